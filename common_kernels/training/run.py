"""One parameter set in training: its optimizer and schedule, step count, losses and metrics, NaN
guard, eval and checkpoint cadence, resume and end. The engine drives one; the multi-concept
trainer (diffusion/multitenant.py) one per job, all from one backward: each concern lives here once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .checkpoint import resume, save_checkpoint
from .late_read import DeviceSchedule, lr_table
from .optim import apply_gradients, build_optimizer
from .train_config import TrainConfig, TrainResult

Event = dict


class Run:
    """`emit` receives this run's events (resume, step, bad_step, eval, checkpoint). Under FSDP
    every process `saves` (gathering shards) and only `writes` ones write files."""

    def __init__(
        self,
        task,
        params: list[nn.Parameter],
        config: TrainConfig,
        accelerator,
        model: nn.Module,
        emit: Callable[[Event], None],
        graphed: bool = False,
        register: bool = True,
        saves: bool = True,
        writes: bool = True,
    ) -> None:
        self.task, self.params, self.config, self.accelerator, self.model = (
            task,
            params,
            config,
            accelerator,
            model,
        )
        self.emit, self.graphed, self.saves, self.writes = emit, graphed, saves, writes
        # A task may split its parameters into groups with their own lr, weight decay and
        # schedule (a sweep's configurations, pivotal tuning's tokens).
        groups = task.param_groups(params, config) if hasattr(task, "param_groups") else None
        self.optimizer, self.scheduler = build_optimizer(
            params, config, accelerator, register=register, graphed=graphed, groups=groups
        )
        # Under graphs the rates are tensors: the schedule's values are known here once, so
        # neither the step event nor the captured step reads the rate back from the device.
        self.lrs = lr_table(self.scheduler, config.steps) if graphed else None
        self.host_lrs = self.lrs[:, 0].tolist() if graphed else None
        self.reads_model_every = getattr(task, "reads_model_every", 0)
        self.result = TrainResult(step=0)
        self.bad, self.samples, self.started = 0, 0, time.perf_counter()
        self.eval_seconds = 0.0  # spent in evaluations so far: the timing line reports it apart
        out = config.output_dir
        self.ckpt_dir = Path(out) / "checkpoints" if out else None

    def resume(self, notice: Callable[[str], None] = print) -> None:
        """Continue from the newest readable checkpoint in the output folder, if any."""
        found = resume(self.config.output_dir, self.task, self.optimizer, self.scheduler, notice)
        if found is not None:
            self.result.step = self.result.resumed_from = found[0]
            self.emit({"kind": "resume", "step": found[0], "path": str(found[1])})

    @property
    def done(self) -> bool:
        return self.result.step >= self.config.steps

    def device_schedule(self) -> DeviceSchedule:
        """The learning rates of a captured step chosen on the device from the good steps so far
        (from this run's step on, after a resume), so its loss can be read late."""
        rates = [g["lr"] for g in self.optimizer.param_groups]
        return DeviceSchedule(self.lrs, rates, self.result.step)

    def must_read(self) -> bool:
        """Whether the launched step's outcome must be known before another step is launched:
        one more step may end the run or fail it (max_bad_steps), or be due an evaluation, a
        checkpoint or a task's own look at the model (`reads_model_every`: validation images),
        which must see the parameters before the next step changes them."""
        step, config = self.result.step + 1, self.config
        cadences = (
            config.eval_every,
            config.checkpoint_every if self.ckpt_dir is not None else 0,
            self.reads_model_every,
        )
        return (
            step >= config.steps
            or self.bad + 1 >= config.max_bad_steps
            or any(every and step % every == 0 for every in cadences)
        )

    def last_lr(self) -> float:
        """The first group's learning rate for the next step, read on the host."""
        if self.host_lrs is not None:
            return self.host_lrs[min(self.result.step, len(self.host_lrs) - 1)]
        return float(self.scheduler.get_last_lr()[0])

    def skip(self) -> str | None:
        """Count a step whose loss was NaN/inf (nothing is updated); returns the error once
        max_bad_steps came in a row."""
        # Captured kernels write into the very .grad tensors: under graphs zero them in place.
        self.optimizer.zero_grad(set_to_none=not self.graphed)
        self.bad += 1
        self.result.skipped_steps += 1
        self.emit({"kind": "bad_step", "step": self.result.step, "consecutive": self.bad})
        if self.bad < self.config.max_bad_steps:
            return None
        return f"the loss was NaN/inf for {self.bad} steps in a row at step {self.result.step}"

    def advance(self, loss: float, samples: int, stepped: bool = False) -> None:
        """Finish a good step: the update (unless a captured graph `stepped` already), the
        schedule, the step event, then evaluation and checkpoint when their cadence comes."""
        self.bad = 0
        if not stepped:
            # A captured backward writes into the very .grad tensors: keep them under graphs.
            apply_gradients(
                self.params, self.optimizer, self.config, self.accelerator, not self.graphed
            )
        self.scheduler.step()
        result, config = self.result, self.config
        result.step += 1
        result.losses.append(loss)
        self.samples += samples
        self.emit(
            {
                "kind": "step",
                "step": result.step,
                "total": config.steps,
                "loss": loss,
                "lr": self.last_lr(),
                "elapsed": time.perf_counter() - self.started,
            }
        )
        if self._due(config.eval_every):
            self.evaluate()
        if self.ckpt_dir is not None and self._due(config.checkpoint_every) and self.saves:
            path = self.checkpoint()
            self.emit({"kind": "checkpoint", "step": result.step, "path": str(path)})

    def _due(self, every: int) -> bool:
        return bool(every) and self.result.step % every == 0

    def evaluate(self) -> None:
        if not hasattr(self.task, "evaluate"):
            return
        start = time.perf_counter()
        self.model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            metrics = self.task.evaluate(self.accelerator.unwrap_model(self.model))
        self.model.train()
        self.eval_seconds += time.perf_counter() - start
        self.result.metrics = metrics
        self.emit({"kind": "eval", "step": self.result.step, "metrics": metrics})

    def checkpoint(self) -> Path:
        return save_checkpoint(
            self.ckpt_dir,
            self.result.step,
            self.task,
            self.optimizer,
            self.scheduler,
            self.config,
            self.writes,
        )

    def save_progress(self) -> Path | None:
        """A checkpoint of the steps taken since the run (re)started, if any: for stops and failures."""
        if self.ckpt_dir is None or not self.saves:
            return None
        if self.result.step <= (self.result.resumed_from or 0):
            return None
        return self.checkpoint()

    def finish(self, evaluate: bool = True) -> TrainResult:
        """Throughput, peak memory and (unless the last step just did) a final evaluation."""
        result = self.result
        elapsed = time.perf_counter() - self.started
        result.samples_per_s = self.samples / elapsed if elapsed > 0 else 0.0
        device = self.accelerator.device
        if device.type == "cuda":
            result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
        if evaluate and not self._due(self.config.eval_every):
            self.evaluate()
        return result
