"""`peftkit vit-train` and `peftkit vit-eval`: thin argparse layers over train_vit / evaluate_vit.

peftkit vit-train --data vtab:vtab-1k/dtd --model vit_base_patch16_224 --method vpt-deep --output runs/dtd
peftkit vit-train --sweep --method lora,ssf,vpt-deep --data builtin:counting,builtin:location --output runs/sweep
peftkit vit-eval --adapter runs/dtd/adapter.safetensors --data vtab:vtab-1k/dtd
"""

from __future__ import annotations

import argparse
import json

from peftkit.common_kernels.args import (
    DefaultsHelp,
    existing_file,
    finite_float,
    non_negative_float,
    non_negative_int,
    output_dir,
    output_file,
    positive_float,
    positive_int,
)
from peftkit.common_kernels.errors import PeftkitError


def _parser() -> argparse.ArgumentParser:
    from peftkit.common_kernels.training.fast_path import add_speed_args

    p = argparse.ArgumentParser(
        prog="peftkit vit-train",
        description="fine-tune a ViT with an adapter "
        "(VTAB-1k protocol: train800val200 -> test top-1)",
        formatter_class=DefaultsHelp,
    )
    p.add_argument(
        "--data",
        required=True,
        help="vtab:<task dir>, fgvc:<dataset dir>, folder:<root> or builtin:<counting|location|"
        "orientation|shape|color>; comma-separated with --sweep",
    )
    p.add_argument(
        "--method",
        default="lora",
        help="linear, bitfit, full, vpt-shallow, vpt-deep, adaptformer, ssf, "
        "lora, oft, kron, combined with '+' (vpt-deep+lora); comma-separated with --sweep",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="train every method on every task; write results.md/csv",
    )
    p.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2",
        help="with --sweep, repeatable: train every combination (lr, weight_decay, warmup_epochs, "
        "label_smoothing, seed, epochs, vpt_length, r, ...); the combinations of one method and "
        "task train together in one pass over the frozen backbone",
    )
    p.add_argument(
        "--output",
        type=output_dir,
        help="run folder: adapter, results.json, checkpoints (a rerun resumes)",
    )
    g = p.add_argument_group("backbone")
    g.add_argument(
        "--model",
        default="vit_base_patch16_224",
        help="timm model name: a ViT (vit_*, deit_*), DINOv2 (vit_base_patch14_dinov2) or Swin "
        "(swin_tiny_patch4_window7_224), or hf-hub:<org>/<repo> for a timm repository on the hub",
    )
    g.add_argument(
        "--open-clip", help="open_clip model name: use its visual tower instead of a timm ViT"
    )
    g.add_argument(
        "--checkpoint",
        type=existing_file,
        help="local .safetensors weights instead of downloading from the hub",
    )
    g.add_argument(
        "--random-init",
        action="store_true",
        help="no pretrained weights (tests, from-scratch runs)",
    )
    g.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help="JSON of extra timm create_model arguments",
    )
    g.add_argument("--img-size", type=positive_int, help="input size (default: the model's)")
    m = p.add_argument_group("method options")
    m.add_argument("--vpt-length", type=positive_int, help="VPT prompts per layer (default 10)")
    m.add_argument("--vpt-dropout", type=non_negative_float, help="VPT prompt dropout (default 0)")
    m.add_argument(
        "--bottleneck", type=positive_int, help="AdaptFormer bottleneck width (default 64)"
    )
    m.add_argument("--adapter-scale", type=finite_float, help="AdaptFormer scale s (default 0.1)")
    m.add_argument(
        "--ssf-sites",
        type=lambda s: s.split(","),
        help="comma-separated SSF sites (default: all but pre_norm)",
    )
    m.add_argument("--r", type=positive_int, help="LoRA / LoKr rank (default 8)")
    m.add_argument("--alpha", type=positive_float, help="LoRA / LoKr alpha")
    m.add_argument("--block-size", type=positive_int, help="OFT block size (default 32)")
    m.add_argument("--factor", type=int, help="LoKr factor")
    m.add_argument(
        "--core-sites",
        type=lambda s: s.split(","),
        help="layers for LoRA/OFT/LoKr: qkv,proj,fc1,fc2",
    )
    t = p.add_argument_group("training")
    t.add_argument(
        "--protocol",
        choices=["tune", "final", "auto"],
        default="final",
        help="final: train800val200 -> test; tune: train800 -> val200; auto (with --sweep): tune "
        "the grid, retrain each task's best val200 configuration, report test top-1 once",
    )
    t.add_argument(
        "--epochs", type=positive_int, default=100, help="passes over the training split"
    )
    t.add_argument("--steps", type=positive_int, help="optimizer steps (overrides --epochs)")
    t.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per step and process"
    )
    t.add_argument(
        "--lr",
        type=positive_float,
        help="default: the method's (lora 1e-3, ssf 5e-3, full 1.25e-4)",
    )
    t.add_argument(
        "--weight-decay",
        type=non_negative_float,
        help="default: the method's (lora 1e-4, ssf 5e-5, full 0.05)",
    )
    t.add_argument(
        "--warmup-epochs",
        type=non_negative_float,
        default=10.0,
        help="linear LR warm-up, then cosine",
    )
    t.add_argument("--grad-accum", type=positive_int, default=1, help="batches per optimizer step")
    add_speed_args(t)
    t.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile the backbone's blocks (fuses norms and activations: ViT-B/16 steps "
        "~1.3x faster, for ~11 s of compiling): auto compiles single-GPU runs of >= 250k "
        "training images (a sweep of several configurations, FGVC; not one VTAB-1k run)",
    )
    t.add_argument(
        "--label-smoothing", type=non_negative_float, default=0.0, help="cross-entropy smoothing"
    )
    t.add_argument("--eval-every-epochs", type=positive_int, default=1, help="eval cadence")
    t.add_argument(
        "--checkpoint-every-epochs", type=non_negative_int, default=10, help="0: no checkpoints"
    )
    t.add_argument(
        "--num-classes", type=positive_int, help="default: max label of the training split + 1"
    )
    t.add_argument(
        "--builtin-sizes",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        help="train,eval sizes of built-in tasks (default VTAB-1k: 1000,1000 for final)",
    )
    t.add_argument(
        "--seed", type=non_negative_int, default=0, help="init, data order, augmentation"
    )
    t.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _config(args: argparse.Namespace, data: str, method: str):
    from .train import ViTTrainConfig

    options = {
        k: getattr(args, k)
        for k in (
            "vpt_length",
            "vpt_dropout",
            "bottleneck",
            "adapter_scale",
            "ssf_sites",
            "r",
            "alpha",
            "block_size",
            "factor",
            "core_sites",
        )
    }
    return ViTTrainConfig(
        data=data,
        model=args.model,
        pretrained=not args.random_init,
        checkpoint=args.checkpoint,
        open_clip=args.open_clip,
        model_kwargs=args.model_kwargs,
        method=method,
        method_options={k: v for k, v in options.items() if v is not None},
        protocol=args.protocol,
        img_size=args.img_size,
        num_classes=args.num_classes,
        builtin_sizes=args.builtin_sizes,
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        grad_accum=args.grad_accum,
        mixed_precision=args.mixed_precision,
        cuda_graph=args.cuda_graph,
        compile={"on": True, "off": False}.get(args.compile, "auto"),
        label_smoothing=args.label_smoothing,
        eval_every_epochs=args.eval_every_epochs,
        checkpoint_every_epochs=args.checkpoint_every_epochs,
        seed=args.seed,
        output_dir=args.output,
        progress=not args.no_progress,
        cpu=args.cpu,
    )


