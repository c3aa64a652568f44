"""Retrain the decoder of a text-to-image starter's VAE on hue-turned checkered scenes (the
encoder frozen unless `--encoder-anchor`), and write a copy of the starter with it (issue 14). `--posterior-scale`
narrows the encoder's posterior first: the shipped one's noise is as large as the checks' signal in
the latents, so a decoder trained on its samples learns to blur them; `--unet-minutes` then
continues the UNet and text encoder on the sharper latents. The sample flower is never shown (teal
and magenta only from hue turns). Logs held-out PSNR and tune_demo's sample check before and after.

    python -m peftkit.assets.recipes.tune_vae_decoder --starter assets/starter-sd --out runs/sd-dec
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .recipe_run import Budget, RunLog, autocast, lr_factor, pick_device, save_folder
from .shapes import ShapeScenes, rotate_hue, take
from .train_starter_sd import sd_scenes, weighted_recon
from .tune_demo import SAMPLES, round_trip

STARTER = Path(__file__).resolve().parent.parent / "starter-sd"


@dataclass
class DecoderRecipe:
    minutes: float = 5.0
    steps: int | None = None  # fixed step count instead of the wall-clock budget
    batch: int = 128
    lr: float = 2e-4
    warmup: int = 50
    hue: float = 0.8  # fraction of scenes whose colors are turned by a random angle
    plain: float = 0.25  # fraction of untextured objects (the rest striped, dotted or checkered)
    pool: int = 50000
    seed: int = 0
    log_every: int = 50
    # multiplies the encoder's posterior std (through quant_conv's log-variance bias); 1 keeps it
    posterior_scale: float = 1.0
    # also train the encoder, its mean pulled toward the old one's with this weight (None: frozen)
    encoder_anchor: float | None = None
    # pixel loss weight 1 + edge_weight * (edge strength near the pixel): textures and outlines
    # are a small part of a scene's pixels, so a plain mean barely sees them
    edge_weight: float = 0.0
    unet_minutes: float = 0.0  # continue UNet + text encoder on the new latents (0: keep them)
    unet_steps: int | None = None  # fixed UNet step count instead of unet_minutes
    unet_batch: int = 512
    unet_lr: float = 2e-4


def _scene_psnr(vae, scenes: ShapeScenes, pool: dict, device) -> float:
    idx = torch.arange(min(512, len(pool["shape"])), device=device)
    x = scenes.render(take(pool, idx), device) * 2 - 1
    with torch.no_grad(), autocast(device):
        out = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
    return round(float(-10 * torch.log10(F.mse_loss(out, x) / 4)), 2)


def _sample_check(vae) -> dict:
    """tune_demo's VAE check of the five samples (on the CPU, where the judge runs)."""
    from ...diffusion.concept_judge import ConceptJudge

    images = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.png"))]
    return round_trip(vae.to("cpu"), images, ConceptJudge())[1]


def narrow_posterior(vae, scale: float) -> None:
    """Multiply the posterior std of `vae`'s encoder by `scale`, its mean unchanged: quant_conv's
    second half of output channels is the log-variance."""
    if scale != 1.0:
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.bias.data[half:] += 2 * math.log(scale)


