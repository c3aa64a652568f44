"""ViT-B/16 training step of every peftkit vision method vs HF peft (LoRA, OFT, LoKr) and the
frozen-backbone floor, eager and torch.compile, in one process.

Setting: timm vit_base_patch16_224 (random weights, 100-class head), batch 64, 224 px, frozen
base stored in bf16 (fp32 for BitFit and full fine-tuning, which train backbone tensors),
trainable tensors fp32, bf16 autocast, fused AdamW; a step is forward +
backward + optimizer step. Floor = the frozen model with no adapter: forward + input-gradient
backward (the least work any adapter step can do). Median of `--steps` (>= 15) CUDA-event-timed
steps after warm-up; peak memory over the timed steps. Every config runs in its own try/except
and rows are written as they finish, so one failure (or the deadline) does not lose the rest.
Before timing, peftkit LoRA and peft LoRA with the same weights must give the same logits.

    python bench/vit.py --out bench/results/vit
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

R, BLOCK = 8, 32
DEVICE = "cuda"  # a CPU smoke test sets this to "cpu"
PEFT_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
PEFTKIT = {
    "linear": {},
    "bitfit": {},
    "full": {},
    "vpt-shallow": {"vpt_length": 50},
    "vpt-deep": {"vpt_length": 10},
    "adaptformer": {"bottleneck": 64},
    "ssf": {},
    "lora": {"r": R, "alpha": R},
    "oft": {"block_size": BLOCK},
    "kron": {"r": R, "alpha": R},
    "vpt-deep+lora": {"vpt_length": 10, "r": R},
}
PEFT = ("lora", "oft", "lokr")
COMPILE_ORDER = [
    "floor",
    "peftkit-lora",
    "peft-lora",
    "peftkit-oft",
    "peft-oft",
    "peftkit-kron",
    "peft-lokr",
    "peftkit-vpt-deep",
    "peftkit-adaptformer",
    "peftkit-ssf",
    "peftkit-bitfit",
    "peftkit-linear",
]


def vit(num_classes: int = 100) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=num_classes)


def adapt(variant: str):
    """(model to call, trainable params, the plain net) for 'floor', 'peftkit-<method>', 'peft-<method>'."""
    # BitFit and full fine-tuning train backbone tensors: keep that backbone fp32 (autocast casts per op).
    trains_backbone = variant in ("peftkit-bitfit", "peftkit-full")
    net = vit().to(DEVICE, torch.float32 if trains_backbone else torch.bfloat16)
    if variant == "floor":
        net.requires_grad_(False)
        return net, [], net
    lib, method = variant.split("-", 1)
    if lib == "peftkit":
        from peftkit.vision.methods import VisionAdapter, ViTMethodConfig

        adapter = VisionAdapter(net, ViTMethodConfig.parse(method, **PEFTKIT[method]))
        params = adapter.trainable_parameters()
        model = net
    else:
        from peft import LoKrConfig, LoraConfig, OFTConfig, get_peft_model

        config = {
            "lora": LoraConfig(r=R, lora_alpha=R, target_modules=PEFT_TARGETS),
            "oft": OFTConfig(r=0, oft_block_size=BLOCK, target_modules=PEFT_TARGETS),
            "lokr": LoKrConfig(r=R, alpha=R, target_modules=PEFT_TARGETS),
        }[method]
        model = get_peft_model(net, config)
        net.head.requires_grad_(
            True
        )  # a new label set trains its head, as every peftkit method does
        params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # trainable tensors in fp32 on the bf16 base (peft's default too)
        p.data = p.data.float()
    return model, params, net


def check_lora_parity() -> float:
    """peftkit LoRA and peft LoRA with identical A, B give the same logits (bf16 tolerance)."""
    from peft import LoraConfig, get_peft_model

    from peftkit.vision.methods import VisionAdapter, ViTMethodConfig

    ours_net = vit().to(DEVICE)
    adapter = VisionAdapter(ours_net, ViTMethodConfig.parse("lora", r=R, alpha=R))
    theirs = get_peft_model(
        vit().to(DEVICE), LoraConfig(r=R, lora_alpha=R, target_modules=PEFT_TARGETS)
    )
    torch.manual_seed(1)
    modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in adapter.core.layers.items():
            d = layer.deltas["vision"]
            d.B.normal_(0, 0.02)
            modules[name].lora_A["default"].weight.copy_(d.A)
            modules[name].lora_B["default"].weight.copy_(d.B)
        x = torch.randn(8, 3, 224, 224, device=DEVICE)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            a, b = ours_net(x).float(), theirs(x).float()
            with theirs.disable_adapter():
                base = theirs(x).float()
    moved = float((b - base).norm() / base.norm())
    assert moved > 1e-3, (
        f"the parity check's LoRA weights do not change the output ({moved:.3g}): check is void"
    )
    err = float((a - b).norm() / b.norm())
    assert err < 2e-2, f"peftkit LoRA and peft LoRA disagree: relative error {err:.3g}"
    return err


def measure(variant: str, compiled: bool, batch: int, steps: int) -> dict:
    model, params, net = adapt(variant)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    call = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, 224, 224, device=DEVICE)
    y = torch.randint(0, 100, (batch,), device=DEVICE)

    def step():
        inp = x.requires_grad_(True) if opt is None else x
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(call(inp).float(), y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            inp.grad = None

    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    row = {
        "variant": variant,
        "compile": compiled,
        "ms": round(ms, 2),
        "images_per_s": round(batch * 1000 / ms, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "warmup_s": round(warmup_s, 1),
        "trainable": sum(p.numel() for p in params),
    }
    del model, params, net, opt, call
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def table(rows: list[dict]) -> str:
    floor = {r["compile"]: r["ms"] for r in rows if r["variant"] == "floor" and "ms" in r}
    peft = {
        (r["variant"].split("-", 1)[1].replace("lokr", "kron"), r["compile"]): r["ms"]
        for r in rows
        if r["variant"].startswith("peft-") and "ms" in r
    }
    lines = [
        "| variant | mode | ms/step | images/s | peak GiB | x floor | peft / peftkit | trainable |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mode = "compile" if r["compile"] else "eager"
        if "ms" not in r:
            lines.append(f"| {r['variant']} | {mode} | failed: {r['error'][:60]} | | | | | |")
            continue
        x_floor = f"{r['ms'] / floor[r['compile']]:.2f}" if r["compile"] in floor else "-"
        method = r["variant"].split("-", 1)[1] if r["variant"].startswith("peftkit-") else None
        vs = (
            f"{peft[(method, r['compile'])] / r['ms']:.2f}x"
            if (method, r["compile"]) in peft
            else ""
        )
        lines.append(
            f"| {r['variant']} | {mode} | {r['ms']:.2f} | {r['images_per_s']:.0f} | {r['peak_gib']:.2f} | "
            f"{x_floor} | {vs} | {r['trainable']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--steps", type=int, default=20, help="timed steps per config (median; >= 15)"
    )
    parser.add_argument(
        "--compile",
        default=",".join(COMPILE_ORDER),
        help="variants to also time under torch.compile, in this order (empty: none)",
    )
    parser.add_argument(
        "--deadline", type=float, default=330.0, help="start no config after this many seconds"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/vit.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    meta = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "batch": args.batch,
        "steps": args.steps,
    }
    try:
        meta["lora_parity_rel_err"] = check_lora_parity()
    except Exception as err:  # keep benchmarking; the table says parity failed
        meta["lora_parity_error"] = f"{type(err).__name__}: {err}"
    print(json.dumps(meta), flush=True)
    eager = ["floor", *[f"peftkit-{m}" for m in PEFTKIT], *[f"peft-{m}" for m in PEFT]]
    plan = [(v, False) for v in eager] + [(v, True) for v in args.compile.split(",") if v]
    rows = []
    for variant, compiled in plan:
        if time.perf_counter() - start > args.deadline:
            rows.append({"variant": variant, "compile": compiled, "error": "skipped: deadline"})
            continue
        try:
            rows.append(measure(variant, compiled, args.batch, args.steps))
        except Exception as err:
            traceback.print_exc()
            rows.append(
                {"variant": variant, "compile": compiled, "error": f"{type(err).__name__}: {err}"}
            )
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "vit.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = (
        f"ViT-B/16, batch {args.batch}, 224 px, bf16, {meta['gpu']}; median of {args.steps} steps; "
        f"LoRA parity vs peft: {meta.get('lora_parity_rel_err', meta.get('lora_parity_error'))}\n\n"
        + table(rows)
    )
    (args.out / "vit.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
