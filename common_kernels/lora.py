"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685), eq. (3):

    h = W0 x + (alpha / r) * B A x,   A: r x d_in,  B: d_out x r,  B = 0 at init.

rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead, which keeps the
update's magnitude stable as r grows. On Conv2d, A is a conv with the base kernel, stride and
padding and B a 1x1 conv, so B A reshaped is a kernel of the base shape.

`apply="factored"` adds s B (A x) to the base output: the fewest FLOPs. `apply="weight"` runs the
base op once with W + s B A: one kernel per pass instead of five or six, at the price of a
weight-gradient GEMM in backward; it wins where kernel launches, not arithmetic, bound the step,
which on GPUs is nearly always (bench/NOTES.md). `apply="auto"` (default) picks weight space on
CUDA and factored on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, check_positive, check_probability
from .delta import Delta, Geometry
from .errors import PeftkitError
from .registry import register_core


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA settings. `alpha=None` means alpha = r (scaling 1, or sqrt(r) with rsLoRA)."""

    r: int = 8
    alpha: float | None = None
    rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming"
    apply: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__  # DoRAConfig shares these checks
        if not isinstance(self.r, int) or self.r < 1:
            raise PeftkitError(f"{cls}.r must be an integer >= 1, got {self.r!r}")
        if self.alpha is not None:
            check_positive(cls, "alpha", self.alpha)
        check_probability(cls, "dropout", self.dropout)
        if self.init not in ("kaiming", "gaussian"):
            raise PeftkitError(f"{cls}.init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if self.apply not in ("auto", "factored", "weight"):
            raise PeftkitError(
                f"LoRAConfig.apply must be 'auto', 'factored' or 'weight', got {self.apply!r}"
            )
        if self.apply == "weight" and self.dropout > 0:
            raise PeftkitError(
                "LoRAConfig.apply='weight' cannot apply input dropout: set dropout=0 or apply='factored'"
            )

    @property
    def scaling(self) -> float:
        alpha = float(self.r) if self.alpha is None else self.alpha
        return alpha / math.sqrt(self.r) if self.rslora else alpha / self.r


def lora_linear_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """scale * B A x for x of shape (..., d_in). The scale multiplies the r-wide intermediate,
    the cheapest place to apply it."""
    return F.linear(F.linear(x, A) * scale, B)


def lora_conv_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor | float,
    geometry: Geometry,
) -> torch.Tensor:
    """scale * conv1x1(B, conv(A, x)) with A: (r, d_in, kh, kw) on the base geometry, B: (d_out, r, 1, 1)."""
    return F.conv2d(geometry.conv(x, A) * scale, B)


def lora_delta_weight(
    A: torch.Tensor, B: torch.Tensor, scale: float, weight_shape: tuple[int, ...]
) -> torch.Tensor:
    """scale * B A reshaped to the base weight's shape (the merge delta)."""
    return (scale * (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1))).reshape(weight_shape)


