"""peft and diffusers layouts: `.lora_A.weight`, `.lora_B.weight` (+ `.lora_magnitude_vector`, DoRA).

The scale comes from peft's config: `adapter_config.json` beside a `save_pretrained` folder's
weights, or diffusers' `lora_adapter_metadata`; alpha_pattern then lora_alpha, over r or sqrt(r)
(`use_rslora`). diffusers files without metadata use diffusers' own rule, alpha = r (its writers
fold the scale into lora_B, as ours do). peft-saved weights without their config are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...common_kernels.errors import PeftkitError
from .neutral import COMPONENTS, AdapterSet, Entry, canonical

PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
OLD_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v"}
OLD_PROCESSOR["to_out_lora"] = "to_out.0"
OLD_TEXT = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj"}
OLD_TEXT["to_out_lora"] = "out_proj"


def is_peft(keys) -> bool:
    return any(".lora_A." in k for k in keys)


def is_old_diffusers(keys) -> bool:
    return any(re.search(r"\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$", k) for k in keys)


def peft_config_of(path: Path, metadata: dict, keys) -> dict | None:
    """peft's LoraConfig fields that set the scale; None where diffusers' alpha = r rule applies."""
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        return json.loads(raw)
    beside = path.parent / PEFT_CONFIG
    if beside.is_file():
        return json.loads(beside.read_text())
    if any(k.startswith("base_model.model.") for k in keys):
        raise PeftkitError(
            f"{str(path)!r} holds peft weights (base_model.model.* keys) but {str(beside)!r} is "
            "missing: its lora_alpha, alpha_pattern and use_rslora set the scale, so the file "
            "cannot be read without it; put the adapter_config.json saved with it beside the file"
        )
    return None


def peft_scale(module: str, r: int, meta: dict | None) -> float:
    """peft's rule: an alpha_pattern entry matching the module's name tail, else lora_alpha, over
    r (sqrt(r) with use_rslora); without a config diffusers takes alpha = r."""
    if meta is None:
        return 1.0
    alpha = meta.get("lora_alpha", r)
    for pattern, value in (meta.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern.lstrip('^')})$", module):
            alpha = value
    return float(alpha) / (r**0.5 if meta.get("use_rslora") else r)


def _component_meta(meta: dict | None, component: str) -> dict | None:
    # diffusers stores one metadata dict per component, as `unet.lora_alpha`-style keys.
    if meta and any(k.startswith(component + ".") for k in meta):
        return {
            k.removeprefix(component + "."): v
            for k, v in meta.items()
            if k.startswith(component + ".")
        }
    return meta


def read_peft(tensors, metadata, path, default_component) -> AdapterSet:
    meta = peft_config_of(Path(path), metadata, tensors)
    out: AdapterSet = {}
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
        found = {"A": a, "B": b}
        magnitude = tensors.get(key.split(".lora_A.")[0] + ".lora_magnitude_vector")
        if magnitude is not None:
            found["magnitude"] = magnitude.flatten()
        scale = peft_scale(module, a.shape[0], _component_meta(meta, component))
        entry = Entry("dora" if magnitude is not None else "lora", found, scale)
        out.setdefault(component, {})[canonical(component, module)] = entry
    return out


def read_peft_folder(folder: Path):
    """The weights file of a peft `save_pretrained` folder, refusing one without its config."""
    weights, config = folder / PEFT_FILE, folder / PEFT_CONFIG
    if not weights.is_file():
        raise PeftkitError(
            f"folder {str(folder)!r} has no {PEFT_FILE}: give the .safetensors file itself, or a "
            "peft save_pretrained folder"
        )
    if not config.is_file():
        raise PeftkitError(
            f"peft folder {str(folder)!r} has no {PEFT_CONFIG}: it sets lora_alpha, so the scale "
            "cannot be determined; put the adapter_config.json saved with the weights back"
        )
    return weights


def read_old_diffusers(tensors, path) -> AdapterSet:
    out: AdapterSet = {}
    for key, down in tensors.items():
        found = re.match(
            r"(?:(unet|text_encoder|text_encoder_2)\.)?(.+?)(?:\.processor)?\.(to_[qkv]_lora|to_out_lora)"
            r"\.down\.weight$",
            key,
        )
        if not found:
            continue
        component, parent, kind = found.group(1) or "unet", found.group(2), found.group(3)
        table = OLD_PROCESSOR if component == "unet" else OLD_TEXT
        up = tensors[key.replace(".down.weight", ".up.weight")]
        alpha = tensors.get(key.replace(f".{kind}.down.weight", f".{kind}.alpha"))
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        module = canonical(component, f"{parent}.{table[kind]}")
        out.setdefault(component, {})[module] = Entry("lora", {"A": down, "B": up}, scale)
    return out


def diffusers_tensors(adapters: AdapterSet) -> dict[str, torch.Tensor]:
    # Scaling goes into lora_B: with no alphas in a file, diffusers sets alpha = r per module (scale
    # 1). DoRA normalizes W + s B A, so folding s into B is exact there too.
    out = {}
    for component, entries in adapters.items():
        for m, entry in entries.items():
            if entry.core not in ("lora", "dora"):
                raise PeftkitError(
                    f"component {component!r} holds a {entry.core!r} adapter, but diffusers' SD/SDXL "
                    "load_lora_weights only carries LoRA and DoRA: write the kohya/LyCORIS format "
                    "(--to kohya), which carries every core, or keep the peftkit format (save_adapter)"
                )
            a, b = entry.tensors["A"], entry.tensors["B"]
            out[f"{component}.{m}.lora_A.weight"] = a.contiguous()
            out[f"{component}.{m}.lora_B.weight"] = (b * entry.scale).contiguous()
            if "magnitude" in entry.tensors:
                shape = (-1,) if a.dim() == 2 else (1, -1, 1, 1)  # peft's layout for Conv2d
                out[f"{component}.{m}.lora_magnitude_vector"] = (
                    entry.tensors["magnitude"].reshape(shape).contiguous()
                )
    return out
