"""Check a text-to-image starter against the demo's concept, then sweep the demo's settings on it.

First whether its VAE carries the sample flower (the samples round-tripped, and drawn from latents
fitted to them: no LoRA can show more than the decoder draws), then one `peftkit demo` per setting,
several at once on one GPU; summary.md / summary.json hold the judge's counts (issue 14).

    python -m peftkit.assets.recipes.tune_demo --starter runs/starter-sd --out runs/tune
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..samples.make_samples import MAGENTA, TEAL, YELLOW, sample_views
from .shapes import COLORS

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "concept"
# other designs of the concept for design_check: checks per radius (4 is the samples': ~6 px),
# and (petals, checks, hub) colors: the samples', more saturated ones, and two of the starter's
DESIGN_CELLS = (4, 3, 2.5, 2, 1.5)
DESIGN_COLORS = {
    "teal-magenta": (TEAL, MAGENTA, YELLOW),
    "saturated": ((0.0, 0.75, 0.70), (0.95, 0.05, 0.65), (1.0, 0.9, 0.1)),
    "red-blue": (COLORS["red"], COLORS["blue"], COLORS["yellow"]),
    "purple-orange": (COLORS["purple"], COLORS["orange"], COLORS["yellow"]),
}
# name -> demo flags; the first is the shipped defaults
SETTINGS = {
    "defaults": [],
    "attn-lr1e-3": ["--lr", "1e-3"],
    "all-lr5e-4": ["--targets", "attn,ff,conv", "--lr", "5e-4"],
    "all-lr1e-3-500": ["--targets", "attn,ff,conv", "--lr", "1e-3", "--steps", "500"],
    "all-lr2e-3-800-r16": ["--targets", "attn,ff,conv", "--lr", "2e-3", "--steps", "800"]
    + ["--rank", "16"],
    "attn-lr1e-3-600": ["--lr", "1e-3", "--steps", "600"],
    "attn-lr2e-3": ["--lr", "2e-3"],
    "all-lr1e-3": ["--targets", "attn,ff,conv", "--lr", "1e-3"],
    "all-lr2e-3": ["--targets", "attn,ff,conv", "--lr", "2e-3"],
    "attn-ff-lr1e-3-400": ["--targets", "attn,ff", "--lr", "1e-3", "--steps", "400"],
}


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    return x.float() / 127.5 - 1


def _scored(rec: torch.Tensor, x: torch.Tensor, judge, key: str) -> tuple[list[Image.Image], dict]:
    """Decoded images `rec` (in [-1, 1]) of the targets `x` as images, with the PSNR (dB) of each
    and the judge's P(concept) on each under `key`."""
    rec = rec.detach().clamp(-1, 1)
    pixels = ((rec.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    decoded = [Image.fromarray(p) for p in pixels]
    mse = ((rec - x) ** 2).mean(dim=(1, 2, 3))
    return decoded, {
        "psnr_db": [round(float(v), 1) for v in -10 * torch.log10(mse / 4)],
        key: [round(p, 3) for p in judge.probabilities(decoded)],
    }


def round_trip(vae, images: list[Image.Image], judge) -> tuple[list[Image.Image], dict]:
    """`images` through `vae` (encoder mean, then decoder): the reconstructions, and the PSNR (dB)
    of each and the judge's P(concept) on each reconstruction."""
    x = _tensor(images)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return _scored(rec, x, judge, "judge_on_reconstructions")


def _sheet(rows: list[list[Image.Image]]) -> Image.Image:
    sheet = Image.new("RGB", (64 * max(len(r) for r in rows), 64 * len(rows)))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(image.resize((64, 64)), (64 * x, 64 * y))
    return sheet


def _load(starter: Path):
    from diffusers import AutoencoderKL

    from ...diffusion.concept_judge import ConceptJudge

    return AutoencoderKL.from_pretrained(starter / "vae").float().eval(), ConceptJudge()


def vae_check(starter: Path, out: Path) -> dict:
    """PSNR (dB) of each sample through the VAE and the judge's P(concept) on the reconstructions;
    vae_check.png shows samples over reconstructions."""
    vae, judge = _load(starter)
    images = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.png"))]
    decoded, report = round_trip(vae, images, judge)
    _sheet([images, decoded]).save(out / "vae_check.png")
    return report


def decoder_reach(starter: Path, out: Path, steps: int = 300) -> dict:
    """Whether the starter's decoder can draw the samples at all: latents fitted by gradient descent
    (from the encoder's, L1 + MSE) instead of encoded. PSNR and the judge on the decoded fits;
    decoder_reach.png shows samples over fits. When this passes and vae_check fails, the encoder
    is what loses the concept."""
    vae, judge = _load(starter)
    vae.requires_grad_(False)
    images = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.png"))]
    x = _tensor(images)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(steps):
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fits, report = _scored(vae.decode(z).sample, x, judge, "judge_on_fits")
    _sheet([images, fits]).save(out / "decoder_reach.png")
    return report


def design_check(starter: Path, out: Path) -> dict:
    """The same check on other designs of the sample concept (make_samples.sample_views with
    DESIGN_CELLS checks per radius, in DESIGN_COLORS): whether bolder checks or colors would
    survive the VAE. designs.png: per design, a row of the five views and a row of their
    reconstructions."""
    vae, judge = _load(starter)
    report, rows = {}, []
    for colors_name, colors in DESIGN_COLORS.items():
        for cells in DESIGN_CELLS:
            images = sample_views(cells=cells, colors=colors)
            decoded, report[f"{colors_name} cells={cells}"] = round_trip(vae, images, judge)
            report[f"{colors_name} cells={cells}"]["judge_on_samples"] = [
                round(p, 3) for p in judge.probabilities(images)
            ]
            rows += [images, decoded]
    _sheet(rows).save(out / "designs.png")
    return report


def sweep(starter: Path, out: Path, device: str, names: list[str], extra: list[str] = ()) -> dict:
    """Run the demo once per setting (plus `extra` flags), all at once (they share the GPU);
    returns name -> the demo's judge counts."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    runs = {}
    for name in names:
        argv = [sys.executable, "-m", "peftkit.apps.cli", "demo", "--base", str(starter)]
        argv += ["--device", device, "--output", str(out / name), "--no-progress"]
        (out / name).mkdir(parents=True, exist_ok=True)
        log = open(out / name / "log.txt", "w")
        argv += SETTINGS[name] + list(extra)
        runs[name] = (subprocess.Popen(argv, stdout=log, stderr=log, env=env), log)
    results = {}
    for name, (proc, log) in runs.items():
        proc.wait()
        log.close()
        metrics = out / name / "metrics.json"
        results[name] = (
            json.loads(metrics.read_text())["judge"] if metrics.is_file() else "failed: see log.txt"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starter", required=True, help="pipeline folder (train_starter_sd)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma list from {list(SETTINGS)}"
    )
    parser.add_argument(
        "--designs",
        action="store_true",
        help="only the VAE check of other sample designs (designs.png, designs.json)",
    )
    parser.add_argument(
        "--extra", default="", help="flags added to every demo run, e.g. '--sample-steps 25'"
    )
    args = parser.parse_args(argv)
    out, starter = Path(args.out), Path(args.starter)
    out.mkdir(parents=True, exist_ok=True)
    if args.designs:
        designs = design_check(starter, out)
        (out / "designs.json").write_text(json.dumps(designs, indent=2))
        for name, result in designs.items():
            print(f"{name}: {result}")
        return 0
    report = {"starter": str(starter), "vae": vae_check(starter, out)}
    report["decoder_reach"] = decoder_reach(starter, out)
    print(f"VAE on the samples: {report['vae']}", flush=True)
    print(f"decoder from fitted latents: {report['decoder_reach']}", flush=True)
    names, extra = args.settings.split(","), args.extra.split()
    report["demo"] = sweep(starter, out, args.device, names, extra)
    lines = [f"# Demo settings on {starter}", "", f"VAE on the samples: {report['vae']}", ""]
    lines += [f"- {name} `{' '.join(SETTINGS[name])}`: {j}" for name, j in report["demo"].items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    print("\n".join(lines[4:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
