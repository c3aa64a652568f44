"""Data-parallel parity and scaling of the ViT and concept trainers under `accelerate launch`.

Parity (fp32, TF32 off): each trainer runs once as one process with global batch B and once as two
processes with B/2 each (`accelerate launch`), same seed and data order (the engine splits every
global batch by rank); the final adapters are compared tensor by tensor. Throughput (bf16):
global images/s over the steps after warm-up, read from the engine's step events on rank 0, for one process at B, two at B/2 each (same global batch) and two at B each
(same per-GPU batch). The ViT is timed twice: as shipped (each built-in image is drawn and resized on
the CPU inside the step) and with the training set held in memory (the GPU work and the all-reduce
alone).

ViT: `train_vit`, timm ViT-B/16 with random weights, LoRA r8 (qkv, proj, fc1, fc2) + head, built-in
task "counting" at 224 px, B = 32. Concept: `train_concept`, LoRA r4 on the UNet attention, B = 8:
the starter model for parity; for throughput a random SD1.5-shaped UNet at 64x64 latents (the
starter VAE, 256 px) with a random 768-wide text encoder and 77 tokens, as SD1.5 conditions it.

The ViT rows also report how many steps `train_vit` makes of an epoch in each run, since its
epoch-based options become steps through that number (an epoch is over the global batch). Only
rank 0 writes the trainers' final files.

    python bench/ddp.py --out bench/results/ddp            # 2 GPUs, a few minutes
    python bench/ddp.py --out /tmp/ddp-cpu --tiny --cpu     # 2 CPU processes (gloo), small models

Each launch is its own subprocess with a time limit, and each job in it writes its own result, so
one failure costs only its own rows. Writes <out>/ddp.json (every row and every job's raw result),
<out>/ddp.md and <out>/logs/ (one log per launch); the adapters themselves stay in scratch space.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

import psutil
import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from models import SD15_UNET  # noqa: E402

from peftkit.common_kernels.training.engine import launch_world  # noqa: E402

SAMPLES = HERE.parent.parent / "assets" / "samples" / "concept"
# fp32 with TF32 off differs between the runs only in summation order (the batch split, the
# all-reduce). AdamW turns that into up to ~1e-4 relative on the smallest LoRA B tensors (measured on
# CPU over 10 steps; the whole adapter moves ~1e-7), because it scales every element's update to
# about lr however small and cancelling its gradient is. A real fault (a rank on the wrong rows,
# ranks repeating each other's noise) moves adapters by order 1, so 1e-3 leaves 10x headroom for
# GPU reduction orders and still separates the two by orders of magnitude.
REL_TOLERANCE = 1e-3
SETTINGS = {
    "full": {
        "vit": dict(
            model="vit_base_patch16_224",
            model_kwargs={},
            batch=32,
            parity_steps=10,
            train_images=256,
        ),
        "concept": dict(
            batch=8, parity_steps=10, parity_resolution=64, unet=SD15_UNET, resolution=256
        ),
        "warmup": 3,
        "timed": 20,
        "timeout": 150,
    },
    "tiny": {
        "vit": dict(
            model="vit_tiny_patch16_224",
            model_kwargs={"img_size": 32},
            batch=8,
            parity_steps=6,
            train_images=32,
        ),
        "concept": dict(
            batch=4,
            parity_steps=4,
            parity_resolution=32,
            unet={**SD15_UNET, "block_out_channels": (32, 32, 64, 64), "sample_size": 8},
            resolution=32,
        ),
        "warmup": 1,
        "timed": 3,
        "timeout": 300,
    },
}


# ---- worker: one process of one launch; runs its jobs in turn ----


class StepClock:
    """The engine's step events -> global images/s over the steps after `warmup`, and the losses."""

    def __init__(self, images_per_step: int, warmup: int) -> None:
        self.images_per_step, self.warmup = images_per_step, warmup
        self.elapsed: list[float] = []
        self.losses: list[float] = []

    def __call__(self, event: dict) -> None:
        if event["kind"] == "step":
            self.elapsed.append(event["elapsed"])
            self.losses.append(event["loss"])

    def summary(self) -> dict:
        timed = len(self.elapsed) - self.warmup
        seconds = self.elapsed[-1] - self.elapsed[self.warmup - 1] if timed > 0 else 0.0
        return {
            "images_per_s": timed * self.images_per_step / seconds if seconds > 0 else None,
            "timed_steps": timed,
            "final_loss": self.losses[-1] if self.losses else None,
        }


