"""Shared GPU timing for the benchmarks: CUDA-event medians, peak memory, result tables.

Method (see bench/NOTES.md): warm up, then time `inner` repetitions between two CUDA events,
`repeats` times, and report the median per repetition, so launch gaps count as they do in
training. Peak memory is measured over the timed region alone.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch


def time_step(
    step: Callable[[], None], warmup: int = 5, repeats: int = 15, inner: int = 1
) -> tuple[float, float]:
    """(median ms per call, peak GiB) of `step` on the current CUDA device."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return statistics.median(times), peak


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def write_results(out: Path, name: str, rows: list[dict], markdown: str, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{name}.md").write_text(markdown)


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "peft", "diffusers", "timm", "triton"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"gpu": torch.cuda.get_device_name(0), "versions": versions}


def graphed(step: Callable[[], None], warmup: int = 3) -> Callable[[], None]:
    """`step` captured as one CUDA graph (warm-up on a side stream first, which also allocates
    what the step keeps); the returned callable replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay  # the bound method keeps the graph alive
