"""kohya / A1111 / LyCORIS files: `lora_unet_<module_with_underscores>.<suffix>` plus `.alpha`.

Each core's Delta names its kohya suffixes (`kohya_names`: LoRA lora_down/lora_up, DoRA + dora_scale,
LoHa hada_w*_a/b, LoKr lokr_w1(_a/_b)/lokr_w2(_a/_b), LyCORIS OFT/BOFT oft_blocks + rescale; Tucker
convs `lora_mid`, `hada_t1/t2`, `lokr_t2` are read, folded into the plain pair, never written); the scale is alpha / rank, rank as LyCORIS reads it (1 for a LoKr with both
factors full; alpha = rank when `.alpha` is absent), except where `.alpha` is a setting
(`kohya_alpha`: LyCORIS OFT's constraint). Cores with no layout of their own (peftkit's OFT and
BOFT act on inputs) are written as LyCORIS' `full` weight difference (`.diff`).
"""

from __future__ import annotations

import re

import torch

from ...common_kernels.delta import Geometry
from ...common_kernels.errors import PeftkitError
from ...common_kernels.inject import candidate_modules
from ...common_kernels.registry import core, core_names
from .neutral import AdapterSet, Entry, canonical, config_and_state

KOHYA_PREFIX = {
    "unet": "unet",
    "te": "text_encoder",
    "te1": "text_encoder",
    "te2": "text_encoder_2",
}
# LyCORIS' own networks (create_lycoris without kohya's preset) name modules `lycoris_<module>`.
STEM = re.compile(r"(lora|lycoris)_(?:(unet|te1|te2|te)_)?(.+)$")
# Multi-word segments of diffusers UNet and CLIP module names: lets a kohya name, whose dots became
# underscores, be split back into a module path when no model is at hand (file-only conversion).
SEGMENTS = {
    *("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v"),
    *("to_out", "proj_in", "proj_out", "conv_in", "conv_out", "conv_shortcut", "time_emb_proj"),
    *("time_embedding", "linear_1", "linear_2", "add_embedding", "text_model", "self_attn"),
    *("q_proj", "k_proj", "v_proj", "out_proj", "text_projection", "add_k_proj", "add_v_proj"),
    *("conv_norm_out",),
}
# Tensors whose file layout differs from the core's: DoRA's magnitude is (d_out, 1, ...) in LyCORIS.
TO_FILE = {
    "magnitude": lambda t, e: t.reshape(-1, *[1] * (next(iter(e.tensors.values())).dim() - 1))
}
FROM_FILE = {"magnitude": lambda t: t.flatten()}
# Suffixes of LyCORIS layouts peftkit has no core for, and what to say about them.
UNSUPPORTED = {
    "oft_diag": "OFT blocks of LyCORIS before 2.0",
    "diff": "LyCORIS 'full' weight differences",
    "w_norm": "LyCORIS norm layers",
}


def kohya_layouts() -> dict[str, dict[str, str]]:
    """{core name: {parameter: kohya suffix}} for every registered core that has a kohya layout."""
    return {
        n: core(n).delta.kohya_names
        for n in core_names()
        if getattr(core(n).delta, "kohya_names", None)
    }


def is_kohya(keys) -> bool:
    return any(STEM.match(k.split(".", 1)[0]) and "." in k for k in keys) and not any(
        k.startswith(("unet.", "transformer.", "text_encoder")) for k in keys
    )


def _exact_names(components) -> dict[str, dict[str, str]]:
    return {
        component: {
            canonical(component, n).replace(".", "_"): canonical(component, n)
            for n, m in candidate_modules(model)
            if type(m).__name__ in ("Linear", "Conv2d")
        }
        for component, model in (components or {}).items()
    }


def _split(flat: str) -> str:
    parts, out, i = flat.split("_"), [], 0
    while i < len(parts):
        for width in (3, 2, 1):
            joined = "_".join(parts[i : i + width])
            if width == 1 or joined in SEGMENTS:
                out.append(joined)
                i += width
                break
    return ".".join(out)