def in_memory(load_task):
    """`load_task` with the training set made once and held in memory: the engine prepares each
    image on the CPU inside the step, which would otherwise hide what data parallelism scales."""

    def load(*args, **kwargs):
        data = load_task(*args, **kwargs)
        data.train = [data.train[i] for i in range(len(data.train))]
        return data

    return load


def run_vit(job: dict, folder: Path, cpu: bool) -> dict:
    from peftkit.vision import train as vision_train

    s = SETTINGS[job["size"]]["vit"]
    config = vision_train.ViTTrainConfig(
        data="builtin:counting",
        model=s["model"],
        model_kwargs=s["model_kwargs"],
        pretrained=False,
        method="lora",
        method_options={"r": 8},
        builtin_sizes=(s["train_images"], 32),
        steps=job["steps"],
        batch_size=job["batch"],
        warmup_epochs=0,
        eval_every_epochs=0,
        checkpoint_every_epochs=0,
        eval_batch_size=64,
        mixed_precision=job["precision"],
        output_dir=str(folder),
        progress=False,
        cpu=cpu,
    )
    clock = StepClock(job["batch"] * launch_world()[1], job["warmup"])
    load = in_memory(vision_train.load_task) if job["data"] == "memory" else vision_train.load_task
    with mock.patch.object(vision_train, "load_task", load):
        results = vision_train.train_vit(config, on_event=clock)
    return {
        **clock.summary(),
        "steps_per_epoch": results["steps_per_epoch"],
        "top1": results["top1"],
    }


