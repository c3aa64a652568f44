"""Exact Cayley inverse (I - Q)^-1 for batches of skew 32x32 blocks: which method is correct,
capturable in a CUDA graph, and fast, one layer at a time (10 blocks) and all OFT layers of an
SD1.5 UNet at once (~1500 blocks).

    python bench/oft_inverse.py --out results/
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_step  # noqa: E402


def skew_batch(n: int, b: int, std: float, device: str) -> torch.Tensor:
    Q = torch.randn(n, b, b, device=device) * std
    return Q - Q.transpose(1, 2)


def inv_default(Q):
    eye = torch.eye(Q.shape[-1], device=Q.device, dtype=Q.dtype)
    return torch.linalg.inv_ex(eye - Q)[0]


def with_library(name):
    def run(Q):
        previous = torch.backends.cuda.preferred_linalg_library()
        torch.backends.cuda.preferred_linalg_library(name)
        try:
            return inv_default(Q)
        finally:
            torch.backends.cuda.preferred_linalg_library(previous)

    return run


def inv_cholesky(Q):
    # (I - Q)^-1 = (I + Q^T Q)^-1 (I + Q); I + Q^T Q is symmetric positive definite.
    eye = torch.eye(Q.shape[-1], device=Q.device, dtype=Q.dtype)
    S = eye + Q.transpose(1, 2) @ Q
    L = torch.linalg.cholesky_ex(S)[0]
    return torch.cholesky_solve(eye + Q, L)


def newton_schulz(iters):
    def run(Q):
        eye = torch.eye(Q.shape[-1], device=Q.device, dtype=Q.dtype)
        S = eye + Q.transpose(1, 2) @ Q
        bound = 1.0 + (Q * Q).sum(dim=(1, 2), keepdim=True)
        X = (2.0 / (1.0 + bound)) * eye
        for _ in range(iters):
            X = X @ (2.0 * eye - S @ X)
        return X @ (eye + Q)

    return run


METHODS = {
    "inv_ex": inv_default,
    "inv_ex-cusolver": with_library("cusolver"),
    "inv_ex-magma": with_library("magma"),
    "cholesky": inv_cholesky,
    "newton-schulz-12": newton_schulz(12),
    "newton-schulz-16": newton_schulz(16),
}


def capturable(fn, Q) -> bool:
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(Q)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(Q)
        graph.replay()
        torch.cuda.synchronize()
        return bool(torch.isfinite(out).all())
    except Exception:
        torch.cuda.synchronize()
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--capture")
    parser.add_argument("--blocks", type=int, default=10)
    args = parser.parse_args()
    if args.capture:
        print(capturable(METHODS[args.capture], skew_batch(args.blocks, 32, 0.1, "cuda")))
        return
    rows = []
    for n in (10, 1500):
        for std in (0.01, 0.3):
            Q = skew_batch(n, 32, std, "cuda")
            ref = torch.linalg.inv(torch.eye(32, dtype=torch.float64, device="cuda") - Q.double())
            for name, fn in METHODS.items():
                row = dict(blocks=n, q_std=std, method=name)
                try:
                    out = fn(Q)
                    row["rel_err"] = float((out.double() - ref).norm() / ref.norm())
                    row["eager_ms"], _ = time_step(lambda: fn(Q), warmup=3, repeats=15, inner=20)
                    # A failed capture can poison the CUDA context: check in a fresh process.
                    probe = subprocess.run(
                        [sys.executable, __file__, "--capture", name, "--blocks", str(n)],
                        capture_output=True,
                        text=True,
                    )
                    row["capturable"] = probe.stdout.strip().endswith("True")
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "oft_inverse.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
