"""`peftkit demo`: the first thing to run. Offline, on a CPU, in a few minutes it trains a concept
adapter (DreamBooth with prior preservation, Ruiz et al. 2023) on the bundled sample flower with
the starter model, and shows what changed: a before/after grid (base vs adapted, fixed seeds), the
adapter, and how many images show the concept before and after, by the bundled concept judge
(diffusion/concept_judge.py), plus whether a control prompt without the identifier kept its look.

    peftkit demo                                   # starter model, LoRA, ./peftkit-demo/
    peftkit demo --method lokr --output runs/demo
    peftkit demo --base ./sd15 --device cuda --images photos/ --prompt "a photo of sks dog" \
        --class-prompt "a photo of a dog"
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..common_kernels.adapter_file import atomic_write
from ..common_kernels.errors import PeftkitError
from ..common_kernels.registry import canonical, core_names
from ..diffusion.concept_defaults import CONCEPT_DEFAULTS
from ..diffusion.concept_judge import JUDGE

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples" / "concept"
# CLI names -> ConceptConfig methods
SAMPLE_PHRASE = "sks flower"  # what the samples' captions (toy-N.txt) call the concept
INSTANCE_PROMPT = f"a photo of {SAMPLE_PHRASE}"
CLASS_PROMPT = "a photo of a flower"
# Concept prompts (the judge counts the concept in these) and one control prompt without the
# identifier, which the adapter should leave alone.
PROMPTS = [
    "a photo of sks flower",
    "a sks flower on a blue background",
    "a sks flower on a white background",
    "a big sks flower on a green background",
]
CONTROL_PROMPT = "a red circle on a white background"
SEEDS = [0, 1, 2]
# DDIM with trailing spacing: 15 steps suffice at 64 px; on the starter a guidance of 3 shows the
# concept in more new contexts than 5 or 7.5 (assets/recipes/README.md)
SAMPLE_STEPS, GUIDANCE = 15, 3.0


def color_histogram(image: Image.Image, bins: int = 8, size: int = 32) -> np.ndarray:
    """Square root of the normalized joint RGB histogram (bins^3 cells) of `image` resized to
    size x size: unit length, so a dot product of two is their Bhattacharyya coefficient."""
    pixels = np.asarray(
        image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.int64
    )
    cells = pixels * bins // 256
    index = (cells[..., 0] * bins + cells[..., 1]) * bins + cells[..., 2]
    counts = np.bincount(index.ravel(), minlength=bins**3).astype(np.float64)
    return np.sqrt(counts / counts.sum())


def color_similarity(generated: list[Image.Image], references: list[Image.Image]) -> float:
    """Mean pairwise Bhattacharyya coefficient of color histograms, in [0, 1] (1: same colors in
    the same proportions). Blind to shape; enough to tell whether the concept's colors appear.

        >>> red = Image.new("RGB", (8, 8), (255, 0, 0))
        >>> color_similarity([red], [red]), color_similarity([red], [Image.new("RGB", (8, 8), (0, 0, 255))])
        (1.0, 0.0)
    """
    if not generated or not references:
        raise PeftkitError("similarity needs at least one generated and one reference image")
    a = np.stack([color_histogram(im) for im in generated])
    b = np.stack([color_histogram(im) for im in references])
    return round(float((a @ b.T).mean()), 6)


def similarity(
    generated: list[Image.Image], references: list[Image.Image], clip=None
) -> dict[str, float]:
    """{"color": color_similarity} plus {"clip_i": ...} with an open_clip `ClipEmbedder`."""
    scores = {"color": color_similarity(generated, references)}
    if clip is not None:
        from ..diffusion.metrics import pairwise_similarity

        scores["clip_i"] = pairwise_similarity(clip.images(generated), clip.images(references))
    return scores


def red_circle_on_white(image: Image.Image) -> bool:
    """Whether `image` still shows what the control prompt asks for: a white border, one red blob
    that fills its bounding box like a disc does (pi/4 ~ 0.79) and is about as tall as wide, and
    little of any other color."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    white = pixels.min(axis=-1) > 0.75
    red = (pixels[..., 0] > 0.55) & (pixels[..., 1] < 0.35) & (pixels[..., 2] < 0.35)
    if np.median(border.min(axis=-1)) < 0.75 or red.mean() < 0.01:
        return False
    rows, cols = np.nonzero(red)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    fill = red.sum() / (height * width)
    other = 1 - white.mean() - red.mean()
    return bool(0.6 <= fill <= 0.95 and 0.7 <= height / width <= 1.43 and other < 0.15)


