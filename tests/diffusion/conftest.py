"""Concept-training fixtures: a few tiny instance images with a caption, and a tiny open_clip model
saved as a local folder (the tiny SD pipeline itself, `tiny_sd_path`, is shared from tests/conftest.py)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image


def write_concept_images(folder, count=4, size=16, seed=0):
    """`count` small RGB images of one 'concept' (a bright square on a dark field, jittered), the
    first with a caption file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.full((size, size, 3), 30, dtype=np.uint8)
        x, y = rng.integers(0, size // 4, 2)
        pixels[y : y + size // 2, x : x + size // 2] = (220, 180, 40)
        pixels = np.clip(pixels + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("a photo of sks toy on a table")
    return folder


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory):
    return write_concept_images(tmp_path_factory.mktemp("concept") / "images")


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        folder / "open_clip_model.safetensors",
    )
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}})
    )
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_path(tiny_sd_path, tmp_path_factory):
    """A tiny StableDiffusionXLPipeline (two text encoders, pooled + size conditioning) saved to disk;
    tokenizer and VAE are borrowed from the tiny SD pipeline."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        eos_token_id=1,
        bos_token_id=0,
        pad_token_id=1,
    )
    # Two transformer layers in one block and per-block head counts: the key layouts SDXL files use.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        norm_num_groups=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(tiny_sd_path / "vae"),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
        ),
    )
    out = tmp_path_factory.mktemp("tiny-sdxl") / "pipeline"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory):
    """A tiny transformers CLIP vision model with projection (an IP-Adapter image encoder), saved."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    return str(path)


def write_box_pairs(root, conditions=True):
    """Four 16x16 images of a colored box under root/images (with a caption each), and with
    `conditions` their Canny edges under root/conditions: a control/IP-Adapter training set."""
    from peftkit.diffusion.conditions import canny

    (root / "images").mkdir(parents=True)
    if conditions:
        (root / "conditions").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        a = np.full((16, 16, 3), 20, np.uint8)
        a[3 + i : 12, 2 : 9 + i] = rng.integers(60, 255, 3)
        Image.fromarray(a).save(root / "images" / f"{i}.png")
        if conditions:
            canny(Image.fromarray(a)).save(root / "conditions" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text("a box")
    return root
