"""LoRA files in the three layouts people exchange (Textual Inversion files: ti_format.py):

| format   | keys (per module)                                        | scaling                          |
|----------|----------------------------------------------------------|----------------------------------|
| peftkit  | `<module>.A`, `<module>.B` + metadata (config, base)      | config alpha / r                 |
| diffusers| `unet.<module>.lora_A.weight`, `.lora_B.weight` (peft)   | folded into lora_B (alpha = r)   |
| kohya    | `lora_unet_<module_with_underscores>.lora_down.weight`,   | `.alpha` tensor: alpha / r       |
|          | `.lora_up.weight`, `.alpha`; text encoders `lora_te_`,    |                                  |
|          | SDXL `lora_te1_` / `lora_te2_`                            |                                  |

Every reader turns a file into one neutral form, `LoraSet` = {component: {module: (A, B, alpha)}}
with delta = (alpha / r) B A, and every writer takes that form, so any format converts to any other.

    save_diffusers_lora({"unet": handle}, "out/pytorch_lora_weights.safetensors")
    pipe.load_lora_weights("out", weight_name="pytorch_lora_weights.safetensors")   # plain diffusers
    handles = load_lora_file({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "some_kohya.safetensors")
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..common_kernels.adapter_file import base_shapes, read_tensors, save_tensors
from ..common_kernels.errors import PeftkitError
from ..common_kernels.inject import AdapterHandle, candidate_modules, fingerprint, inject
from ..common_kernels.lora import LoRAConfig

LoraSet = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
# Multi-word segments of diffusers UNet and CLIP module names: lets a kohya name, whose dots became
# underscores, be split back into a module path when no model is at hand (file-only conversion).
_SEGMENTS = {
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "proj_in",
    "proj_out",
    "conv_in",
    "conv_out",
    "conv_shortcut",
    "time_emb_proj",
    "time_embedding",
    "linear_1",
    "linear_2",
    "add_embedding",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "text_projection",
    "add_k_proj",
    "add_v_proj",
    "conv_norm_out",
}
_KOHYA_PREFIX = {
    "unet": "unet",
    "te": "text_encoder",
    "te1": "text_encoder",
    "te2": "text_encoder_2",
}
_OLD_PROCESSOR = {
    "to_q_lora": "to_q",
    "to_k_lora": "to_k",
    "to_v_lora": "to_v",
    "to_out_lora": "to_out.0",
}
_OLD_TEXT = {
    "to_q_lora": "q_proj",
    "to_k_lora": "k_proj",
    "to_v_lora": "v_proj",
    "to_out_lora": "out_proj",
}


# ---------------------------------------------------------------- neutral form <-> handles
def _canonical(component: str, module: str) -> str:
    # transformers 5 dropped CLIPTextModel's `text_model` wrapper; files keep the older, longer names,
    # which every diffusers version reads (newer ones strip the prefix).
    if component.startswith("text_encoder") and not module.startswith("text_model."):
        return "text_model." + module
    return module


def _local(component: str, module: str, model: nn.Module | None) -> str:
    """A canonical name as `model` spells it (without `text_model.` on transformers >= 5 CLIP)."""
    if component.startswith("text_encoder") and module.startswith("text_model."):
        flat = not hasattr(model, "text_model") if model is not None else _clip_is_flat()
        if flat:
            return module.removeprefix("text_model.")
    return module


@functools.cache
def _clip_is_flat() -> bool:
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = CLIPTextConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=4,
    )
    return not hasattr(CLIPTextModel(tiny), "text_model")


def localize(lora: LoraSet, components: dict[str, nn.Module] | None = None) -> LoraSet:
    """Module names as the given models (or the installed transformers, without models) spell them."""
    return {
        c: {_local(c, m, (components or {}).get(c)): v for m, v in entries.items()}
        for c, entries in lora.items()
    }


def lora_set_of(handles: dict[str, AdapterHandle]) -> LoraSet:
    """The LoRA weights of peftkit handles, keyed by component; refuses other cores."""
    out: LoraSet = {}
    for component, handle in handles.items():
        if handle.config.method != "lora":
            # diffusers reads LoKr (peft `lokr_w1` keys) only for Flux-family pipelines, not SD/SDXL.
            raise PeftkitError(
                f"component {component!r} holds a {handle.config.method!r} adapter, but diffusers' SD/SDXL "
                "load_lora_weights and kohya files only carry LoRA: merge it into the base (handle.merge(), then "
                "save the model) or keep the peftkit format (save_adapter)"
            )
        out[component] = {}
        for module, layer in handle.layers.items():
            delta = layer.deltas[handle.name]
            a, b = delta.A.detach().cpu(), delta.B.detach().cpu()
            out[component][_canonical(component, module)] = (a, b, delta.scaling * a.shape[0])
    return out


def _config_for(entries: dict[str, tuple[torch.Tensor, torch.Tensor, float]]):
    """One LoRAConfig for a component's modules plus the tensors it loads. Modules of other rank or
    alpha are zero-padded to the largest rank with their scaling folded into B, which is exact."""
    shapes = Counter((a.shape[0], alpha) for a, _, alpha in entries.values())
    targets = [f"re:{re.escape(m)}" for m in sorted(entries)]
    if len(shapes) == 1:
        ((r, alpha),) = shapes
        state = {}
        for m, (a, b, _) in entries.items():
            state[f"{m}.A"], state[f"{m}.B"] = a, b
        return LoRAConfig(targets=targets, r=r, alpha=float(alpha)), state
    r = max(a.shape[0] for a, _, _ in entries.values())
    state = {}
    for m, (a, b, alpha) in entries.items():
        k = a.shape[0]
        pad_a = torch.zeros((r,) + tuple(a.shape[1:]), dtype=a.dtype)
        pad_b = torch.zeros((b.shape[0], r) + tuple(b.shape[2:]), dtype=b.dtype)
        pad_a[:k], pad_b[:, :k] = a, b * (alpha / k)
        state[f"{m}.A"], state[f"{m}.B"] = pad_a, pad_b
    return LoRAConfig(targets=targets, r=r, alpha=float(r)), state


def check_fits(component: str, model: nn.Module, entries, path) -> None:
    modules = dict(candidate_modules(model))
    for m in sorted(entries):
        a, b, _ = entries[m]
        if m not in modules:
            raise PeftkitError(
                f"LoRA file {str(path)!r} has weights for {component} module {m!r}, which this model "
                "does not have: the file was made for another base model"
            )
        weight = getattr(modules[m], "weight", None)
        if type(modules[m]).__name__ not in ("Linear", "Conv2d") or weight is None:
            raise PeftkitError(
                f"LoRA file {str(path)!r} targets {component} module {m!r} of type "
                f"{type(modules[m]).__name__}; only Linear and Conv2d layers take LoRA"
            )
        if weight.shape[0] != b.shape[0] or tuple(weight.shape[1:]) != tuple(a.shape[1:]):
            raise PeftkitError(
                f"LoRA file {str(path)!r} does not fit {component} module {m!r}: its weight is {tuple(weight.shape)} "
                f"here but the file's factors need ({b.shape[0]}, {', '.join(map(str, a.shape[1:]))}): the file "
                "was made for another base model"
            )


def load_lora_file(
    components: dict[str, nn.Module], path: str | Path, name: str = "default", scale: float = 1.0
) -> dict[str, AdapterHandle]:
    """Inject the LoRA stored at `path` (peftkit, diffusers/peft, kohya or old diffusers format,
    detected from the keys) into `components` ({"unet": ..., "text_encoder": ...}).

    Example: handles = load_lora_file({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "lora.safetensors")
    """
    lora = localize(read_lora(path, components), components)
    handles = {}
    for component, entries in lora.items():
        if component not in components:
            raise PeftkitError(
                f"LoRA file {str(path)!r} has weights for {component!r} but only "
                f"{sorted(components)} were given: pass that component too"
            )
        check_fits(component, components[component], entries, path)
    for component, entries in lora.items():
        config, state = _config_for(entries)
        handle = inject(components[component], config, name=name, scale=scale)
        handle.load_state_dict(state)
        handles[component] = handle
    return handles


# ---------------------------------------------------------------- reading
def read_lora(
    path: str | Path, components: dict[str, nn.Module] | None = None, component: str | None = None
) -> LoraSet:
    """Any supported LoRA file as a `LoraSet`. `components` (optional) resolves kohya names exactly;
    `component` names the target of files that do not say (peft state dicts, peftkit files)."""
    tensors, metadata = read_tensors(path)
    keys = list(tensors)
    if "config" in metadata:
        return _read_peftkit(tensors, metadata, path, component or _only(components))
    if any(
        k.startswith("lora_") and (k.endswith(".lora_down.weight") or k.endswith(".alpha"))
        for k in keys
    ):
        return _read_kohya(tensors, path, components)
    if any(".lora_A." in k for k in keys):
        return _read_peft(tensors, metadata, path, component or _only(components))
    if any(re.search(r"\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$", k) for k in keys):
        return _read_old_diffusers(tensors, path)
    raise PeftkitError(
        f"{str(path)!r} is not a LoRA file peftkit knows (keys look like {keys[:3]}): expected "
        "peftkit, diffusers/peft ('.lora_A.weight') or kohya ('lora_unet_...lora_down.weight') keys"
    )


def _only(components) -> str:
    """The component a file that names none belongs to: the only one given, else the UNet."""
    return next(iter(components)) if components and len(components) == 1 else "unet"


def _read_peftkit(tensors, metadata, path, default_component) -> LoraSet:
    from ..common_kernels.config import AdapterConfig

    config = AdapterConfig.from_json(metadata["config"])
    if config.method != "lora":
        raise PeftkitError(
            f"{str(path)!r} holds a peftkit {config.method!r} adapter: only LoRA converts to "
            "diffusers/kohya files; load it with peftkit.common_kernels.load_adapter"
        )
    # dreambooth.save_concept names the second SDXL text encoder "text_encoder1".
    stored = {"text_encoder1": "text_encoder_2"}.get(
        metadata.get("component", ""), metadata.get("component")
    )
    component = stored or default_component
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    alpha = config.scaling * config.r
    return {
        component: {
            _canonical(component, m): (tensors[f"{m}.A"], tensors[f"{m}.B"], alpha) for m in modules
        }
    }


def _peft_alpha(module: str, r: int, meta: dict) -> float:
    """peft's rule: an alpha_pattern entry matching the module's name tail, else lora_alpha; without
    metadata diffusers takes alpha = r."""
    alpha = meta.get("lora_alpha", r) if meta else r
    for pattern, value in (meta.get("alpha_pattern") or {}).items() if meta else ():
        if re.match(rf"(.*\.)?({pattern.lstrip('^')})$", module):
            alpha = value
    if meta and meta.get("use_rslora"):
        alpha = alpha * r / r**0.5  # rsLoRA scales by alpha/sqrt(r); express it as alpha' / r
    return float(alpha)


def _read_peft(tensors, metadata, path, default_component) -> LoraSet:
    raw = metadata.get("lora_adapter_metadata")
    meta = json.loads(raw) if raw else {}
    out: LoraSet = {}
    for key in tensors:
        if ".lora_A." not in key:
            continue
        stem = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        head, _, rest = stem.partition(".")
        component, module = (head, rest) if head in COMPONENTS else (default_component, stem)
        a, b = tensors[key], tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise PeftkitError(
                f"{str(path)!r} has {key!r} but no matching lora_B: the file is incomplete"
            )
        cmeta = (
            {
                k.removeprefix(component + "."): v
                for k, v in meta.items()
                if k.startswith(component + ".")
            }
            if any(k.startswith(component + ".") for k in meta)
            else meta
        )
        out.setdefault(component, {})[_canonical(component, module)] = (
            a,
            b,
            _peft_alpha(module, a.shape[0], cmeta),
        )
    return out


def _kohya_names(components) -> dict[str, dict[str, str]]:
    names = {}
    for component, model in (components or {}).items():
        names[component] = {
            _canonical(component, n).replace(".", "_"): _canonical(component, n)
            for n, m in candidate_modules(model)
            if type(m).__name__ in ("Linear", "Conv2d")
        }
    return names


def _split_kohya(flat: str) -> str:
    parts, out, i = flat.split("_"), [], 0
    while i < len(parts):
        for width in (3, 2, 1):
            joined = "_".join(parts[i : i + width])
            if width == 1 or joined in _SEGMENTS:
                out.append(joined)
                i += width
                break
    return ".".join(out)


def _read_kohya(tensors, path, components) -> LoraSet:
    exact = _kohya_names(components)
    out: LoraSet = {}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        found = re.match(r"lora_(unet|te1|te2|te)_(.+)$", stem)
        if not found:
            raise PeftkitError(
                f"kohya key {key!r} in {str(path)!r} has no lora_unet_/lora_te_ prefix: unsupported"
            )
        component = _KOHYA_PREFIX[found.group(1)]
        flat = found.group(2)
        module = exact.get(component, {}).get(flat) or _split_kohya(flat)
        up = tensors.get(stem + ".lora_up.weight")
        if up is None:
            raise PeftkitError(
                f"{str(path)!r} has {key!r} but no lora_up weight: the file is incomplete"
            )
        down = tensors[key]
        alpha = tensors.get(stem + ".alpha")
        out.setdefault(component, {})[module] = (
            down,
            up,
            float(alpha) if alpha is not None else float(down.shape[0]),
        )
    if not out:
        raise PeftkitError(
            f"{str(path)!r} has kohya-style keys but no '.lora_down.weight' tensors (LoCon/LoHa/LoKr "
            "kohya files are not supported)"
        )
    return out


def _read_old_diffusers(tensors, path) -> LoraSet:
    out: LoraSet = {}
    for key, down in tensors.items():
        found = re.match(
            r"(?:(unet|text_encoder|text_encoder_2)\.)?(.+?)(?:\.processor)?\.(to_[qkv]_lora|to_out_lora)"
            r"\.down\.weight$",
            key,
        )
        if not found:
            continue
        component, parent, kind = found.group(1) or "unet", found.group(2), found.group(3)
        table = _OLD_PROCESSOR if component == "unet" else _OLD_TEXT
        up = tensors[key.replace(".down.weight", ".up.weight")]
        alpha = tensors.get(key.replace(f".{kind}.down.weight", f".{kind}.alpha"))
        out.setdefault(component, {})[_canonical(component, f"{parent}.{table[kind]}")] = (
            down,
            up,
            float(alpha) if alpha is not None else float(down.shape[0]),
        )
    return out


# ---------------------------------------------------------------- writing
def diffusers_tensors(lora: LoraSet) -> dict[str, torch.Tensor]:
    # Scaling goes into lora_B: with no alphas in a file, diffusers sets alpha = r per module (scale 1).
    out = {}
    for component, entries in lora.items():
        for m, (a, b, alpha) in entries.items():
            out[f"{component}.{m}.lora_A.weight"] = a.contiguous()
            out[f"{component}.{m}.lora_B.weight"] = (b * (alpha / a.shape[0])).contiguous()
    return out


def kohya_tensors(lora: LoraSet) -> dict[str, torch.Tensor]:
    sdxl = "text_encoder_2" in lora
    prefixes = {"unet": "unet", "text_encoder": "te1" if sdxl else "te", "text_encoder_2": "te2"}
    out = {}
    for component, entries in lora.items():
        if component not in prefixes:
            raise PeftkitError(
                f"kohya files name only unet/text_encoder/text_encoder_2, not {component!r}"
            )
        for m, (a, b, alpha) in entries.items():
            stem = f"lora_{prefixes[component]}_{m.replace('.', '_')}"
            out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = (
                a.contiguous(),
                b.contiguous(),
            )
            out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def save_diffusers_lora(handles: dict[str, AdapterHandle], path: str | Path) -> Path:
    """One safetensors file that `pipe.load_lora_weights(folder, weight_name=file)` loads (SD / SDXL).

    Example: save_diffusers_lora({"unet": unet_handle, "text_encoder": te_handle}, "out/" + DIFFUSERS_FILE)
    """
    return save_tensors(path, diffusers_tensors(lora_set_of(handles)), {"format": "pt"})


def save_kohya_lora(handles: dict[str, AdapterHandle], path: str | Path) -> Path:
    """kohya-ss / A1111 style file (`lora_unet_..`, `lora_te_..`, `.alpha`)."""
    return save_tensors(
        path, kohya_tensors(lora_set_of(handles)), {"ss_network_module": "networks.lora"}
    )


def _skeleton(entries) -> nn.Module:
    """An empty module tree (meta tensors) with the file's layers, so peftkit metadata (fingerprint,
    base shapes) can be computed from a file alone."""
    root = nn.Module()
    for m, (a, b, _) in entries.items():
        parent = root
        *path, leaf = m.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        layer = (
            nn.Linear(a.shape[1], b.shape[0], device="meta")
            if a.dim() == 2
            else nn.Conv2d(a.shape[1], b.shape[0], tuple(a.shape[2:]), device="meta")
        )
        parent.add_module(leaf, layer)
    return root


def peftkit_tensors(entries, component: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A peftkit adapter file's tensors and metadata for one component (what `load_adapter` reads)."""
    from .. import __version__

    entries = localize({component: entries})[component]
    config, state = _config_for(entries)
    skeleton, names = _skeleton(entries), sorted(entries)
    metadata = {
        "peftkit_version": __version__,
        "method": "lora",
        "config": config.to_json(),
        "base_model": "",
        "base_fingerprint": fingerprint(skeleton, names),
        "base_shapes": json.dumps(base_shapes(skeleton, names)),
        "adapter_name": "default",
        "component": component,
    }
    return state, metadata
