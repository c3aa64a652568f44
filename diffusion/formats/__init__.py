"""Adapter files in the layouts people exchange, read and written through one neutral form:

| format    | keys (per module)                                           | scale                         |
|-----------|-------------------------------------------------------------|-------------------------------|
| peftkit   | `<module>.<param>` + metadata (config, base)                | the config's                  |
| diffusers | `unet.<module>.lora_A.weight`, `.lora_B.weight` (+ DoRA's   | folded into lora_B (alpha = r)|
|  / peft   | `.lora_magnitude_vector`); peft folders: adapter_config.json| lora_alpha, alpha_pattern     |
| kohya /   | `lora_unet_<module_with_underscores>.lora_down.weight`, LoHa| `.alpha` / rank               |
|  LyCORIS  | `.hada_w1_a`.., LoKr `.lokr_w1`.., DoRA `.dora_scale`       |                               |

Readers return `AdapterSet` = {component: {module: Entry}} (neutral.py); writers take it, so any
format converts to any other that can carry the core.

    save_diffusers_lora({"unet": handle}, "out/pytorch_lora_weights.safetensors")
    handles = load_lora_file({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "lokr.safetensors")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...common_kernels.adapter_file import base_shapes, read_tensors, save_tensors
from ...common_kernels.config import AdapterConfig
from ...common_kernels.delta import Geometry
from ...common_kernels.errors import PeftkitError
from ...common_kernels.inject import AdapterHandle, fingerprint
from .kohya import is_kohya, kohya_metadata, kohya_tensors, read_kohya
from .neutral import (
    COMPONENTS,
    AdapterSet,
    Entry,
    adapter_set_of,
    canonical,
    check_fits,
    config_and_state,
    file_weight_shape,
    load_adapter_set,
    localize,
)
from .peft import (
    diffusers_tensors,
    is_old_diffusers,
    is_peft,
    read_old_diffusers,
    read_peft,
    read_peft_folder,
)

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
__all__ = [
    "COMPONENTS",
    "DIFFUSERS_FILE",
    "AdapterSet",
    "Entry",
    "adapter_set_of",
    "adapters_from",
    "check_fits",
    "detect_format",
    "diffusers_tensors",
    "kohya_metadata",
    "kohya_tensors",
    "load_lora_file",
    "localize",
    "peftkit_tensors",
    "read_adapters",
    "read_tensors",
    "save_diffusers_lora",
    "save_kohya_lora",
]


def _only(components) -> str:
    """The component a file that names none belongs to: the only one given, else the UNet."""
    return next(iter(components)) if components and len(components) == 1 else "unet"


def detect_format(keys, metadata: dict, path: str | Path = "") -> str:
    """'peftkit', 'kohya', 'peft' (peft/diffusers) or 'old-diffusers', from keys and metadata."""
    if "config" in metadata:
        return "peftkit"
    if is_peft(keys):
        return "peft"
    if is_old_diffusers(keys):
        return "old-diffusers"
    if is_kohya(keys):
        return "kohya"
    raise PeftkitError(
        f"{str(path)!r} is not an adapter file peftkit knows (keys look like {list(keys)[:3]}): "
        "expected peftkit, "
        "diffusers/peft ('.lora_A.weight') or kohya/LyCORIS ('lora_unet_...lora_down.weight') keys"
    )


def read_adapters(
    path: str | Path, components: dict[str, nn.Module] | None = None, component: str | None = None
) -> AdapterSet:
    """Any supported adapter file (or peft folder) in the neutral form. `components` (optional)
    resolves kohya names exactly; `component` names the target of files that do not say."""
    path = Path(path)
    if path.is_dir():
        path = read_peft_folder(path)
    tensors, metadata = read_tensors(path)
    return adapters_from(tensors, metadata, path, components, component)


def adapters_from(tensors, metadata, path, components=None, component=None) -> AdapterSet:
    """The neutral form of a file's tensors (real, or meta tensors with real `.alpha` values)."""
    default = component or _only(components)
    kind = detect_format(tensors, metadata, path)
    if kind == "peftkit":
        return _read_peftkit(tensors, metadata, default)
    if kind == "peft":
        return read_peft(tensors, metadata, path, default)
    if kind == "old-diffusers":
        return read_old_diffusers(tensors, path)
    return read_kohya(tensors, path, components, default)