class LoRADelta(Delta):
    kohya_names: ClassVar[dict[str, str]] = {"A": "lora_down.weight", "B": "lora_up.weight"}

    def __init__(self, geometry: Geometry, config: LoRAConfig, name: str = "") -> None:
        super().__init__(geometry)
        r = config.r
        if r > min(geometry.fan_in, geometry.out_features):
            raise PeftkitError(
                f"LoRA rank r={r} is larger than module {name!r} allows "
                f"(min(fan_in={geometry.fan_in}, d_out={geometry.out_features})): lower r or exclude the module"
            )
        self.scaling = config.scaling
        kh, kw = geometry.kernel_size
        if geometry.kind == "linear":
            self.A = nn.Parameter(torch.empty(r, geometry.in_features))
            self.B = nn.Parameter(torch.zeros(geometry.out_features, r))
        else:
            self.A = nn.Parameter(torch.empty(r, geometry.in_features, kh, kw))
            self.B = nn.Parameter(torch.zeros(geometry.out_features, r, 1, 1))
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.A, std=1.0 / r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Input dropout only exists in the factored form.
        self.apply_mode = "factored" if config.dropout > 0 else config.apply
        self.weight_form = config.dropout == 0
        self._batched: torch.Tensor | None = None

    @staticmethod
    def prepare_all(deltas: list[LoRADelta]) -> None:
        """Scale, transpose and cast the factors of all weight-space layers of one shape in one
        batched op before a model's forward, as kron.py does: each layer's weight-space add is then
        one addmm (routed runs: one baddbmm) instead of four kernels. `_batched` = [A | s B^T] as
        one (r, fan_in + d_out) tensor in the base weight's dtype, so that K adapters' factors
        are gathered by one stack or cat, not two."""
        groups: dict[tuple, list[LoRADelta]] = {}
        for d in deltas:
            # DoRA (a subclass) keeps its factors in fp32 for the row norm: not prepared here.
            if d.additive and d.weight_form and d.uses_weight_space(d.A):
                key = (tuple(d.A.shape), tuple(d.B.shape), d.A.dtype, d.weight_dtype)
                groups.setdefault(key, []).append(d)
        for (_, _, _, dtype), group in groups.items():
            r = group[0].A.shape[0]
            A = torch.stack([d.A.reshape(r, -1) for d in group])
            Bt = torch.stack([d.B.reshape(-1, r).T for d in group])
            Bt = Bt * stacked_scales(group)[:, None, None]
            packed = A.new_empty(*A.shape[:2], A.shape[2] + Bt.shape[2], dtype=dtype)
            packed[..., : A.shape[2]].copy_(A)  # cast on the way in: no float32 concatenation
            packed[..., A.shape[2] :].copy_(Bt)
            for d, one in zip(group, packed.unbind(0)):
                d._batched = one

    @staticmethod
    def release_all(deltas: list[LoRADelta]) -> None:
        for d in deltas:
            d._batched = None

    def _prepared(self, dtype: torch.dtype) -> torch.Tensor | None:
        batched = self._batched
        return batched if batched is not None and batched.dtype == dtype else None

    @staticmethod
    def _unpacked(packed: torch.Tensor, fan_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, s B) as views of [A | s B^T] along its last dim (any leading dims)."""
        return packed[..., :fan_in], packed[..., fan_in:].transpose(-1, -2)

    def add_to_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        prepared = self._prepared(weight.dtype)
        if prepared is not None:
            flat = weight.reshape(weight.shape[0], -1)
            A, B = self._unpacked(prepared, flat.shape[1])
            return torch.addmm(flat, B, A).reshape(weight.shape)
        # Scaled in the factors' precision, then cast once: each elementwise kernel here is paid
        # per layer per step, and at these sizes a kernel costs its launch, not its arithmetic.
        s = scale if self.scaling == 1.0 else scale * self.scaling
        B = (self.B.reshape(self.B.shape[0], -1) * s).to(weight.dtype)
        A = self.A.to(weight.dtype).reshape(self.A.shape[0], -1)
        return torch.addmm(weight.reshape(weight.shape[0], -1), B, A).reshape(weight.shape)

    def delta(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        A, B = self.A.to(x.dtype), self.B.to(x.dtype)
        x = self.dropout(x)
        s = scale * self.scaling
        if self.geometry.kind == "linear":
            return lora_linear_delta(x, A, B, s.to(x.dtype))
        return lora_conv_delta(x, A, B, s.to(x.dtype), self.geometry)

    def group_key(self) -> tuple | None:
        if self.geometry.kind != "linear" or not isinstance(self.dropout, nn.Identity):
            return None
        return ("lora", tuple(self.A.shape), tuple(self.B.shape), self.A.dtype)

    @staticmethod
    def routed_delta(deltas: list[LoRADelta], x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Row i gets deltas[slot[i]]'s output (nothing where slot is -1), for all rows in two
        batched matmuls over gathered factors: the segmented-GEMM idea of Punica/S-LoRA, here with
        one (r x d) factor pair per row."""
        A = torch.stack([d.A for d in deltas])
        B = torch.stack([d.B for d in deltas])
        scales = stacked_scales(deltas)
        rows = slot.clamp(min=0)
        # index_select, not A[rows]: its backward is one index_add, where advanced indexing's
        # backward is a sort-based index_put costing ~100 us of host time per call.
        keep = (slot >= 0).to(A.dtype) * scales.index_select(0, rows)
        A_rows = A.index_select(0, rows).to(x.dtype)
        B_rows = (B.index_select(0, rows) * keep[:, None, None]).to(x.dtype)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        out = torch.bmm(torch.bmm(flat, A_rows.transpose(1, 2)), B_rows.transpose(1, 2))
        return out.reshape(*x.shape[:-1], B.shape[1])

    @staticmethod
    def segmented_pays(deltas: list[LoRADelta], x: torch.Tensor, plan) -> bool:
        """Whether routed runs cost fewer bytes through the prepared factors than through K
        folded weights: N (d_in + 2 d_out) against 4 K d_out d_in for N token rows (reading x,
        writing and reading the output; writing, filling, reading K weights). Few tokens and wide
        layers (deep UNet levels, cross-attention on text tokens) take the factors. Needs equal
        runs in row order, all factors prepared in x's dtype."""
        if plan is None or plan.order is not None or len(set(plan.lengths)) != 1:
            return False
        if any(d._prepared(x.dtype) is None for d in deltas):
            return False
        d_out, d_in = deltas[0].B.shape[0], deltas[0].A.shape[1]
        return x.numel() // d_in * (d_in + 2 * d_out) < 4 * len(deltas) * d_out * d_in

    @staticmethod
    def segmented_delta(
        deltas: list[LoRADelta], x: torch.Tensor, plan, y: torch.Tensor
    ) -> torch.Tensor:
        """y + each run's s_k B_k A_k x, runs as laid out by `plan` (equal, in row order), in two
        batched GEMMs over the prepared factors: the segmented GEMM of Punica, one factor pair per
        run; a run that takes no adapter gets zero factors."""
        packed = [d._prepared(x.dtype) for d in deltas]
        if len(deltas) in plan.slots:
            packed.append(torch.zeros_like(packed[0]))
        P = torch.stack(packed)
        if plan.index is not None:
            P = P.index_select(0, plan.index)
        runs, d_in = len(plan.lengths), x.shape[-1]
        h = torch.bmm(x.reshape(runs, -1, d_in), P[..., :d_in].transpose(1, 2))
        out = torch.baddbmm(y.reshape(runs, -1, y.shape[-1]), h, P[..., d_in:])
        return out.reshape(y.shape)

    @staticmethod
    def routed_weights(deltas: list[LoRADelta], weight: torch.Tensor) -> torch.Tensor:
        """(K, d_out, d_in): W + s_k B_k A_k for each of the K deltas, in one batched GEMM; scaled
        in the factors' precision and cast once, as `add_to_weight`."""
        prepared = [d._prepared(weight.dtype) for d in deltas]
        if all(p is not None for p in prepared):
            A, B = LoRADelta._unpacked(torch.stack(prepared), weight.shape[1])
            return torch.baddbmm(weight.unsqueeze(0), B, A)
        A = torch.stack([d.A for d in deltas]).to(weight.dtype)
        B = torch.stack([d.B for d in deltas])
        B = (B * stacked_scales(deltas)[:, None, None]).to(weight.dtype)
        return torch.baddbmm(weight.unsqueeze(0), B, A)

    @staticmethod
    def joined_factors(deltas: list[LoRADelta]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) side by side along the rank, B scaled, so that B A = sum_k s_k B_k A_k: K
        adapters active together cost one GEMM pair (or one addmm in weight space), not K."""
        A = torch.cat([d.A for d in deltas])
        B = torch.cat([d.B * (d.scale * d.scaling) for d in deltas], dim=1)
        return A, B

    @staticmethod
    def joined_delta(deltas: list[LoRADelta], x: torch.Tensor) -> torch.Tensor:
        A, B = LoRADelta.joined_factors(deltas)
        return F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))

    @staticmethod
    def joined_weight(deltas: list[LoRADelta], weight: torch.Tensor) -> torch.Tensor:
        prepared = [d._prepared(weight.dtype) for d in deltas]
        if all(p is not None for p in prepared):
            A, B = LoRADelta._unpacked(torch.cat(prepared), weight.shape[1])
            return torch.addmm(weight, B, A)
        A, B = LoRADelta.joined_factors(deltas)
        return torch.addmm(weight, B.to(weight.dtype), A.to(weight.dtype))

    def merge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return weight + lora_delta_weight(
            self.A.to(weight.dtype), self.B.to(weight.dtype), scale * self.scaling, weight.shape
        )

    def unmerge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return weight - lora_delta_weight(
            self.A.to(weight.dtype), self.B.to(weight.dtype), scale * self.scaling, weight.shape
        )


def stacked_scales(deltas: list[LoRADelta]) -> torch.Tensor:
    """(K,) effective scales s_k * alpha_k / r_k."""
    if (
        len({d.scaling for d in deltas}) == 1
    ):  # one alpha/r, the usual case: one multiply instead of K
        return torch.stack([d.scale for d in deltas]) * deltas[0].scaling
    return torch.stack([d.scale * d.scaling for d in deltas])


register_core(
    "lora",
    LoRAConfig,
    LoRADelta,
    aliases=(),
    summary="low-rank update W + (alpha/r) B A",
    label="LoRA",
)
