"""Inference (no grad) of the SD1.5-shaped UNet, bs 4, bf16: base model vs merged adapters vs
unmerged adapters (one LoRA, two active, a batch routed over four LoRAs or four LoKrs, one
DoRA, LoHa, BOFT), eager and as a CUDA graph, next to peft's unmerged LoRA. Routed rows also
report their error against each row run with its adapter alone (`check`).

    python bench/inference.py --out results/
    python bench/inference.py --cpu-smoke --out /tmp/inference   # tiny UNet, eager, the logic only
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import graphed, rel_error, time_step  # noqa: E402
from models import SD15_UNET, UNET_TARGETS  # noqa: E402

from peftkit.common_kernels import (  # noqa: E402
    BOFTConfig,
    DoRAConfig,
    KronConfig,
    LoHaConfig,
    LoRAConfig,
    inject,
    routing,
)

CORES = {  # by core, a config for the SD1.5-shaped UNet (smoke: False) or the tiny one (True)
    "lora": lambda smoke: LoRAConfig(targets=UNET_TARGETS, r=16),
    "lokr": lambda smoke: KronConfig(targets=UNET_TARGETS, r=16),
    "dora": lambda smoke: DoRAConfig(targets=UNET_TARGETS, r=16),
    "loha": lambda smoke: LoHaConfig(targets=UNET_TARGETS, r=8),
    "boft": lambda smoke: BOFTConfig(
        targets=UNET_TARGETS, block_size=8 if smoke else 32, n_butterfly_factor=2
    ),
}
VARIANTS = (
    "base",
    "merged",
    "lora x1",
    "lora x2",
    "routed lora x4",
    "routed lokr x4",
    "peft lora x1",
    "dora x1",
    "loha x1",
    "boft x1",
)
TINY_UNET = dict(
    SD15_UNET,
    sample_size=8,
    block_out_channels=(32, 64, 64, 64),
    cross_attention_dim=32,
    norm_num_groups=8,
)


def randomize(handle) -> None:
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.normal_(std=0.01)


def variant(name: str, bs: int, device: str, smoke: bool):
    """(step, check): `step` runs the variant's forward; `check` (routed rows only) measures each
    row against that row with its adapter alone, after the timing."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    shape = TINY_UNET if smoke else SD15_UNET
    dtype = torch.float32 if smoke else torch.bfloat16
    with torch.device(device):
        net = UNet2DConditionModel(**shape).to(dtype).eval()
    g = torch.Generator(device=device).manual_seed(0)
    size = shape["sample_size"]
    x = torch.randn(bs, 4, size, size, device=device, generator=g, dtype=dtype)
    enc = torch.randn(bs, 77, shape["cross_attention_dim"], device=device, generator=g, dtype=dtype)
    t = torch.full((bs,), 500, device=device)
    check = None
    if name.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=16, lora_alpha=16, target_modules=UNET_TARGETS))
    elif name != "base":
        # "<core> x<count>", "routed <core> x<count>"; "merged" is one LoRA, merged.
        spec = name.replace("merged", "lora x1").removeprefix("routed ")
        kind, _, count = spec.partition(" x")
        handles = [inject(net, CORES[kind](smoke), name=f"a{i}") for i in range(int(count))]
        for h in handles:
            randomize(h)
            h.set_scale(1.0 / len(handles))
        if name == "merged":
            handles[0].merge()
        if name.startswith("routed"):
            ids, names = [i % len(handles) for i in range(bs)], [h.name for h in handles]
            # Entered once and left open: the ids tensor is made here, not inside a captured graph.
            context = routing(net, ids, names)
            context.__enter__()

            def check() -> float:
                with torch.no_grad():
                    mixed = net(x, t, enc).sample
                    context.__exit__(None, None, None)
                    worst = 0.0
                    for row, k in enumerate(ids):
                        for j, h in enumerate(handles):
                            (h.enable if j == k else h.disable)()
                        alone = net(x[row : row + 1], t[row : row + 1], enc[row : row + 1]).sample
                        worst = max(worst, rel_error(mixed[row : row + 1], alone))
                return worst

    def step():
        with torch.no_grad():
            return net(x, t, enc).sample

    return step, check


def time_cpu(step, repeats: int = 2) -> float:
    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny UNet on the CPU, eager only (no timing value)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    modes = ("eager",) if smoke else ("eager", "graph")
    rows = []
    for mode in modes:
        for name in args.variants.split(","):
            row = dict(mode=mode, variant=name, bs=args.bs)
            try:
                step, check = variant(name, args.bs, device, smoke)
                if smoke:
                    row["ms"] = round(time_cpu(step), 2)
                else:
                    if mode == "graph":
                        step = graphed(step)
                    row["ms"] = round(time_step(step, warmup=3, repeats=15)[0], 2)
                if check is not None:
                    row["check_rel_error"] = float(f"{check():.2e}")
            except Exception as exc:  # one failure must not cost the whole GPU run
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            if not smoke:
                torch.cuda.empty_cache()
    (args.out / "inference.json").write_text(json.dumps(rows, indent=1))
    base = {r["mode"]: r["ms"] for r in rows if r["variant"] == "base" and "ms" in r}
    lines = ["| mode | variant | ms | x base | routed rows vs alone |", "|---|---|---|---|---|"]
    for r in rows:
        if "ms" in r and r["mode"] in base:
            lines.append(
                f"| {r['mode']} | {r['variant']} | {r['ms']:.1f} | "
                f"{r['ms'] / base[r['mode']]:.2f} | {r.get('check_rel_error', '')} |"
            )
    (args.out / "inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
