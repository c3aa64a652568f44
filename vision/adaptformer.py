"""AdaptFormer (Chen et al., NeurIPS 2022, "AdaptFormer: Adapting Vision Transformers for Scalable
Visual Recognition", Sec. 3.2, Eq. 4-5): a bottleneck adapter parallel to each block's MLP,

    x' = x + MLP(LN(x)) + s * W_up ReLU(W_down LN(x))

with bottleneck d_hat << d and scale s (0.1 in the paper). W_up and its bias start at zero, so the
adapted model starts exactly at the base model; W_down uses the Kaiming-uniform init of the
official release. The adapter reads the MLP's input LN(x) (the official code feeds the
un-normalized x; with the zero-initialized W_up both start at the base model) and is attached as
a forward hook on `block.mlp`, so timm / open_clip blocks stay untouched.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.common_kernels.errors import PeftkitError

from .backbones import ViTLayout
from .hooked import HookedMethod


@dataclass
class AdaptFormerConfig:
    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise PeftkitError(f"AdaptFormerConfig.bottleneck must be >= 1, got {self.bottleneck}")
        if self.scale <= 0:
            raise PeftkitError(f"AdaptFormerConfig.scale must be > 0, got {self.scale}")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftkitError(f"AdaptFormerConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


def adaptformer_branch(
    x: torch.Tensor,
    down_w: torch.Tensor,
    down_b: torch.Tensor,
    up_w: torch.Tensor,
    up_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """s * (W_up ReLU(W_down x + b_down) + b_up): the term added to the MLP output."""
    return scale * F.linear(F.relu(F.linear(x, down_w, down_b)), up_w, up_b)


class BottleneckAdapter(nn.Module):
    def __init__(self, dim: int, config: AdaptFormerConfig) -> None:
        super().__init__()
        self.down = nn.Linear(dim, config.bottleneck)
        self.up = nn.Linear(config.bottleneck, dim)
        self.dropout = nn.Dropout(config.dropout)
        self.scale = config.scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A bf16 base feeds bf16 tokens to fp32 adapter weights; outside autocast they must meet in one dtype.
        h = self.dropout(F.relu(self.down(x.to(self.down.weight.dtype))))
        return self.scale * self.up(h)


class AdaptFormer(HookedMethod):
    """One BottleneckAdapter per block in `model.peftkit_adaptformer`, added to each `mlp` output by
    a forward hook."""

    attr, label = "peftkit_adaptformer", "AdaptFormer adapters"
    mismatch_hint = "the adapter was made with another bottleneck, depth or width"

    def __init__(self, model: nn.Module, layout: ViTLayout, config: AdaptFormerConfig) -> None:
        self.config = config
        adapters = self._attach(
            model,
            nn.ModuleList(
                BottleneckAdapter(layout.width(i), config) for i in range(len(layout.blocks))
            ),
        )

        def hook(adapter):
            return lambda mod, args, out: out + adapter(args[0]).to(out.dtype)

        self.hooks = [
            model.get_submodule(name).register_forward_hook(hook(a))
            for name, a in zip(layout.site_names("mlp"), adapters)
        ]
