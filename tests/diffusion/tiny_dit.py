"""Tiny SD3 and Flux pipelines for CPU tests, built from configs and saved with save_pretrained:
CLIP text encoders, a T5 encoder with a tokenizer built offline (a few-piece Unigram model), the
tiny SD VAE, and a one- or two-block transformer. Loading goes through the real from_pretrained."""

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def t5_tokenizer(max_length: int = 16):
    """A T5 tokenizer over single letters: enough to tell prompts apart, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in LETTERS] + [(c, -2.0) for c in LETTERS]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=model,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def _t5(vocab: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=d_model,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    )


def _clip(tokenizer, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=16,
        eos_token_id=1,
        bos_token_id=0,
        pad_token_id=1,
        projection_dim=32,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def build_tiny_sd3(sd_path, out):
    """StableDiffusion3Pipeline: two CLIPs with projection (pooled 64), T5 of width 64, one joint
    block at 16 px (latents 8x8, patch 2); tokenizer and VAE from the tiny SD pipeline."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(sd_path / "tokenizer")
    t5_tok = t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            pos_embed_max_size=16,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL.from_pretrained(sd_path / "vae", shift_factor=0.0609),
        text_encoder=_clip(tokenizer, projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, projection=True),
        tokenizer_2=tokenizer,
        text_encoder_3=_t5(len(t5_tok), 64),
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(out)
    return out


def build_tiny_flux(sd_path, out, guidance: bool = True):
    """FluxPipeline: CLIP (pooled 32), T5 of width 32, one double and one single block, guidance
    embedding on (as FLUX.1-dev); 16 px images give 8x8 latents packed into 16 tokens of 16."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(sd_path / "tokenizer")
    t5_tok = t5_tokenizer()
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=guidance,
            axes_dims_rope=(4, 6, 6),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
        ),
        vae=AutoencoderKL.from_pretrained(sd_path / "vae", shift_factor=0.0609),
        text_encoder=_clip(tokenizer, projection=False),
        tokenizer=tokenizer,
        text_encoder_2=_t5(len(t5_tok), 32),
        tokenizer_2=t5_tok,
    )
    pipe.save_pretrained(out)
    return out


def build_tiny_pipelines(sd_path, root) -> dict:
    """{"sd3": folder, "flux": folder}: both tiny pipelines saved under `root`."""
    return {
        "sd3": build_tiny_sd3(sd_path, root / "sd3"),
        "flux": build_tiny_flux(sd_path, root / "flux"),
    }