def _summary(results: dict) -> str:
    # peak memory is measured on GPUs only
    head = results["trainable"] - results["trainable_without_head"]
    share = results["trainable_pct_of_backbone"]
    peak = results.get("peak_memory_gib")
    return (
        f"{results['method']} on {results['task']} ({'/'.join(results['splits'])}): top-1 {results['top1']:.2f}% | "
        f"{results['trainable']:,} trainable params ({share:.3f}% of backbone + {head:,} head) | "
        f"{results['images_per_s']:.1f} img/s" + (f" | peak {peak:.2f} GiB" if peak else "")
    )


def vit_train(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    datas = [d for d in args.data.split(",") if d] if args.sweep else [args.data]
    methods = [m for m in args.method.split(",") if m] if args.sweep else [args.method]
    if args.sweep:
        return _sweep(args, datas, methods)
    if args.protocol == "auto" or args.grid:
        raise PeftkitError(
            "--protocol auto and --grid need --sweep: add it (a sweep may have one method and task)"
        )
    from .train import train_vit

    results = train_vit(_config(args, args.data, args.method))
    print(_summary(results))
    if args.output:
        print(f"adapter: {args.output}/adapter.safetensors, results: {args.output}/results.json")
    return 0


def _sweep(args: argparse.Namespace, datas: list[str], methods: list[str]) -> int:
    from .protocol import run_protocol
    from .sweep import label, parse_grid, run_sweep, write_table

    if not args.output:
        raise PeftkitError(
            "--sweep needs --output: every run and the results table are written there"
        )
    grid = parse_grid(args.grid)
    base = _config(args, datas[0], methods[0])
    if args.protocol == "auto":
        rows, md = run_protocol(base, methods, datas, args.output, grid)
    else:
        rows = run_sweep(base, methods, datas, args.output, grid)
        md = write_table(rows, args.output)
    for r in rows:
        named = {**r, "method": label(r)}
        print(
            _summary(named)
            if r["top1"] is not None
            else f"{named['method']} on {r['task']}: {r['error']}"
        )
    print(md)
    print(f"table written to {args.output}/results.md and results.csv")
    return 0


def vit_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="peftkit vit-eval",
        description="top-1 of a saved ViT adapter on a split",
        formatter_class=DefaultsHelp,
    )
    p.add_argument(
        "--adapter",
        required=True,
        type=existing_file,
        help="adapter.safetensors written by vit-train",
    )
    p.add_argument(
        "--data",
        required=True,
        help="vtab:<task dir>, fgvc:<dataset dir>, folder:<root> or builtin:<name>",
    )
    p.add_argument(
        "--split", default="test", choices=["test", "val200"], help="val200: the tune split"
    )
    p.add_argument(
        "--checkpoint",
        type=existing_file,
        help="local .safetensors backbone weights (default: the source recorded at training)",
    )
    p.add_argument(
        "--pretrained", action="store_true", help="take the backbone weights from the hub"
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="rebuild the run's random-init backbone (seed from the adapter)",
    )
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per batch")
    p.add_argument(
        "--builtin-sizes",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        help="train,eval sizes of built-in tasks",
    )
    p.add_argument("--json", type=output_file, help="also write the metrics to this JSON file")
    args = p.parse_args(argv)
    from .train import evaluate_vit

    pretrained = True if args.pretrained else False if args.random_init else None
    metrics = evaluate_vit(
        args.adapter,
        args.data,
        args.split,
        pretrained=pretrained,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        builtin_sizes=args.builtin_sizes,
    )
    print(
        f"{metrics['method']} on {args.data} [{args.split}]: top-1 {metrics['top1']:.2f}% "
        f"({metrics['eval_examples']} images)"
    )
    if args.json:
        from pathlib import Path

        from peftkit.common_kernels.adapter_file import atomic_write

        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    return 0
