"""The speed benchmarks in one GPU run (< 10 min), each in its own process with a time limit,
then one summary: every core's training step against the frozen floor and peft, side by side,
and inference with merged / unmerged / routed adapters.

    python bench/run_all.py                                   # -> bench/results/<date>-<gpu>/summary.md
    python bench/run_all.py --out <dir> --only multitenant,vit # any jobs by name (see JOBS)

The default set is SPEED; the feature benchmarks (vit, dreambooth, control, multitenant, cores,
engine_graph) run by name, each a few minutes; bench/ddp.py needs two GPUs and runs alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

UNET_VARIANTS = "floor,peftkit-lora,peft-lora,peftkit-lokr,peft-lokr,peftkit-oft,peft-oft"
# name -> (argv after the script, seconds allowed); train_step's --deadline leaves time to finish the running variant
JOBS = {
    "train_step_unet4": (
        [
            "train_step.py",
            "--model",
            "unet",
            "--bs",
            "4",
            "--compile",
            "graph",
            "--base",
            "bf16",
            "--variants",
            UNET_VARIANTS,
            "--deadline",
            "115",
        ],
        145,
    ),
    "train_step_unet1": (
        [
            "train_step.py",
            "--model",
            "unet",
            "--bs",
            "1",
            "--compile",
            "graph",
            "--base",
            "bf16",
            "--variants",
            UNET_VARIANTS,
            "--deadline",
            "80",
        ],
        105,
    ),
    "train_step_vit": (
        [
            "train_step.py",
            "--model",
            "vit",
            "--bs",
            "64",
            "--compile",
            "full+graph",
            "--base",
            "bf16",
            "--variants",
            UNET_VARIANTS,
            "--deadline",
            "185",
        ],
        225,
    ),
    "inference": (["inference.py"], 85),
    "cores": (["cores.py", "--modes", "bf16-base"], 90),
    "engine_graph": (["engine_graph.py"], 90),
    "vit": (["vit.py", "--deadline", "130"], 180),
    "dreambooth": (["dreambooth.py", "--deadline", "130"], 180),
    "control": (["control.py"], 170),
    "multitenant": (["multitenant.py"], 300),
}
SPEED = ["train_step_unet4", "train_step_unet1", "train_step_vit", "inference"]


def summarize(out: Path) -> str:
    rows = []
    for path in sorted(out.glob("train_step-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [
        "| model | bs | mode | variant | ms | x floor | peft ms / peftkit ms | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ms" not in r:
            lines.append(
                f"| {r['model']} | {r['bs']} | {r['compile']} | {r['variant']} | error: {r.get('error', '')[:60]} | | | |"
            )
            continue
        same = [
            x
            for x in rows
            if x["model"] == r["model"]
            and x["bs"] == r["bs"]
            and x["compile"] == r["compile"]
            and x["base"] == r["base"]
            and "ms" in x
        ]
        floor = next((x["ms"] for x in same if x["variant"] == "floor"), None)
        peer = None
        if r["variant"].startswith("peftkit-"):
            peer = next(
                (x["ms"] for x in same if x["variant"] == "peft-" + r["variant"].split("-")[1]),
                None,
            )
        ratio = f"{r['ms'] / floor:.2f}" if floor else ""
        vs_peft = f"{peer / r['ms']:.2f}" if peer else ""
        lines.append(
            f"| {r['model']} | {r['bs']} | {r['compile']} | {r['variant']} | {r['ms']:.1f} | {ratio} | "
            f"{vs_peft} | {r['peak_gib']:.2f} |"
        )
    inference = out / "inference.json"
    if inference.is_file():
        rows = json.loads(inference.read_text())
        base = {r["mode"]: r["ms"] for r in rows if r["variant"] == "base" and "ms" in r}
        lines += [
            "",
            "Inference, SD1.5-shaped UNet bs 4 (no grad):",
            "",
            "| mode | variant | ms | x base |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['mode']} | {r['variant']} | {r['ms']:.1f} | {r['ms'] / base[r['mode']]:.2f} |"
            for r in rows
            if "ms" in r and r["mode"] in base
        ]
    return "\n".join(lines) + "\n"


def default_out() -> Path:
    import datetime

    import torch

    gpu = torch.cuda.get_device_name(0).split()[-1].lower() if torch.cuda.is_available() else "cpu"
    return HERE / "results" / f"{datetime.date.today()}-{gpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="default: bench/results/<date>-<gpu>")
    parser.add_argument("--only", default=",".join(SPEED), help=f"comma list of {', '.join(JOBS)}")
    args = parser.parse_args()
    args.out = args.out or default_out()
    args.out.mkdir(parents=True, exist_ok=True)
    status = {}
    for name in args.only.split(","):
        argv, limit = JOBS[name]
        script = HERE / argv[0]
        if not script.exists():
            status[name] = "missing"
            continue
        start = time.perf_counter()
        with (args.out / f"{name}.log").open("w") as log:
            try:
                rc = subprocess.run(
                    [sys.executable, str(script), *argv[1:], "--out", str(args.out)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=limit,
                ).returncode
                status[name] = f"rc={rc}"
            except subprocess.TimeoutExpired:
                status[name] = f"timeout after {limit}s"
        status[name] += f" ({time.perf_counter() - start:.0f}s)"
        print(name, status[name], flush=True)
    summary = (
        "# Benchmark run (`python bench/run_all.py`)\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in status.items())
        + "\n\n"
        + summarize(args.out)
    )
    (args.out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
