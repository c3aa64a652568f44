"""`AdaptedLayer`: one base nn.Linear / nn.Conv2d plus any number of named deltas of any core.

Forward, for the live (active, unmerged) deltas:

    y = base_op(R_k..R_1 x; W R'_1..R'_m) + sum_j s_j * Delta_j x

Input-side rotations (OFT on Linear) rotate x, weight-side rotations (OFT on Conv2d) rotate the
kernel, additive cores (LoRA, Kronecker) see the original x. An additive core in weight space is
folded into the kernel instead (same value), except after an input rotation, where folding would
make it see R x. Merging folds the same expression into the weight in the same order, so merged and
unmerged outputs agree.

Per-sample routing: with `adapter_ids` set (one index per batch row into `route_names`, -1 for
none), row i sees only adapter route_names[ids[i]], all rows in one forward. `routing` lays the
rows out as runs (`route_plan`, sorting them when they are scattered); each run gets its adapter's
effective weight (LoRA: W + s_k B_k A_k for all K in one batched GEMM; any other core: its own
folded weight) and all runs go through one batched GEMM: the FLOPs of a single adapter, the
segmented GEMM of Punica (SGMV) with whole weights per segment. Where K folded weights would move
more bytes than the rows (few tokens, wide layers), LoRA runs take their prepared factors instead
(`segmented_pays`); scattered rows of one LoRA group take a gathered factored pass; only LoRA with
input dropout masks rows per adapter.
Several active LoRA adapters of one shape join along the rank: one GEMM pair (or addmm) for all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .delta import Delta, geometry_of
from .errors import PeftkitError


@dataclass(frozen=True)
class RunPlan:
    """Routed rows as contiguous runs, found on the host by `routing`: run j has `lengths[j]` rows
    and takes adapter `slots[j]` of the layer's adapters in routing order (slot == their count:
    the base weight alone); `index` holds the slots on the device, None when they are 0, 1, ...
    With `order` set the runs are of the rows sorted by adapter (x[order]); `restore` undoes it."""

    lengths: tuple[int, ...]
    slots: tuple[int, ...]
    index: torch.Tensor | None
    order: torch.Tensor | None = None
    restore: torch.Tensor | None = None


def joinable(deltas: list[Delta]) -> list[list[Delta]]:
    """Additive deltas in groups that run as one: equal `group_key`s of a core that can join its
    factors (`joined_delta`/`joined_weight`, LoRA's); every other delta alone."""
    groups: dict[tuple, list[Delta]] = {}
    out: list[list[Delta]] = []
    for d in deltas:
        key = d.group_key()
        if key is None or not hasattr(type(d), "joined_delta"):
            out.append([d])
            continue
        if key not in groups:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(d)
    return out


class AdaptedLayer(nn.Module):
    def __init__(self, base: nn.Module, name: str = "") -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.geometry = geometry_of(base, name)
        self.deltas = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: dict[str, float] = {}
        self.adapter_ids: torch.Tensor | None = None
        self.route_names: list[str] = []
        self.route_plan: RunPlan | None = None

    # ---- adapters ----
    def add(self, adapter: str, delta: Delta, scale: float = 1.0) -> None:
        if adapter in self.deltas:
            raise PeftkitError(
                f"module {self.name!r} already has an adapter named {adapter!r}: pick another name"
            )
        delta.register_buffer("scale", torch.tensor(float(scale)), persistent=False)
        ref = self.base.weight
        # Adapter params stay at least fp32 even on a bf16/fp16 base: tiny updates vanish in half precision.
        delta.to(device=ref.device, dtype=torch.promote_types(ref.dtype, torch.float32))
        delta.weight_dtype = ref.dtype
        delta.init_from_base(ref)
        self.deltas[adapter] = delta
        self.active.append(adapter)

    def remove(self, adapter: str) -> None:
        if adapter in self.merged:
            self.set_merged([n for n in self.merged if n != adapter])
        del self.deltas[adapter]
        if adapter in self.active:
            self.active.remove(adapter)

    def set_scale(self, adapter: str, scale: float) -> None:
        merged = adapter in self.merged
        if merged:
            self.set_merged([n for n in self.merged if n != adapter])
        self.deltas[adapter].scale.fill_(float(scale))
        if merged:
            self.set_merged([*self.merged, adapter])

    @torch.no_grad()
    def set_merged(self, adapters: list[str]) -> None:
        """Make exactly `adapters` merged into the base weight (rotations first, then additive)."""
        weight = self.base.weight
        work = weight.to(torch.promote_types(weight.dtype, torch.float32))
        for adapter, scale in reversed(list(self.merged.items())):
            work = self.deltas[adapter].unmerge_weight(work, scale)
        order = sorted(adapters, key=lambda n: self.deltas[n].additive)
        merged = {}
        for adapter in order:
            scale = float(self.deltas[adapter].scale)
            work = self.deltas[adapter].merge_weight(work, scale)
            merged[adapter] = scale
        weight.copy_(work.to(weight.dtype))
        self.merged = merged

    # ---- forward ----
    def _base_op(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if weight is None:
            return self.base(x)
        if self.geometry.kind == "linear":
            return F.linear(x, weight, self.base.bias)
        g = self.geometry
        return F.conv2d(x, weight, self.base.bias, g.stride, g.padding, g.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_ids is not None:
            return self._routed_forward(x)
        live = [self.deltas[n] for n in self.active if n not in self.merged]
        if not live:
            return self.base(x)
        h, weight = x, None
        for d in live:
            if d.additive:
                continue
            if d.side == "input":
                h = d.transform_input(h, d.scale)
            else:
                weight = d.transform_weight(self.base.weight if weight is None else weight, d.scale)
        in_weight, factored = [], []
        for d in live:
            if d.additive:
                (in_weight if h is x and d.uses_weight_space(x) else factored).append(d)
        for group in joinable(in_weight):
            base = self.base.weight if weight is None else weight
            if len(group) > 1:
                weight = type(group[0]).joined_weight(group, base)
            else:
                weight = group[0].add_to_weight(base, group[0].scale)
        y = self._base_op(h, weight)
        for group in joinable(factored):
            if len(group) > 1:
                y = y + type(group[0]).joined_delta(group, x)
            else:
                y = y + group[0].delta(x, group[0].scale)
        return y

    def _routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.adapter_ids
        if ids.shape[0] != x.shape[0]:
            raise PeftkitError(
                f"adapter_ids has {ids.shape[0]} entries but module {self.name!r} got a batch of {x.shape[0]} rows: "
                "give one adapter index per batch row"
            )
        routed = [(k, self.deltas[n]) for k, n in enumerate(self.route_names) if n in self.deltas]
        deltas = [d for _, d in routed]
        if not deltas:
            return self.base(x)
        plan, key = self.route_plan, deltas[0].group_key()
        one_lora_group = (
            deltas[0].additive
            and key is not None
            and hasattr(type(deltas[0]), "routed_delta")
            and all(d.group_key() == key for d in deltas)
        )
        weights_pay = all(d.uses_weight_space(x) for d in deltas) and plan is not None
        cls = type(deltas[0])
        if one_lora_group and weights_pay and cls.segmented_pays(deltas, x, plan):
            return cls.segmented_delta(deltas, x, plan, self._base_op(x, None))
        if one_lora_group and not (weights_pay and plan.order is None):
            # Factored, or rows scattered: one gathered pass with no weight-sized tensors.
            slot = self._slots([k for k, _ in routed])
            return self._base_op(x, None) + type(deltas[0]).routed_delta(deltas, x, slot)
        if plan is not None and all(d.weight_form for d in deltas):
            return self._segmented_forward(x, deltas)
        return self._masked_forward(x, routed)

    def _slots(self, order: list[int]) -> torch.Tensor:
        """Each row's position among the routed deltas `order` (routing indices), -1 for none."""
        ids = self.adapter_ids
        if order == list(range(len(self.route_names))):
            return ids  # every routed adapter, in routing order: ids index them as they are
        lut = torch.full((len(self.route_names) + 1,), -1, dtype=torch.long, device=ids.device)
        for j, k in enumerate(order):
            lut[k + 1] = j
        return lut[ids + 1]

    def _masked_forward(self, x: torch.Tensor, routed: list[tuple[int, Delta]]) -> torch.Tensor:
        """Each adapter's full pass, kept on its rows: the fallback for LoRA with input dropout
        (its weight form would drop the dropout) and for ids set without `routing` (no run plan)."""
        view = (-1,) + (1,) * (x.dim() - 1)
        masks = {k: (self.adapter_ids == k).view(view) for k, _ in routed}
        h = x
        for k, d in routed:
            if not d.additive and d.side == "input":
                h = torch.where(masks[k], d.transform_input(x, d.scale), h)
        y = self._base_op(h, None)
        for k, d in routed:
            if d.additive:
                y = y + d.delta(x, d.scale) * masks[k].to(y.dtype)
            elif d.side == "weight":
                y = torch.where(
                    masks[k], self._base_op(h, d.transform_weight(self.base.weight, d.scale)), y
                )
        return y

    def _segmented_forward(self, x: torch.Tensor, deltas: list[Delta]) -> torch.Tensor:
        plan, weight, bias = self.route_plan, self.base.weight, self.base.bias
        cls, key = type(deltas[0]), deltas[0].group_key()
        if (
            key is not None
            and hasattr(cls, "routed_weights")
            and all(d.group_key() == key for d in deltas)
        ):
            stacked = cls.routed_weights(deltas, weight)
        else:
            stacked = torch.stack([d.effective_weight(weight, d.scale) for d in deltas])
        if len(deltas) in plan.slots:  # some runs take the base weight alone
            stacked = torch.cat([stacked, weight.unsqueeze(0).to(stacked.dtype)])
        if plan.index is not None:
            stacked = stacked.index_select(0, plan.index)
        if plan.order is not None:
            x = x.index_select(0, plan.order)
        if self.geometry.kind == "linear" and len(set(plan.lengths)) == 1:
            flat = x.reshape(len(plan.lengths), -1, x.shape[-1])
            w_t = stacked.transpose(1, 2)
            y = torch.bmm(flat, w_t) if bias is None else torch.baddbmm(bias, flat, w_t)
            y = y.reshape(*x.shape[:-1], weight.shape[0])
        else:
            parts = x.split(list(plan.lengths))
            y = torch.cat([self._base_op(p, w) for p, w in zip(parts, stacked.unbind(0))])
        return y if plan.restore is None else y.index_select(0, plan.restore)

    def extra_repr(self) -> str:
        return f"adapters={list(self.deltas)}, active={self.active}, merged={list(self.merged)}"