def _core_of(stem: str, found: dict[str, torch.Tensor], path) -> str:
    suffixes = set(found)
    for suffix, what in UNSUPPORTED.items():
        if suffix in suffixes:
            raise PeftkitError(
                f"{str(path)!r} module {stem!r} holds {what} ('.{suffix}'), which peftkit does not "
                "read: merge it into the base with LyCORIS, or export one of "
                f"{', '.join(kohya_layouts())} from LyCORIS"
            )

    def ranks_fit(name: str) -> bool:  # LyCORIS' OFT and BOFT share suffixes, not tensor ranks
        ndim = getattr(core(name).delta, "kohya_ndim", {})
        return all(found[s].dim() == n for s, n in ndim.items() if s in found)

    fits = [
        (len(names), n)
        for n, names in kohya_layouts().items()
        if suffixes - {"alpha"} <= set(names.values()) and ranks_fit(n)
    ]
    if not fits:
        raise PeftkitError(
            f"{str(path)!r} module {stem!r} has tensors {sorted(suffixes)} that match no core "
            f"peftkit knows ({', '.join(kohya_layouts())}); 'dora_scale' on LoHa/LoKr is not "
            "supported (peftkit's DoRA is LoRA-based)"
        )
    return min(fits)[1]


# Factor pairs that only exist together; a file holding one half was cut down or damaged.
PAIRS = (
    ("lora_down.weight", "lora_up.weight"),
    ("hada_w1_a", "hada_w1_b"),
    ("hada_w2_a", "hada_w2_b"),
    ("lokr_w1_a", "lokr_w1_b"),
    ("lokr_w2_a", "lokr_w2_b"),
    ("hada_t1", "hada_t2"),
)


def _check_pairs(stem: str, suffixes: set[str], path) -> None:
    for a, b in PAIRS:
        if (a in suffixes) != (b in suffixes):
            have, missing = (a, b) if a in suffixes else (b, a)
            raise PeftkitError(
                f"{str(path)!r} is incomplete: module {stem!r} has '.{have}' but not '.{missing}'; "
                "the file is damaged or was cut down: export it again"
            )


def read_kohya(tensors, path, components, default_component: str) -> AdapterSet:
    exact = _exact_names(components)
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem, _, suffix = key.partition(".")
        stems.setdefault(stem, {})[suffix] = value
    out: AdapterSet = {}
    for stem, found in stems.items():
        match = STEM.match(stem)
        if not match:
            raise PeftkitError(
                f"kohya key {stem!r} in {str(path)!r} has no lora_unet_/lora_te_/lycoris_ prefix"
            )
        _check_pairs(stem, set(found), path)
        found = _untucker(found)
        name = _core_of(stem, found, path)
        delta_cls = core(name).delta
        names = kohya_layouts()[name]
        ours = {p: FROM_FILE.get(p, lambda t: t)(found[s]) for p, s in names.items() if s in found}
        component = KOHYA_PREFIX[match.group(2)] if match.group(2) else default_component
        flat = match.group(3)
        entry = Entry(name, ours)
        rank = entry.rank
        alpha = found.get("alpha")
        entry.scale = 1.0 if rank is None or alpha is None else float(alpha) / rank
        if hasattr(delta_cls, "file_options"):
            entry.options = delta_cls.file_options(ours)
        if getattr(delta_cls, "kohya_alpha", None):  # `.alpha` is a setting there, not a scale
            entry.options[delta_cls.kohya_alpha] = 0.0 if alpha is None else float(alpha)
        module = exact.get(component, {}).get(flat) or _split(flat)
        out.setdefault(component, {})[canonical(component, module)] = entry
    return out


# LyCORIS' Tucker convs (use_tucker on k x k kernels): core tensor -> (its mode-1 factor, its mode-2
# factor, whether the plain layout keeps conv-shaped factors as LoCon's lora_up/lora_down do).
TUCKER = {
    "lora_mid.weight": ("lora_up.weight", "lora_down.weight", True),
    "hada_t1": ("hada_w1_a", "hada_w1_b", False),
    "hada_t2": ("hada_w2_a", "hada_w2_b", False),
    "lokr_t2": ("lokr_w2_a", "lokr_w2_b", False),
}


