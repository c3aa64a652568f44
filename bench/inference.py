"""Inference (no grad) of the SD1.5-shaped UNet, bs 4, bf16: base model vs merged adapters vs
unmerged adapters (one, two active, and a mixed batch routing four LoRAs; one DoRA, LoHa, BOFT),
eager and as a CUDA graph, next to peft's unmerged LoRA.

    python bench/inference.py --out results/
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import graphed, time_step  # noqa: E402
from models import UNET_TARGETS, build  # noqa: E402

from peftkit.common_kernels import (  # noqa: E402
    BOFTConfig,
    DoRAConfig,
    LoHaConfig,
    LoRAConfig,
    inject,
    routing,
)

CORES = {
    "lora": lambda: LoRAConfig(targets=UNET_TARGETS, r=16),
    "dora": lambda: DoRAConfig(targets=UNET_TARGETS, r=16),
    "loha": lambda: LoHaConfig(targets=UNET_TARGETS, r=8),
    "boft": lambda: BOFTConfig(targets=UNET_TARGETS, block_size=32, n_butterfly_factor=2),
}


def randomize(handle) -> None:
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.normal_(std=0.01)


def variant(name: str, bs: int):
    net, _ = build("unet", bs)
    net = net.to(torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(bs, 4, 64, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    enc = torch.randn(bs, 77, 768, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.full((bs,), 500, device="cuda")
    if name.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=16, lora_alpha=16, target_modules=UNET_TARGETS))
    elif name != "base":
        # "<core> x<count>"; "merged" is one LoRA, "routed x4" four.
        kind, _, count = name.replace("merged", "lora x1").replace("routed", "lora").partition(" x")
        k = int(count)
        handles = [inject(net, CORES[kind](), name=f"a{i}") for i in range(k)]
        for h in handles:
            randomize(h)
            h.set_scale(1.0 / k)
        if name == "merged":
            handles[0].merge()
        if name == "routed x4":
            # Entered once and left open: the ids tensor is made here, not inside a captured graph.
            routing(net, [i % 4 for i in range(bs)], [h.name for h in handles]).__enter__()

    def step():
        with torch.no_grad():
            return net(x, t, enc).sample

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bs", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in ("eager", "graph"):
        for name in (
            "base",
            "merged",
            "lora x1",
            "lora x2",
            "routed x4",
            "peft lora x1",
            "dora x1",
            "loha x1",
            "boft x1",
        ):
            try:
                step = variant(name, args.bs)
                if mode == "graph":
                    step = graphed(step)
                ms, peak = time_step(step, warmup=3, repeats=15)
                row = dict(mode=mode, variant=name, bs=args.bs, ms=round(ms, 2))
            except Exception as exc:
                row = dict(
                    mode=mode, variant=name, bs=args.bs, error=f"{type(exc).__name__}: {exc}"[:300]
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    (args.out / "inference.json").write_text(json.dumps(rows, indent=1))
    base = {r["mode"]: r["ms"] for r in rows if r["variant"] == "base" and "ms" in r}
    lines = ["| mode | variant | ms | x base |", "|---|---|---|---|"]
    for r in rows:
        if "ms" in r:
            lines.append(
                f"| {r['mode']} | {r['variant']} | {r['ms']:.1f} | {r['ms'] / base[r['mode']]:.2f} |"
            )
    (args.out / "inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
