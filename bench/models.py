"""Benchmark workloads built from code (random weights, no download): an SD1.5-shaped UNet and
ViT-B/16, each with its inputs and a training loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
VIT_TARGETS = ["qkv"]
# Modules compiled one by one in "regional" compilation: the repeated blocks.
REGIONS = {"unet": ("BasicTransformerBlock", "ResnetBlock2D"), "vit": ("Block",)}


def build(
    model: str, bs: int, device: str = "cuda"
) -> tuple[nn.Module, Callable[[nn.Module, bool], torch.Tensor]]:
    """(model, loss_fn(model, input_grad)); loss_fn runs one forward and returns a scalar loss."""
    torch.manual_seed(0)
    g = torch.Generator(device=device).manual_seed(1)
    if model == "unet":
        from diffusers import UNet2DConditionModel

        with torch.device(device):
            net = UNet2DConditionModel(**SD15_UNET)
        x = torch.randn(bs, 4, 64, 64, device=device, generator=g)
        enc = torch.randn(bs, 77, 768, device=device, generator=g)
        t = torch.randint(0, 1000, (bs,), device=device, generator=g)
        target = torch.randn(bs, 4, 64, 64, device=device, generator=g)

        def loss_fn(m: nn.Module, input_grad: bool) -> torch.Tensor:
            xi = x.detach().requires_grad_(input_grad)
            return F.mse_loss(m(xi, t, enc).sample.float(), target)
    else:
        import timm

        with torch.device(device):
            net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
        x = torch.randn(bs, 3, 224, 224, device=device, generator=g)
        y = torch.randint(0, 100, (bs,), device=device, generator=g)

        def loss_fn(m: nn.Module, input_grad: bool) -> torch.Tensor:
            xi = x.detach().requires_grad_(input_grad)
            return F.cross_entropy(m(xi).float(), y)

    net.requires_grad_(False)
    return net, loss_fn


def compile_regions(model: nn.Module, kind: str, **kwargs) -> None:
    for module in model.modules():
        if type(module).__name__ in REGIONS[kind]:
            module.compile(**kwargs)
