"""Where adapters attach to a timm Swin Transformer (Liu et al., ICCV 2021).

Swin blocks hold the same sites as a ViT's (attn.qkv, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2,
mlp), so the cores, SSF, AdaptFormer, BitFit and full fine-tuning apply unchanged; the token
width doubles at every stage, so per-block widths come in `block_dims`. VPT does not apply: Swin
attends within shifted windows of a (B, H, W, C) grid and has no token sequence to prepend
prompts to (the VPT paper's Swin variant changes the window attention itself).
"""

from __future__ import annotations

from torch import nn

from .backbones import _TIMM_SITES, ViTLayout

_NO_PROMPTS = "Swin attends within windows of an image grid: there is no token sequence for prompts"


def swin_layout(model: nn.Module) -> ViTLayout:
    """The ViTLayout of a timm `SwinTransformer`; its head is the Linear `head.fc`."""
    blocks, dims = [], []
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            blocks.append(f"layers.{i}.blocks.{j}")
            dims.append(block.norm1.normalized_shape[-1])
    model_sites = {"patch": "patch_embed.proj", "norm": "norm"}
    if not isinstance(model.patch_embed.norm, nn.Identity):
        model_sites["pre_norm"] = "patch_embed.norm"
    return ViTLayout(
        family="swin",
        embed_dim=dims[0],
        patch_size=tuple(model.patch_embed.patch_size),
        num_prefix_tokens=0,
        blocks=blocks,
        entry="patch_embed",
        exit="norm",
        exit_is_pre=True,
        head="head.fc",
        block_sites=dict(_TIMM_SITES),
        model_sites=model_sites,
        block_dims=dims,
        unsupported={"vpt-shallow": _NO_PROMPTS, "vpt-deep": _NO_PROMPTS},
    )
