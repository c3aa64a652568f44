"""`peftkit train-concept`, `train-ti`, `generate` and `evaluate-concept`: thin commands over
dreambooth.py, textual_inversion.py, generate.py and metrics.py.

    peftkit train-concept --model ./sd15 --images photos/ --prompt "a photo of sks dog" --output out/dog \\
        --class-prompt "a photo of a dog" --steps 800
    peftkit train-concept --model starter --config job.yaml     # one job of train-concepts' jobs.yaml
    peftkit train-ti --model ./sd15 --images photos/ --token "<dog>" --init-word dog --output out/dog-ti
    peftkit generate --model ./sd15 --adapter out/dog:0.8 --prompt "sks dog on the moon" --seeds 0,1,2 --output samples
    peftkit evaluate-concept --generated samples --references photos/ --clip-model ./clip-b32
    peftkit evaluate-concept --generated samples          # the bundled judge: the sample flower

Sizes default to the base model's native one; every --help lists the defaults.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..common_kernels.args import (
    DefaultsHelp,
    existing_dir,
    existing_file,
    finite_float,
    non_negative_float,
    non_negative_int,
    output_dir,
    output_file,
    positive_float,
    positive_int,
    resolution,
)
from ..common_kernels.errors import PeftkitError
from ..common_kernels.training.warm_start import Start, fast_start
from .concept_defaults import CONCEPT_DEFAULTS


def add_step_args(
    parser: argparse.ArgumentParser, steps: int, batch_size: int, lr: float | None, lr_help: str
) -> None:
    """The run flags every diffusion trainer shares (steps, batch, LR, warm-up, precision and
    graph, checkpoints, seed, device); each command passes its own defaults."""
    from ..common_kernels.training.fast_path import add_speed_args

    parser.add_argument("--steps", type=positive_int, default=steps, help="optimizer steps")
    parser.add_argument(
        "--batch-size", type=positive_int, default=batch_size, help="images per step"
    )
    parser.add_argument("--lr", type=positive_float, default=lr, help=lr_help)
    parser.add_argument(
        "--grad-accum", type=positive_int, default=1, help="batches per optimizer step"
    )
    parser.add_argument(
        "--warmup-steps", type=non_negative_int, default=0, help="linear LR warm-up"
    )
    add_speed_args(parser)
    parser.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=0,
        help="checkpoint every N steps (resume: rerun)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="data, noise and adapter init"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="train on the CPU even when a GPU is present"
    )
    parser.add_argument("--no-progress", action="store_true")


def _training_args(parser: argparse.ArgumentParser, job_required: bool = True) -> None:
    parser.add_argument(
        "--model", required=True, help="base pipeline: diffusers folder, hub id, or 'starter'"
    )
    parser.add_argument(
        "--images",
        required=job_required,
        type=existing_dir,
        help="folder of instance images (x.txt next to x.png = caption)",
    )
    parser.add_argument(
        "--output",
        required=job_required,
        type=output_dir,
        help="output folder (adapter, checkpoints, train.json)",
    )
    parser.add_argument(
        "--resolution",
        type=resolution,
        default=None,
        help="pixels (default: the base model's native size)",
    )
    add_step_args(parser, CONCEPT_DEFAULTS.steps, 1, None, "learning rate (default: the method's)")
    parser.add_argument(
        "--lr-schedule",
        choices=["constant", "linear", "cosine"],
        default=CONCEPT_DEFAULTS.lr_schedule,
        help="after the warm-up: constant, linear decay or cosine decay to 0",
    )
    parser.add_argument(
        "--optimizer",
        choices=["auto", "adamw", "adamw8bit"],
        default="auto",
        help="auto: AdamW (the captured step needs it); 8-bit AdamW with --no-cuda-graph when "
        "bitsandbytes is installed and a GPU is used",
    )
    parser.add_argument(
        "--attention",
        choices=["auto", "sdpa", "xformers"],
        default="auto",
        help="auto: xformers when installed with CUDA, else PyTorch SDPA",
    )


def _train_config(args: argparse.Namespace, lr: float):
    import importlib.util

    import torch

    from ..common_kernels.training.engine import TrainConfig

    optimizer = args.optimizer
    if optimizer == "auto":
        usable = (
            importlib.util.find_spec("bitsandbytes") is not None
            and torch.cuda.is_available()
            and not args.cpu
            and args.cuda_graph is False
        )
        optimizer = "adamw8bit" if usable else "adamw"
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr or lr,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        mixed_precision=args.mixed_precision,
        cuda_graph=args.cuda_graph,
        seed=args.seed,
        output_dir=args.output,
        checkpoint_every=args.checkpoint_every,
        optimizer=optimizer,
        progress=not args.no_progress,
        cpu=args.cpu,
        schedule=args.lr_schedule,
    )


def smoothed_loss(losses: list[float], window: int = 50) -> float | None:
    """The mean loss of the last `window` steps: one batch's loss swings with its timestep draw
    (0.02 to 1+ on the same adapter), so a single step says little about where training ended."""
    return sum(losses[-window:]) / len(losses[-window:]) if losses else None


def _summary(output: str, result) -> None:
    summary = {
        "steps": result.step,
        "final_loss": smoothed_loss(result.losses),
        "final_loss_window": min(50, len(result.losses)),
        "last_step_loss": result.losses[-1] if result.losses else None,
        "resumed_from": result.resumed_from,
        "skipped_steps": result.skipped_steps,
        "samples_per_s": result.samples_per_s,
        "peak_memory_gib": result.peak_memory_gib,
        "metrics": result.metrics,
    }
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / "train.json").write_text(json.dumps(summary, indent=2))
    loss = summary["final_loss"]
    print(
        f"trained {result.step} steps; final loss {loss if loss is None else f'{loss:.4f}'} "
        f"(mean of the last {summary['final_loss_window']} steps, as in train.json); "
        f"outputs in {output}"
    )


def _frozen_dtype(args):
    """The dtype the frozen base loads in: the run's half precision when it has one, so no fp32
    copy of the weights is read into host memory and cast again on the way to the GPU (the
    adapters are made fp32 either way)."""
    import torch

    from ..common_kernels.training.fast_path import default_device_type, resolve_precision

    precision = resolve_precision(args.mixed_precision, default_device_type(args.cpu))
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


@fast_start
def train_concept(argv: list[str], start: Start) -> int:
    """DreamBooth: train an adapter (LoRA, LoKr or OFT) on the UNet, or the SD3/Flux transformer,
    from a few images of a concept."""
    import dataclasses

    from .base import load_base
    from .dreambooth import ConceptConfig
    from .dreambooth import train_concept as run
    from .objective import WEIGHTING_SCHEMES

    d = CONCEPT_DEFAULTS
    parser = argparse.ArgumentParser(
        prog="peftkit train-concept",
        description=train_concept.__doc__,
        formatter_class=DefaultsHelp,
    )
    _training_args(parser, job_required=False)
    parser.add_argument(
        "--config",
        help="YAML file with the keys of one job of train-concepts' jobs.yaml (images, prompt, "
        "output, method, rank, steps, lr, schedule, ...); the job flags below are then ignored",
    )
    from ..common_kernels.registry import core_names

    parser.add_argument(
        "--prompt", help="instance prompt with a rare identifier: 'a photo of sks dog'"
    )
    parser.add_argument(
        "--method", choices=core_names(aliases=True), default=d.method, help="adapter core"
    )
    parser.add_argument("--rank", type=positive_int, default=d.rank, help="rank (cores with one)")
    parser.add_argument("--alpha", type=positive_float, default=None, help="alpha (default: rank)")
    parser.add_argument(
        "--block-size", type=positive_int, default=d.block_size, help="OFT/BOFT block size"
    )
    parser.add_argument(
        "--targets",
        default=",".join(d.targets),
        help="comma list of presets (UNet: attn, ff, conv; SD3/Flux transformer: attn, ff, "
        "all-linear) and module patterns (globs or re:...)",
    )
    parser.add_argument(
        "--text-encoder-rank",
        type=non_negative_int,
        default=0,
        help="LoRA rank on the text encoder(s); 0: off",
    )
    parser.add_argument(
        "--class-prompt", help="turns prior preservation on, e.g. 'a photo of a dog'"
    )
    parser.add_argument(
        "--class-dir",
        help="class images (default <output>/class_images; missing ones are generated)",
    )
    parser.add_argument(
        "--num-class-images",
        type=non_negative_int,
        default=d.num_class_images,
        help="class images for prior preservation",
    )
    parser.add_argument(
        "--prior-weight",
        type=non_negative_float,
        default=d.prior_weight,
        help="weight of the class loss",
    )
    parser.add_argument(
        "--caption-dropout",
        type=non_negative_float,
        default=d.caption_dropout,
        help="share of instance steps trained on the empty prompt (helps guidance)",
    )
    parser.add_argument("--flip", action="store_true", help="mirror images left-right at random")
    parser.add_argument(
        "--min-snr-gamma",
        type=non_negative_float,
        help=f"min-SNR weighting; 0: off (default: {d.min_snr_gamma}, off for SD3/Flux)",
    )
    parser.add_argument(
        "--offset-noise",
        type=non_negative_float,
        default=0.0,
        help="offset noise strength, e.g. 0.05",
    )
    parser.add_argument(
        "--weighting-scheme",
        choices=["auto", *WEIGHTING_SCHEMES],
        default="auto",
        help="SD3/Flux timestep density (logit_normal, mode) or loss weight (sigma_sqrt, cosmap); "
        "auto: diffusers' default of the family (SD3 logit_normal, Flux none)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--validation-prompt", action="append", default=[], help="repeatable")
    parser.add_argument(
        "--validation-every",
        type=non_negative_int,
        default=0,
        help="save validation images every N steps",
    )
    from .concept_flags import CONCEPT_EXTRAS, add_concept_extras

    add_concept_extras(parser)
    args = parser.parse_args(argv)
    start.warm(args.cpu)
    if not args.config:
        missing = [f"--{k}" for k in ("images", "output", "prompt") if not getattr(args, k)]
        if missing:
            parser.error(
                f"the following arguments are required: {', '.join(missing)} (or --config)"
            )
    base = load_base(args.model, dtype=_frozen_dtype(args), attention=args.attention)
    size = args.resolution or base.native_resolution
    if args.config:
        job = config_job(args, size, base)
        images, config, train_config, class_dir = job.images, job.concept, job.train, job.class_dir
        args.output = train_config.output_dir
    else:
        config = ConceptConfig(
            instance_prompt=args.prompt,
            method=args.method,
            rank=args.rank,
            alpha=args.alpha,
            block_size=args.block_size,
            targets=[t.strip() for t in args.targets.split(",") if t.strip()],
            text_encoder_rank=args.text_encoder_rank,
            class_prompt=args.class_prompt,
            num_class_images=args.num_class_images,
            prior_weight=args.prior_weight,
            min_snr_gamma=(
                d.min_snr_for(base) if args.min_snr_gamma is None else args.min_snr_gamma
            ),
            offset_noise=args.offset_noise,
            gradient_checkpointing=args.gradient_checkpointing,
            resolution=size,
            validation_prompts=args.validation_prompt,
            validation_every=args.validation_every,
            caption_dropout=args.caption_dropout,
            flip=args.flip,
            **{k: getattr(args, k) for k in CONCEPT_EXTRAS},
            weighting_scheme=args.weighting_scheme,
        )
        images, class_dir = args.images, args.class_dir
        train_config = dataclasses.replace(
            _train_config(args, d.lr_for(args.method)), eval_every=args.eval_every
        )
    shape = "in aspect buckets of about" if config.buckets else "at"
    print(f"training a {config.method} adapter {shape} {config.resolution}x{config.resolution}")
    start.ready()
    task, result = run(
        base, images, config, train_config, class_dir=class_dir, started=start.started
    )
    print(task.unet_handle.report())
    _summary(args.output, result)
    return 0


def config_job(args: argparse.Namespace, resolution: int, base):
    """The ConceptJob of `--config job.yaml`, read by train-concepts' own job parser; keys the file
    leaves out take the shared concept defaults and the base model's native size."""
    import dataclasses

    import yaml

    from .multitenant_cli import _job

    path = Path(args.config)
    if not path.is_file():
        raise PeftkitError(f"--config {path}: no such file")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise PeftkitError(
            f"{path}: expected a mapping of one job's keys (images, prompt, output, ...)"
        )
    d = CONCEPT_DEFAULTS
    method = str(raw.get("method", d.method))
    defaults = {
        "steps": d.steps,
        "rank": d.rank,
        "lr": d.lr.get(method, d.lr_for(d.method)),
        "schedule": d.lr_schedule,
        "num_class_images": d.num_class_images,
        "resolution": resolution,
        "targets": list(d.targets),
        "min_snr_gamma": d.min_snr_for(base),
    }
    if args.output:
        defaults["output"] = str(Path(args.output).resolve())
    run = {"cpu": args.cpu}
    if args.mixed_precision != "auto":
        run["mixed_precision"] = args.mixed_precision
    job = _job(str(path), raw, defaults, path.parent, None, run)
    job.train = dataclasses.replace(job.train, progress=not args.no_progress)
    return job


