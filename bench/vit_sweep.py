"""A K = 8 sweep (4 learning rates x 2 weight decays) of one VTAB-1k-layout task on ViT-B/16, for
LoRA and VPT-deep: the 8 configurations trained in one pass (`vit-train --sweep --grid`, i.e.
vision/batched.py) against the same 8 runs one after another (`train_vit` each, the default fast
path with CUDA graphs), on one GPU, with random backbone weights (no hub).

Parity first, fp32 without TF32: two configurations trained together vs each alone (max relative
error over the adapter tensors, after one step and after an epoch), each beside two noise floors:
the same run alone vs alone with its input moved by one ulp, and vs alone with its matmuls in the
other cuBLAS library (other kernels for the same math, as a batched GEMM is to a plain one). LoRA's
B starts at 0, so A's first gradients are ~0 and Adam normalizes the rounding noise of near-zero
gradient components into full-size updates: a difference at a floor is rounding, not math (CPU,
10 steps of a small ViT: 6.4e-6 together vs alone, 1-ulp floor 2.5e-5). Float64 parity is exact
(tests/vision/test_sweep.py). Then timing at the default precision (bf16, each step one CUDA
graph): wall clock of the sweep in one pass, of the 8 runs in a row and of one run alone, steady
ms per step without the evaluations (timed apart), the 100-epoch wall clock of one pass against
one run projected from those, and an estimate of a 19-task x 6-method x 8-configuration sweep.

    python bench/vit_sweep.py --out bench/results/vit-sweep              # ~6 min on an H200
    python bench/vit_sweep.py --out /tmp/vit-sweep-smoke --cpu-smoke     # the logic, tiny, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
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
from peftkit.common_kernels.training.fast_path import compile_plan  # noqa: E402
from peftkit.vision import train as vit_train  # noqa: E402
from peftkit.vision.batched import group_configs, train_together  # noqa: E402
from peftkit.vision.sweep import grid_configs  # noqa: E402
from peftkit.vision.train import ViTTrainConfig, train_vit  # noqa: E402

GRID = {"lr": [1e-3, 3e-3, 1e-2, 3e-2], "weight_decay": [1e-4, 1e-2]}
# name -> (method, options). LoRA runs in weight space on a GPU by default (W + s B A formed per
# configuration, one more weight-gradient GEMM each); "lora-factored" checks the factored pass.
METHODS = {
    "lora": ("lora", {"r": 8}),
    "lora-factored": ("lora", {"r": 8, "apply": "factored"}),
    "vpt-deep": ("vpt-deep", {"vpt_length": 10}),
}
TIMED = ("lora", "vpt-deep")
PARITY = ("lora", "lora-factored", "vpt-deep")
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
    name, options = METHODS[method]
    point = replace(base, method=name, method_options=options)
    return [replace(c, output_dir=str(out / name)) for name, c in grid_configs(point, GRID)]


@contextlib.contextmanager
def one_ulp_input():
    """Runs started inside see every input moved by one ulp (nextafter): a perturbation as small
    as any change of summation order makes, to measure the fp32 noise floor of a run."""
    build = vit_train.build_model

    def nudged(*args, **kwargs):
        model, size = build(*args, **kwargs)
        up = lambda x: torch.nextafter(x, torch.full_like(x, math.inf))  # noqa: E731
        model.register_forward_pre_hook(lambda module, args: (up(args[0]), *args[1:]))
        return model, size

    vit_train.build_model = nudged
    try:
        yield
    finally:
        vit_train.build_model = build


@contextlib.contextmanager
def other_gemm_library():
    """Runs started inside compute their matmuls with the other cuBLAS library (cuBLASLt <->
    cuBLAS): the same math through other kernels, as a batched GEMM is against a plain one. The
    floor for a comparison of code paths; on the CPU nothing changes (a floor of 0)."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    other = "cublas" if before == torch._C._BlasBackend.Cublaslt else "cublaslt"
    torch.backends.cuda.preferred_blas_library(other)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def parity(base: ViTTrainConfig, method: str, out: Path) -> list[dict]:
    """Two configurations of the grid trained together vs each alone in fp32 (max relative error
    over the adapter tensors), after one step and after the run, beside the noise floor: each run
    alone vs alone with its input moved by one ulp. LoRA's B starts at 0, so A's first gradients
    are ~0 and Adam normalizes their rounding noise into full-size updates: a difference at the
    floor is noise, not a difference of the math."""
    rows = []
    for steps in (1, None):
        where = out / f"steps{steps or 'all'}"
        pair = configs(replace(base, mixed_precision="no", steps=steps), method, where)[::5]
        quietly(train_together, pair, str(where / "group"))
        errors, floor, kernels = [], [], []
        for c in pair:
            alone = replace(c, output_dir=c.output_dir + "-alone")
            nudged = replace(c, output_dir=c.output_dir + "-ulp")
            relibbed = replace(c, output_dir=c.output_dir + "-gemm")
            quietly(train_vit, alone)
            with one_ulp_input():
                quietly(train_vit, nudged)
            with other_gemm_library():
                quietly(train_vit, relibbed)
            want = read_tensors(Path(alone.output_dir) / "adapter.safetensors")[0]
            for run, into in ((c, errors), (nudged, floor), (relibbed, kernels)):
                got = read_tensors(Path(run.output_dir) / "adapter.safetensors")[0]
                into.append(max(rel_error(got[k], want[k]) for k in want))
        rows.append(
            {
                "method": method,
                "check": f"2 configurations together vs alone, fp32, {steps or 'all'} step(s)",
                "max_rel_error": max(errors),
                "noise_floor": max(floor),
                "kernel_floor": max(kernels),
            }
        )
    return rows