def sd15_base(unet_config: dict, device: str):
    """A random SD1.5-shaped pipeline around the starter's VAE (4x downsampling: 256 px -> 64x64
    latents), tokenizer and scheduler; only the UNet's size matters to the step, the text encoder
    runs once to cache the conditioning."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from peftkit.diffusion.base import DiffusionBase, load_base, set_attention_backend

    starter = load_base("starter")
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config)
    text_config = CLIPTextConfig(
        **{
            **starter.pipe.text_encoder.config.to_dict(),
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 2,
            "max_position_embeddings": 77,
        }
    )
    tokenizer = starter.pipe.tokenizer
    tokenizer.model_max_length = 77
    pipe = StableDiffusionPipeline(
        vae=starter.vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=starter.pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    set_attention_backend(unet)
    return DiffusionBase(pipe=pipe, kind="sd", source="random SD1.5-shaped UNet")


def run_concept(job: dict, folder: Path, cpu: bool) -> dict:
    from peftkit.common_kernels.training.engine import TrainConfig
    from peftkit.diffusion.base import load_base
    from peftkit.diffusion.dreambooth import ConceptConfig, train_concept

    s = SETTINGS[job["size"]]["concept"]
    if job["base"] == "starter":
        base, resolution = load_base("starter"), s["parity_resolution"]
    else:
        device = (
            "cpu"
            if cpu or not torch.cuda.is_available()
            else f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        )
        base, resolution = sd15_base(s["unet"], device), s["resolution"]
    config = ConceptConfig(instance_prompt="a photo of sks toy", rank=4, resolution=resolution)
    train_config = TrainConfig(
        steps=job["steps"],
        batch_size=job["batch"],
        lr=1e-4,
        mixed_precision=job["precision"],
        output_dir=str(folder),
        progress=False,
        cpu=cpu,
    )
    clock = StepClock(job["batch"] * launch_world()[1], job["warmup"])
    train_concept(base, SAMPLES, config, train_config, on_event=clock)
    return clock.summary()


def run_trainer(job: dict, folder: Path, cpu: bool) -> dict:
    run = run_vit if job["trainer"] == "vit" else run_concept
    return run(job, folder / f"rank{launch_world()[0]}", cpu)


def worker(jobs: list[dict], out: Path, cpu: bool, run=run_trainer) -> None:
    """This process's part of a launch: `run(job, folder, cpu)` for each job in turn; rank 0
    writes each job's result.json (bench/fsdp.py passes its own `run`)."""
    rank, _ = launch_world()
    for job in jobs:
        if job["precision"] == "no" and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        folder = out / job["name"]
        start = time.perf_counter()
        try:
            result = run(job, folder, cpu)
        except (
            Exception
        ) as exc:  # the next job may still succeed; a rank left waiting ends at the timeout
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "result.json").write_text(json.dumps({**job, **result}))
        print(json.dumps({"job": job["name"], "rank": rank, **result}), flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---- driver: plans the launches, runs them, compares and tabulates ----

# (trainer, 1-process job, 2-process job, what the 2-process run is)
PARITY = [
    ("vit", "vit-parity-1", "vit-parity-2", "train_vit, as shipped"),
    ("concept", "concept-parity-1", "concept-parity-2", "train_concept, as shipped"),
]
SPEED = {
    "vit-memory": "vit, training set held in memory",
    "vit-step": "vit, images made in the step (as shipped)",
    "concept-sd15": "concept, SD1.5-shaped UNet",
}
SETTING = {
    "1xB": "1 process",
    "2xHalf": "2 processes, same global batch",
    "2xB": "2 processes, same per-process batch",
}


def plan(size: str) -> list[tuple[int, list[dict]]]:
    """(processes, jobs) per launch. A launch holds one precision (accelerate fixes it for the
    process's lifetime) and one trainer, so a hang or crash costs one trainer's rows."""
    s = SETTINGS[size]

    def job(name, trainer, precision, processes, batch, **extra):
        steps = s[trainer]["parity_steps"] if precision == "no" else s["warmup"] + s["timed"]
        return {
            "name": name,
            "trainer": trainer,
            "precision": precision,
            "processes": processes,
            "batch": batch,
            "steps": steps,
            "warmup": s["warmup"],
            "size": size,
            "data": "step",
            "base": "starter",
            **extra,
        }

    def speed(group, trainer, suffixes, **extra):
        b = s[trainer]["batch"]
        shapes = {"1xB": (1, b), "2xHalf": (2, b // 2), "2xB": (2, b)}
        return [job(f"{group}-{x}", trainer, "bf16", *shapes[x], **extra) for x in suffixes]

    def by_processes(jobs):
        return [(n, [j for j in jobs if j["processes"] == n]) for n in (1, 2)]

    vb, cb = s["vit"]["batch"], s["concept"]["batch"]
    return [
        (1, [job("vit-parity-1", "vit", "no", 1, vb)]),
        (2, [job("vit-parity-2", "vit", "no", 2, vb // 2)]),
        (1, [job("concept-parity-1", "concept", "no", 1, cb)]),
        (2, [job("concept-parity-2", "concept", "no", 2, cb // 2)]),
        *by_processes(
            speed("vit-memory", "vit", ["1xB", "2xHalf", "2xB"], data="memory")
            + speed("vit-step", "vit", ["1xB", "2xHalf"])
        ),
        *by_processes(speed("concept-sd15", "concept", ["1xB", "2xHalf", "2xB"], base="sd15")),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    processes: int,
    jobs: list[dict],
    jobs_dir: Path,
    cpu: bool,
    timeout: float,
    log: Path,
    script: Path = HERE,
) -> dict:
    """Run `script worker` on `jobs` as one launch of `processes` processes (bench/fsdp.py reuses it)."""
    argv = [str(script), "worker", "--out", str(jobs_dir), "--jobs", json.dumps(jobs)] + (
        ["--cpu"] if cpu else []
    )
    if processes > 1:
        # --multi_gpu is accelerate's torchrun launcher; with --cpu accelerate would start a single
        # process, so the CPU smoke test takes the same launcher and the trainers' cpu=True picks gloo.
        argv = [
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            *argv,
        ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT, env=env
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun starts each rank in a session of its own, so the ranks are found by descent.
            for child in [
                *psutil.Process(proc.pid).children(recursive=True),
                psutil.Process(proc.pid),
            ]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.wait()
            rc = "timeout"
    return {
        "processes": processes,
        "jobs": [j["name"] for j in jobs],
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "log": str(log),
    }


def read_result(jobs_dir: Path, name: str) -> dict:
    path = jobs_dir / name / "result.json"
    return (
        json.loads(path.read_text())
        if path.is_file()
        else {"error": "no result (launch failed or timed out)"}
    )


def read_adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = [
        f for f in ("adapter.safetensors", "unet_adapter.safetensors") if (folder / f).is_file()
    ]
    if not files:
        raise FileNotFoundError(f"no adapter in {folder}")
    return load_file(folder / files[0])


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Per tensor max |a - b| and ||a - b|| / ||a||, the worst of each over the adapter; and
    ||a - b|| / ||a|| of the whole adapter as one vector."""
    if a.keys() != b.keys():
        raise ValueError(f"the adapters hold different tensors: {sorted(a.keys() ^ b.keys())[:4]}")
    abs_worst, rel_worst, where, diff2, norm2 = 0.0, 0.0, "", 0.0, 0.0
    for key in a:
        x, y = a[key].double(), b[key].double()
        abs_worst = max(abs_worst, float((x - y).abs().max()))
        rel = float((x - y).norm() / x.norm().clamp_min(1e-30))
        if rel >= rel_worst:
            rel_worst, where = rel, key
        diff2, norm2 = diff2 + float((x - y).square().sum()), norm2 + float(x.square().sum())
    return {
        "max_abs": abs_worst,
        "max_rel": rel_worst,
        "worst_tensor": where,
        "tensors": len(a),
        "adapter_rel": (diff2 / max(norm2, 1e-60)) ** 0.5,
    }


def compare(row: dict, a: Path, b: Path, passes) -> dict:
    try:
        row.update(difference(read_adapter(a), read_adapter(b)))
        row["pass"] = passes(row)
    except Exception as exc:  # a missing run fails its check and leaves the others standing
        row.update({"error": f"{type(exc).__name__}: {exc}"[:300], "pass": False})
    return row


def parity_rows(jobs_dir: Path, size: str) -> list[dict]:
    planned = {j["name"]: j for _, jobs in plan(size) for j in jobs}
    rows = []
    for trainer, one, two, what in PARITY:
        losses = [read_result(jobs_dir, name).get("final_loss") for name in (one, two)]
        shapes = f"2 proc x {planned[two]['batch']} vs 1 proc x {planned[one]['batch']}"
        rows.append(
            compare(
                {
                    "trainer": trainer,
                    "check": f"adapter, {shapes}: {what}",
                    "tolerance": REL_TOLERANCE,
                    "final_losses": losses,
                },
                jobs_dir / one / "rank0",
                jobs_dir / two / "rank0",
                lambda r: r["max_rel"] <= REL_TOLERANCE,
            )
        )
    one, two = read_result(jobs_dir, "vit-parity-1"), read_result(jobs_dir, "vit-parity-2")
    if "steps_per_epoch" in one and "steps_per_epoch" in two:
        # ViTTrainConfig's epochs, warmup_epochs, eval_every_epochs... become steps through this number.
        rows.append(
            {
                "trainer": "vit",
                "check": "train_vit steps per epoch, 2 proc vs 1 proc (same global batch)",
                "value": f"{two['steps_per_epoch']} vs {one['steps_per_epoch']}",
                "tolerance": "equal",
                "pass": two["steps_per_epoch"] == one["steps_per_epoch"],
            }
        )
    return rows


def throughput_rows(jobs_dir: Path, size: str) -> list[dict]:
    planned = {j["name"]: j for _, jobs in plan(size) for j in jobs}
    rows = []
    for group, label in SPEED.items():
        base = read_result(jobs_dir, f"{group}-1xB").get("images_per_s")
        for suffix, setting in SETTING.items():
            job = planned.get(f"{group}-{suffix}")
            if job is None:
                continue
            result = read_result(jobs_dir, job["name"])
            ips = result.get("images_per_s")
            rows.append(
                {
                    "trainer": label,
                    "setting": setting,
                    "processes": job["processes"],
                    "batch_per_process": job["batch"],
                    "images_per_s": ips,
                    "vs_1": ips / base if ips and base else None,
                    "error": result.get("error"),
                }
            )
    return rows


def table(parity: list[dict], speed: list[dict], meta: dict) -> str:
    lines = ["| trainer | check | value | tolerance | pass |", "|---|---|---|---|---|"]
    for r in parity:
        if "error" in r:
            value = f"error: {r['error'][:100]}"
        elif "value" in r:
            value = r["value"]
        elif r["tolerance"] == 0.0:
            value = f"max abs {r['max_abs']:.3g}"
        else:
            value = (
                f"rel {r['max_rel']:.3g} (max abs {r['max_abs']:.3g}, worst `{r['worst_tensor']}`); "
                "final loss "
                + " vs ".join(f"{x:.7g}" if x is not None else "-" for x in r["final_losses"])
            )
        tol = (
            r["tolerance"]
            if isinstance(r["tolerance"], str)
            else ("exact" if r["tolerance"] == 0.0 else f"rel {r['tolerance']:g}")
        )
        lines.append(
            f"| {r['trainer']} | {r['check']} | {value} | {tol} | {'yes' if r.get('pass') else 'NO'} |"
        )
    lines += [
        "",
        "| trainer | setting | processes x batch | images/s | vs 1 process |",
        "|---|---|---|---|---|",
    ]
    for r in speed:
        ips = (
            f"{r['images_per_s']:.1f}" if r["images_per_s"] else f"error: {(r['error'] or '')[:80]}"
        )
        ratio = f"{r['vs_1']:.2f}" if r["vs_1"] else "-"
        lines.append(
            f"| {r['trainer']} | {r['setting']} | {r['processes']} x {r['batch_per_process']} | {ips} "
            f"| {ratio} |"
        )
    lines.append(
        f"\nrel = max over tensors of ||a - b|| / ||a||. Parity: fp32, TF32 off, {meta['parity_steps']}; "
        f"throughput: bf16, global images/s, {meta['timing']}. Device: {meta['device']}."
    )
    return "\n".join(lines) + "\n"


def environment(cpu: bool) -> str:
    if cpu or not torch.cuda.is_available():
        return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    return (
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="driver", choices=["driver", "worker"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--tiny", action="store_true", help="small models and few steps (CPU smoke test)"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="train on CPU processes (gloo) instead of GPUs"
    )
    parser.add_argument("--jobs", help="worker only: the JSON list of jobs")
    parser.add_argument(
        "--deadline",
        type=float,
        default=300.0,
        help="skip launches starting after this many seconds",
    )
    args = parser.parse_args()
    if args.mode == "worker":
        worker(json.loads(args.jobs), args.out, args.cpu)
        return
    if not args.cpu and torch.cuda.device_count() < 2:
        sys.exit("bench/ddp.py needs 2 GPUs (or --cpu for the CPU smoke test)")
    size = "tiny" if args.tiny else "full"
    s = SETTINGS[size]
    # Adapters and trainer outputs stay in scratch space (tens of MB); <out> gets the tables and logs.
    jobs_dir, logs = Path(tempfile.mkdtemp(prefix="peftkit-ddp-")), args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    launches = []
    for i, (processes, jobs) in enumerate(plan(size)):
        if time.perf_counter() - start > args.deadline:
            record = {
                "processes": processes,
                "jobs": [j["name"] for j in jobs],
                "rc": "skipped: deadline",
            }
        else:
            record = launch(
                processes, jobs, jobs_dir, args.cpu, s["timeout"], logs / f"launch-{i}.log"
            )
        launches.append(record)
        print(json.dumps(record), flush=True)
    meta = {
        "device": environment(args.cpu),
        "size": size,
        "launches": launches,
        "rel_tolerance": REL_TOLERANCE,
        "parity_steps": f"{s['vit']['parity_steps']} steps (ViT), {s['concept']['parity_steps']} (concept)",
        "timing": f"warm-up {s['warmup']} steps, timed {s['timed']}",
        "settings": json.loads(json.dumps(s, default=str)),
    }
    parity, speed = parity_rows(jobs_dir, size), throughput_rows(jobs_dir, size)
    results = {j["name"]: read_result(jobs_dir, j["name"]) for _, jobs in plan(size) for j in jobs}
    shutil.rmtree(jobs_dir, ignore_errors=True)
    markdown = table(parity, speed, meta)
    (args.out / "ddp.json").write_text(
        json.dumps(
            {"meta": meta, "parity": parity, "throughput": speed, "results": results}, indent=1
        )
    )
    (args.out / "ddp.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
