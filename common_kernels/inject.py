"""`inject`: wrap the modules a config targets in `AdaptedLayer`s, freeze the base, return a handle.

handle = inject(model, LoRAConfig(targets=["to_q", "to_v"], r=8), name="dog")
opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-4)
...
handle.merge(); handle.unmerge(); handle.unload()   # unload restores the original modules
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .config import AdapterConfig
from .delta import Delta
from .errors import PeftkitError
from .layer import AdaptedLayer, RunPlan
from .registry import core_of


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, base module) pairs, seeing through existing AdaptedLayers."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, AdaptedLayer):
            inside.append(name)
            yield name, module.base
        else:
            yield name, module


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Dotted names of the modules `config` selects; a clear error when there are none."""
    names = []
    for name, module in candidate_modules(model):
        if not name or type(module).__name__ not in config.target_types:
            continue
        if config.targets and not any(_matches(name, p) for p in config.targets):
            continue
        if any(_matches(name, p) for p in config.exclude):
            continue
        names.append(name)
    if not names:
        typed = [
            n for n, m in candidate_modules(model) if n and type(m).__name__ in ("Linear", "Conv2d")
        ]
        raise PeftkitError(
            f"no module matches targets={config.targets} with target_types={config.target_types}: "
            f"the model's Linear/Conv2d modules are named like {typed[:6]}; fix the patterns"
        )
    return names


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def fingerprint(model: nn.Module, names: Sequence[str]) -> str:
    """Hash of the target names and their weight shapes: identifies which bases an adapter fits."""
    h = hashlib.sha256()
    modules = dict(candidate_modules(model))
    for name in sorted(names):
        h.update(f"{name}:{tuple(modules[name].weight.shape)};".encode())
    return h.hexdigest()[:16]


class AdapterHandle:
    """One named adapter on a model: its parameters, state, scale, merge state and removal."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        config: AdapterConfig,
        layers: dict[str, AdaptedLayer],
        base_model: str | None,
    ) -> None:
        self.model, self.name, self.config, self.layers, self.base_model = (
            model,
            name,
            config,
            layers,
            base_model,
        )
        self._hooks = _batch_hooks(self)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for lname, layer in self.layers.items():
            for pname, p in layer.deltas[self.name].named_parameters():
                yield f"{lname}.{pname}", p

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise PeftkitError(
                f"adapter {self.name!r} state does not fit this model: "
                + (
                    f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                    if missing
                    else ""
                )
                + (
                    f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
                    if unexpected
                    else ""
                )
                + ": the adapter was made for other target modules or another base model"
            )
        for key in sorted(own):
            if own[key].shape != state[key].shape:
                module = key.rsplit(".", 1)[0]
                raise PeftkitError(
                    f"adapter tensor {key!r} has shape {tuple(state[key].shape)} but module {module!r} needs "
                    f"{tuple(own[key].shape)}: the adapter was made for another base model"
                )
        with torch.no_grad():
            for key, p in own.items():
                p.copy_(state[key].to(p.dtype))

    def fingerprint(self) -> str:
        return fingerprint(self.model, list(self.layers))

    def set_scale(self, scale: float) -> None:
        for layer in self.layers.values():
            layer.set_scale(self.name, scale)

    def enable(self) -> None:
        for layer in self.layers.values():
            if self.name not in layer.active:
                layer.active.append(self.name)

    def disable(self) -> None:
        for layer in self.layers.values():
            if self.name in layer.active:
                layer.active.remove(self.name)

    def merge(self) -> None:
        for layer in self.layers.values():
            if self.name not in layer.merged:
                layer.set_merged([*layer.merged, self.name])

    def unmerge(self) -> None:
        for layer in self.layers.values():
            if self.name in layer.merged:
                layer.set_merged([n for n in layer.merged if n != self.name])

    def unload(self) -> None:
        """Remove this adapter; modules left with no adapter become the original modules again."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for lname, layer in self.layers.items():
            layer.remove(self.name)
            if not layer.deltas:
                parent, child = _parent(self.model, lname)
                setattr(parent, child, layer.base)
        self.layers = {}
        remaining = [m for m in self.model.modules() if isinstance(m, AdaptedLayer)]
        saved = getattr(self.model, "_peftkit_requires_grad", None)
        if not remaining and saved is not None:
            for pname, p in self.model.named_parameters():
                p.requires_grad_(saved.get(pname, p.requires_grad))
            del self.model._peftkit_requires_grad

    def report(self) -> str:
        total = sum(p.numel() for p in self.model.parameters()) - self.num_parameters()
        n = self.num_parameters()
        return (
            f"adapter {self.name!r} ({self.config.method}): {len(self.layers)} modules, "
            f"{n:,} trainable parameters = {100.0 * n / max(total, 1):.3f}% of {total:,} base parameters"
        )