def native_resolution(base) -> int:
    """The pixel size a pipeline was trained at (DiffusionBase.native_resolution)."""
    return base.native_resolution


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PeftkitError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    return device


def open_base(base: str, device: str):
    """load_base(base) on `device`, with a hint in --base terms when the starter is missing."""
    from ..diffusion.base import STARTER, load_base

    if base == "starter" and not STARTER.is_dir():
        raise PeftkitError(
            f"the starter model is not installed ({STARTER} is missing): pass --base with a "
            "diffusers Stable Diffusion folder or hub id, e.g. --base ./sd15"
        )
    loaded = load_base(base)
    loaded.pipe.to(device)
    return loaded


def train_adapter(
    base,
    images: str | Path,
    instance_prompt: str,
    method: str,
    steps: int,
    rank: int,
    output_dir: str | Path,
    lr: float | None = None,
    block_size: int = CONCEPT_DEFAULTS.block_size,
    resolution: int = 64,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    on_event: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    class_prompt: str | None = None,
    num_class_images: int = CONCEPT_DEFAULTS.num_class_images,
    targets: tuple[str, ...] = CONCEPT_DEFAULTS.targets,
):
    """Train a concept adapter (method: lora, lokr or oft) on the UNet of `base` with
    peftkit.diffusion's DreamBooth task and the shared engine, and save it to `output_dir`;
    `class_prompt` turns prior preservation on (class images generated into output_dir's
    parent). Returns (ConceptTask, TrainResult); the adapter stays injected and active.

        >>> task, result = train_adapter(open_base("starter", "cpu"), SAMPLES, INSTANCE_PROMPT, "lora",
        ...                              300, 8, "out/flower", class_prompt=CLASS_PROMPT)  # doctest: +SKIP
    """
    from ..common_kernels.training.engine import train
    from ..diffusion.data import ConceptDataset, class_images
    from ..diffusion.dreambooth import ConceptTask, save_concept

    job = concept_job(
        "demo",
        images,
        instance_prompt,
        method,
        steps,
        rank,
        output_dir,
        lr,
        block_size,
        resolution,
        device,
        seed,
        progress,
        class_prompt=class_prompt,
        num_class_images=num_class_images,
        targets=targets,
        min_snr_gamma=CONCEPT_DEFAULTS.min_snr_for(base),
    )
    classes = None
    if class_prompt:
        classes = class_images(
            base,
            job.class_dir,
            class_prompt,
            num_class_images,
            resolution,
            seed=seed,
            device=device,
        )
    task = ConceptTask(
        base, ConceptDataset(images, instance_prompt, resolution), job.concept, classes, seed=seed
    )
    result = train(task, task.dataset(), job.train, on_event=on_event, should_stop=should_stop)
    # on a GPU, training casts the frozen base to bf16 and parks the cached encoders on the CPU;
    # sampling wants the fp32 pipeline open_base loaded, on the device
    base.pipe.to(device, torch.float32)
    save_concept(task, output_dir)
    return task, result


