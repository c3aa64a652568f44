"""One whole training step (forward, backward, clipping, AdamW) replayed as a single CUDA graph.

At the shapes adapters train at, a step is bound by kernel launches, not arithmetic: an SD1.5 UNet
step with LoRA issues thousands of small kernels (bench/NOTES.md). Captured once and replayed, the
step costs its GPU time alone. Requirements (fast_path.graph_plan): one CUDA device, fixed batch
shapes, no gradient accumulation, bf16 or fp32 (fp16's loss scaler syncs with the host), and a
loss that is a pure function of the batch tensors (host-side work in `loss` is captured once and
never re-run; a task's own random draws happen outside, in its `draw`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from ..errors import PeftkitError
from ..oft import cusolver_linalg

WARMUP_STEPS = 3


def capturable_checkpoint(module: nn.Module, *args: Any) -> Any:
    """Activation checkpointing a CUDA graph can capture, for models without active dropout:
    PyTorch's default saves and restores the RNG state on the host around the recomputation,
    which capture forbids; with nothing random in the block, the state is not needed."""
    return torch.utils.checkpoint.checkpoint(
        module.__call__, *args, use_reentrant=False, preserve_rng_state=False
    )


def active_dropout(model: nn.Module) -> bool:
    """Whether any dropout in `model` drops something in training mode."""
    kinds = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    return any(isinstance(m, kinds) and m.p > 0 for m in model.modules())


def graph_optimizer(
    params: list[nn.Parameter] | list[dict], lr: float, weight_decay: float, device: torch.device
):
    """Fused, capturable AdamW with a tensor learning rate, so schedules update it in place;
    `params` may be {"params", "lr"} groups, each then with a tensor rate of its own."""
    if params and isinstance(params[0], dict):
        params = [{**g, "lr": torch.tensor(g["lr"], device=device)} for g in params]
    return torch.optim.AdamW(
        params,
        lr=torch.tensor(lr, device=device),
        weight_decay=weight_decay,
        fused=True,
        capturable=True,
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


def clip_sets(params: list[nn.Parameter], optimizer) -> list[list[nn.Parameter]]:
    """`params` as their optimizer's param groups hold them when it has several, else whole."""
    if len(optimizer.param_groups) == 1:
        return [params]
    mine = {id(p) for p in params}
    sets = [[p for p in g["params"] if id(p) in mine] for g in optimizer.param_groups]
    return [s for s in sets if s]


class GraphedStep:
    """A step captured once and replayed: `launch(inputs)` copies `inputs` into the captured ones,
    replays, and returns the device tensor of losses (one per group; read it to sync).

    `loss_fn(inputs)` returns one loss per group of (parameters, optimizer, clip norm): several
    adapters trained from one backward (multitenant.py) each clip and step their own. A non-finite
    loss in any group skips every update on the device (fused AdamW's `found_inf`). `context` is
    entered around warm-up and capture (routing copies its row ids to the device there); what it
    yields is kept, since captured kernels read that memory at every replay. Warm-ups run the step
    without updating (found_inf set), to allocate optimizer state and autotune outside the capture.
    `schedule(found_inf)`, if given, runs in the step before the optimizers (late_read.DeviceSchedule).
    """

    def __init__(
        self,
        loss_fn: Callable[[Any], torch.Tensor | list[torch.Tensor]],
        groups: list[tuple[list[nn.Parameter], torch.optim.Optimizer, float | None]],
        autocast,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        warmups: int = WARMUP_STEPS,
        schedule: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.loss_fn, self.groups, self.autocast = loss_fn, groups, autocast
        self.context, self.warmups, self.schedule = context, warmups, schedule
        self.params = [p for params, _, _ in groups for p in params]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        # Clipped as apply_gradients clips: each param group of an optimizer with several alone.
        self.clipped = [
            (clip_sets(params, optimizer), optimizer, norm) for params, optimizer, norm in groups
        ]
        # 0-dim, like the capturable optimizer's step counters it is subtracted from; float32,
        # which fused AdamW reads it as whatever the default dtype.
        self.found_inf = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for _, optimizer, _ in groups:
            optimizer.found_inf = self.found_inf
        self.static: Any = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.losses: torch.Tensor | None = None
        self.capture_seconds = 0.0

    def _body(self, warmup: bool) -> torch.Tensor:
        torch._foreach_zero_(self.grads)
        with self.autocast():
            losses = self.loss_fn(self.static)
        losses = list(losses) if isinstance(losses, (list, tuple)) else [losses]
        sum(losses).backward()
        values = torch.stack([loss.detach().float().reshape(()) for loss in losses])
        if warmup:
            self.found_inf.fill_(1.0)
        else:
            self.found_inf.copy_((~torch.isfinite(values)).any().float())
        if self.schedule is not None:
            self.schedule(self.found_inf)
        for sets, optimizer, max_grad_norm in self.clipped:
            for params in sets if max_grad_norm else []:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
            optimizer.step()
        return values

    def _capture(self, inputs: Any) -> None:
        start = time.perf_counter()
        self.static = clone_batch(inputs)
        with self.context() as held:
            self.held = held
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), cusolver_linalg():
                for _ in range(self.warmups):
                    self._body(warmup=True)
            torch.cuda.current_stream().wait_stream(side)
            # The warm-up's activations sit in the allocator's cache for the side stream, which
            # the graph's private pool cannot reuse: hand them back, or they add to the peak.
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.graph = torch.cuda.CUDAGraph()
            # Compiled code resolves its linalg library when it runs: keep it capturable.
            with torch.cuda.graph(self.graph), cusolver_linalg():
                self.losses = self._body(warmup=False)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start

    def launch(self, inputs: Any) -> torch.Tensor:
        if self.graph is None:
            self._capture(inputs)
        copy_batch(self.static, inputs)
        self.graph.replay()
        return self.losses

    def skip_pending(self) -> None:
        """After a non-finite step nothing was updated: clear the flag and the gradients it left."""
        self.found_inf.zero_()
        torch._foreach_zero_(self.grads)

    def release(self) -> None:
        """Free the graph and its private memory pool (a step's activations) once no step is left:
        the memory goes back to the allocator, no longer reserved beside what runs next."""
        self.graph = self.static = self.losses = self.held = None
        torch.cuda.empty_cache()

    def abandon(self) -> None:
        """Leave the graphed path (a failed capture): the optimizers step eagerly from here on."""
        for _, optimizer, _ in self.groups:
            optimizer.__dict__.pop("found_inf", None)
        torch._foreach_zero_(self.grads)