def _batch_hooks(handle: AdapterHandle) -> list:
    """Cores whose per-layer state depends on parameters alone (OFT's rotations, LoRA's cast
    factors) may build it for all layers at once, before the model's forward, through a
    `prepare_all` hook."""
    delta_cls = core_of(handle.config).delta
    if not hasattr(delta_cls, "prepare_all"):
        return []

    switches = checkpoint_switches(handle.model)

    def deltas(live_only: bool) -> list[Delta]:
        out = []
        for layer in handle.layers.values():
            if live_only and (handle.name not in layer.active or handle.name in layer.merged):
                continue
            out.append(layer.deltas[handle.name])
            # Followed here, not only at inject: the model may have been cast since.
            out[-1].weight_dtype = layer.base.weight.dtype
        return out

    def before(module, args):
        # Under torch.compile the compiler fuses per-layer work itself; module state stays untouched.
        # Under activation checkpointing the layers recompute in backward, after `after` released
        # the batch, and must save the same tensors as the first pass: so each layer builds its own.
        if not torch.compiler.is_compiling() and not checkpointing(switches):
            delta_cls.prepare_all(deltas(live_only=True))

    def after(module, args, output):
        if not torch.compiler.is_compiling():
            delta_cls.release_all(deltas(live_only=False))

    before.peftkit_hook = after.peftkit_hook = True
    return [
        handle.model.register_forward_pre_hook(before),
        handle.model.register_forward_hook(after),
    ]


CHECKPOINT_FLAGS = ("gradient_checkpointing", "grad_checkpointing")  # diffusers/transformers, timm


def checkpoint_switches(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that carry an activation-checkpointing flag, found once."""
    return [m for m in model.modules() if any(hasattr(m, f) for f in CHECKPOINT_FLAGS)]


def checkpointing(switches: list[nn.Module]) -> bool:
    """Whether any of `switches` recomputes activations in backward now."""
    return any(getattr(m, f, False) is True for m in switches for f in CHECKPOINT_FLAGS)


def inject(
    model: nn.Module,
    config: AdapterConfig,
    name: str = "default",
    base_model: str | None = None,
    scale: float = 1.0,
) -> AdapterHandle:
    """Add adapter `name` of `config`'s method to every targeted module and freeze the base model.

    Example:
        >>> import torch
        >>> from peftkit.common_kernels import inject, LoRAConfig
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> handle = inject(model, LoRAConfig(targets=["0", "2"], r=2))
        >>> handle.num_parameters()
        52
    """
    delta_cls = core_of(config).delta
    targets = find_targets(model, config)
    if not hasattr(model, "_peftkit_requires_grad"):
        model._peftkit_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    # Freeze the base, but not the adapters injected before this one.
    earlier = {id(p) for layer in adapted_layers(model) for p in layer.deltas.parameters()}
    for p in model.parameters():
        if id(p) not in earlier:
            p.requires_grad_(False)
    layers: dict[str, AdaptedLayer] = {}
    for tname in targets:
        parent, child = _parent(model, tname)
        module = getattr(parent, child)
        layer = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module, tname)
        delta = delta_cls(layer.geometry, config, tname)
        layer.add(name, delta, scale)
        if layer is not module:
            setattr(parent, child, layer)
        layers[tname] = layer
    return AdapterHandle(model, name, config, layers, base_model)


def adapted_layers(model: nn.Module) -> list[AdaptedLayer]:
    return [m for m in model.modules() if isinstance(m, AdaptedLayer)]


def remove_adapters(model: nn.Module) -> None:
    """Remove every adapter from `model` (unmerging merged ones) and give it back its original
    modules and requires_grad flags, whether or not the handles are still at hand."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AdaptedLayer):
            if module.merged:
                module.set_merged([])
            parent, child = _parent(model, name)
            setattr(parent, child, module.base)
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, fn in hooks.items() if getattr(fn, "peftkit_hook", False)]:
            del hooks[key]
    saved = getattr(model, "_peftkit_requires_grad", None)
    if saved is not None:
        for pname, p in model.named_parameters():
            p.requires_grad_(saved.get(pname, p.requires_grad))
        del model._peftkit_requires_grad