def divergence(base: ViTTrainConfig, out: Path) -> dict:
    """A LoRA configuration whose weights overflow (lr 1e36) trained with a good one in fp32: it
    fails alone (under CUDA graphs: its steps redone eagerly, then the step captured again for the
    good one), and the good one ends as alone (its error to read against the parity floor)."""
    good, bad = configs(replace(base, mixed_precision="no"), "lora", out)[::5]
    results, _ = quietly(train_together, [good, replace(bad, lr=1e36)], str(out / "group"))
    alone = replace(good, output_dir=good.output_dir + "-alone")
    quietly(train_vit, alone)
    got = read_tensors(Path(good.output_dir) / "adapter.safetensors")[0]
    want = read_tensors(Path(alone.output_dir) / "adapter.safetensors")[0]
    return {
        "method": "lora",
        "check": "lr 1e36 beside a good configuration, fp32: the good one vs alone",
        "statuses": [r["status"] for r in results],
        "max_rel_error": max(rel_error(got[k], want[k]) for k in want),
    }


def timing(base: ViTTrainConfig, method: str, out: Path) -> dict:
    """One pass of the grid, its 8 runs in a row and the first alone, at `base.compile`."""
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
        "compile": base.compile,
        "K": len(grid),
        "steps": steps,
        "together_s": t_together,
        "sequential_s": t_seq,
        "one_run_s": one,
        "together_vs_one": t_together / one,
        "sequential_vs_together": t_seq / t_together,
        "epochs": base.epochs,
        # steady steps without the evaluations between them, which are timed apart
        "together_ms_per_step": 1000 * together[0]["timing"]["train"] / steps,
        "one_ms_per_step": 1000 * alone[0][0]["timing"]["train"] / steps,
        "together_eval_s": together[0]["timing"].get("eval", 0.0),
        "one_eval_s": alone[0][0]["timing"].get("eval", 0.0),
        # capture > 0: the step ran as one CUDA graph (0: eager); it includes compiling
        "together_capture_s": together[0]["timing"]["capture"],
        "one_capture_s": alone[0][0]["timing"]["capture"],
        "together_top1": [r["top1"] for r in together],
        "alone_top1": [r["top1"] for r, _ in alone],
    }


def projected_s(row: dict, who: str, epochs: int, steps_per_epoch: int) -> float:
    """Wall clock of `who` ("together" or "one") over `epochs`, from its measured set-up, steady
    step and evaluation time per epoch."""
    measured = row["together_s" if who == "together" else "one_run_s"]
    step_s, eval_s = row[f"{who}_ms_per_step"] / 1000, row[f"{who}_eval_s"]
    setup = measured - step_s * row["steps"] - eval_s
    return setup + step_s * steps_per_epoch * epochs + eval_s * epochs / row["epochs"]


