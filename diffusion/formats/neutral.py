"""The neutral form every format reader returns and every writer takes, and its way into a model.

`AdapterSet` = {component: {module: Entry}}; an Entry holds one layer's core name, its tensors under
the core's own parameter names and shapes (what the core's Delta holds), and the scale s of
delta = s * f(tensors): alpha / r for LoRA-like cores, 1 for OFT.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ...common_kernels.delta import Geometry, geometry_of
from ...common_kernels.errors import PeftkitError
from ...common_kernels.inject import AdapterHandle, candidate_modules, inject
from ...common_kernels.registry import core

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")  # transformer: SD3/Flux
# Where each core's rank sits (tensor, axis), first present wins: LyCORIS' rule for LoKr, whose
# scale is 1 when neither factor is low rank. Zero-padding along these axes is exact.
RANK_AXES = {
    "lora": {"A": 0, "B": 1},
    "dora": {"A": 0, "B": 1},
    "loha": {"w1b": 0, "w1a": 1, "w2a": 1, "w2b": 0},
    "kron": {"W1a": 1, "W1b": 0, "W2a": 1, "W2b": 0},
}
# The tensor a per-module scale folds into when modules of one component disagree (exact: linear).
FOLD_INTO = {"lora": ("B",), "dora": ("B",), "loha": ("w1a",), "kron": ("W1", "W1a")}
# A full factor that a file may store as a product of two low-rank ones (LoKr).
PRODUCTS = {"W1": ("W1a", "W1b"), "W2": ("W2a", "W2b")}


@dataclass
class Entry:
    core: str
    tensors: dict[str, torch.Tensor]
    scale: float = 1.0
    options: dict = field(default_factory=dict)  # config fields the tensors cannot tell (OFT eps)
    base: torch.Tensor | None = None  # the base weight, when known (for weight-difference writes)

    @property
    def rank(self) -> int | None:
        for name, axis in RANK_AXES.get(self.core, {}).items():
            if name in self.tensors:
                return int(self.tensors[name].shape[axis])
        return None

    @property
    def alpha(self) -> float | None:
        return None if self.rank is None else self.scale * self.rank


AdapterSet = dict[str, dict[str, Entry]]


# ---------------------------------------------------------------- module names
def canonical(component: str, module: str) -> str:
    # transformers 5 dropped CLIPTextModel's `text_model` wrapper; files keep the older, longer names,
    # which every diffusers version reads (newer ones strip the prefix).
    if component.startswith("text_encoder") and not module.startswith("text_model."):
        return "text_model." + module
    return module


def _local(component: str, module: str, model: nn.Module | None) -> str:
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


def localize(adapters: AdapterSet, components: dict[str, nn.Module] | None = None) -> AdapterSet:
    """Module names as the given models (or the installed transformers, without models) spell them."""
    return {
        c: {_local(c, m, (components or {}).get(c)): v for m, v in entries.items()}
        for c, entries in adapters.items()
    }


# ---------------------------------------------------------------- handles <-> neutral form
def adapter_set_of(handles: dict[str, AdapterHandle]) -> AdapterSet:
    """The weights of peftkit handles, keyed by component, in the neutral form."""
    out: AdapterSet = {}
    for component, handle in handles.items():
        options = {
            k: v for k, v in handle.config.to_dict().items() if k not in ("method", "targets", "r")
        }
        out[component] = {}
        for module, layer in handle.layers.items():
            delta = layer.deltas[handle.name]
            tensors = {n: p.detach().cpu() for n, p in delta.named_parameters()}
            out[component][canonical(component, module)] = Entry(
                handle.config.method,
                tensors,
                float(getattr(delta, "scaling", 1.0)),
                options,
                layer.base.weight.detach(),  # a view: copied only if a writer needs it
            )
    return out


def _unfold(entry: Entry, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The entry's tensors with full factors formed where the target holds them whole (LoKr)."""
    tensors = dict(entry.tensors)
    for full, (a, b) in PRODUCTS.items():
        if full in expected and full not in tensors and a in tensors:
            left, right = tensors.pop(a), tensors.pop(b)
            tensors[full] = (left @ right.reshape(right.shape[0], -1)).reshape(expected[full])
    return tensors


