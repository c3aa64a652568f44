"""A tiny diffusers UNet in float64 and its output on a fixed input, for exact format interop tests."""

import torch


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
        attention_head_dim=8,
    )
    return unet.double()


@torch.no_grad()
def output(unet):
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    context = torch.randn(1, 16, 32, generator=gen, dtype=torch.float64)
    return unet(sample, 10, context).sample


def randomize(parameters, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)


def relative(got, want):
    return ((got - want).norm() / want.norm()).item()
