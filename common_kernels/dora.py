"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353), eq. (5):

    W' = m * (W0 + s B A) / ||W0 + s B A||_row,   m: d_out, starts at ||W0||_row,  B = 0 at init.

LoRA's factors (lora.py) plus a magnitude per output row; on Conv2d the norm runs over each
output channel's kernel. As in the paper (sec. 4.3) and HF peft, the norm is a constant in
backward: gradients reach m and B A through the scaled direction only, which saves the norm's
weight-sized backward and matches peft's gradients. Always runs in weight space: the norm needs
W0 + s B A formed anyway, so folding it into the kernel costs one GEMM more than LoRA, not five.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .delta import Geometry
from .errors import PeftkitError
from .lora import LoRAConfig, LoRADelta, stacked_scales
from .registry import register_core


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA settings: LoRA's (r, alpha, rslora, init); no input dropout, weight space only."""

    apply: str = "weight"

    def __post_init__(self) -> None:
        if self.dropout:
            raise PeftkitError(
                f"DoRAConfig.dropout must be 0 (DoRA runs in weight space), got {self.dropout}"
            )
        if self.apply != "weight":
            raise PeftkitError(
                f"DoRAConfig.apply must be 'weight' (the row norm needs W + s B A formed), "
                f"got {self.apply!r}"
            )
        super().__post_init__()


def dora_weight(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m / ||W + s B A||_row * (W + s B A), the row norm), for W of shape (d_out, ...) and A, B
    of any shapes that flatten to (r, fan_in) and (d_out, r); the norm is detached (sec. 4.3)."""
    flat = weight.reshape(weight.shape[0], -1)
    V = torch.addmm(flat, B.reshape(B.shape[0], -1) * scale, A.reshape(A.shape[0], -1))
    norm = torch.linalg.vector_norm(V.detach(), dim=1)
    return ((magnitude / norm)[:, None] * V).reshape(weight.shape), norm


class DoRADelta(LoRADelta):
    kohya_names: ClassVar[dict[str, str]] = {
        "A": "lora_down.weight",
        "B": "lora_up.weight",
        "magnitude": "dora_scale",
    }
    additive = False
    side = "weight"

    def __init__(self, geometry: Geometry, config: DoRAConfig, name: str = "") -> None:
        super().__init__(geometry, config, name)
        self.magnitude = nn.Parameter(torch.ones(geometry.out_features))
        self._merged_norm: torch.Tensor | None = None

    def init_from_base(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            flat = weight.reshape(weight.shape[0], -1).to(self.magnitude.dtype)
            self.magnitude.copy_(torch.linalg.vector_norm(flat, dim=1))

    def _weight(self, weight: torch.Tensor, scale) -> tuple[torch.Tensor, torch.Tensor]:
        # In the parameters' precision (at least fp32), autocast or not: a bf16 row norm would
        # rescale every row by up to 0.4%, more than a small update changes it.
        dtype = torch.promote_types(weight.dtype, self.A.dtype)
        with torch.autocast(weight.device.type, enabled=False):
            new, norm = dora_weight(weight.to(dtype), self.A, self.B, self.magnitude, scale)
        return new.to(weight.dtype), norm

    def transform_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self._weight(weight, scale * self.scaling)[0]

    def group_key(self) -> tuple | None:
        if self.geometry.kind != "linear":
            return None
        return ("dora", tuple(self.A.shape), tuple(self.B.shape), self.A.dtype)

    @staticmethod
    def routed_weights(deltas: list[DoRADelta], weight: torch.Tensor) -> torch.Tensor:
        """(K, d_out, d_in): each delta's DoRA weight from one batched GEMM (for routed runs)."""
        A = torch.stack([d.A for d in deltas])
        B = torch.stack([d.B for d in deltas]) * stacked_scales(deltas)[:, None, None]
        m = torch.stack([d.magnitude for d in deltas])
        with torch.autocast(weight.device.type, enabled=False):
            V = torch.baddbmm(weight.to(A.dtype).unsqueeze(0), B, A)
            norm = torch.linalg.vector_norm(V.detach(), dim=2, keepdim=True)
            return (m[:, :, None] / norm * V).to(weight.dtype)

    def merge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        # The norm is kept: W' alone has row norms m, so W0 cannot be recovered without it.
        new, self._merged_norm = self._weight(weight, scale * self.scaling)
        return new

    def unmerge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        ratio = (self._merged_norm / self.magnitude).to(weight.dtype)
        self._merged_norm = None
        flat = weight.reshape(weight.shape[0], -1) * ratio[:, None]
        lora = self.B.reshape(self.B.shape[0], -1) @ self.A.reshape(self.A.shape[0], -1)
        return (flat - (scale * self.scaling) * lora.to(weight.dtype)).reshape(weight.shape)


register_core(
    "dora",
    DoRAConfig,
    DoRADelta,
    aliases=(),
    summary="weight-decomposed LoRA: m (W + s B A) / ||W + s B A||",
    label="DoRA",
)