def continue_unet(starter: Path, vae, recipe: DecoderRecipe, device, log):
    """Continue `starter`'s UNet and text encoder on the latents of `vae` with train_starter_sd's
    own phase 2 (same scene pool and captions); returns (unet, text, results)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .caption_tokenizer import encode_captions
    from .train_starter_sd import SDRecipe, train_unet

    sd = SDRecipe(
        minutes=recipe.unet_minutes,
        steps=recipe.unet_steps,
        vae_share=0.0,
        batch=recipe.unet_batch,
        lr=recipe.unet_lr,
        text_lr=recipe.unet_lr,
        warmup=recipe.warmup,
        seed=recipe.seed,
    )
    tokenizer = CLIPTokenizer.from_pretrained(starter / "tokenizer")
    unet = UNet2DConditionModel.from_pretrained(starter / "unet").float()
    text = CLIPTextModel.from_pretrained(starter / "text_encoder").float()
    scheduler = DDIMScheduler.from_pretrained(starter / "scheduler")
    scenes = sd_scenes(sd.size)
    params = scenes.params(sd.pool, sd.seed)
    ids = encode_captions(tokenizer, scenes.captions(params)).to(device)
    pool = {k: v.to(device) for k, v in params.items()}
    results = train_unet(unet, text, vae, tokenizer, scheduler, scenes, pool, ids, sd, device, log)
    return unet.eval(), text.eval(), results


def tune_decoder(starter: Path, out: Path, recipe: DecoderRecipe, device: torch.device) -> dict:
    """Train `starter`'s VAE decoder (and post-quant conv; the encoder too with
    `recipe.encoder_anchor`), then optionally continue its UNet; save the whole starter with them
    to `out`. Returns the before/after report (also in out/recipe.json)."""
    from diffusers import AutoencoderKL

    log = RunLog(out.parent / f"{out.name}-decoder_log.txt")
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL.from_pretrained(starter / "vae").float().eval()
    vae.requires_grad_(False)
    narrow_posterior(vae, recipe.posterior_scale)
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    old = None
    if recipe.encoder_anchor is not None:
        old = copy.deepcopy(vae).to(device)  # the latents the UNet knows, to stay near them
        trainable += [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    scenes = sd_scenes(64, recipe.plain)
    pool = {k: v.to(device) for k, v in scenes.params(recipe.pool, recipe.seed + 11).items()}
    held_out = {k: v.to(device) for k, v in scenes.params(512, recipe.seed + 12).items()}
    report = {"before": {"samples": _sample_check(vae)}}
    report["before"]["scenes_psnr_db"] = _scene_psnr(vae.to(device), scenes, held_out, device)
    log(f"before: {report['before']}")
    vae.decoder.train()
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.99))
    budget = Budget(recipe.minutes, recipe.steps)
    gen = torch.Generator(device=device).manual_seed(recipe.seed)
    step = 0
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * lr_factor(step, budget.progress(step), recipe.warmup)
        idx = torch.randint(0, recipe.pool, (recipe.batch,), device=device, generator=gen)
        x = scenes.render(take(pool, idx), device)
        angles = torch.rand(len(x), device=device, generator=gen) * 2 * torch.pi
        x = rotate_hue(x, angles * (torch.rand(len(x), device=device, generator=gen) < recipe.hue))
        x = x * 2 - 1
        with autocast(device):
            with torch.set_grad_enabled(old is not None):
                posterior = vae.encode(x).latent_dist
                latents = posterior.sample(generator=gen)
            out_x = vae.decode(latents).sample.float()
        loss = weighted_recon(out_x, x, recipe.edge_weight)
        if old is not None:
            with torch.no_grad(), autocast(device):
                anchor = old.encode(x).latent_dist.mean.float()
            loss = loss + recipe.encoder_anchor * F.mse_loss(posterior.mean.float(), anchor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        if step % recipe.log_every == 0 or budget.done(step):
            log(f"decoder step {step} recon {float(loss.detach()):.4f} {budget.elapsed():.0f}s")
    vae.eval()
    report["after"] = {"scenes_psnr_db": _scene_psnr(vae, scenes, held_out, device)}
    report["after"]["samples"] = _sample_check(vae)  # leaves the VAE on the CPU
    report["steps"], report["seconds"] = step, round(budget.elapsed(), 1)
    log(f"after: {report['after']}")
    unet = text = None
    if recipe.unet_minutes > 0 or recipe.unet_steps:
        unet, text, report["unet"] = continue_unet(starter, vae.to(device), recipe, device, log)
    log.close()

    def write(tmp: Path) -> None:
        shutil.copytree(starter, tmp, dirs_exist_ok=True)
        shutil.rmtree(tmp / "vae")
        vae.to("cpu", torch.float16).save_pretrained(tmp / "vae", safe_serialization=True)
        if unet is not None:
            shutil.rmtree(tmp / "unet")
            shutil.rmtree(tmp / "text_encoder")
            unet.to("cpu", torch.float16).save_pretrained(tmp / "unet", safe_serialization=True)
            text.to("cpu", torch.float32).save_pretrained(tmp / "text_encoder")
        recipe_file = tmp / "recipe.json"
        record = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
        record["decoder"] = {"recipe": asdict(recipe), "results": report}
        recipe_file.write_text(json.dumps(record, indent=2))
        shutil.copy(log.path, tmp / "decoder_log.txt")

    save_folder(out, write)
    vae.float()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    d = DecoderRecipe()
    parser.add_argument("--starter", default=str(STARTER), help="pipeline folder to start from")
    parser.add_argument("--out", required=True, help="where the starter copy goes")
    parser.add_argument("--minutes", type=float, default=d.minutes, help="wall-clock budget")
    parser.add_argument("--steps", type=int, help="fixed step count instead of --minutes")
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--hue", type=float, default=d.hue, help="fraction of hue-turned scenes")
    parser.add_argument(
        "--plain", type=float, default=d.plain, help="fraction of untextured objects"
    )
    parser.add_argument(
        "--posterior-scale",
        type=float,
        default=d.posterior_scale,
        help="multiply the encoder's posterior std by this first",
    )
    parser.add_argument(
        "--unet-minutes",
        type=float,
        default=d.unet_minutes,
        help="then continue UNet + text encoder on the new latents for this long",
    )
    parser.add_argument("--unet-lr", type=float, default=d.unet_lr)
    parser.add_argument(
        "--edge-weight",
        type=float,
        default=d.edge_weight,
        help="weight the pixel loss toward edges and textures (0: plain mean)",
    )
    parser.add_argument(
        "--encoder-anchor",
        type=float,
        default=d.encoder_anchor,
        help="train the encoder too, its latents pulled toward the old ones with this weight",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    recipe = DecoderRecipe(
        minutes=args.minutes,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        hue=args.hue,
        plain=args.plain,
        posterior_scale=args.posterior_scale,
        unet_minutes=args.unet_minutes,
        unet_lr=args.unet_lr,
        encoder_anchor=args.encoder_anchor,
        edge_weight=args.edge_weight,
    )
    tune_decoder(Path(args.starter), Path(args.out), recipe, pick_device(args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
