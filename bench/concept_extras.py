"""train-concept's validation loss, aspect buckets, pivotal tuning and a text-encoder LoRA on the
default fast path, on an SD1.5-shaped pipeline with random weights (bench/multitenant.py's).

Parity first, in fp32 without TF32: a run scoring the validation loss every 2 steps is still
captured as one CUDA graph and ends with the eager run's adapter, losses and validation losses;
so do images of one aspect bucket, pivotal tuning and a text-encoder LoRA (token ids gathered on
the device); images in several buckets fall back to eager steps with the one-line notice. Then
timing in bf16 at 512 px bs 2 (steady ms/step; peak memory of the steps and of the whole run,
each run starting from an emptied allocator).

    python bench/concept_extras.py --out bench/results/concept-extras     # ~3 min on an H200
    python bench/concept_extras.py --out /tmp/smoke --cpu-smoke            # the logic, tiny, CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multitenant as mt  # noqa: E402
from common import environment, rel_error, write_results  # noqa: E402
from concept_graph import TINY_UNET, quiet  # noqa: E402

from peftkit.common_kernels.training.engine import TrainConfig  # noqa: E402
from peftkit.common_kernels.training.trackers import METRICS_FILE  # noqa: E402
from peftkit.diffusion.dreambooth import ConceptConfig, train_concept  # noqa: E402


def images(folder: Path, shapes: list[tuple[int, int]]) -> Path:
    """Random images of the given (width, height) shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def fresh_memory() -> None:
    """Free what earlier runs left (pipelines and graph pools held in reference cycles until a
    collection) and restart the peak: otherwise a row's peak counts the rows before it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run(folder, out, graph, precision, steps, px, smoke, every=2, **concept):
    """(adapter, TrainResult, printed lines, validation losses, peak GiB of the whole run: loading,
    caching latents and the steps) of one train-concept run."""
    fresh_memory()
    base = mt.bench_base()  # a fresh pipeline: pivotal runs add tokens to the tokenizer
    config = ConceptConfig("a photo of <sks> toy", rank=4, resolution=px, **concept)
    train_config = TrainConfig(
        steps=steps,
        batch_size=2,
        lr=1e-4,
        schedule="constant",
        mixed_precision=precision,
        cuda_graph=graph,
        output_dir=str(out),
        cpu=smoke,
        progress=False,
        eval_every=every if config.validates else 0,
    )
    (task, result), lines = quiet(train_concept, base, folder, config, train_config)
    # every trained tensor: the UNet adapter, a text-encoder LoRA, the new token's rows
    state = {
        k: v.detach().float().cpu().clone()
        for k, v in task.state_dict().items()
        if not k.startswith("rng.")
    }
    log = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    del task
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return state, result, lines, [r["validation_loss"] for r in log if "validation_loss" in r], peak


def parity(name, eager, graphed, tolerance=1e-4) -> dict:
    (a, ra, _, va, _), (b, rb, lines, vb, _) = eager, graphed
    pairs = list(zip(ra.losses + va, rb.losses + vb))
    losses = max(abs(x - y) / max(abs(x), 1e-12) for x, y in pairs)
    err = max(rel_error(b[k], a[k]) for k in a)
    return dict(
        check=name,
        adapter_rel_error=err,
        loss_rel_error=losses,
        graphed=rb.timing["capture"] > 0,
        notice=next((line for line in lines if "eager" in line.lower()), ""),
        ok=err < tolerance and losses < tolerance,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if smoke:
        mt.DEVICE, mt.UNET = "cpu", TINY_UNET
    # "auto" captures on a GPU where the task allows it; on the CPU (smoke) both runs are eager
    step, px = (16, 64) if smoke else (64, 512)
    root = Path(tempfile.mkdtemp())
    square = images(root / "square", [(px, px)] * 4)
    wide = images(root / "wide", [(3 * px // 2, px)] * 4)
    mixed = images(root / "mixed", [(3 * px // 2, px)] * 2 + [(px, 3 * px // 2)] * 2)
    cases = {
        "validation loss every 2 steps": (square, {"validation_fraction": 0.25}),
        "one aspect bucket": (wide, {"buckets": True, "bucket_step": step}),
        "several aspect buckets": (mixed, {"buckets": True, "bucket_step": step}),
        "pivotal tuning": (square, {"new_token": "<sks>", "init_word": "toy"}),
        "text-encoder LoRA": (square, {"text_encoder_rank": 4}),
    }
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name, (folder, concept) in cases.items():
        runs = [
            run(folder, root / f"{name}-{mode}", mode, "no", 6, px, smoke, **concept)
            for mode in (False, "auto")
        ]
        rows.append(parity(f"{name} fp32", *runs))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    timing = []
    for name, (folder, concept) in {"square": (square, {}), **cases}.items():
        steps = 4 if smoke else 60
        out = root / f"time-{name}"
        _, result, lines, _, peak = run(
            folder, out, "auto", "auto", steps, px, smoke, 20, **concept
        )
        timing.append(
            dict(
                case=name,
                graphed=result.timing["capture"] > 0,
                ms_per_step=1000 * result.timing["train"] / max(1, len(result.losses)),
                peak_gib=result.peak_memory_gib,
                run_peak_gib=peak,
                line=next((line for line in lines if line.startswith("set-up")), ""),
            )
        )
    table = ["| check | adapter rel. error | loss rel. error | graphed | ok | notice |"]
    table += ["|---|---|---|---|---|---|"]
    table += [
        f"| {r['check']} | {r['adapter_rel_error']:.2e} | {r['loss_rel_error']:.2e} | "
        f"{r['graphed']} | {r['ok']} | {r['notice']} |"
        for r in rows
    ]
    table += ["", f"| bf16, {px} px, bs 2 | graphed | ms/step | peak GiB, steps | peak GiB, run |"]
    table += ["|---|---|---|---|---|"]
    table += [
        f"| {t['case']} | {t['graphed']} | {t['ms_per_step']:.1f} | {t['peak_gib']:.2f} | "
        f"{t['run_peak_gib']:.2f} |"
        for t in timing
    ]
    markdown = "\n".join(table) + "\n"
    print(markdown)
    meta = {"gpu": "cpu smoke"} if smoke else environment()
    write_results(args.out, "concept_extras", rows + timing, markdown, meta)
    assert all(r["ok"] for r in rows), rows


if __name__ == "__main__":
    main()
