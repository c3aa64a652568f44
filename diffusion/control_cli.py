"""`peftkit train-control` and `peftkit train-ip-adapter`: thin commands over ControlTask and
IPAdapterTask on the shared training engine.

    peftkit train-control --model runwayml/stable-diffusion-v1-5 --data pairs.jsonl --output out/edges \\
        --condition-from canny --mode lora --steps 2000
    peftkit train-ip-adapter --model ./sd15 --data photos/ --image-encoder ./clip-vit-h --output out/ip

On N GPUs: `accelerate launch --num_processes N -m peftkit.apps.cli train-control ...` (DDP; the batch
size is per process), plus `--fsdp` to shard the full-copy branch and its AdamW states, and
`--fsdp-shard-frozen` to shard the frozen UNet too (fsdp.py). Process 0 alone writes files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..common_kernels.args import (
    finite_float,
    non_negative_float,
    output_dir,
    positive_int,
    resolution,
)
from ..common_kernels.training.warm_start import Start, fast_start
from .base import load_base


def _common_args(parser: argparse.ArgumentParser) -> None:
    from .cli import add_step_args

    parser.add_argument(
        "--model", required=True, help="base Stable Diffusion pipeline: folder or hub id"
    )
    parser.add_argument(
        "--data", required=True, help="folder (images/, conditions/) or .jsonl/.csv manifest"
    )
    parser.add_argument(
        "--output",
        required=True,
        type=output_dir,
        help="output folder (weights, checkpoints, train.json)",
    )
    parser.add_argument("--resolution", type=resolution, default=512)
    add_step_args(parser, steps=1000, batch_size=4, lr=1e-5, lr_help="learning rate")
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="under accelerate launch: shard model, gradients and optimizer states (full-copy branch)",
    )
    parser.add_argument(
        "--fsdp-shard-frozen",
        action="store_true",
        help="with --fsdp, also shard the frozen UNet (less memory, two gathers per block per step)",
    )


def _train(task, args: argparse.Namespace, start: Start):
    from ..common_kernels.training.engine import TrainConfig, launch_world, train

    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        mixed_precision=args.mixed_precision,
        cuda_graph=args.cuda_graph,
        seed=args.seed,
        output_dir=args.output,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
        cpu=args.cpu,
        schedule="constant",
        fsdp=args.fsdp,
        fsdp_shard_frozen=args.fsdp_shard_frozen,
    )
    start.ready()
    result = train(task, task.dataset(), config, started=start.started)
    if launch_world()[0] != 0:
        return result
    summary = {
        "steps": result.step,
        "final_loss": result.losses[-1] if result.losses else None,
        "samples_per_s": result.samples_per_s,
        "peak_memory_gib": result.peak_memory_gib,
        "metrics": result.metrics,
        "parallel": result.parallel,
    }
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "train.json").write_text(json.dumps(summary, indent=2))
    return result


@fast_start
def train_control(argv: list[str], start: Start) -> int:
    """Train a zero-conv control branch; writes <output>/controlnet (a diffusers ControlNetModel folder)."""
    from ..common_kernels.registry import core, core_names
    from ..common_kernels.training.engine import launch_world
    from .cli import DefaultsHelp
    from .conditions import EXTRACTORS
    from .control import ControlConfig, ControlTask, save_control
    from .pairs import load_pairs

    parser = argparse.ArgumentParser(
        prog="peftkit train-control",
        description=train_control.__doc__,
        formatter_class=DefaultsHelp,
    )
    _common_args(parser)
    parser.add_argument(
        "--mode",
        choices=["full", "lora"],
        default="full",
        help="full: train the copied encoder; lora: an adapter on the copy (merged at save)",
    )
    parser.add_argument(
        "--adapter", choices=core_names(aliases=True), default="lora", help="core for --mode lora"
    )
    parser.add_argument(
        "--rank", type=positive_int, default=8, help="rank (lora/kron) for --mode lora"
    )
    parser.add_argument(
        "--condition-from",
        choices=sorted(EXTRACTORS),
        help="compute condition images from the training images instead of reading them",
    )
    parser.add_argument("--conditioning-scale", type=finite_float, default=1.0)
    args = parser.parse_args(argv)
    start.warm(args.cpu)

    adapter = {}
    if args.mode == "lora":
        from .control import DEFAULT_TARGETS

        adapter = core(args.adapter).make_config(list(DEFAULT_TARGETS), rank=args.rank).to_dict()
    config = ControlConfig(
        mode=args.mode,
        adapter=adapter,
        conditioning_scale=args.conditioning_scale,
        condition_from=args.condition_from,
    )
    examples = load_pairs(args.data, need_condition=args.condition_from is None)
    base = load_base(args.model)
    extractor = EXTRACTORS[args.condition_from] if args.condition_from else None
    task = ControlTask(
        base, examples, config, resolution=args.resolution, extractor=extractor, seed=args.seed
    )
    _train(task, args, start)
    # Every process joins (FSDP gathers the sharded branch to save it); process 0 writes.
    writer = launch_world()[0] == 0
    folder = save_control(
        task.controlnet,
        Path(args.output) / "controlnet",
        task.handle,
        config,
        base_model=args.model,
        write=writer,
    )
    if writer:
        print(f"saved control branch to {folder}")
    return 0


@fast_start
def train_ip_adapter(argv: list[str], start: Start) -> int:
    """Train an IP-Adapter; writes <output>/ip-adapter.safetensors (diffusers load_ip_adapter layout)."""
    from ..common_kernels.training.engine import launch_world
    from .cli import DefaultsHelp
    from .image_encoder import ImageEncoder
    from .ip_adapter import IPAdapterConfig, save_ip_adapter
    from .ip_adapter_task import IPAdapterTask
    from .pairs import load_pairs

    parser = argparse.ArgumentParser(
        prog="peftkit train-ip-adapter",
        description=train_ip_adapter.__doc__,
        formatter_class=DefaultsHelp,
    )
    _common_args(parser)
    parser.add_argument(
        "--image-encoder",
        required=True,
        help="CLIP vision model folder/hub id, or open_clip:<architecture>:<pretrained>",
    )
    parser.add_argument("--variant", choices=["basic", "plus"], default="basic")
    parser.add_argument(
        "--num-tokens", type=positive_int, default=None, help="image tokens (basic: 4, plus: 16)"
    )
    parser.add_argument("--resampler-dim", type=positive_int, default=768)
    parser.add_argument("--resampler-heads", type=positive_int, default=12)
    parser.add_argument(
        "--drop",
        type=non_negative_float,
        default=0.05,
        help="probability of dropping the image, the text, and both (each)",
    )
    parser.set_defaults(lr=1e-4)  # the paper's rate: only the small projection and K/V layers train
    args = parser.parse_args(argv)
    start.warm(args.cpu)

    tokens = args.num_tokens or (4 if args.variant == "basic" else 16)
    config = IPAdapterConfig(
        variant=args.variant,
        num_tokens=tokens,
        resampler_dim=args.resampler_dim,
        resampler_heads=args.resampler_heads,
        drop_image=args.drop,
        drop_text=args.drop,
        drop_both=args.drop,
        image_encoder=args.image_encoder,
    )
    examples = load_pairs(args.data, need_condition=False)
    base = load_base(args.model)
    encoder = ImageEncoder(args.image_encoder, args.variant)
    task = IPAdapterTask(
        base, examples, config, encoder, resolution=args.resolution, seed=args.seed
    )
    _train(task, args, start)
    if launch_world()[0] == 0:
        path = save_ip_adapter(
            task.adapter, Path(args.output) / "ip-adapter.safetensors", base_model=args.model
        )
        print(f"saved IP-Adapter to {path}")
    return 0
