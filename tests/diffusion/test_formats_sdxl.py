"""SDXL LoRA interop: two text encoders (kohya `lora_te1_`/`lora_te2_`, diffusers `text_encoder_2.`),
checked through diffusers' StableDiffusionXLPipeline.load_lora_weights on a tiny SDXL saved to disk."""

import json

import pytest
import torch

from peftkit.common_kernels import LoRAConfig, inject
from peftkit.diffusion import formats

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def tiny_sdxl_path(tmp_path_factory):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, norm_num_groups=32, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32, sample_size=16)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, eos_token_id=1, bos_token_id=0,
                            pad_token_id=1, projection_dim=32)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(config),
                                     text_encoder_2=CLIPTextModelWithProjection(config), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def load_pipe(path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(path)


@torch.no_grad()
def outputs(pipe):
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 16, 64, generator=gen)
    cond = {"text_embeds": torch.randn(1, 32, generator=gen), "time_ids": torch.randn(1, 6, generator=gen)}
    return (pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids)[0],
            pipe.unet(sample, 10, context, added_cond_kwargs=cond).sample)


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_sdxl_lora_loads_in_diffusers_and_peftkit_alike(tiny_sdxl_path, tmp_path, kind):
    pipe = load_pipe(tiny_sdxl_path)
    base = outputs(pipe)
    handles = {"unet": inject(pipe.unet, LoRAConfig(targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in"], r=4,
                                                    alpha=2.0)),
               "text_encoder": inject(pipe.text_encoder, LoRAConfig(targets=TEXT_TARGETS, r=2, alpha=3.0)),
               "text_encoder_2": inject(pipe.text_encoder_2, LoRAConfig(targets=TEXT_TARGETS, r=4))}
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
    formats.load_lora_file({"unet": ours.unet, "text_encoder": ours.text_encoder,
                            "text_encoder_2": ours.text_encoder_2}, tmp_path / "lora.safetensors")
    for got in (outputs(plain), outputs(ours)):
        for g, w in zip(got, want):
            assert ((g - w).norm() / w.norm()).item() < 1e-5
