"""Visual Prompt Tuning (Jia et al., ECCV 2022, "Visual Prompt Tuning", Sec. 3.2, Eq. 4-7).

Shallow (VPT-Shallow, Eq. 4-5): p learnable tokens P enter after [CLS] once,

    x_1 = L_1([cls, P, E_0]),  x_i = L_i(x_{i-1})

Deep (VPT-Deep, Eq. 6-7): every block i gets fresh prompts P_{i-1}; the prompt outputs of the
previous block are discarded,

    [cls_i, _, E_i] = L_i([cls_{i-1}, P_{i-1}, E_{i-1}])

The head reads [CLS]; prompt tokens are dropped before the final norm, so pooling and the head see
the same token layout as the plain ViT. Prompts are initialized uniform(-v, v) with
v = sqrt(6 / (3 * patch_h * patch_w + d)) (Xavier uniform over the patch-embedding fan-in, as the
official release does) and pass through dropout (the paper's prompt dropout) when training.

Attached through forward hooks: the entry module (timm `norm_pre`, open_clip `ln_pre`) inserts the
prompts, each later block's pre-hook replaces them (deep), the exit hook removes them. The timm /
open_clip code is not touched; `remove()` gives the plain ViT back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from peftkit.common_kernels.errors import PeftkitError

from .backbones import ViTLayout
from .hooked import HookedMethod


@dataclass
class VPTConfig:
    length: int = 10
    deep: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.length <= 1024:
            raise PeftkitError(f"VPTConfig.length must be in [1, 1024], got {self.length}")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftkitError(f"VPTConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


def vpt_init_bound(patch_size: tuple[int, int], dim: int) -> float:
    """The official VPT init: Xavier uniform bound with fan-in 3 * patch area and fan-out d."""
    return math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + dim))


def insert_prompts(tokens: torch.Tensor, prompts: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """[prefix, patches] -> [prefix, prompts, patches]; prompts (p, d) are shared by the batch,
    (batch, p, d) are one set per row (a batched sweep's configurations)."""
    batch = prompts.to(tokens.dtype)
    if batch.dim() == 2:
        batch = batch.unsqueeze(0).expand(tokens.shape[0], -1, -1)
    return torch.cat([tokens[:, :n_prefix], batch, tokens[:, n_prefix:]], dim=1)


def replace_prompts(tokens: torch.Tensor, prompts: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Swap the p prompt tokens after the prefix for fresh ones (VPT-Deep)."""
    p = prompts.shape[-2]
    return insert_prompts(
        torch.cat([tokens[:, :n_prefix], tokens[:, n_prefix + p :]], dim=1), prompts, n_prefix
    )


def remove_prompts(tokens: torch.Tensor, p: int, n_prefix: int) -> torch.Tensor:
    return torch.cat([tokens[:, :n_prefix], tokens[:, n_prefix + p :]], dim=1)


class VisualPrompts(nn.Module):
    """Owns the prompts: (1, p, d) shallow or (depth, p, d) deep."""

    def __init__(self, config: VPTConfig, layout: ViTLayout) -> None:
        super().__init__()
        n = len(layout.blocks) if config.deep else 1
        bound = vpt_init_bound(layout.patch_size, layout.embed_dim)
        self.prompts = nn.Parameter(
            torch.empty(n, config.length, layout.embed_dim).uniform_(-bound, bound)
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, layer: int) -> torch.Tensor:
        return self.dropout(self.prompts[layer])


class VPT(HookedMethod):
    """VPT attached to a ViT classifier; `model.peftkit_vpt` holds the prompts."""

    attr, label = "peftkit_vpt", "VPT prompts"
    mismatch_hint = "the adapter was made with another prompt length, depth or width"

    def __init__(self, model: nn.Module, layout: ViTLayout, config: VPTConfig) -> None:
        self.config = config
        module = self._attach(model, VisualPrompts(config, layout))
        n_prefix, p = layout.num_prefix_tokens, config.length

        def enter(mod, args, out):
            return insert_prompts(out, module(0), n_prefix)

        def deep(i):
            def pre(mod, args):
                return (replace_prompts(args[0], module(i), n_prefix), *args[1:])

            return pre

        self.hooks = [model.get_submodule(layout.entry).register_forward_hook(enter)]
        if config.deep:
            self.hooks += [
                model.get_submodule(b).register_forward_pre_hook(deep(i))
                for i, b in enumerate(layout.blocks)
                if i > 0
            ]
        exit_module = model.get_submodule(layout.exit)
        if layout.exit_is_pre:
            self.hooks.append(
                exit_module.register_forward_pre_hook(
                    lambda mod, args: (remove_prompts(args[0], p, n_prefix), *args[1:])
                )
            )
        else:
            self.hooks.append(
                exit_module.register_forward_hook(
                    lambda mod, args, out: remove_prompts(out, p, n_prefix)
                )
            )