def concept_job(
    name: str,
    images: str | Path,
    instance_prompt: str,
    method: str,
    steps: int = CONCEPT_DEFAULTS.steps,
    rank: int = CONCEPT_DEFAULTS.rank,
    output_dir: str | Path = "",
    lr: float | None = None,
    block_size: int = CONCEPT_DEFAULTS.block_size,
    resolution: int = 64,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
    class_prompt: str | None = None,
    num_class_images: int = CONCEPT_DEFAULTS.num_class_images,
    targets: tuple[str, ...] = CONCEPT_DEFAULTS.targets,
    min_snr_gamma: float = CONCEPT_DEFAULTS.min_snr_gamma,
):
    """The demo's and the app's concept settings for `method` (lora, lokr or oft) as a ConceptJob,
    from the shared defaults (diffusion/concept_defaults.py): what `train_adapter` trains alone and
    the app's queue trains beside other jobs."""
    from ..common_kernels.training.engine import TrainConfig
    from ..diffusion.dreambooth import ConceptConfig
    from ..diffusion.multitenant import ConceptJob

    core = canonical(method)  # a PeftkitError naming the cores for an unknown one
    config = ConceptConfig(
        instance_prompt=instance_prompt,
        method=core,
        rank=rank,
        block_size=block_size,
        targets=list(targets),
        resolution=resolution,
        class_prompt=class_prompt,
        num_class_images=num_class_images,
        prior_weight=CONCEPT_DEFAULTS.prior_weight,
        min_snr_gamma=min_snr_gamma,
    )
    train_config = TrainConfig(
        steps=steps,
        batch_size=1,
        lr=lr or CONCEPT_DEFAULTS.lr_for(core),
        schedule=CONCEPT_DEFAULTS.lr_schedule,
        warmup_steps=CONCEPT_DEFAULTS.warmup_steps,
        seed=seed,
        output_dir=str(output_dir),
        progress=progress,
        cpu=device == "cpu",
    )
    # beside the adapter folder, not in it: the app offers that folder's files for download
    class_dir = Path(output_dir).parent / "class_images" if class_prompt else None
    return ConceptJob(name, images, config, train_config, class_dir)


def render(
    base,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    resolution: int,
    label: str,
    progress: bool = True,
) -> list[list[Image.Image]]:
    """images[prompt][seed] with whatever adapters are active in `base`."""
    from tqdm.auto import tqdm

    from ..diffusion.generate import generate_grid

    base.unet.eval()
    return [
        generate_grid(base, [p], seeds, steps=steps, guidance=guidance, resolution=resolution)[0]
        for p in tqdm(prompts, desc=label, unit="prompt", disable=not progress)
    ]


def before_after_grid(
    before: list[list[Image.Image]],
    after: list[list[Image.Image]],
    prompts: list[str],
    seeds: list[int],
) -> Image.Image:
    """One row per prompt: the base model's images, then the adapted model's, same seeds."""
    from ..diffusion.generate import contact_sheet

    rows = [b + a for b, a in zip(before, after)]
    labels = [f"base s{s}" for s in seeds] + [f"adapted s{s}" for s in seeds]
    return contact_sheet(rows, prompts, labels)