def _read_peftkit(tensors, metadata, default_component) -> AdapterSet:
    config = AdapterConfig.from_json(metadata["config"])
    # dreambooth.save_concept names the second SDXL text encoder "text_encoder1".
    stored = {"text_encoder1": "text_encoder_2"}.get(
        metadata.get("component", ""), metadata.get("component")
    )
    component = stored or default_component
    options = {k: v for k, v in config.to_dict().items() if k not in ("method", "targets", "r")}
    scale = float(getattr(config, "scaling", 1.0))
    entries: dict[str, Entry] = {}
    for key, value in tensors.items():
        module, _, param = key.rpartition(".")
        entry = entries.setdefault(module, Entry(config.method, {}, scale, options))
        entry.tensors[param] = value
    return {component: {canonical(component, m): e for m, e in entries.items()}}


def load_lora_file(
    components: dict[str, nn.Module], path: str | Path, name: str = "default", scale: float = 1.0
) -> dict[str, AdapterHandle]:
    """Inject the adapter stored at `path` (peftkit, diffusers/peft file or folder, kohya/LyCORIS
    LoRA, LoCon, LoHa, LoKr, DoRA; detected from the keys) into `components`.

    Example: handles = load_lora_file({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "lora.safetensors")
    """
    return load_adapter_set(read_adapters(path, components), components, path, name, scale)


def save_diffusers_lora(handles: dict[str, AdapterHandle], path: str | Path) -> Path:
    """One safetensors file that `pipe.load_lora_weights(folder, weight_name=file)` loads (SD /
    SDXL; LoRA and DoRA).

    Example: save_diffusers_lora({"unet": unet_handle, "text_encoder": te_handle}, "out/" + DIFFUSERS_FILE)
    """
    return save_tensors(path, diffusers_tensors(adapter_set_of(handles)), {"format": "pt"})


def save_kohya_lora(handles: dict[str, AdapterHandle], path: str | Path) -> Path:
    """kohya-ss / A1111 / LyCORIS file (`lora_unet_..`, `lora_te_..`, `.alpha`), any core."""
    adapters = adapter_set_of(handles)
    return save_tensors(path, kohya_tensors(adapters), kohya_metadata(adapters))


def file_geometry(entry: Entry, module: str) -> Geometry:
    """A layer's geometry from its base weight or, without one, from the file's tensors."""
    shape = tuple(entry.base.shape) if entry.base is not None else file_weight_shape(entry)
    # Factors kept as matrices (LoHa, a low-rank LoKr W2) read the same on a Linear and a Conv2d.
    pinned = entry.base is not None or "A" in entry.tensors or "W2" in entry.tensors
    if shape is None or len(shape) not in (2, 4) or not pinned:
        raise PeftkitError(
            f"module {module!r}: a {entry.core!r} file does not say the base layer's shape on its "
            "own: pass --base (the model the adapter was made for)"
        )
    if len(shape) == 2:
        return Geometry("linear", shape[1], shape[0])
    return Geometry("conv2d", shape[1], shape[0], shape[2:])


def _skeleton(geometries: dict[str, Geometry]) -> nn.Module:
    """An empty module tree (meta tensors) with the file's layers, so peftkit metadata (fingerprint,
    base shapes) can be computed from a file alone."""
    root = nn.Module()
    for m, g in geometries.items():
        parent = root
        *path, leaf = m.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        layer = (
            nn.Linear(g.in_features, g.out_features, device="meta")
            if g.kind == "linear"
            else nn.Conv2d(g.in_features, g.out_features, g.kernel_size, device="meta")
        )
        parent.add_module(leaf, layer)
    return root


def peftkit_tensors(
    entries: dict[str, Entry], component: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A peftkit adapter file's tensors and metadata for one component (what `load_adapter` reads)."""
    from ... import __version__

    entries = localize({component: entries})[component]
    geometries = {m: file_geometry(e, m) for m, e in entries.items()}
    config, state = config_and_state(entries, geometries)
    skeleton, names = _skeleton(geometries), sorted(entries)
    metadata = {
        "peftkit_version": __version__,
        "method": config.method,
        "config": config.to_json(),
        "base_model": "",
        "base_fingerprint": fingerprint(skeleton, names),
        "base_shapes": json.dumps(base_shapes(skeleton, names)),
        "adapter_name": "default",
        "component": component,
    }
    return state, metadata