@fast_start
def train_ti(argv: list[str], start: Start) -> int:
    """Textual Inversion: learn embeddings for new tokens from a few images."""
    from ..common_kernels.training.engine import train
    from .base import load_base
    from .data import ConceptDataset
    from .textual_inversion import TIConfig, TITask, save_embeddings

    parser = argparse.ArgumentParser(
        prog="peftkit train-ti", description=train_ti.__doc__, formatter_class=DefaultsHelp
    )
    _training_args(parser)
    parser.set_defaults(lr=5e-3, steps=2000)
    parser.add_argument(
        "--token", action="append", required=True, help="new token, e.g. '<my-dog>' (repeatable)"
    )
    parser.add_argument(
        "--init-word", required=True, help="a word close to the concept, e.g. 'dog'"
    )
    parser.add_argument(
        "--num-vectors", type=positive_int, default=1, help="embedding rows per token"
    )
    parser.add_argument(
        "--templates",
        choices=["object", "style"],
        default="object",
        help="caption templates for the token",
    )
    args = parser.parse_args(argv)
    start.warm(args.cpu)
    base = load_base(args.model, dtype=_frozen_dtype(args), attention=args.attention)
    # The trained rows' gradients run back through the text encoder: it stays fp32, as in
    # diffusers' textual_inversion.py; the UNet and VAE take the run's half precision.
    base.pipe.text_encoder.float()
    config = TIConfig(
        tokens=args.token,
        init_word=args.init_word,
        num_vectors=args.num_vectors,
        templates=args.templates,
        resolution=args.resolution or base.native_resolution,
    )
    train_config = _train_config(args, args.lr)
    task = TITask(base, ConceptDataset(args.images, "", config.resolution), config)
    start.ready()
    result = train(task, task.dataset(), train_config, started=start.started)
    files = save_embeddings(task, args.output)
    print("embeddings: " + ", ".join(str(f) for f in files))
    _summary(args.output, result)
    return 0


