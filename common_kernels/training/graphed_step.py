"""One whole training step (forward, backward, clipping, AdamW) replayed as a single CUDA graph.

At the shapes adapters train at, a step is bound by kernel launches, not arithmetic: an SD1.5 UNet
step with LoRA issues thousands of small kernels (bench/NOTES.md). Captured once and replayed, the
step costs its GPU time alone. Requirements, checked with clear errors: one CUDA device, fixed
batch shapes, no gradient accumulation, bf16 or fp32 (fp16's loss scaler syncs with the host),
and a loss that is a pure function of the batch tensors (host-side work in `loss` is captured once
and never re-run). NaN/inf losses skip the update on the device (fused AdamW's `found_inf`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError
from ..oft import cusolver_linalg

WARMUP_STEPS = 3


def graph_optimizer(
    params: list[nn.Parameter], lr: float, weight_decay: float, device: torch.device
):
    """Fused, capturable AdamW with a tensor learning rate, so schedules update it in place."""
    return torch.optim.AdamW(
        params,
        lr=torch.tensor(lr, device=device),
        weight_decay=weight_decay,
        fused=True,
        capturable=True,
    )


def check_graphable(
    device: torch.device, num_processes: int, grad_accum: int, mixed_precision: str, optimizer: str
) -> None:
    problems = []
    if device.type != "cuda":
        problems.append("a CUDA device")
    if num_processes > 1:
        problems.append("a single process (DDP all-reduces are not captured here)")
    if grad_accum != 1:
        problems.append("grad_accum=1")
    if mixed_precision == "fp16":
        problems.append("mixed_precision 'bf16' or 'no' (fp16 loss scaling syncs with the host)")
    if optimizer != "adamw":
        problems.append("optimizer 'adamw'")
    if problems:
        raise PeftkitError(
            "cuda_graph=True needs " + ", ".join(problems) + ": change those settings or set "
            "cuda_graph=False"
        )


def copy_batch(static: Any, batch: Any, path: str = "batch") -> None:
    """Copy `batch` into the captured inputs `static` (same nesting of tensors, dicts, lists and
    dataclasses); a changed shape or a changed non-tensor value is an error naming where."""
    if torch.is_tensor(static):
        if not torch.is_tensor(batch) or batch.shape != static.shape or batch.dtype != static.dtype:
            got = tuple(batch.shape) if torch.is_tensor(batch) else type(batch).__name__
            raise PeftkitError(
                f"cuda_graph=True needs fixed batch shapes, but {path} changed from "
                f"{tuple(static.shape)} to {got}: use a fixed resolution and batch size, "
                "or set cuda_graph=False"
            )
        static.copy_(batch, non_blocking=True)
    elif dataclasses.is_dataclass(static):
        for f in dataclasses.fields(static):
            copy_batch(getattr(static, f.name), getattr(batch, f.name), f"{path}.{f.name}")
    elif isinstance(static, dict):
        for key in static:
            copy_batch(static[key], batch[key], f"{path}[{key!r}]")
    elif isinstance(static, (list, tuple)):
        for i, (s, b) in enumerate(zip(static, batch)):
            copy_batch(s, b, f"{path}[{i}]")
    elif static != batch:
        raise PeftkitError(
            f"cuda_graph=True needs a batch of tensors only, but {path} is a "
            f"{type(static).__name__} that changes between steps: precompute it as a tensor"
        )


def clone_batch(batch: Any) -> Any:
    """A copy of `batch` with every tensor cloned: the inputs a graph is captured on."""
    if torch.is_tensor(batch):
        return batch.clone()
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(
            batch,
            **{
                f.name: clone_batch(getattr(batch, f.name))
                for f in dataclasses.fields(batch)
                if f.init
            },
        )
    if isinstance(batch, dict):
        return {k: clone_batch(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(clone_batch(v) for v in batch)
    return batch


class GraphedStep:
    """Call with each batch; returns the step's loss as a device tensor (read it to sync)."""

    def __init__(
        self,
        loss_fn: Callable[[Any], torch.Tensor],
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None,
        autocast,
    ) -> None:
        self.loss_fn, self.params, self.optimizer = loss_fn, params, optimizer
        self.max_grad_norm, self.autocast = max_grad_norm, autocast
        # 0-dim, like the capturable optimizer's step counters it is subtracted from.
        self.found_inf = torch.zeros((), device=params[0].device)
        optimizer.found_inf = self.found_inf
        self.static = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.calls = 0

    def _body(self) -> torch.Tensor:
        with self.autocast():
            loss = self.loss_fn(self.static)
        loss.backward()
        self.found_inf.copy_((~torch.isfinite(loss.detach().float())).float().reshape(()))
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        return loss.detach()

    def __call__(self, batch: Any) -> torch.Tensor:
        if self.static is None:
            self.static = clone_batch(batch)
        copy_batch(self.static, batch)
        self.calls += 1
        if self.calls <= WARMUP_STEPS:
            # Eager warm-up on a side stream allocates grads and optimizer state before capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), cusolver_linalg():
                loss = self._body()
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            # Compiled code resolves its linalg library when it runs: keep it capturable.
            with torch.cuda.graph(self.graph), cusolver_linalg():
                self.loss = self._body()
        self.graph.replay()
        return self.loss
