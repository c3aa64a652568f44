"""The one list of adapter cores. Each core file registers itself once (`register_core`): its
canonical name, aliases, config class and delta class. CLI choices, app dropdowns, the vision
method parser and the file readers all ask here, so a new core is one new file plus its tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, fields
from typing import Any

from .config import AdapterConfig
from .errors import PeftkitError


@dataclass(frozen=True)
class Core:
    name: str  # canonical: the name written into adapter files
    config: type[AdapterConfig]
    delta: type  # a `delta.Delta` subclass
    aliases: tuple[str, ...] = ()
    summary: str = ""
    label: str = ""  # how apps show it ("LoKr"); the name when empty

    @property
    def uses_rank(self) -> bool:
        return "r" in {f.name for f in fields(self.config)}

    def make_config(self, targets: list[str], **options: Any) -> AdapterConfig:
        """A config from the options users give every core (`rank`, `alpha`, `block_size`, ...);
        options this core has no field for are dropped, `rank` fills the field `r`, None means
        the core's default."""
        names = {f.name for f in fields(self.config)}
        if "rank" in options:
            options.setdefault("r", options.pop("rank"))
        kept = {k: v for k, v in options.items() if k in names and v is not None}
        return self.config(targets=targets, **kept)


_CORES: dict[str, Core] = {}
_NAMES: dict[str, str] = {}
_discovered = False


def register_core(
    name: str,
    config: type[AdapterConfig],
    delta: type,
    aliases: tuple[str, ...] = (),
    summary: str = "",
    label: str = "",
) -> Core:
    entry = Core(name, config, delta, tuple(aliases), summary, label or name)
    for n in (name, *aliases):
        if _NAMES.get(n, name) != name:
            raise PeftkitError(f"adapter core name {n!r} is registered twice")
        _NAMES[n] = name
    config.method = name
    _CORES[name] = entry
    return entry


def _discover() -> None:
    # Cores register on import; importing every module of this package (not training/) finds
    # them all without a second list to keep in step.
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = __name__.rsplit(".", 1)[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if not info.ispkg:
            importlib.import_module(f"{package}.{info.name}")


def core(name: str) -> Core:
    """The core called `name` (canonical or alias), e.g. core("lokr").config is KronConfig."""
    _discover()
    if name not in _NAMES:
        raise PeftkitError(
            f"unknown adapter core {name!r}: choose one of {', '.join(core_names(aliases=True))}"
        )
    return _CORES[_NAMES[name]]


def core_of(config: AdapterConfig) -> Core:
    _discover()
    for entry in _CORES.values():
        if type(config) is entry.config:
            return entry
    raise PeftkitError(f"no adapter core for config type {type(config).__name__}")


def core_names(aliases: bool = False) -> list[str]:
    """Canonical names, sorted; with `aliases`, every accepted name (for CLI choices)."""
    _discover()
    return sorted(_NAMES if aliases else _CORES)


def canonical(name: str) -> str:
    return core(name).name