def _fit(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """`tensor` zero-padded to `shape` (exact on rank axes), or None when it cannot fit."""
    if tensor.shape == shape:
        return tensor
    if tensor.dim() != len(shape) or any(s > t for s, t in zip(tensor.shape, shape)):
        return None
    out = tensor.new_zeros(shape)
    out[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return out


def _component_config(entries: dict[str, Entry], geometries: dict[str, Geometry]):
    names = {e.core for e in entries.values()}
    if len(names) != 1:
        raise PeftkitError(
            f"the file mixes cores {sorted(names)} in one component; peftkit holds one core per "
            "component: split the file by core first"
        )
    name = names.pop()
    targets = [f"re:{re.escape(m)}" for m in sorted(entries)]
    options = dict(next(iter(entries.values())).options)
    if hasattr(core(name).delta, "file_options"):
        return _rotation_config(name, targets, entries, geometries), False
    ranks = [e.rank for e in entries.values() if e.rank is not None]
    scales = Counter(e.scale for e in entries.values())
    fold = name in FOLD_INTO and (len(scales) > 1 or not ranks)
    if name == "kron":
        low = [e.rank for e in entries.values() if {"W1a", "W2a"} & set(e.tensors)]
        full_r = max(max(g.out_features, g.in_features) for g in geometries.values())
        r = max(low) if low else full_r
        options["decompose_both"] = any("W1a" in e.tensors for e in entries.values())
        options.update(_kron_factor(entries, geometries))
    elif ranks:
        r = max(ranks)
    else:
        r = None
    if any(e.scale != 1.0 for e in entries.values()) and name not in FOLD_INTO:
        raise PeftkitError(f"a {name!r} adapter has no scale to carry: the file is inconsistent")
    alpha = None if r is None else float(r) if fold else next(iter(scales)) * r
    options["rslora"] = False  # the entries' scale already says alpha / sqrt(r)
    return core(name).make_config(targets, **{**options, "rank": r, "alpha": alpha}), fold


def _rotation_config(name: str, targets, entries: dict[str, Entry], geometries):
    """LyCORIS OFT/BOFT: one constraint and rescale setting for the component, and the block size
    LyCORIS was given, found as the candidate that rebuilds every module's blocks."""
    settings = {
        tuple(sorted((k, v) for k, v in e.options.items() if k != "block_size"))
        for e in entries.values()
    }
    if len(settings) != 1:
        raise PeftkitError(
            f"the {name!r} file's modules disagree on {sorted(settings)}; peftkit holds one "
            "setting per component: save the LyCORIS network with one constraint (alpha) and rescale"
        )
    spec, common = core(name), dict(next(iter(settings)))
    for size in sorted({e.options["block_size"] for e in entries.values()}):
        config = spec.make_config(targets, **common, block_size=size)
        try:
            with torch.device("meta"):
                built = {m: spec.delta(geometries[m], config, m) for m in entries}
        except PeftkitError:  # this block size splits some layer no way LyCORIS would
            continue
        if all(
            built[m].oft_blocks.shape == e.tensors["oft_blocks"].shape for m, e in entries.items()
        ):
            return config
    raise PeftkitError(
        f"the {name!r} file's block shapes follow no block_size LyCORIS' factorization rebuilds "
        "for these layers: the file was made for another base model"
    )


def _kron_factor(entries, geometries) -> dict:
    """The KronConfig options (factor, and LyCORIS' ordering flags) that rebuild every module's
    factor sizes: the most-square rule (-1) or a fixed factor, in peft's or LyCORIS' order."""
    sizes = {n for e in entries.values() for n in (*_w1_shape(e), *_w2_shape(e))}
    for factor in (-1, *sorted(sizes)):
        for lycoris_order in (False, True):
            for unbalanced in (False, True):
                options = dict(factor=factor, lycoris_order=lycoris_order, unbalanced=unbalanced)
                if all(
                    _w1_shape(e) == _kron_w1(geometries[m], options) for m, e in entries.items()
                ):
                    return options
    raise PeftkitError(
        "the LoKr file's factor sizes follow no factorization rule KronConfig rebuilds (peft's or "
        "LyCORIS' `factor`, unbalanced or not): the file was made for another base model, or by a "
        "tool with its own rule; merge it into the base with that tool"
    )


def _w1_shape(entry: Entry) -> tuple[int, int]:
    t = entry.tensors
    return tuple(t["W1"].shape) if "W1" in t else (t["W1a"].shape[0], t["W1b"].shape[1])


def _w2_shape(entry: Entry) -> tuple[int, int]:
    t = entry.tensors
    return tuple(t["W2"].shape[:2]) if "W2" in t else (t["W2a"].shape[0], t["W2b"].shape[1])


def _kron_w1(geometry: Geometry, options: dict) -> tuple[int, int]:
    from ...common_kernels.kron import KronConfig, KronDelta

    with torch.device("meta"):
        delta = KronDelta(geometry, KronConfig(targets=["_"], r=1, **options))
    return delta.shape[0], delta.shape[2]


def config_and_state(entries: dict[str, Entry], geometries: dict[str, Geometry], path=""):
    """One config for a component's modules plus the state it loads. Modules of other rank or
    scale are zero-padded to the largest rank with their scale folded into one factor: exact."""
    config, fold = _component_config(entries, geometries)
    spec = core(config.method)
    state = {}
    for m, entry in sorted(entries.items()):
        with torch.device("meta"):
            expected = {
                n: p.shape for n, p in spec.delta(geometries[m], config, m).named_parameters()
            }
        tensors = _unfold(entry, expected)
        if fold:
            key = next(k for k in FOLD_INTO[entry.core] if k in tensors)
            tensors[key] = tensors[key] * entry.scale
        if set(tensors) != set(expected):
            raise PeftkitError(
                f"{str(path)!r}: {entry.core} module {m!r} stores {sorted(tensors)} but peftkit's "
                f"{entry.core} needs {sorted(expected)} for this layer: the file uses a layout "
                "peftkit cannot rebuild exactly (e.g. a low-rank factor where peftkit keeps it full)"
            )
        for n, shape in expected.items():
            fitted = _fit(tensors[n], shape)
            if fitted is None:
                raise PeftkitError(
                    f"{str(path)!r} does not fit module {m!r}: its {n} is {tuple(tensors[n].shape)} "
                    f"but the layer needs {tuple(shape)}: the file was made for another base model"
                )
            state[f"{m}.{n}"] = fitted
    return config, state


def check_fits(component: str, model: nn.Module, entries: dict[str, Entry], path) -> dict:
    """The geometry of each module the file names, refusing modules the model lacks or misfits."""
    modules = dict(candidate_modules(model))
    geometries = {}
    for m in sorted(entries):
        if m not in modules:
            raise PeftkitError(
                f"adapter file {str(path)!r} has weights for {component} module {m!r}, which this "
                "model does not have: the file was made for another base model"
            )
        if type(modules[m]).__name__ not in ("Linear", "Conv2d"):
            raise PeftkitError(
                f"adapter file {str(path)!r} targets {component} module {m!r} of type "
                f"{type(modules[m]).__name__}; only Linear and Conv2d layers take adapters"
            )
        geometries[m] = geometry_of(modules[m], m)
        needs = file_weight_shape(entries[m])
        weight = modules[m].weight.shape
        have = (
            tuple(weight)
            if needs is not None and len(needs) == 4
            else (weight[0], weight[1:].numel())
        )
        if needs is not None and tuple(needs) != have:
            raise PeftkitError(
                f"adapter file {str(path)!r} does not fit {component} module {m!r}: its weight is "
                f"{tuple(weight)} here but the file's factors need {tuple(needs)}: the file was made "
                "for another base model"
            )
    return geometries


def file_weight_shape(entry: Entry) -> tuple[int, ...] | None:
    """The base weight's shape as the entry's tensors pin it down: whole for LoRA and full-kernel
    LoKr, else as a matrix (d_out, fan_in); None for cores whose tensors do not say (OFT)."""
    t = entry.tensors
    if "A" in t:
        return (t["B"].shape[0], *t["A"].shape[1:])
    if entry.core == "kron":
        w2 = t["W2"].shape if "W2" in t else (t["W2a"].shape[0], t["W2b"].shape[1])
        (a, c), (b, d) = _w1_shape(entry), w2[:2]
        return (a * b, c * d, *w2[2:])
    if "w1a" in t:
        return (t["w1a"].shape[0], t["w1b"].shape[1])
    return None


def load_adapter_set(
    adapters: AdapterSet,
    components: dict[str, nn.Module],
    path,
    name: str = "default",
    scale: float = 1.0,
) -> dict[str, AdapterHandle]:
    """Inject a neutral-form adapter into `components`, checking every module before any change."""
    adapters = localize(adapters, components)
    plans = {}
    for component, entries in adapters.items():
        if component not in components:
            raise PeftkitError(
                f"adapter file {str(path)!r} has weights for {component!r} but only "
                f"{sorted(components)} were given: pass that component too"
            )
        geometries = check_fits(component, components[component], entries, path)
        plans[component] = config_and_state(entries, geometries, path)
    handles = {}
    for component, (config, state) in plans.items():
        handle = inject(components[component], config, name=name, scale=scale)
        handle.load_state_dict(state)
        handles[component] = handle
    return handles
