"""Tiny ViTs and an explicit float64 ViT forward that the method tests compare against."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit.vision.backbones import create_backbone

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
TINY_CLIP = dict(
    image_size=16, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=4.0, output_dim=24
)


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


def tiny_vit(num_classes: int = 5, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone(
        "vit_tiny_patch16_224", num_classes=num_classes, **{**TINY, **overrides}
    ).eval()


def tiny_clip(num_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone(num_classes=num_classes, open_clip_config=TINY_CLIP).eval()


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def plain_op(name, module, x):
    """The base op of a Linear / LayerNorm / Conv2d, written out (a core's wrapper is seen through)."""
    module = base_module(module)
    if isinstance(module, torch.nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    if isinstance(module, torch.nn.Conv2d):
        return F.conv2d(x, module.weight, module.bias, module.stride)
    return x @ module.weight.T + (module.bias if module.bias is not None else 0)


def reference_vit(model, x, op=plain_op, mlp_extra=None, tokens=None):
    """timm ViT forward from its weights (model and x in float64).

    op(name, module, x): each Linear/LayerNorm/patch Conv2d (override to add a method's term);
    mlp_extra(i, h): added to block i's MLP output given its input h; tokens(i, t): rewrites the
    tokens entering block i (i = 0 after the embedding)."""
    get = model.get_submodule
    t = op("patch_embed.proj", get("patch_embed.proj"), x).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(len(x), -1, -1), t], 1) + model.pos_embed
    for i, blk in enumerate(model.blocks):
        n = f"blocks.{i}"
        if tokens is not None:
            t = tokens(i, t)
        h = op(f"{n}.norm1", get(f"{n}.norm1"), t)
        B, N, C = h.shape
        heads = blk.attn.num_heads
        q, k, v = (
            op(f"{n}.attn.qkv", get(f"{n}.attn.qkv"), h)
            .reshape(B, N, 3, heads, C // heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn = torch.softmax(q @ k.transpose(-1, -2) / (C // heads) ** 0.5, dim=-1)
        t = t + op(
            f"{n}.attn.proj", get(f"{n}.attn.proj"), (attn @ v).transpose(1, 2).reshape(B, N, C)
        )
        h = op(f"{n}.norm2", get(f"{n}.norm2"), t)
        m = op(
            f"{n}.mlp.fc2", get(f"{n}.mlp.fc2"), F.gelu(op(f"{n}.mlp.fc1", get(f"{n}.mlp.fc1"), h))
        )
        t = t + m + (mlp_extra(i, h) if mlp_extra is not None else 0)
    if tokens is not None:
        t = tokens(len(model.blocks), t)
    t = op("norm", get("norm"), t)
    return t[:, 0] @ model.head.weight.T + model.head.bias


def base_module(module):
    """The plain Linear under a core's AdaptedLayer."""
    return getattr(module, "base", module)


@pytest.fixture
def float64():
    """Float64 by default for the test (parity tests that must be exact)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def kit():
    """The helpers above, for tests (pytest's importlib mode cannot import conftest by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        tiny_vit=tiny_vit,
        tiny_clip=tiny_clip,
        reference_vit=reference_vit,
        TINY=TINY,
        TINY_CLIP=TINY_CLIP,
    )