def _untucker(found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tucker factors as the plain low-rank pair peftkit holds, exactly and at the same rank.
    LyCORIS builds W[o, c, k] = sum_ij u[i, o] t[i, j, k] d[j, c] (t: (R, R, kh, kw), u: (R, out),
    d: (R, in)); that is u^T (out, R) times t x_2 d (R, in, kh, kw), the pair written here."""
    found = dict(found)
    for name, (up, down, conv_shaped) in TUCKER.items():
        if name not in found:
            continue
        t, u, d = found.pop(name), found[up], found[down]
        folded = torch.einsum("ij...,jc->ic...", t, d.reshape(d.shape[0], -1))
        if conv_shaped:  # LoCon's lora_up is stored as (out, R, 1, 1) already
            found[down] = folded
        else:
            found[up] = u.T.contiguous()
            found[down] = folded.reshape(folded.shape[0], -1)
    return found


def _stem_prefixes(adapters: AdapterSet) -> dict[str, str]:
    sdxl = "text_encoder_2" in adapters
    return {"unet": "unet", "text_encoder": "te1" if sdxl else "te", "text_encoder_2": "te2"}


def weight_difference(entry: Entry, module: str) -> torch.Tensor:
    """W' - W for one layer (the LyCORIS `full` layout), from its base weight."""
    if entry.base is None:
        raise PeftkitError(
            f"a {entry.core!r} adapter has no kohya/LyCORIS layout of its own (LyCORIS' OFT "
            "rotates outputs, peftkit's inputs), so it is written as LyCORIS' 'full' weight "
            f"difference, which needs the base weight of {module!r}: pass --base (convert) or save "
            "from the loaded model; or keep the peftkit format, or the diffusers format for LoRA/DoRA"
        )
    w = entry.base.detach().float().cpu()
    shape = tuple(w.shape)
    geometry = (
        Geometry("linear", shape[1], shape[0])
        if w.dim() == 2
        else Geometry("conv2d", shape[1], shape[0], shape[2:])
    )
    config, state = config_and_state({module: entry}, {module: geometry})
    delta = core(entry.core).delta(geometry, config, module)
    delta.load_state_dict({k.removeprefix(module + "."): v for k, v in state.items()})
    with torch.no_grad():
        return delta.merge_weight(w.clone(), 1.0) - w


def kohya_tensors(adapters: AdapterSet) -> dict[str, torch.Tensor]:
    prefixes = _stem_prefixes(adapters)
    layouts = kohya_layouts()
    out = {}
    for component, entries in adapters.items():
        if component not in prefixes:
            raise PeftkitError(
                f"kohya files name only unet/text_encoder/text_encoder_2, not {component!r}: "
                "write SD3/Flux transformer adapters with --to diffusers (the pipelines' "
                "load_lora_weights reads it)"
            )
        for m, entry in entries.items():
            stem = f"lora_{prefixes[component]}_{m.replace('.', '_')}"
            if entry.core not in layouts:
                out[f"{stem}.diff"] = weight_difference(entry, m).contiguous()
                continue
            tensors = dict(entry.tensors)
            rank = entry.rank
            if rank is None and "W1" in tensors:  # LoKr, both factors full: LyCORIS reads scale 1
                tensors["W1"] = tensors["W1"] * entry.scale
            for p, t in tensors.items():
                t = TO_FILE.get(p, lambda t, e: t)(t, entry)
                out[f"{stem}.{layouts[entry.core][p]}"] = t.contiguous()
            setting = getattr(core(entry.core).delta, "kohya_alpha", None)
            if setting:
                out[f"{stem}.alpha"] = torch.tensor(float(entry.options.get(setting, 0.0)))
            else:
                out[f"{stem}.alpha"] = torch.tensor(1.0 if rank is None else entry.scale * rank)
    return out


NETWORK_MODULE = {"lora": "networks.lora", "dora": "lycoris.kohya"}


def kohya_metadata(adapters: AdapterSet) -> dict[str, str]:
    names = {e.core for entries in adapters.values() for e in entries.values()}
    module = (
        NETWORK_MODULE.get(names.pop(), "lycoris.kohya") if len(names) == 1 else "lycoris.kohya"
    )
    return {"ss_network_module": module}
