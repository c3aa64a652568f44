"""Adapter configs: one dataclass per method, validated on creation, round-tripping through JSON.

Every method config inherits the targeting fields from `AdapterConfig`; the core registry
(registry.py) maps the method name stored in files back to the class.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from .errors import PeftkitError


@dataclass
class AdapterConfig:
    """Which modules an adapter wraps.

    `targets` are patterns on dotted module names: shell globs (`"*.to_q"`, `"blocks.*.attn.qkv"`),
    or regular expressions prefixed with `re:` (`"re:.*attn[12]\\.to_[qkv]$"`). A glob also matches
    the name's last components, so `"qkv"` matches `"blocks.0.attn.qkv"`. `target_types` restricts
    matches to module classes by name (`"Linear"`, `"Conv2d"`); with no `targets`, every module of
    those types matches. `exclude` patterns remove matches.
    """

    method: ClassVar[str] = ""
    targets: list[str] = field(default_factory=list)
    target_types: list[str] = field(default_factory=lambda: ["Linear", "Conv2d"])
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.target_types, str):
            self.target_types = [self.target_types]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        allowed = {"Linear", "Conv2d"}
        bad = [t for t in self.target_types if t not in allowed]
        if bad:
            raise PeftkitError(f"target_types {bad} not supported: use any of {sorted(allowed)}")
        if not self.targets and not self.target_types:
            raise PeftkitError(
                "targets and target_types are both empty: name at least one module pattern or type"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AdapterConfig:
        data = dict(data)
        from .registry import core  # registry imports this module

        method = data.pop("method", None)
        if not isinstance(method, str):
            raise PeftkitError(f"adapter config names no method (got {method!r})")
        cls = core(method).config
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise PeftkitError(
                f"{cls.__name__} has no field(s) {unknown}: allowed fields are {sorted(names)}"
            )
        return cls(**data)

    @staticmethod
    def from_json(text: str) -> AdapterConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PeftkitError(f"adapter config is not valid JSON: {err}") from None
        return AdapterConfig.from_dict(data)


def check_positive(cls_name: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise PeftkitError(f"{cls_name}.{name} must be {bound}, got {value}")


def check_probability(cls_name: str, name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise PeftkitError(f"{cls_name}.{name} must be in [0, 1), got {value}")
