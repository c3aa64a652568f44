"""open_clip visual towers with attention that adapters can reach.

open_clip blocks attend through `nn.MultiheadAttention`, whose forward reads `in_proj_weight` and
`out_proj.weight` directly instead of calling submodules, so nothing there can be wrapped or
hooked. `split_attention` swaps each one for `SplitAttention`: the same weights (the very
Parameters) as two Linear layers `qkv` and `proj` and the same computation, softmax(q k^T /
sqrt(d_head)) v, so the cores, SSF and BitFit reach qkv/proj as on a timm ViT.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class SplitAttention(nn.Module):
    """Self-attention of an `nn.MultiheadAttention` (no dropout, no key padding) with its input
    and output projections as the Linear layers `qkv` (d -> 3d) and `proj` (d -> d)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        d = mha.embed_dim
        self.num_heads, self.batch_first = mha.num_heads, mha.batch_first
        self.qkv = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
        self.proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        self.qkv.weight = mha.in_proj_weight
        self.proj.weight = mha.out_proj.weight
        if mha.in_proj_bias is not None:
            self.qkv.bias = mha.in_proj_bias
        if mha.out_proj.bias is not None:
            self.proj.bias = mha.out_proj.bias

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        x = q_x if self.batch_first else q_x.transpose(0, 1)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(b, n, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def split_attention(visual: nn.Module) -> None:
    """Swap every block's `nn.MultiheadAttention` in an open_clip tower for a SplitAttention
    (blocks that attend some other way keep theirs; then qkv/proj stay out of reach)."""
    for block in visual.transformer.resblocks:
        attn = getattr(block, "attn", None)
        if (
            isinstance(attn, nn.MultiheadAttention)
            and not attn.dropout
            and attn._qkv_same_embed_dim
        ):
            block.attn = SplitAttention(attn)


def has_split_attention(visual: nn.Module) -> bool:
    return all(
        isinstance(getattr(b, "attn", None), SplitAttention) for b in visual.transformer.resblocks
    )