def estimate(rows: list[dict], batch_size: int) -> dict:
    """A 19-task x 6-method VTAB-1k sweep: K = 8 in one pass for 100 epochs of train800, then the
    chosen configuration alone for 100 epochs of train800val200, from the measured steady steps
    and set-up times, each part compiled or not as the commands' defaults decide for its rows
    (compile_plan); the six methods are taken to cost the mean of LoRA and VPT-deep."""
    mean = lambda values: sum(values) / len(values)  # noqa: E731

    def part(who: str, images: int, k: int) -> float:
        per_epoch = -(-images // batch_size)
        compiled = compile_plan("auto", "cuda", 1, k * 100 * per_epoch * batch_size)
        chosen = [r for r in rows if r["compile"] == compiled] or rows
        return mean([projected_s(r, who, 100, per_epoch) for r in chosen])

    sweep, final = part("together", 800, 8), part("one", 1000, 1)
    return {
        "per_task_and_method_s": sweep + final,
        "vtab_19x6_gpu_hours": 19 * 6 * (sweep + final) / 3600,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny ViT and data on the CPU")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of train800 timed")
    parser.add_argument(
        "--compile", default="off,on", help="comma list: time the blocks eager (off) and compiled"
    )
    parser.add_argument("--no-parity", action="store_true", help="timing only")
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
    checks, diverged = [], None
    if not args.no_parity:  # eager blocks, fp32 without TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        short = replace(base, epochs=1, compile=False)
        checks = [row for m in PARITY for row in parity(short, m, root / f"p-{m}")]
        diverged = divergence(short, root / "diverged")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    modes = {"off": False, "on": True}
    rows = [
        timing(replace(base, compile=modes[mode]), m, root / f"time-{m}-{mode}")
        for mode in args.compile.split(",")
        for m in TIMED
    ]
    guess = estimate(rows, base.batch_size)
    head = (
        "method | compile | K | steps | one pass s | 8 in a row s | one run s | one pass / one run"
    )
    tail = (
        "ms/step together | ms/step one | eval s together / one | capture s together / one "
        "(0: eager) | 100 epochs projected: one pass / one run"
    )
    lines = [f"| {head} | {tail} |", "|" + "---|" * 13]
    per_epoch = -(-800 // base.batch_size)
    for r in rows:
        ratio = projected_s(r, "together", 100, per_epoch) / projected_s(r, "one", 100, per_epoch)
        lines.append(
            f"| {r['method']} | {'on' if r['compile'] else 'off'} | {r['K']} | {r['steps']} | {r['together_s']:.1f} | "
            f"{r['sequential_s']:.1f} | {r['one_run_s']:.1f} | {r['together_vs_one']:.2f}x | "
            f"{r['together_ms_per_step']:.1f} | {r['one_ms_per_step']:.1f} | "
            f"{r['together_eval_s']:.1f} / {r['one_eval_s']:.1f} | "
            f"{r['together_capture_s']:.1f} / {r['one_capture_s']:.1f} | {ratio:.2f}x |"
        )
    if checks:
        lines += [
            "",
            "| parity | max rel error | floor: alone vs 1-ulp input | floor: alone vs other GEMM "
            "library |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {c['method']}: {c['check']} | {c['max_rel_error']:.2e} | {c['noise_floor']:.2e} | "
            f"{c['kernel_floor']:.2e} |"
            for c in checks
        ]
        lines += [
            "",
            f"Divergence ({diverged['check']}): statuses {diverged['statuses']}, max rel error "
            f"{diverged['max_rel_error']:.2e}.",
        ]
    lines += [
        "",
        f"Estimated 19-task x 6-method VTAB-1k sweep (K = 8 per pass, 100 epochs, then the chosen "
        f"configuration retrained): {guess['vtab_19x6_gpu_hours']:.2f} GPU-hours.",
    ]
    meta = {"gpu": "cpu smoke"} if smoke else environment()
    write_results(
        args.out,
        "vit_sweep",
        rows + checks + ([diverged] if diverged else []) + [guess],
        "\n".join(lines) + "\n",
        meta,
    )
    print("\n".join(lines))
    print(json.dumps(guess))


if __name__ == "__main__":
    main()
