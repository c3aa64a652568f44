"""What both starter recipes share: a wall-clock budget that drives the LR schedule, a log that goes
to stdout and a file, bf16 autocast on CUDA, and atomic folder saves."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


class Budget:
    """Training length as wall-clock minutes (or a fixed step count, for tests and reruns that
    must be exact). `progress(step)` in [0, 1] drives the cosine schedule, so a run that is
    stopped by the clock still ends at the bottom of its schedule."""

    def __init__(self, minutes: float, steps: int | None = None) -> None:
        self.minutes, self.steps = minutes, steps
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        if self.steps:
            return min(1.0, step / self.steps)
        if self.minutes <= 0:  # a phase switched off (e.g. tune_vae_decoder --minutes 0)
            return 1.0
        return min(1.0, self.elapsed() / (60.0 * self.minutes))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def lr_factor(step: int, progress: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `floor` over the budget."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class RunLog:
    """Lines printed to stdout and appended to a log file (flushed, so a killed run keeps its log)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "w")

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA (weights stay fp32); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_folder(dest: Path, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary sibling of `dest`, then swap it in: a crash never leaves a
    half-written model folder at `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the shipped folder private
    try:
        write(tmp)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6
