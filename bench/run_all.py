"""Every GPU benchmark in one run, each in its own process with a time limit, then one summary.

    python bench/run_all.py --out bench/results/<date>-<gpu> [--only cores,train_step,...]

Writes <out>/summary.md (the train-step table with ratios vs the frozen floor and vs peft, measured
side by side) next to each benchmark's own files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (argv after the script, seconds allowed)
JOBS = {
    "train_step_unet4": (["train_step.py", "--model", "unet", "--bs", "4", "--compile", "graph", "--base", "bf16",
                          "--variants", "floor,peftkit-lora,peft-lora,peftkit-lokr,peft-lokr,peftkit-oft"], 150),
    "train_step_unet1": (["train_step.py", "--model", "unet", "--bs", "1", "--compile", "graph", "--base", "bf16",
                          "--variants", "floor,peftkit-lora,peft-lora,peftkit-lokr,peft-lokr,peftkit-oft"], 110),
    "train_step_vit": (["train_step.py", "--model", "vit", "--bs", "64", "--compile", "full+graph", "--base", "bf16",
                        "--variants", "floor,peftkit-lora,peft-lora,peftkit-lokr,peft-lokr,peftkit-oft,peft-oft"], 260),
    "engine_graph": (["engine_graph.py"], 90),
    "inference": (["inference.py"], 90),
    "cores": (["cores.py", "--modes", "bf16-base"], 90),
    "vit": (["vit.py", "--deadline", "130"], 180),
    "dreambooth": (["dreambooth.py", "--deadline", "130"], 180),
    "control": (["control.py"], 170),
}


def summarize(out: Path) -> str:
    rows = []
    for path in sorted(out.glob("train_step-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| model | bs | mode | variant | ms | x floor | peft ms / peftkit ms | peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['model']} | {r['bs']} | {r['compile']} | {r['variant']} | error: {r.get('error', '')[:60]} | | | |")
            continue
        same = [x for x in rows if x["model"] == r["model"] and x["bs"] == r["bs"] and x["compile"] == r["compile"]
                and x["base"] == r["base"] and "ms" in x]
        floor = next((x["ms"] for x in same if x["variant"] == "floor"), None)
        peer = None
        if r["variant"].startswith("peftkit-"):
            peer = next((x["ms"] for x in same if x["variant"] == "peft-" + r["variant"].split("-")[1]), None)
        ratio = f"{r['ms'] / floor:.2f}" if floor else ""
        vs_peft = f"{peer / r['ms']:.2f}" if peer else ""
        lines.append(f"| {r['model']} | {r['bs']} | {r['compile']} | {r['variant']} | {r['ms']:.1f} | {ratio} | "
                     f"{vs_peft} | {r['peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=",".join(JOBS))
    args = parser.parse_args()
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
                rc = subprocess.run([sys.executable, str(script), *argv[1:], "--out", str(args.out)], stdout=log,
                                    stderr=subprocess.STDOUT, timeout=limit).returncode
                status[name] = f"rc={rc}"
            except subprocess.TimeoutExpired:
                status[name] = f"timeout after {limit}s"
        status[name] += f" ({time.perf_counter() - start:.0f}s)"
        print(name, status[name], flush=True)
    summary = "# Benchmark run\n\n" + "\n".join(f"- {k}: {v}" for k, v in status.items()) + "\n\n" + summarize(args.out)
    (args.out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
