"""The full-copy control branch on two GPUs: one process vs DDP vs FSDP (`--fsdp`,
common_kernels/fsdp.py) under `accelerate launch`.

Model: a random SD1.5-shaped UNet (860M, frozen) with its full-copy control branch (~360M, every
weight trained, AdamW), 256 px over the starter VAE (64x64 latents), condition = Canny edges of
the bundled sample images (ControlTask, the engine's loop).

Parity (fp32, TF32 off, lr 1e-3, 1 step by default): 1 process at global batch B against 2
processes at B/2 under DDP and under FSDP, and DDP against FSDP. What the runs learned is compared:
||a - b|| / ||a - init|| over the whole branch (pass below 2e-2). AdamW moves every element by
about lr * g / (|g| + eps): elements whose gradient is near eps (1e-8) - many in the zero convs of
a random UNet - flip with summation order, and over more steps the random network amplifies
that (CPU, tiny UNet: 0.9% after 1 step, 4.5% after 2, 49% after 3, DDP and FSDP alike). A real
fault (a rank on the wrong rows, ranks repeating each other's noise) is order 1 from the first
step.
Memory and speed (bf16, per-GPU batch kept): peak GiB allocated per process and global images/s
after warm-up, for 1 process, DDP x2, FSDP x2 (the branch sharded, the frozen UNet whole on each
GPU, the default) and FSDP x2 with the frozen UNet sharded too (`fsdp2-all`). FSDP's point is the memory: weights, gradients
and AdamW moments of the branch (and the frozen UNet) are split over the processes.

    python bench/fsdp.py --out bench/results/fsdp              # 2 GPUs, ~5 min
    python bench/fsdp.py --out /tmp/fsdp-cpu --tiny --cpu      # 2 CPU processes (gloo), small UNet
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from common import write_results  # noqa: E402
from ddp import SAMPLES, StepClock, difference, launch, sd15_base, worker  # noqa: E402
from models import SD15_UNET  # noqa: E402

from peftkit.common_kernels.training.engine import launch_world  # noqa: E402

SIZES = {
    "full": dict(
        unet=SD15_UNET,
        resolution=256,
        parity_batch=4,
        speed_batch=8,
        warmup=3,
        timed=10,
        timeout=240,
    ),
    "tiny": dict(
        unet={**SD15_UNET, "block_out_channels": (32, 32, 64, 64), "sample_size": 8},
        resolution=32,
        parity_batch=4,
        speed_batch=2,
        warmup=1,
        timed=3,
        timeout=300,
    ),
}
WEIGHTS = "controlnet/diffusion_pytorch_model.safetensors"
UPDATE_TOLERANCE = 2e-2


def run(job: dict, out: Path, cpu: bool) -> dict:
    """One training of the branch in this process (one rank of the launch)."""
    from peftkit.common_kernels.training.engine import TrainConfig, train
    from peftkit.diffusion.conditions import EXTRACTORS
    from peftkit.diffusion.control import ControlConfig, ControlTask, save_control
    from peftkit.diffusion.pairs import load_pairs

    size = SIZES[job["size"]]
    rank, world = launch_world()
    device = "cpu" if cpu else f"cuda:{rank}"
    data = Path(tempfile.mkdtemp()) / "pairs"
    (data / "images").mkdir(parents=True)
    for image in sorted(SAMPLES.glob("*.png")):
        shutil.copy(image, data / "images" / image.name)
    task = ControlTask(
        sd15_base(size["unet"], device),
        load_pairs(data, need_condition=False),
        ControlConfig(),
        resolution=size["resolution"],
        extractor=EXTRACTORS["canny"],
        seed=0,
    )
    clock = StepClock(job["batch"] * world, job["warmup"])
    # Parity at lr 1e-3: the branch learns through zero convs that start at zero, so at 1e-5 its
    # first gradients are ~1e-8, AdamW's eps, where summation order decides the update.
    lr = 1e-3 if job["name"].startswith("parity") else 1e-5
    config = TrainConfig(
        steps=job["steps"],
        batch_size=job["batch"],
        lr=lr,
        mixed_precision=job["precision"],
        schedule="constant",
        progress=False,
        cpu=cpu,
        fsdp=job["fsdp"],
        fsdp_shard_frozen=job.get("shard_frozen", False),
    )
    if job["name"] == "parity-1":  # the starting branch, to compare what the runs learned
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in task.controlnet.state_dict().items()},
            out / "init.safetensors",
        )
    if not cpu:
        torch.cuda.reset_peak_memory_stats(device)
    if job.get("profile") and rank == 0:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            result = train(task, task.dataset(), config, on_event=clock)
        table = prof.key_averages()
        (Path(job["profile"]) / f"profile-{job['name']}.txt").write_text(
            "## by GPU time\n"
            + table.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
            + "\n## by host time\n"
            + table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        )
    else:
        result = train(task, task.dataset(), config, on_event=clock)
    save_control(task.controlnet, out / "controlnet", write=rank == 0)
    return {
        **clock.summary(),
        "parallel": result.parallel,
        "peak_gib_per_process": round(result.peak_memory_gib, 2),
    }


def plan(size: str, parity_steps: int = 1) -> list[tuple[int, list[dict]]]:
    s = SIZES[size]
    steps = s["warmup"] + s["timed"]

    def job(name, precision, fsdp, batch, steps, shard_frozen=False):
        return dict(
            name=name,
            size=size,
            precision=precision,
            fsdp=fsdp,
            batch=batch,
            steps=steps,
            warmup=s["warmup"],
            shard_frozen=shard_frozen,
        )

    b = s["parity_batch"]
    n = parity_steps
    return [
        (1, [job("parity-1", "no", False, b, n)]),
        (2, [job("parity-ddp2", "no", False, b // 2, n)]),
        (2, [job("parity-fsdp2", "no", True, b // 2, n)]),
        (1, [job("speed-1", "bf16", False, s["speed_batch"], steps)]),
        (2, [job("speed-ddp2", "bf16", False, s["speed_batch"], steps)]),
        (2, [job("speed-fsdp2", "bf16", True, s["speed_batch"], steps)]),
        (2, [job("speed-fsdp2-all", "bf16", True, s["speed_batch"], steps, shard_frozen=True)]),
        (2, [job("parity-fsdp2-all", "no", True, b // 2, n, shard_frozen=True)]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="driver", choices=["driver", "worker"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--parity-steps", type=int, default=1)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only the DDP and FSDP speed runs, under torch.profiler (tables in --out)",
    )
    args = parser.parse_args()
    if args.mode == "worker":
        worker(json.loads(args.jobs), args.out, args.cpu, run=run)
        return
    from safetensors.torch import load_file

    size = "tiny" if args.tiny else "full"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    jobs_dir = Path(tempfile.mkdtemp())
    launches = []
    launches_planned = plan(size, args.parity_steps)
    if args.profile:
        launches_planned = [
            (n, [{**j, "profile": str(args.out.resolve())} for j in jobs])
            for n, jobs in plan(size)
            if jobs[0]["name"].startswith("speed-") and n > 1
        ]
    for processes, jobs in launches_planned:
        name = jobs[0]["name"]
        launches.append(
            launch(
                processes,
                jobs,
                jobs_dir,
                args.cpu,
                SIZES[size]["timeout"],
                args.out / "logs" / f"{name}.log",
                script=HERE,
            )
        )
        print(json.dumps(launches[-1]), flush=True)
    if args.profile:
        return
    results = {}
    for _, jobs in plan(size, args.parity_steps):
        path = jobs_dir / jobs[0]["name"] / "result.json"
        results[jobs[0]["name"]] = (
            json.loads(path.read_text()) if path.is_file() else {"error": "no result"}
        )
    parity = []
    for first, other in (
        ("parity-1", "parity-ddp2"),
        ("parity-1", "parity-fsdp2"),
        ("parity-1", "parity-fsdp2-all"),
        ("parity-ddp2", "parity-fsdp2"),
    ):
        row = {"runs": f"{first} vs {other}"}
        try:
            a, b = (load_file(jobs_dir / n / WEIGHTS) for n in (first, other))
            init = load_file(jobs_dir / "parity-1" / "init.safetensors")
            row.update(difference(a, b))
            moved = sum(float((a[k].double() - init[k].double()).square().sum()) for k in a) ** 0.5
            apart = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a) ** 0.5
            row["update_rel"] = apart / max(moved, 1e-30)
            row["pass"] = row["update_rel"] < UPDATE_TOLERANCE
        except Exception as exc:
            row.update({"error": f"{type(exc).__name__}: {exc}"[:300], "pass": False})
        parity.append(row)
    lines = [
        f"Parity, fp32 (pass: ||a - b|| / ||a - init|| < {UPDATE_TOLERANCE}):",
        "",
        "| runs | update rel | worst tensor rel (where) | max abs | pass |",
        "|---|---|---|---|---|",
    ]
    for r in parity:
        lines.append(
            f"| {r['runs']} | {r['update_rel']:.2e} | {r['max_rel']:.2e} ({r['worst_tensor']}) | "
            f"{r['max_abs']:.2e} | {r['pass']} |"
            if "error" not in r
            else f"| {r['runs']} | {r['error']} | | | False |"
        )
    lines += [
        "",
        "Memory and speed, bf16, per-GPU batch kept:",
        "",
        "| run | parallel | batch/process | global images/s | x 1 process | peak GiB per process |",
        "|---|---|---|---|---|---|",
    ]
    one = results.get("speed-1", {}).get("images_per_s")
    for name in ("speed-1", "speed-ddp2", "speed-fsdp2", "speed-fsdp2-all"):
        r = results[name]
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:120]} | | | | |")
            continue
        ratio = f"{r['images_per_s'] / one:.2f}" if one and r.get("images_per_s") else "-"
        ips = round(r["images_per_s"], 1) if r.get("images_per_s") else "-"
        lines.append(
            f"| {name} | {r['parallel']} | {r['batch']} | {ips} | {ratio} | {r['peak_gib_per_process']} |"
        )
    markdown = "\n".join(lines) + "\n"
    meta = {
        "size": size,
        "torch": torch.__version__,
        "launches": launches,
        "results": results,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if not args.cpu
        else "cpu",
    }
    write_results(args.out, "fsdp", parity, markdown, meta)
    print(markdown)


if __name__ == "__main__":
    main()
