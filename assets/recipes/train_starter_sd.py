"""Pretrain the starter text-to-image model (assets/starter-sd) from scratch on procedural scenes.

A Stable-Diffusion-shaped latent diffusion model at 64x64 pixels, small enough for a laptop CPU:
AutoencoderKL (64x64x3 <-> 32x32x4, one downsampling: a 16x16 latent blurred the sample
flower's 5-pixel checks), a CLIP text encoder with a byte-level BPE tokenizer whose
merges cover the caption words (any other word still splits into byte tokens), a UNet2DCondition
model with cross-attention, and a DDIM scheduler. Two phases, one wall-clock budget:

1. the VAE (L1 + MSE reconstruction, a small KL term; latents rescaled to unit std afterwards);
2. the UNet and text encoder jointly, epsilon prediction, 10% empty captions so classifier-free
   guidance works, on scenes drawn from a pool of 200k captioned parameter sets and rasterized
   on the GPU every step.

    python -m peftkit.assets.recipes.train_starter_sd --out assets/starter-sd

The folder loads with `StableDiffusionPipeline.from_pretrained` (UNet and VAE are stored in fp16
and load as fp32) and with `peftkit.diffusion.base.load_base("starter")`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .caption_tokenizer import build_tokenizer, encode_captions
from .recipe_run import (
    Budget,
    RunLog,
    autocast,
    folder_megabytes,
    lr_factor,
    pick_device,
    save_folder,
)
from .shapes import SD_SHAPES, SD_TEXTURES, ShapeScenes, rotate_hue, take

ASSETS = Path(__file__).resolve().parent.parent


@dataclass
class SDRecipe:
    """Every setting of a run; written to recipe.json next to the weights."""

    size: int = 64
    minutes: float = 8.4
    vae_share: float = 0.22  # fraction of the budget spent on the VAE
    # share of the VAE's images with their hues turned (shapes.rotate_hue), so it also meets
    # colors no caption names, like the sample flower's teal and magenta
    vae_hue: float = 0.7
    # share of plain objects in the VAE's own scenes (None: the captioned pool's 0.55); fine
    # checks are what a short VAE run blurs first
    vae_plain: float | None = 0.3
    # pixel loss weighted toward the target's edges (weighted_recon below): a
    # plain mean barely sees the few pixels of fine checks, and a short run blurs them first
    vae_edge_weight: float = 10.0
    steps: int | None = None  # fixed UNet step count instead of the clock (tests)
    vae_steps: int | None = None
    batch: int = 512
    vae_batch: int = 128
    lr: float = 7e-4
    text_lr: float = 7e-4
    vae_lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1
    kl_weight: float = 1e-6
    pool: int = 200_000
    seed: int = 0
    log_every: int = 100
    unet: dict = field(
        default_factory=lambda: dict(
            block_out_channels=(64, 128, 192),
            layers_per_block=1,
            attention_head_dim=4,
            norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
    )
    vae: dict = field(
        default_factory=lambda: dict(
            block_out_channels=(32, 64),  # one downsampling: 32x32 latents at 64 px
            layers_per_block=1,
            norm_num_groups=32,
            latent_channels=4,
        )
    )
    text: dict = field(
        default_factory=lambda: dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=32,
        )
    )

    @classmethod
    def tiny(cls, **overrides) -> SDRecipe:
        """A few-hundred-KB model for CPU smoke tests."""
        base = dict(
            size=32,
            batch=8,
            vae_batch=8,
            pool=256,
            warmup=2,
            log_every=1,
            unet=dict(
                block_out_channels=(16, 32),
                layers_per_block=1,
                attention_head_dim=2,
                norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            ),
            vae=dict(
                block_out_channels=(8, 16, 16),
                layers_per_block=1,
                norm_num_groups=8,
                latent_channels=4,
            ),
            text=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=32,
            ),
        )
        return cls(**{**base, **overrides})


def sd_scenes(size: int, plain: float = 0.55) -> ShapeScenes:
    """The text-to-image starter's scenes (every shape and texture, up to four objects); `plain`
    is the share of untextured objects, 0.55 in the captioned pool the UNet learns from."""
    return ShapeScenes(size=size, shapes=SD_SHAPES, max_count=4, textures=SD_TEXTURES, plain=plain)


# ---- models ----


def build_models(recipe: SDRecipe, tokenizer):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae_blocks = len(recipe.vae["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        sample_size=recipe.size,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        **recipe.vae,
    )
    latent = recipe.size // 2 ** (vae_blocks - 1)  # the pipeline's vae_scale_factor rule
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **recipe.text,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=latent,
        in_channels=recipe.vae["latent_channels"],
        out_channels=recipe.vae["latent_channels"],
        cross_attention_dim=recipe.text["hidden_size"],
        **recipe.unet,
    )
    # DDPM's linear betas end near zero signal (alpha_bar_T ~ 4e-5); SD's scaled_linear leaves
    # enough at t=T on small latents for the model to read the mean color from the noise instead of
    # the prompt. "trailing" spacing starts sampling at t=999.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )
    return vae, text, unet, scheduler


# ---- phase 1: VAE ----


def weighted_recon(out: torch.Tensor, target: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """L1 + MSE per pixel, weighted toward the target's edges (its color gradient, spread over
    3 x 3) when `edge_weight` > 0; the weights average to one, so the loss keeps its scale."""
    err = (out - target).abs() + (out - target) ** 2
    if edge_weight <= 0:
        return err.mean()
    dy = F.pad((target[:, :, 1:] - target[:, :, :-1]).abs(), (0, 0, 0, 1))
    dx = F.pad((target[..., 1:] - target[..., :-1]).abs(), (0, 1))
    edges = F.max_pool2d((dx + dy).sum(1, keepdim=True), 3, stride=1, padding=1)
    weight = 1 + edge_weight * edges / edges.mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    return (err * weight).mean() / weight.mean()


def train_vae(vae, scenes: ShapeScenes, pool: dict, recipe: SDRecipe, device, log) -> dict:
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    budget = Budget(recipe.minutes * recipe.vae_share, recipe.vae_steps)
    gen = torch.Generator(device=device).manual_seed(recipe.seed)
    # a stream of its own, so the scenes and noise are those of a run without hue turns
    hue_gen = torch.Generator(device=device).manual_seed(recipe.seed + 7)
    step, recon = 0, float("nan")
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = recipe.vae_lr * lr_factor(step, budget.progress(step), recipe.warmup)
        idx = torch.randint(
            0, len(pool["shape"]), (recipe.vae_batch,), device=device, generator=gen
        )
        x = scenes.render(take(pool, idx), device)
        if recipe.vae_hue:
            angles = torch.rand(len(x), device=device, generator=hue_gen) * 2 * torch.pi
            turn = torch.rand(len(x), device=device, generator=hue_gen) < recipe.vae_hue
            x = rotate_hue(x, angles * turn)
        x = x * 2 - 1
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            out = vae.decode(posterior.sample(generator=gen)).sample.float()
        rec = weighted_recon(out, x, recipe.vae_edge_weight)
        loss = rec + recipe.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % recipe.log_every == 0 or budget.done(step):
            recon = float(rec.detach())
            log(
                f"vae step {step} recon {recon:.4f} kl {float(posterior.kl().detach().mean()):.1f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {budget.elapsed():.0f}s"
            )
    vae.eval()
    with torch.no_grad(), autocast(device):
        idx = torch.arange(min(1024, len(pool["shape"])), device=device)
        x = scenes.render(take(pool, idx), device) * 2 - 1
        latents = vae.encode(x).latent_dist.sample(generator=gen).float()
        psnr = -10 * torch.log10(F.mse_loss(vae.decode(latents).sample.float().clamp(-1, 1), x) / 4)
    scale = 1.0 / float(latents.std())
    vae.register_to_config(scaling_factor=scale)
    log(
        f"vae done: {step} steps, recon {recon:.4f}, PSNR {float(psnr):.1f} dB, scaling_factor {scale:.4f}"
    )
    return {
        "vae_steps": step,
        "vae_recon": recon,
        "vae_psnr_db": float(psnr),
        "scaling_factor": scale,
        "vae_seconds": budget.elapsed(),
    }


# ---- phase 2: UNet + text encoder ----


def train_unet(
    unet,
    text,
    vae,
    tokenizer,
    scheduler,
    scenes: ShapeScenes,
    pool: dict,
    ids: torch.Tensor,
    recipe: SDRecipe,
    device,
    log,
) -> dict:
    unet.to(device).train()
    text.to(device).train()
    vae.requires_grad_(False)
    groups = [
        {"params": list(unet.parameters()), "lr": recipe.lr, "base": recipe.lr},
        {"params": list(text.parameters()), "lr": recipe.text_lr, "base": recipe.text_lr},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=1e-2, betas=(0.9, 0.99))
    alphas = scheduler.alphas_cumprod.to(device)
    empty = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids.to(device)
    budget = Budget(recipe.minutes * (1 - recipe.vae_share), recipe.steps)
    gen = torch.Generator(device=device).manual_seed(recipe.seed + 1)
    step, avg, losses = 0, None, []
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = group["base"] * lr_factor(step, budget.progress(step), recipe.warmup)
        idx = torch.randint(0, len(pool["shape"]), (recipe.batch,), device=device, generator=gen)
        with torch.no_grad(), autocast(device):
            x = scenes.render(take(pool, idx), device) * 2 - 1
            latents = (
                vae.encode(x).latent_dist.sample(generator=gen).float() * vae.config.scaling_factor
            )
        drop = torch.rand(recipe.batch, device=device, generator=gen) < recipe.caption_dropout
        batch_ids = torch.where(drop[:, None], empty, ids[idx])
        noise = torch.randn(latents.shape, device=device, generator=gen)
        t = torch.randint(0, len(alphas), (recipe.batch,), device=device, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with autocast(device):
            hidden = text(batch_ids)[0]
            pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        step += 1
        if step % recipe.log_every == 0 or budget.done(step):
            value = float(loss.detach())
            avg = value if avg is None else 0.9 * avg + 0.1 * value
            losses.append(value)
            log(
                f"unet step {step} loss {value:.4f} (avg {avg:.4f}) lr {opt.param_groups[0]['lr']:.2e} "
                f"{budget.elapsed():.0f}s {step * recipe.batch / max(budget.elapsed(), 1e-9):.0f} img/s"
            )
    return {
        "unet_steps": step,
        "unet_final_loss": avg,
        "unet_seconds": budget.elapsed(),
        "unet_images_seen": step * recipe.batch,
    }


def save_pipeline(
    dest: Path,
    vae,
    text,
    tokenizer,
    tokenizer_files: Path,
    unet,
    scheduler,
    recipe: SDRecipe,
    results: dict,
    log_path: Path,
) -> Path:
    from diffusers import StableDiffusionPipeline

    def write(tmp: Path) -> None:
        # UNet and VAE in fp16 keep the folder under 30 MB; diffusers loads them as fp32. The text
        # encoder stays fp32 because transformers would keep fp16 weights in fp16.
        pipe = StableDiffusionPipeline(
            vae=vae.to("cpu", torch.float16),
            text_encoder=text.to("cpu", torch.float32),
            tokenizer=tokenizer,
            unet=unet.to("cpu", torch.float16),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        # transformers 5 writes only tokenizer.json; 4.x's slow CLIPTokenizer reads these two
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tokenizer_files / name, tmp / "tokenizer" / name)
        (tmp / "recipe.json").write_text(
            json.dumps({"recipe": asdict(recipe), "results": results}, indent=2)
        )
        if log_path.is_file():
            (tmp / "train_log.txt").write_text(log_path.read_text())

    out = save_folder(dest, write)
    vae.float()
    unet.float()
    return out


def train_starter_sd(
    recipe: SDRecipe, out: Path, device: torch.device, log_path: Path | None = None
) -> dict:
    """Train both phases and write the pipeline folder `out`; returns the results (also in recipe.json)."""
    torch.manual_seed(recipe.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    work = Path(tempfile.mkdtemp(prefix="starter-sd-"))
    log_path = log_path or work / "train_log.txt"
    log = RunLog(log_path)
    start = time.perf_counter()
    log(f"starter-sd recipe on {device}: {json.dumps(asdict(recipe))}")
    scenes = sd_scenes(recipe.size)
    params = scenes.params(recipe.pool, recipe.seed)
    tokenizer = build_tokenizer(work / "tokenizer", recipe.text["max_position_embeddings"])
    ids = encode_captions(tokenizer, scenes.captions(params)).to(device)
    pool = {k: v.to(device) for k, v in params.items()}
    vae, text, unet, scheduler = build_models(recipe, tokenizer)
    sizes = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text))
    }
    log(
        f"parameters: {sizes}; vocabulary {len(tokenizer)} tokens; data pool {recipe.pool} scenes "
        f"({time.perf_counter() - start:.1f}s to build)"
    )
    results = {
        "parameters": sizes,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    vae_scenes, vae_pool = scenes, pool
    if recipe.vae_plain is not None:
        vae_scenes = sd_scenes(recipe.size, recipe.vae_plain)
        vae_params = vae_scenes.params(max(recipe.pool // 4, 1), recipe.seed + 3)
        vae_pool = {k: v.to(device) for k, v in vae_params.items()}
    results.update(train_vae(vae, vae_scenes, vae_pool, recipe, device, log))
    results.update(
        train_unet(unet, text, vae, tokenizer, scheduler, scenes, pool, ids, recipe, device, log)
    )
    results["total_seconds"] = time.perf_counter() - start
    log(f"done in {results['total_seconds']:.0f}s; saving to {out}")
    log.close()
    save_pipeline(
        out, vae, text, tokenizer, work / "tokenizer", unet, scheduler, recipe, results, log_path
    )
    shutil.rmtree(work, ignore_errors=True)
    results["folder_mb"] = folder_megabytes(out)
    print(f"saved {out} ({results['folder_mb']:.1f} MB)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(ASSETS / "starter-sd"), help="pipeline folder to write"
    )
    parser.add_argument(
        "--minutes", type=float, default=SDRecipe.minutes, help="wall-clock budget, both phases"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="fixed UNet steps instead of the clock"
    )
    parser.add_argument(
        "--vae-steps", type=int, default=None, help="fixed VAE steps instead of the clock"
    )
    parser.add_argument("--batch", type=int, default=SDRecipe.batch)
    parser.add_argument("--latent-channels", type=int, default=4, help="VAE latent channels")
    parser.add_argument(
        "--vae-share", type=float, default=SDRecipe.vae_share, help="budget share of the VAE"
    )
    parser.add_argument(
        "--vae-hue", type=float, default=SDRecipe.vae_hue, help="share of hue-turned VAE images"
    )
    parser.add_argument(
        "--vae-plain",
        type=float,
        default=SDRecipe.vae_plain,
        help="share of plain objects in the VAE's own scenes",
    )
    parser.add_argument(
        "--vae-width", type=int, default=32, help="VAE channels (w, 2w, 2w); a multiple of 32"
    )
    parser.add_argument(
        "--vae-factor",
        type=int,
        choices=(2, 4),
        default=2,
        help="VAE downsampling: 4 gives 16x16 latents at 64 px, 2 gives 32x32 (channels w, 2w)",
    )
    parser.add_argument(
        "--vae-edge-weight",
        type=float,
        default=SDRecipe.vae_edge_weight,
        help="weight the VAE's pixel loss toward edges and textures (0: plain mean)",
    )
    parser.add_argument("--lr", type=float, default=SDRecipe.lr, help="UNet and text encoder")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny model at 32x32 (smoke test)")
    parser.add_argument("--log", default=None, help="also keep the training log here")
    args = parser.parse_args(argv)
    settings = dict(
        minutes=args.minutes, steps=args.steps, vae_steps=args.vae_steps, seed=args.seed
    )
    recipe = (
        SDRecipe.tiny(**settings)
        if args.tiny
        else SDRecipe(batch=args.batch, lr=args.lr, text_lr=args.lr, **settings)
    )
    recipe.vae_share, recipe.vae_plain, recipe.vae_hue = (
        args.vae_share,
        args.vae_plain,
        args.vae_hue,
    )
    recipe.vae_edge_weight = args.vae_edge_weight
    if not args.tiny:
        w = args.vae_width
        if w % recipe.vae["norm_num_groups"]:
            parser.error(f"--vae-width must be a multiple of {recipe.vae['norm_num_groups']}")
        channels = (w, 2 * w, 2 * w) if args.vae_factor == 4 else (w, 2 * w)
        recipe.vae.update(latent_channels=args.latent_channels, block_out_channels=channels)
    train_starter_sd(
        recipe, Path(args.out), pick_device(args.device), Path(args.log) if args.log else None
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
