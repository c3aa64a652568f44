"""Measure the starter models.

Text-to-image: one prompt per color x shape ("a red circle on a blue background"; the background
color cycles through the others), a few fixed seeds each, 25 DDIM steps with guidance. A
generated image's object color is its most common palette color off the border (the border's
is the background; `shapes.dominant_colors`); its shape comes from a small CNN trained here on
procedural single-object scenes. Reported against chance (1/8 colors, 1/6 shapes).

ViT: linear probe, full fine-tune (and full from random init, to show what pretraining buys),
LoRA, VPT-deep, SSF and AdaptFormer on the five built-in tasks, through peftkit.vision's API
(VTAB-1k protocol "final": 1000 training images, 1000 test images), as a table.

    python -m peftkit.assets.recipes.evaluate_starter --sd assets/starter-sd --vit assets/starter-vit --out eval/

Writes t2i.json, t2i.md, t2i_samples.png, vit/results.md, vit/results.csv (and per-run folders).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .recipe_run import autocast, pick_device
from .shapes import COLOR_NAMES, SHAPES, ShapeScenes

ASSETS = Path(__file__).resolve().parent.parent
VIT_METHODS = {  # method -> (learning rate, options); full fine-tuning needs a smaller step than adapters
    "linear": (5e-3, {}),
    "full": (3e-4, {}),
    "lora": (2e-3, {"r": 8}),
    "vpt-deep": (3e-3, {"vpt_length": 10}),
    "ssf": (3e-3, {}),
    "adaptformer": (2e-3, {"bottleneck": 16}),
}
SCRATCH = "full (random init)"


# ---- text-to-image ----


def t2i_prompts() -> list[tuple[str, int, int, int]]:
    """(prompt, color, shape, background) for every color x shape; background never the color."""
    rows = []
    for c, color in enumerate(COLOR_NAMES):
        for s, shape in enumerate(SHAPES):
            bg = (c + 1 + s) % len(COLOR_NAMES)
            bg_name = COLOR_NAMES[bg]
            rows.append(
                (
                    f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape} on "
                    f"{'an' if bg_name[0] in 'aeiou' else 'a'} {bg_name} background",
                    c,
                    s,
                    bg,
                )
            )
    return rows


class ShapeClassifier(nn.Module):
    """A small CNN: image in [0, 1] -> shape logits."""

    def __init__(self, classes: int = len(SHAPES), width: int = 32) -> None:
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, width * 2, width * 4):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1).mean(dim=(2, 3)))


def _degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # generated images are softer and noisier than the rasterized ones: train on both looks
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(len(x), 1, 1, 1, generator=g, device=x.device) < 0.5).float()
    noise = (
        torch.randn(x.shape, generator=g, device=x.device)
        * torch.rand(len(x), 1, 1, 1, generator=g, device=x.device)
        * 0.05
    )
    return (pick * blur + (1 - pick) * x + noise).clamp(0, 1)


def train_shape_classifier(
    size: int, steps: int, batch: int, device: torch.device
) -> tuple[nn.Module, float]:
    """The shape judge and its top-1 (%) on held-out procedural single-object scenes."""
    scenes = ShapeScenes(size=size, shapes=SHAPES, max_count=1)
    model = ShapeClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 2))
    g = torch.Generator(device=device).manual_seed(0)
    for step in range(steps):
        data = scenes.sample(batch, seed=10_000 + step, device=device)
        with autocast(device):
            loss = F.cross_entropy(
                model(_degrade(data.images, g)).float(), data.labels["shape"].to(device)
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    test = scenes.sample(1024 if device.type == "cuda" else 64, seed=999_999, device=device)
    with torch.no_grad(), autocast(device):
        accuracy = (
            (model(test.images).argmax(-1).cpu() == test.labels["shape"]).float().mean().item()
        )
    return model, 100.0 * accuracy


def evaluate_t2i(
    folder: Path,
    out: Path,
    device: torch.device,
    seeds: int = 2,
    steps: int = 25,
    guidance: float = 4.0,
    classifier_steps: int = 800,
    limit: int | None = None,
) -> dict:
    """Generate every color x shape prompt with `seeds` seeds and score color and shape."""
    from diffusers import StableDiffusionPipeline
    from torchvision.utils import save_image

    from .shapes import dominant_colors

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder)).to(device)
    pipe.set_progress_bar_config(disable=True)
    rows = t2i_prompts()[:limit]
    prompts = [r[0] for r in rows for _ in range(seeds)]
    generators = [
        torch.Generator(device=device).manual_seed(seed) for _ in rows for seed in range(seeds)
    ]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for i in range(0, len(prompts), 96):
        with torch.no_grad():
            images.append(
                pipe(
                    prompts[i : i + 96],
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=generators[i : i + 96],
                    height=size,
                    width=size,
                    output_type="pt",
                ).images
            )
    images = torch.cat(images).float().clamp(0, 1)
    gen_seconds = time.perf_counter() - start
    judge, judge_accuracy = train_shape_classifier(
        size, classifier_steps, 256 if device.type == "cuda" else 16, device
    )
    with torch.no_grad(), autocast(device):
        shape_pred = judge(images.to(device)).argmax(-1).cpu()
    color_pred, bg_pred = dominant_colors(images.cpu())
    want = torch.tensor([[r[1], r[2], r[3]] for r in rows for _ in range(seeds)])
    color_ok, shape_ok, bg_ok = (
        color_pred == want[:, 0],
        shape_pred == want[:, 1],
        bg_pred == want[:, 2],
    )
    result = {
        "samples": len(prompts),
        "prompts": len(rows),
        "seeds": seeds,
        "steps": steps,
        "guidance": guidance,
        "resolution": size,
        "color_accuracy": 100 * color_ok.float().mean().item(),
        "shape_accuracy": 100 * shape_ok.float().mean().item(),
        "color_and_shape_accuracy": 100 * (color_ok & shape_ok).float().mean().item(),
        "background_accuracy": 100 * bg_ok.float().mean().item(),
        "chance": {
            "color": 100 / len(COLOR_NAMES),
            "shape": 100 / len(SHAPES),
            "color_and_shape": 100 / (len(COLOR_NAMES) * len(SHAPES)),
            "background": 100 / (len(COLOR_NAMES) - 1),
        },
        "shape_judge_accuracy_on_procedural": judge_accuracy,
        "generation_seconds": gen_seconds,
        "per_sample": [
            {
                "prompt": p,
                "seed": i % seeds,
                "color": COLOR_NAMES[int(c)],
                "shape": SHAPES[int(s)],
                "background": COLOR_NAMES[int(b)],
            }
            for i, (p, c, s, b) in enumerate(zip(prompts, color_pred, shape_pred, bg_pred))
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    # grid: one row per color, one column per shape (first seed)
    save_image(images[::seeds], out / "t2i_samples.png", nrow=len(SHAPES), padding=2, pad_value=0.5)
    (out / "t2i.json").write_text(json.dumps(result, indent=2))
    (out / "t2i.md").write_text(t2i_markdown(result))
    return result


def t2i_markdown(r: dict) -> str:
    chance = r["chance"]
    lines = [
        f"Starter T2I: {r['samples']} samples ({r['prompts']} color x shape prompts x {r['seeds']} seeds), "
        f"{r['resolution']}x{r['resolution']}, {r['steps']} DDIM steps, guidance {r['guidance']}",
        "",
        "| match | accuracy (%) | chance (%) |",
        "|---|---|---|",
    ]
    for key, label in (
        ("color", "object color"),
        ("shape", "shape"),
        ("color_and_shape", "color and shape"),
        ("background", "background color"),
    ):
        lines.append(f"| {label} | {r[key + '_accuracy']:.1f} | {chance[key]:.1f} |")
    lines += [
        "",
        f"Shape judge (CNN trained on procedural scenes): {r['shape_judge_accuracy_on_procedural']:.1f}% "
        "on held-out procedural images.",
    ]
    return "\n".join(lines) + "\n"


# ---- ViT ----


@contextlib.contextmanager
def memoized_builtin_tasks():
    """Built-in task images are pure functions of (task, split, index); 35 runs x 20 epochs would
    redraw each one hundreds of times on the CPU and leave the GPU idle, so keep them once drawn."""
    from peftkit.vision.data import BuiltinTask

    original = BuiltinTask.__getitem__
    cache: dict = {}

    def cached(self, i):
        key = (self.name, self.split, self.seed, self.canvas, self.transform.size, i)
        if key not in cache:
            cache[key] = original(self, i)
        return cache[key]

    BuiltinTask.__getitem__ = cached
    try:
        yield
    finally:
        BuiltinTask.__getitem__ = original


def evaluate_vit(
    folder: Path,
    out: Path,
    device: torch.device,
    tasks: list[str],
    methods: list[str],
    epochs: int = 20,
    scratch: bool = True,
    builtin_sizes: tuple[int, int] | None = None,
    deadline: float | None = None,
) -> list[dict]:
    """Every method on every built-in task, from the starter backbone in `folder`. Runs that would
    start after `deadline` (a time.perf_counter() value) are skipped and listed in skipped.json."""
    from peftkit.vision.sweep import write_table
    from peftkit.vision.train import ViTTrainConfig, train_vit

    base = ViTTrainConfig(
        model=f"starter:{folder}",
        pretrained=True,
        protocol="final",
        epochs=epochs,
        batch_size=64,
        warmup_epochs=max(1.0, epochs / 10),
        eval_every_epochs=epochs,
        checkpoint_every_epochs=epochs,
        mixed_precision="bf16" if device.type == "cuda" else "no",
        builtin_sizes=builtin_sizes,
        progress=False,
        cpu=device.type == "cpu",
    )
    runs = [(m, *VIT_METHODS[m], True) for m in methods]
    if scratch:
        runs.append((SCRATCH, VIT_METHODS["full"][0] * 2, {}, False))
    rows, skipped = [], []
    with memoized_builtin_tasks():
        for task in tasks:
            for label, lr, options, pretrained in runs:
                if deadline is not None and time.perf_counter() > deadline:
                    skipped.append(f"{task}/{label}")
                    continue
                method = "full" if label == SCRATCH else label
                folder_name = label.replace(" ", "_").replace("(", "").replace(")", "")
                config = replace(
                    base,
                    data=f"builtin:{task}",
                    method=method,
                    method_options=options,
                    lr=lr,
                    pretrained=pretrained,
                    output_dir=str(out / task / folder_name),
                )
                start = time.perf_counter()
                result = train_vit(config)
                result["method"] = label
                result.pop("history", None)
                rows.append(result)
                print(
                    f"vit {task:12s} {label:20s} top-1 {result['top1']:5.1f}  "
                    f"trainable {result['trainable']:>8d}  {time.perf_counter() - start:.1f}s",
                    flush=True,
                )
                write_table(rows, str(out))
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(json.dumps(rows, indent=2, default=str))
    if skipped:
        print(f"skipped (deadline): {skipped}", flush=True)
        (out / "skipped.json").write_text(json.dumps(skipped))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sd", default=str(ASSETS / "starter-sd"), help="starter T2I folder ('' to skip)"
    )
    parser.add_argument(
        "--vit", default=str(ASSETS / "starter-vit"), help="starter ViT folder ('' to skip)"
    )
    parser.add_argument("--out", required=True, help="folder for the results")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--seeds", type=int, default=2, help="seeds per color x shape prompt (48 prompts)"
    )
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument(
        "--classifier-steps", type=int, default=800, help="training steps of the shape judge"
    )
    parser.add_argument(
        "--prompts", type=int, default=None, help="only the first N prompts (smoke tests)"
    )
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs per ViT run")
    parser.add_argument("--tasks", default="counting,location,orientation,shape,color")
    parser.add_argument("--methods", default=",".join(VIT_METHODS))
    parser.add_argument(
        "--no-scratch", action="store_true", help="skip full fine-tuning from random init"
    )
    parser.add_argument(
        "--builtin-sizes", default=None, help="train,test sizes of the built-in tasks (smoke tests)"
    )
    args = parser.parse_args(argv)
    device, out = pick_device(args.device), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sd:
        r = evaluate_t2i(
            Path(args.sd),
            out,
            device,
            args.seeds,
            args.steps,
            args.guidance,
            args.classifier_steps,
            args.prompts,
        )
        print(t2i_markdown(r), flush=True)
    if args.vit:
        sizes = tuple(int(v) for v in args.builtin_sizes.split(",")) if args.builtin_sizes else None
        evaluate_vit(
            Path(args.vit).resolve(),
            out / "vit",
            device,
            args.tasks.split(","),
            args.methods.split(","),
            args.epochs,
            not args.no_scratch,
            sizes,
        )
        print((out / "vit" / "results.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
