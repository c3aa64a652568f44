"""LoHa: the low-rank Hadamard product of FedPara (Hyeon-Woo et al., 2022, arXiv:2108.06098), as
LyCORIS and peft apply it:

    h = W0 x + s ((w1a w1b) * (w2a w2b)) x,   w*a: d_out x r,  w*b: r x fan_in,  s = alpha / r.

A rank-r^2 update from 4 r-rank factors; w2b = 0 at init (as peft), so the delta starts at 0. The
product is itself a rank-r^2 LoRA, (w1a . w2a)(w1b . w2b) with row-wise Khatri-Rao factors, which
is how `apply="factored"` applies it (lora.py's functions); `apply="weight"` (and "auto" on CUDA)
forms the d_out x fan_in delta and runs the base op once. Conv2d factors stay 2-D (fan_in = d_in kh kw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .config import AdapterConfig, check_positive
from .delta import Delta, Geometry
from .errors import PeftkitError
from .lora import lora_conv_delta, lora_linear_delta
from .registry import register_core


@dataclass
class LoHaConfig(AdapterConfig):
    """LoHa settings. `alpha=None` means alpha = r (scaling 1)."""

    r: int = 8
    alpha: float | None = None
    apply: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise PeftkitError(f"LoHaConfig.r must be an integer >= 1, got {self.r!r}")
        if self.alpha is not None:
            check_positive("LoHaConfig", "alpha", self.alpha)
        if self.apply not in ("auto", "factored", "weight"):
            raise PeftkitError(
                f"LoHaConfig.apply must be 'auto', 'factored' or 'weight', got {self.apply!r}"
            )

    @property
    def scaling(self) -> float:
        return (float(self.r) if self.alpha is None else self.alpha) / self.r


def loha_delta_weight(
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """scale * (w1a w1b) * (w2a w2b), a (d_out, fan_in) matrix."""
    return (w1a @ w1b) * (w2a @ (w2b * scale))


def khatri_rao_factors(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U V = (w1a w1b) * (w2a w2b): U = (d_out, r^2) row-wise products of w1a and
    w2a, V = (r^2, fan_in) column-wise products of w1b and w2b."""
    U = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    V = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    return U, V


class LoHaDelta(Delta):
    kohya_names: ClassVar[dict[str, str]] = {
        "w1a": "hada_w1_a",
        "w1b": "hada_w1_b",
        "w2a": "hada_w2_a",
        "w2b": "hada_w2_b",
    }

    def __init__(self, geometry: Geometry, config: LoHaConfig, name: str = "") -> None:
        super().__init__(geometry)
        r, d_out, fan_in = config.r, geometry.out_features, geometry.fan_in
        if r > min(fan_in, d_out):
            raise PeftkitError(
                f"LoHa rank r={r} is larger than module {name!r} allows "
                f"(min(fan_in={fan_in}, d_out={d_out})): lower r or exclude the module"
            )
        self.scaling = config.scaling
        self.w1a, self.w2a = (nn.Parameter(torch.empty(d_out, r)) for _ in range(2))
        self.w1b, self.w2b = (nn.Parameter(torch.empty(r, fan_in)) for _ in range(2))
        for p in (self.w1a, self.w1b, self.w2a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.zeros_(self.w2b)
        self.apply_mode = config.apply

    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return tuple(p.to(dtype) for p in (self.w1a, self.w1b, self.w2a, self.w2b))

    def delta_weight(self, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
        W = loha_delta_weight(*self._factors(dtype), scale * self.scaling)
        return W.reshape(self.geometry.weight_shape)

    def add_to_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight(scale.to(weight.dtype), weight.dtype)

    def delta(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        U, V = khatri_rao_factors(*self._factors(x.dtype))
        s = (scale * self.scaling).to(x.dtype)
        g = self.geometry
        if g.kind == "linear":
            return lora_linear_delta(x, V, U, s)
        kernel = V.reshape(V.shape[0], g.in_features, *g.kernel_size)
        return lora_conv_delta(x, kernel, U[:, :, None, None], s, g)

    def merge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return weight + self.delta_weight(scale, weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return weight - self.delta_weight(scale, weight.dtype)


register_core(
    "loha",
    LoHaConfig,
    LoHaDelta,
    aliases=(),
    summary="Hadamard product of two low-rank updates (w1a w1b) * (w2a w2b)",
    label="LoHa",
)