@contextlib.contextmanager
def routing(
    model: nn.Module, adapter_ids: torch.Tensor | Sequence[int], names: Sequence[str]
) -> Iterator[None]:
    """Within the block, batch row i uses adapter names[adapter_ids[i]] (-1: the base model alone).

    >>> with routing(model, [0, 1, -1], ["dog", "cat"]):   # doctest: +SKIP
    ...     y = model(x)   # row 0 with "dog", row 1 with "cat", row 2 plain
    """
    layers = adapted_layers(model)
    known = {n for layer in layers for n in layer.deltas}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PeftkitError(
            f"routing names unknown adapters {unknown}: the model has {sorted(known)}"
        )
    if any(layer.merged for layer in layers):
        raise PeftkitError(
            "routing needs unmerged adapters: call unmerge() on merged adapters first"
        )
    device = next((l.base.weight.device for l in layers), None)
    # Checked on the host, where the ids usually are: checking them on the GPU would cost two syncs.
    host = torch.as_tensor(adapter_ids, dtype=torch.long).cpu()
    if host.dim() != 1 or (
        host.numel() and (int(host.min()) < -1 or int(host.max()) >= len(names))
    ):
        raise PeftkitError(f"adapter_ids must be a 1-D list of indices in [-1, {len(names) - 1}]")
    values = set(host.tolist())
    if len(values) == 1:
        # Every row takes the same adapter: that is a plain forward with it alone active, which
        # keeps each layer's fastest path (weight-space LoRA, batched OFT) instead of masking rows.
        k = values.pop()
        keep = [(layer, layer.active) for layer in layers]
        for layer in layers:
            layer.active = [names[k]] if k >= 0 and names[k] in layer.deltas else []
        try:
            yield
        finally:
            for layer, active in keep:
                layer.active = active
        return
    ids = host.to(device)
    rows = host.tolist()
    runs = row_runs(rows)
    order = restore = None
    if len(runs) > 2 * len(values):
        # Scattered rows: the layers run them sorted by adapter (a gather in, one out) so that
        # each adapter's rows form one run; the sort is made here on the host, once.
        perm = sorted(range(len(rows)), key=rows.__getitem__)
        runs = row_runs([rows[i] for i in perm])
        order = torch.tensor(perm, device=device)
        restore = torch.tensor(sorted(range(len(perm)), key=perm.__getitem__), device=device)
    plans: dict[tuple, RunPlan] = {}
    for layer in layers:
        layer.adapter_ids, layer.route_names = ids, list(names)
        present = [n for n in names if n in layer.deltas]
        slots = tuple(
            present.index(names[k]) if k >= 0 and names[k] in layer.deltas else len(present)
            for k, _ in runs
        )
        if (
            slots not in plans
        ):  # one device copy per distinct plan, made here and not inside a capture
            index = (
                None if slots == tuple(range(len(present))) else torch.tensor(slots, device=device)
            )
            plans[slots] = RunPlan(tuple(n for _, n in runs), slots, index, order, restore)
        layer.route_plan = plans[slots]
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_ids, layer.route_names, layer.route_plan = None, [], None


def row_runs(ids: list[int]) -> list[tuple[int, int]]:
    """(adapter index, row count) of each maximal run of equal consecutive ids."""
    runs: list[list[int]] = []
    for k in ids:
        if runs and runs[-1][0] == k:
            runs[-1][1] += 1
        else:
            runs.append([k, 1])
    return [(k, n) for k, n in runs]