def _parser() -> argparse.ArgumentParser:
    from ..diffusion.cli import DefaultsHelp

    d = CONCEPT_DEFAULTS
    p = argparse.ArgumentParser(
        prog="peftkit demo",
        description="Train a concept adapter on sample images with "
        "the starter model; write a before/after grid, the adapter and metrics.json.",
        formatter_class=DefaultsHelp,
    )
    p.add_argument(
        "--base",
        default="starter",
        help="'starter' (assets/starter-sd), a diffusers folder or a hub id",
    )
    p.add_argument("--images", default=str(SAMPLES), help="instance images")
    p.add_argument(
        "--prompt", default=INSTANCE_PROMPT, help="instance prompt with a rare identifier"
    )
    p.add_argument(
        "--class-prompt",
        default=CLASS_PROMPT,
        help="prior preservation with the class word ('' turns it off)",
    )
    p.add_argument(
        "--num-class-images", type=int, default=d.num_class_images, help="for prior preservation"
    )
    p.add_argument(
        "--output", default="peftkit-demo", help="where the grid, adapter and metrics go"
    )
    p.add_argument(
        "--method", choices=core_names(aliases=True), default=d.method, help="adapter core"
    )
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (batch 1)")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA/LoKr rank")
    p.add_argument("--block-size", type=int, default=d.block_size, help="OFT block size")
    p.add_argument(
        "--targets",
        default=",".join(d.targets),
        help="UNet modules the adapter wraps: comma list of presets (attn, ff, conv)",
    )
    p.add_argument(
        "--lr",
        type=float,
        help=f"learning rate (default: {d.lr_for('lora')} for LoRA/LoKr, {d.lr_for('oft')} for OFT)",
    )
    p.add_argument(
        "--resolution", type=int, help="training/sampling size (default: the base model's)"
    )
    p.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS, help="sampler steps per image")
    p.add_argument(
        "--guidance", type=float, default=GUIDANCE, help="classifier-free guidance scale"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--seed", type=int, default=0, help="training seed (sampling seeds are fixed: 0, 1, 2)"
    )
    p.add_argument(
        "--judge",
        default=str(JUDGE),
        help="concept judge folder (the bundled one knows the sample flower; '' turns it off)",
    )
    p.add_argument("--clip-model", help="open_clip name or folder: report CLIP-I similarity too")
    p.add_argument(
        "--clip-pretrained", help="open_clip pretrained tag or local checkpoint for --clip-model"
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def judge_counts(judge, before, after, n_concept: int) -> dict[str, int]:
    """How many concept images show the concept before and after training (by `judge`), and how
    many control images still show a red circle on white after training."""
    flat = lambda rows: [im for row in rows for im in row]  # noqa: E731
    counts = {"images": len(flat(after[:n_concept])), "control_images": len(after[n_concept])}
    if judge is not None:
        counts["concept_base"] = judge.count(flat(before[:n_concept]))
        counts["concept_adapted"] = judge.count(flat(after[:n_concept]))
    counts["control_kept"] = sum(bool(red_circle_on_white(im)) for im in after[n_concept])
    counts["control_base"] = sum(bool(red_circle_on_white(im)) for im in before[n_concept])
    return counts


def judge_line(counts: dict[str, int]) -> str:
    """The demo's one-line verdict from `judge_counts`."""
    return (
        f"concept present in {counts['concept_adapted']}/{counts['images']} adapted images vs "
        f"{counts['concept_base']}/{counts['images']} base; control prompt kept in "
        f"{counts['control_kept']}/{counts['control_images']}"
    )


def judge_adapter(
    base,
    adapter: str | Path,
    judge,
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
    progress: bool = False,
) -> dict[str, int]:
    """`judge_counts` for an adapter folder that is not loaded yet (the app's Personalize tab):
    the demo's prompts and seeds on `base` as it is, then with the adapter added at scale 1."""
    from ..diffusion.generate import ConceptRef, load_concepts

    sample = dict(
        seeds=SEEDS,
        steps=steps,
        guidance=guidance,
        resolution=native_resolution(base),
        progress=progress,
    )
    before = render(base, PROMPTS + [CONTROL_PROMPT], label="base images", **sample)
    load_concepts(base, [ConceptRef(str(adapter), 1.0, name="judged")])
    after = render(base, PROMPTS + [CONTROL_PROMPT], label="adapted images", **sample)
    return judge_counts(judge, before, after, len(PROMPTS))


def demo(argv: list[str]) -> int:
    """Train a concept adapter on sample images and write a before/after grid, the adapter and metrics."""
    from ..diffusion.cli import smoothed_loss
    from ..diffusion.concept_judge import ConceptJudge
    from ..diffusion.data import ConceptDataset

    args = _parser().parse_args(argv)
    if args.steps < 1 or args.rank < 1:
        raise PeftkitError(f"--steps and --rank must be >= 1, got {args.steps} and {args.rank}")
    start = time.perf_counter()
    device = pick_device(args.device)
    out = Path(args.output)
    references = ConceptDataset(args.images, args.prompt, 8).images
    judge = ConceptJudge(args.judge) if args.judge else None
    clip = None
    if args.clip_model:
        from ..diffusion.metrics import ClipEmbedder

        clip = ClipEmbedder(args.clip_model, args.clip_pretrained, device=device)
    print(f"loading base model {args.base!r} on {device}")
    base = open_base(args.base, device)
    resolution = args.resolution or native_resolution(base)
    prompts = PROMPTS if args.prompt == INSTANCE_PROMPT else [args.prompt]
    sample = dict(
        seeds=SEEDS,
        steps=args.sample_steps,
        guidance=args.guidance,
        resolution=resolution,
        progress=not args.no_progress,
    )
    before = render(base, prompts + [CONTROL_PROMPT], label="base images", **sample)
    prior = f", prior preservation with '{args.class_prompt}'" if args.class_prompt else ""
    print(
        f"training a {args.method} adapter on {len(references)} images from {args.images} "
        f"({args.steps} steps, '{args.prompt}'{prior}, {resolution}x{resolution})"
    )
    task, result = train_adapter(
        base,
        args.images,
        args.prompt,
        args.method,
        args.steps,
        args.rank,
        out / "adapter",
        lr=args.lr,
        block_size=args.block_size,
        resolution=resolution,
        device=device,
        seed=args.seed,
        progress=not args.no_progress,
        class_prompt=args.class_prompt or None,
        num_class_images=args.num_class_images,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
    )
    after = render(base, prompts + [CONTROL_PROMPT], label="adapted images", **sample)

    n = len(prompts)
    counts = judge_counts(judge, before, after, n)
    scores = {
        "before": similarity([im for row in before[:n] for im in row], references, clip),
        "after": similarity([im for row in after[:n] for im in row], references, clip),
    }
    metric = "clip_i" if clip is not None else "color"
    samples = out / "samples"
    for tag, rows in (("base", before), ("adapted", after)):
        (samples / tag).mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows):
            for seed, image in zip(SEEDS, row):
                image.save(samples / tag / f"p{i}-s{seed}.png")
    grid = out / "grid.png"
    before_after_grid(before, after, prompts + [CONTROL_PROMPT], SEEDS).save(grid)
    record = {
        "judge": counts,
        "metric": metric,
        "before": scores["before"][metric],
        "after": scores["after"][metric],
        "scores": scores,
        "metric_description": {
            "judge": "images the concept judge (assets/concept-judge) finds the concept in; "
            "control images that still show a red circle on white",
            "color": "mean pairwise Bhattacharyya coefficient of joint 8x8x8 RGB histograms (32x32 px)",
            "clip_i": "mean pairwise cosine similarity of open_clip image embeddings",
        },
        "concept_prompts": prompts,
        "control_prompt": CONTROL_PROMPT,
        "class_prompt": args.class_prompt or None,
        "seeds": SEEDS,
        "base": args.base,
        "method": args.method,
        "steps": result.step,
        "rank": args.rank,
        "lr": args.lr or CONCEPT_DEFAULTS.lr_for(args.method),
        "resolution": resolution,
        "sample_steps": args.sample_steps,
        "guidance": args.guidance,
        "device": device,
        "instance_prompt": args.prompt,
        "images": str(args.images),
        "trainable_parameters": task.unet_handle.num_parameters(),
        "final_loss": smoothed_loss(result.losses),
        "seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write(
        out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2))
    )
    if judge is not None:
        print(judge_line(counts))
    print(
        f"similarity to the instance images ({metric}): before {record['before']:.4f} -> after "
        f"{record['after']:.4f}"
    )
    print(
        f"before/after grid: {grid}\nadapter:           {out / 'adapter'}\nmetrics:           "
        f"{out / 'metrics.json'}\nsamples:           {samples}\ndone in {record['seconds']:.0f} s"
    )
    return 0
