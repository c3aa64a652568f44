"""The one training loop every peftkit trainer runs (vision, concepts, TI, control, IP-Adapter).

A task plugs in what differs: the model, its trainable parameters, `loss(model, batch)`, and
optionally `evaluate(model)`, `prepare(accelerator)`, `state_dict`/`load_state_dict` for what
checkpoints hold, `draw(batch)` + `drawn_loss(model, drawn)` when a step has random inputs of its
own (drawn eagerly, so the rest of the step can be captured), `graph_unsafe` (why its step
cannot be captured) or `graph_loss`/`graph_context`/`graph_key` (see `train`), `reads_model_every`
(steps whose step event reads the model: validation images), and for several configurations in
one pass (vision/batched.py) `batches(start)` (its joined batches from batch `start`) and
`param_groups(params, config)` ((params, TrainConfig) per configuration: its own lr, weight decay,
schedule and clipping). The loop owns the rest: accelerate (devices, mixed precision, DDP, FSDP),
AdamW and its schedule, gradient accumulation and clipping, the NaN guard, progress events,
eval/checkpoint cadence and exact resume (run.py), and whole-step CUDA graphs (graphed_step.py)
chosen by default on one GPU (fast_path.py), their losses read one step late (late_read.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..errors import PeftkitError
from .checkpoint import latest_checkpoint
from .data_cache import batches, training_batches
from .fast_path import default_device_type, fallback_line, graph_plan, resolve_precision
from .fsdp import fsdp_requested, shard
from .graphed_step import GraphedStep
from .late_read import LateLoss
from .launch import launch_world
from .optim import apply_gradients, build_optimizer, lr_factor
from .run import Event, Run
from .train_config import TrainConfig, TrainResult

__all__ = [
    "Event",
    "Task",
    "TrainConfig",
    "TrainResult",
    "apply_gradients",
    "batches",
    "build_optimizer",
    "latest_checkpoint",
    "launch_world",
    "lr_factor",
    "train",
]


class Task(Protocol):
    model: nn.Module

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...


def accelerator_for(precision: str, cpu: bool):
    """An `Accelerator` for one run. accelerate keeps one state per process and refuses a second
    precision, but one process trains many runs (the app's jobs, benches, sweeps): the state is
    reset between runs of different precisions (the process group, if any, is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(mixed_precision=precision, cpu=cpu)
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(mixed_precision=precision, cpu=cpu)


def train(
    task: Task,
    dataset,
    config: TrainConfig,
    on_event: Callable[[Event], None] | None = None,
    collate: Callable | None = None,
    resume: bool = True,
    should_stop: Callable[[], bool] | None = None,
    started: float | None = None,
) -> TrainResult:
    """Run `config.steps` optimizer steps of `task` on `dataset`; resume from the newest readable
    checkpoint in `config.output_dir` when there is one. `started` (a time.perf_counter() value):
    when the command began, so the printed set-up time includes loading.

    Example:
        >>> import torch
        >>> from peftkit.common_kernels.training.engine import TrainConfig, train
        >>> class Fit:
        ...     def __init__(self):
        ...         self.model = torch.nn.Linear(2, 1)
        ...     def trainable_parameters(self):
        ...         return list(self.model.parameters())
        ...     def loss(self, model, batch):
        ...         x, y = batch
        ...         return ((model(x).squeeze(-1) - y) ** 2).mean()
        >>> data = [(torch.tensor([float(i), 1.0]), torch.tensor(2.0 * i)) for i in range(8)]
        >>> result = train(Fit(), data, TrainConfig(steps=200, batch_size=4, lr=0.05, progress=False))
        >>> result.losses[-1] < result.losses[0]
        True
    """
    from tqdm.auto import tqdm

    entered = time.perf_counter()
    emit = on_event or (lambda event: None)
    precision = resolve_precision(config.mixed_precision, default_device_type(config.cpu))
    accelerator = accelerator_for(precision, config.cpu)
    device, world = accelerator.device, accelerator.num_processes
    say = print if accelerator.is_main_process else (lambda line: None)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    if hasattr(task, "prepare"):
        task.prepare(accelerator)
    params = [p for p in task.trainable_parameters() if p.requires_grad]
    if not params:
        raise PeftkitError("the task has no trainable parameters: check the adapter targets")
    fsdp = fsdp_requested(config.fsdp) and world > 1
    if fsdp and config.cuda_graph is True:
        raise PeftkitError("cuda_graph=True and FSDP cannot be combined: drop one of them")
    graphed, why = graph_plan(
        config.cuda_graph,
        device.type,
        world,
        config.grad_accum,
        precision,
        config.optimizer,
        getattr(task, "graph_unsafe", None),
    )
    if why:
        say(fallback_line(why))
    config = dataclasses.replace(config, mixed_precision=precision, cuda_graph=graphed)
    if fsdp:
        model = shard(task, task.model, device, world, config.fsdp_shard_frozen, precision)
        params = [p for p in task.trainable_parameters() if p.requires_grad]  # now the sharded ones
    else:
        model = accelerator.prepare(task.model)
    if config.compile:
        # Each region's forward, in place: parameter names (checkpoints, adapter files) stay, and
        # hooks on the region itself (VPT's per-layer prompts) run outside, so one compiled
        # forward serves every block. Compiling happens at the first call: the graph's warm-up.
        regions = getattr(task, "compile_regions", list)()
        for region in regions:
            region.forward = torch.compile(region.forward)
        if regions and config.progress:
            say(f"compiling the model's {len(regions)} blocks: the first step waits for it")
    # Under FSDP saving gathers shards, so every process takes part; process 0 writes.
    run = Run(
        task,
        params,
        config,
        accelerator,
        model,
        emit,
        graphed=graphed,
        saves=accelerator.is_main_process or fsdp,
        writes=accelerator.is_main_process,
    )
    run.result.parallel = "single" if world == 1 else f"{'fsdp' if fsdp else 'ddp'} x{world}"
    if resume:
        run.resume(say)
    draw = getattr(task, "draw", None)

    def step_inputs(batch: Any) -> Any:
        """The batch on the device, with the task's own random draws made (eagerly, uncaptured)."""
        batch = _to_device(batch, device)
        if draw is None:
            return batch
        with accelerator.autocast():
            return draw(batch)

    def step_loss(inputs: Any) -> torch.Tensor:
        return task.drawn_loss(model, inputs) if draw is not None else task.loss(model, inputs)

    # A task whose `loss` does host-side work (a sweep dropping a diverged configuration) has the
    # step captured from `graph_loss` with its `graph_context` held, redone eagerly with `loss` when
    # not finite, and captured again when its `graph_key` changes (a configuration left).
    graph_loss, graph_key = getattr(task, "graph_loss", None), getattr(task, "graph_key", None)

    def capture() -> GraphedStep:
        step = GraphedStep(
            (lambda inputs: graph_loss(model, inputs)) if graph_loss else step_loss,
            [([p for p in params if p.requires_grad], run.optimizer, config.max_grad_norm)],
            accelerator.autocast,
            context=getattr(task, "graph_context", contextlib.nullcontext),
            schedule=run.device_schedule(),
        )
        step.key = graph_key() if graph_key else None
        return step

    graph = capture() if graphed else None
    # A task that joins several data orders in each batch (a sweep) makes its own batches.
    own = getattr(task, "batches", None)
    data = (
        own(run.result.step * config.grad_accum)
        if own is not None
        else training_batches(
            dataset,
            config.batch_size,
            config.seed,
            run.result.step * config.grad_accum,
            collate,
            accelerator.process_index,
            world,
            device,
            say,
        )
    )
    bar = tqdm(
        total=config.steps,
        initial=run.result.step,
        desc="train",
        unit="step",
        disable=not (config.progress and accelerator.is_main_process),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prepared = time.perf_counter()
    run.started = prepared
    first_step = run.result.step
    model.train()

    def finish(total: float, finite: bool, stepped: bool) -> None:
        """Count a step whose loss is known: skip it (NaN/inf; nothing was updated), or advance."""
        if not finite:
            if stepped:
                graph.skip_pending()
            error = run.skip()
            if error:
                saved = run.save_progress() if run.ckpt_dir is not None else None
                where = f"; the last good state is saved in {saved}" if saved else ""
                raise PeftkitError(
                    f"{error}{where}: lower the learning rate, use bf16 instead of fp16, or check "
                    "the data for broken examples"
                )
            return
        if world > 1:
            total = float(accelerator.reduce(torch.tensor(total, device=device), reduction="mean"))
        run.advance(total, config.batch_size * config.grad_accum, stepped=stepped)
        bar.set_postfix(loss=f"{total:.4f}", refresh=False)  # drawn by update's rate limit
        bar.update(1)

    def finish_late(late: LateLoss) -> None:
        total = late.read()[0]
        finish(total, bool(np.isfinite(total)), stepped=True)

    # A captured step's loss is read after the next step is launched (late_read.py), unless the
    # run needs its outcome first (Run.must_read); at most one step is in flight unread. A stop
    # request therefore lands after the step in flight, which is counted and saved with the rest.
    late = None
    while True:
        stop = should_stop is not None and should_stop()
        if late is not None and (stop or run.must_read()):
            finish_late(late)
            late = None
        if run.done:
            break
        if stop:
            path = run.save_progress()
            emit({"kind": "stopped", "step": run.result.step, "path": str(path) if path else None})
            break
        inputs = step_inputs(next(data))
        if graph is not None and graph_key and graph.key != graph_key():
            graph = None  # frees the old graph's memory before the next capture
            graph = capture()
        if graph is not None:
            try:
                launched = LateLoss(graph.launch(inputs))
            except RuntimeError as err:
                if graph.graph is not None:
                    raise
                # Something in the step does not survive capture: fall back, never fail the run.
                graph.abandon()
                graph, run.graphed = None, False
                say(fallback_line(f"capturing the step failed ({str(err).splitlines()[0]})"))
            else:
                if graph_loss is None:
                    if late is not None:
                        finish_late(late)
                    late = launched
                    continue
                # A task that redoes a non-finite step eagerly (a sweep) reads each step at once.
                total = launched.read()[0]
                if np.isfinite(total):
                    finish(total, True, stepped=True)
                    continue
                graph.skip_pending()
                total, finite = _eager_step(
                    model, accelerator, config, inputs, data, step_inputs, step_loss, fsdp
                )
                if finite:  # the device-side schedule counts good steps: this one too
                    graph.schedule.good += 1
                finish(total, finite, stepped=False)
                continue
        total, finite = _eager_step(
            model, accelerator, config, inputs, data, step_inputs, step_loss, fsdp
        )
        finish(total, finite, stepped=False)
    bar.close()
    ended = time.perf_counter()
    capture = graph.capture_seconds if graph is not None else 0.0
    if graph is not None:
        graph.release()  # before the final evaluation, whose eager pass would add to its memory
    evaluating = run.eval_seconds  # the evaluations due during the steps, not the final one
    result = run.finish()
    result.timing = {
        "load": entered - started if started is not None else 0.0,
        "prepare": prepared - entered,
        "capture": capture,
        "train": ended - prepared - capture - evaluating,
        "eval": evaluating,
    }
    if config.progress:
        say(timing_line(result.timing, result.step - first_step))
    emit({"kind": "done", "step": result.step, "metrics": result.metrics})
    return result


def timing_line(timing: dict[str, float], steps: int) -> str:
    """'set-up 12.3 s (load 4.1, prepare 2.0, capture 6.2); 500 steps in 14.1 s (28.2 ms/step);
    evaluations 1.9 s' (the last part when the run evaluated between steps)."""
    parts = ("load", "prepare", "capture")
    setup = sum(timing[k] for k in parts)
    detail = ", ".join(f"{k} {timing[k]:.1f}" for k in parts if timing[k] > 0)
    per_step = 1000 * timing["train"] / steps if steps else 0.0
    evaluating = timing.get("eval", 0.0)
    return (
        f"set-up {setup:.1f} s ({detail}); {steps} steps in {timing['train']:.1f} s "
        f"({per_step:.1f} ms/step)" + (f"; evaluations {evaluating:.1f} s" if evaluating else "")
    )


def _eager_step(model, accelerator, config, first, data, step_inputs, step_loss, fsdp):
    """One optimizer step's forward and backward passes over `grad_accum` micro-batches, the
    first of them `first`: (mean loss, all finite). The update itself is the run's (Run.advance)."""
    total = 0.0
    for micro in range(config.grad_accum):
        inputs = first if micro == 0 else step_inputs(next(data))
        sync = micro == config.grad_accum - 1
        if fsdp:
            model.set_requires_gradient_sync(sync)
        ctx = accelerator.no_sync(model) if not (sync or fsdp) else _null()
        with ctx, accelerator.autocast():
            loss = step_loss(inputs)
        ok = torch.isfinite(loss.detach()).float()
        if accelerator.num_processes > 1:
            # Every rank must agree to skip, or the others would wait in backward's all-reduce.
            ok = accelerator.reduce(ok, reduction="min")
        if not ok:
            return total, False
        accelerator.backward(loss / config.grad_accum)
        total += float(loss.detach()) / config.grad_accum
    return total, True


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        if device.type == "cuda" and not batch.is_cuda and not batch.is_pinned():
            # From pageable memory the copy may wait for the queued steps; pinned, it never does.
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
