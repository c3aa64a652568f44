"""A K = 8 sweep (4 learning rates x 2 weight decays) of one VTAB-1k-layout task on ViT-B/16, for
LoRA and VPT-deep: the 8 configurations trained in one pass (`vit-train --sweep --grid`, i.e.
vision/batched.py) against the same 8 runs one after another (`train_vit` each, the default fast
path with CUDA graphs), on one GPU, with random backbone weights (no hub).

Parity first, fp32 without TF32: two configurations trained together vs each alone (max relative
error over the adapter tensors; the issue's target is 1e-5). Then timing at the default precision
(bf16): wall clock of the sweep in one pass, of the 8 runs in a row and of one run alone, steady
ms per step, and an estimate of a 19-task x 6-method x 8-configuration VTAB-1k sweep.

    python bench/vit_sweep.py --out bench/results/vit-sweep              # ~6 min on an H200
    python bench/vit_sweep.py --out /tmp/vit-sweep-smoke --cpu-smoke     # the logic, tiny, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, rel_error, write_results  # noqa: E402
from e2e_workloads import vtab_folder  # noqa: E402

from peftkit.common_kernels.adapter_file import read_tensors  # noqa: E402
from peftkit.vision.batched import group_configs, train_together  # noqa: E402
from peftkit.vision.sweep import grid_configs  # noqa: E402
from peftkit.vision.train import ViTTrainConfig, train_vit  # noqa: E402

GRID = {"lr": [1e-3, 3e-3, 1e-2, 3e-2], "weight_decay": [1e-4, 1e-2]}
METHODS = {"lora": {"r": 8}, "vpt-deep": {"vpt_length": 10}}
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def quietly(fn, *args, **kwargs):
    """fn's result and its wall time; its printed lines are dropped."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        value = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def configs(base: ViTTrainConfig, method: str, out: Path) -> list[ViTTrainConfig]:
    point = replace(base, method=method, method_options=METHODS[method])
    return [replace(c, output_dir=str(out / name)) for name, c in grid_configs(point, GRID)]


def parity(base: ViTTrainConfig, method: str, out: Path) -> dict:
    """Two configurations of the grid trained together vs each alone, in fp32."""
    pair = configs(replace(base, mixed_precision="no", cuda_graph=False), method, out)[::5]
    quietly(train_together, pair, str(out / "group"))
    errors = []
    for c in pair:
        solo = replace(c, output_dir=c.output_dir + "-alone")
        quietly(train_vit, solo)
        got = read_tensors(Path(c.output_dir) / "adapter.safetensors")[0]
        want = read_tensors(Path(solo.output_dir) / "adapter.safetensors")[0]
        errors.append(max(rel_error(got[k], want[k]) for k in want))
    check = "2 configurations together vs alone, fp32"
    return {"method": method, "check": check, "max_rel_error": max(errors)}


def timing(base: ViTTrainConfig, method: str, out: Path) -> dict:
    grid = configs(base, method, out / "together")
    assert len(group_configs(grid)) == 1
    together, t_together = quietly(train_together, grid, str(out / "together" / "group"))
    alone, t_seq = [], 0.0
    for c in configs(base, method, out / "sequential"):
        results, seconds = quietly(train_vit, c)
        alone.append((results, seconds))
        t_seq += seconds
    steps = together[0]["steps"]
    one = alone[0][1]
    return {
        "method": method,
        "K": len(grid),
        "steps": steps,
        "together_s": t_together,
        "sequential_s": t_seq,
        "one_run_s": one,
        "together_vs_one": t_together / one,
        "sequential_vs_together": t_seq / t_together,
        "together_ms_per_step": 1000 * together[0]["timing"]["train"] / steps,
        "one_ms_per_step": 1000 * alone[0][0]["timing"]["train"] / steps,
        "together_top1": [r["top1"] for r in together],
        "alone_top1": [r["top1"] for r, _ in alone],
    }


def estimate(rows: list[dict], batch_size: int) -> dict:
    """A 19-task x 6-method VTAB-1k sweep: K = 8 in one pass for 100 epochs of train800, then the
    chosen configuration alone for 100 epochs of train800val200, from the measured steady steps
    and set-up times; the six methods are taken to cost the mean of LoRA and VPT-deep."""
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    setup = mean("together_s") - mean("together_ms_per_step") * mean("steps") / 1000
    one_setup = mean("one_run_s") - mean("one_ms_per_step") * mean("steps") / 1000
    sweep = setup + mean("together_ms_per_step") / 1000 * 100 * (800 // batch_size)
    final = one_setup + mean("one_ms_per_step") / 1000 * 100 * (1000 // batch_size)
    return {
        "per_task_and_method_s": sweep + final,
        "vtab_19x6_gpu_hours": 19 * 6 * (sweep + final) / 3600,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny ViT and data on the CPU")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of train800 timed")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    root = Path(tempfile.mkdtemp())
    size, (train, test) = (16, (40, 16)) if smoke else (224, (1000, 500))
    vtab_folder(root / "task", train, test, size)
    base = ViTTrainConfig(
        data=f"vtab:{root / 'task'}",
        model="vit_tiny_patch16_224" if smoke else "vit_base_patch16_224",
        model_kwargs=TINY if smoke else {},
        pretrained=False,
        protocol="tune",
        epochs=1 if smoke else args.epochs,
        batch_size=8 if smoke else 64,
        warmup_epochs=0 if smoke else 1,
        progress=False,
        cpu=smoke,
        checkpoint_every_epochs=0,
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    checks = [parity(replace(base, epochs=1), m, root / f"parity-{m}") for m in METHODS]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = [timing(base, m, root / f"time-{m}") for m in METHODS]
    guess = estimate(rows, base.batch_size)
    head = "method | K | steps | one pass s | 8 in a row s | one run s | one pass / one run"
    lines = [f"| {head} | ms/step together | ms/step one |", "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['K']} | {r['steps']} | {r['together_s']:.1f} | "
            f"{r['sequential_s']:.1f} | {r['one_run_s']:.1f} | {r['together_vs_one']:.2f}x | "
            f"{r['together_ms_per_step']:.1f} | {r['one_ms_per_step']:.1f} |"
        )
    lines += ["", "| parity | max rel error |", "|---|---|"]
    lines += [f"| {c['method']}: {c['check']} | {c['max_rel_error']:.2e} |" for c in checks]
    lines += [
        "",
        f"Estimated 19-task x 6-method VTAB-1k sweep (K = 8 per pass, 100 epochs, then the chosen "
        f"configuration retrained): {guess['vtab_19x6_gpu_hours']:.2f} GPU-hours.",
    ]
    meta = {"gpu": "cpu smoke"} if smoke else environment()
    write_results(args.out, "vit_sweep", rows + checks + [guess], "\n".join(lines) + "\n", meta)
    print("\n".join(lines))
    print(json.dumps(guess))


if __name__ == "__main__":
    main()
