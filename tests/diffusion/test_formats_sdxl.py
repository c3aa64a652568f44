"""SDXL LoRA interop: two text encoders (kohya `lora_te1_`/`lora_te2_`, diffusers `text_encoder_2.`),
checked through diffusers' StableDiffusionXLPipeline.load_lora_weights on a tiny SDXL saved to disk."""

import pytest
import torch

from peftkit.common_kernels import LoRAConfig, inject
from peftkit.diffusion import formats

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def load_pipe(path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(path)


@torch.no_grad()
def outputs(pipe):
    ids = pipe.tokenizer(
        ["a cat"], padding="max_length", max_length=16, return_tensors="pt"
    ).input_ids
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 16, 64, generator=gen)
    cond = {
        "text_embeds": torch.randn(1, 32, generator=gen),
        "time_ids": torch.randn(1, 6, generator=gen),
    }
    return (
        pipe.text_encoder(ids)[0],
        pipe.text_encoder_2(ids)[0],
        pipe.unet(sample, 10, context, added_cond_kwargs=cond).sample,
    )


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_sdxl_lora_loads_in_diffusers_and_peftkit_alike(tiny_sdxl_path, tmp_path, kind):
    pipe = load_pipe(tiny_sdxl_path)
    base = outputs(pipe)
    handles = {
        "unet": inject(
            pipe.unet,
            LoRAConfig(targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in"], r=4, alpha=2.0),
        ),
        "text_encoder": inject(pipe.text_encoder, LoRAConfig(targets=TEXT_TARGETS, r=2, alpha=3.0)),
        "text_encoder_2": inject(pipe.text_encoder_2, LoRAConfig(targets=TEXT_TARGETS, r=4)),
    }
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for handle in handles.values():
            for _, p in handle.named_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    want = outputs(pipe)
    assert all((w - b).abs().max() > 1e-3 for w, b in zip(want, base))
    save = formats.save_diffusers_lora if kind == "diffusers" else formats.save_kohya_lora
    save(handles, tmp_path / "lora.safetensors")

    plain = load_pipe(tiny_sdxl_path)
    plain.load_lora_weights(tmp_path, weight_name="lora.safetensors")
    ours = load_pipe(tiny_sdxl_path)
    formats.load_lora_file(
        {
            "unet": ours.unet,
            "text_encoder": ours.text_encoder,
            "text_encoder_2": ours.text_encoder_2,
        },
        tmp_path / "lora.safetensors",
    )
    for got in (outputs(plain), outputs(ours)):
        for g, w in zip(got, want):
            assert ((g - w).norm() / w.norm()).item() < 1e-5