def generate(argv: list[str]) -> int:
    """Generate a prompts x seeds grid (or a mixed-adapter batch) with one or several adapters."""
    from .base import load_base
    from .generate import (
        ConceptRef,
        attach_image_prompts,
        generate_grid,
        generate_mixed,
        load_concepts,
    )

    parser = argparse.ArgumentParser(
        prog="peftkit generate", description=generate.__doc__, formatter_class=DefaultsHelp
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", action="append", required=True, help="repeatable")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="path[:scale[:name]]: train-concept folder, LoRA or TI file (repeatable)",
    )
    parser.add_argument("--seeds", default="0", help="comma list, e.g. 0,1,2")
    parser.add_argument(
        "--mixed",
        help="comma list naming one adapter per prompt ('base' for none): one batch, "
        "each row with its own adapter",
    )
    parser.add_argument("--output", required=True, type=output_dir)
    parser.add_argument("--steps", type=positive_int, default=30, help="sampler steps")
    parser.add_argument(
        "--guidance", type=non_negative_float, default=7.5, help="classifier-free guidance scale"
    )
    parser.add_argument(
        "--resolution",
        type=resolution,
        default=None,
        help="pixels (default: the base model's native size)",
    )
    parser.add_argument(
        "--attention", choices=["auto", "sdpa", "xformers"], default="auto", help="backend"
    )
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    image = parser.add_argument_group("image prompts")
    image.add_argument(
        "--control", help="control branch folder (from train-control) or ControlNet hub id"
    )
    image.add_argument(
        "--control-image",
        type=existing_file,
        help="condition image for --control (edges, depth, segments...)",
    )
    image.add_argument(
        "--control-scale", type=finite_float, default=1.0, help="control branch strength"
    )
    image.add_argument(
        "--ip-adapter", type=existing_file, help="IP-Adapter file (from train-ip-adapter)"
    )
    image.add_argument("--ip-image", type=existing_file, help="reference image for --ip-adapter")
    image.add_argument(
        "--ip-scale", type=finite_float, default=1.0, help="image-prompt scale (0: text only)"
    )
    image.add_argument(
        "--ip-encoder", help="image encoder (default: the one recorded in the IP-Adapter file)"
    )
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise PeftkitError(
            f"--seeds must be a comma list of integers, got {args.seeds!r}"
        ) from None
    base = load_base(args.model, attention=args.attention)
    import torch

    base.pipe.to("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    base.pipe.set_progress_bar_config(disable=args.no_progress, leave=False)
    load_concepts(base, [ConceptRef.parse(a) for a in args.adapter])
    kwargs = {
        "steps": args.steps,
        "guidance": args.guidance,
        "resolution": args.resolution or base.native_resolution,
        "image_prompts": attach_image_prompts(
            base,
            args.control,
            args.control_image,
            args.control_scale,
            args.ip_adapter,
            args.ip_image,
            args.ip_scale,
            args.ip_encoder,
            guidance=args.guidance,
        ),
    }
    if args.mixed:
        choice = [None if c.strip() == "base" else c.strip() for c in args.mixed.split(",")]
        generate_mixed(base, args.prompt, choice, seed=seeds[0], out_dir=args.output, **kwargs)
    else:
        generate_grid(base, args.prompt, seeds, out_dir=args.output, **kwargs)
    print(f"images and grid.png written to {args.output}")
    return 0


def evaluate_concept(argv: list[str]) -> int:
    """CLIP-I, CLIP-T (open_clip) and DINO similarity of generated images to the instance images;
    without --clip-model, the bundled concept judge counts the images that show the sample flower."""
    from .concept_judge import JUDGE
    from .data import ConceptDataset, open_image
    from .generate import PROMPTS_FILE
    from .metrics import ClipEmbedder, DinoEmbedder, concept_scores

    parser = argparse.ArgumentParser(
        prog="peftkit evaluate-concept",
        description=evaluate_concept.__doc__,
        formatter_class=DefaultsHelp,
    )
    parser.add_argument(
        "--generated", required=True, type=existing_dir, help="folder written by peftkit generate"
    )
    parser.add_argument(
        "--references", type=existing_dir, help="the instance images (needed with --clip-model)"
    )
    parser.add_argument(
        "--judge",
        default=str(JUDGE),
        help="concept judge folder, used when no --clip-model is given",
    )
    parser.add_argument(
        "--prompt", help="prompt of every generated image (default: the folder's prompts.json)"
    )
    parser.add_argument(
        "--clip-model", help="open_clip name (ViT-B-32) or a folder with open_clip_config.json"
    )
    parser.add_argument(
        "--clip-pretrained", help="open_clip pretrained tag or local checkpoint file"
    )
    parser.add_argument(
        "--dino-model", help="transformers folder or hub id of a DINO ViT (adds the 'dino' score)"
    )
    parser.add_argument("--output", type=output_file, help="write the scores to this JSON file")
    args = parser.parse_args(argv)
    folder = Path(args.generated)
    if not args.clip_model:
        return _judge_folder(folder, args.judge, args.output)
    if not args.references:
        raise PeftkitError("--clip-model compares with the instance images: pass --references")
    record = (
        json.loads((folder / PROMPTS_FILE).read_text()) if (folder / PROMPTS_FILE).is_file() else {}
    )
    if not record and not args.prompt:
        raise PeftkitError(
            f"{folder} has no {PROMPTS_FILE}: pass --prompt with the prompt the images were made with"
        )
    names = (
        sorted(record)
        if record
        else sorted(p.name for p in folder.glob("*.png") if p.name != "grid.png")
    )
    generated = [open_image(folder / n) for n in names]
    prompts = [args.prompt or record[n] for n in names]
    references = ConceptDataset(args.references, "", 8).images
    clip = ClipEmbedder(args.clip_model, args.clip_pretrained)
    dino = DinoEmbedder(args.dino_model) if args.dino_model else None
    scores = concept_scores(generated, prompts, references, clip, dino)
    print(json.dumps(scores, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(scores, indent=2))
    return 0


def _judge_folder(folder: Path, judge_dir: str, output: str | None) -> int:
    """The judge's verdict on every image of `folder` (grid.png left out), printed as JSON."""
    from .concept_judge import ConceptJudge
    from .data import open_image

    names = (
        sorted(
            p.name
            for p in folder.iterdir()
            if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and p.name != "grid.png"
        )
        if folder.is_dir()
        else []
    )
    if not names:
        raise PeftkitError(f"no images in {folder}: pass the folder peftkit generate wrote")
    judge = ConceptJudge(judge_dir)
    probabilities = judge.probabilities([open_image(folder / n) for n in names])
    scores = {
        "judge": str(judge_dir),
        "concept_present": sum(p >= judge.threshold for p in probabilities),
        "images": len(names),
        "probability": dict(zip(names, [round(p, 4) for p in probabilities])),
    }
    print(json.dumps(scores, indent=2))
    print(f"concept present in {scores['concept_present']}/{len(names)} images")
    if output:
        Path(output).write_text(json.dumps(scores, indent=2))
    return 0
