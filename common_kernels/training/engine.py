"""The one training loop every peftkit trainer runs (vision, concepts, control, IP-Adapter).

A task plugs in what differs: the model, its trainable parameters, `loss(model, batch)`, and
optionally `evaluate(model)`, `prepare(accelerator)` and `state_dict`/`load_state_dict` for what
checkpoints hold. The loop owns the rest: accelerate (devices, mixed precision, DDP), AdamW and a
warmup + cosine schedule, gradient accumulation and clipping, a NaN guard, progress events,
periodic atomic checkpoints and exact resume (data order, RNG and optimizer state included).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..adapter_file import read_tensors, save_tensors
from ..errors import PeftkitError
from .fsdp import fsdp_requested, full_tensors, like, shard
from .graphed_step import GraphedStep, check_graphable, graph_optimizer

Event = dict[str, Any]


@dataclass
class TrainConfig:
    """`batch_size` is per process: the global batch is batch_size x processes x grad_accum."""

    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    output_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    optimizer: str = "adamw"
    max_bad_steps: int = 3
    progress: bool = True
    cpu: bool = False
    cuda_graph: bool = False
    fsdp: bool = (
        False  # with several processes: shard the model, gradients and AdamW states (fsdp.py)
    )
    fsdp_shard_frozen: bool = (
        False  # under FSDP also shard the task's frozen modules (else whole on each)
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise PeftkitError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise PeftkitError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "constant", "linear"):
            raise PeftkitError(
                f"TrainConfig.schedule must be 'cosine', 'constant' or 'linear', got {self.schedule!r}"
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise PeftkitError(
                f"TrainConfig.mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}"
            )
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise PeftkitError(
                f"TrainConfig.optimizer must be 'adamw' or 'adamw8bit', got {self.optimizer!r}"
            )


class Task(Protocol):
    model: nn.Module

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    samples_per_s: float = 0.0
    peak_memory_gib: float = 0.0
    resumed_from: int | None = None
    skipped_steps: int = 0
    parallel: str = "single"  # or "ddp xN" / "fsdp xN": how the run was spread over processes


def lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def launch_world() -> tuple[int, int]:
    """(rank, number of processes) of this launch, as `accelerate launch`/torchrun set them:
    known before the engine starts, for sizing epochs and choosing who writes the final files."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def batches(
    dataset,
    batch_size: int,
    seed: int,
    start: int,
    collate: Callable | None,
    rank: int = 0,
    world: int = 1,
) -> Iterator[Any]:
    """Endless batches in a seeded order; batch `start` is the first yielded, so a resumed run sees
    exactly the batches the uninterrupted one would have. With `world` processes each global batch
    of batch_size * world rows is split by rank, so N processes see what one process with the
    global batch would. A short final batch of an epoch is dropped; a dataset smaller than one
    global batch is repeated to fill it."""
    from torch.utils.data import default_collate

    n = len(dataset)
    if n == 0:
        raise PeftkitError("the training set is empty: add examples or check the data path")
    total = batch_size * world
    per_epoch = max(1, n // total)
    collate = collate or default_collate
    index = start
    while True:
        epoch, pos = divmod(index, per_epoch)
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        ).tolist()
        rows = [order[i % n] for i in range(pos * total, (pos + 1) * total)]
        yield collate([dataset[i] for i in rows[rank * batch_size : (rank + 1) * batch_size]])
        index += 1


def build_optimizer(
    params: list[nn.Parameter], config: TrainConfig, accelerator, register: bool = True
) -> tuple[Any, Any]:
    """The optimizer and LR schedule the loop steps for `params`. Trainers that update several
    parameter sets from one backward (multi-tenant concept training) build one pair per set, with
    register=False when sets come and go: accelerate keeps every optimizer it prepares, and their
    states, for the accelerator's lifetime. Unregistered optimizers get no fp16 loss scaling."""
    if config.cuda_graph:
        optimizer = graph_optimizer(params, config.lr, config.weight_decay, accelerator.device)
    else:
        optimizer = _optimizer(params, config)
        if register:
            optimizer = accelerator.prepare_optimizer(optimizer)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))


def apply_gradients(
    params: list[nn.Parameter],
    optimizer,
    config: TrainConfig,
    accelerator,
    set_to_none: bool = True,
) -> None:
    """Clip the gradient norm of `params` alone, take the optimizer step, clear the gradients. The
    norm covers exactly the parameters the optimizer owns, so parameter sets stepped side by side
    are clipped as each would be trained alone."""
    if config.max_grad_norm:
        accelerator.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=set_to_none)


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise PeftkitError(
                "optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes, "
                "or use optimizer='adamw'"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    # Fused AdamW on the GPU: one kernel per step instead of ~10 multi-tensor launches per parameter
    # chunk; with several jobs stepping side by side (multitenant.py) those launches were the step.
    fused = bool(params) and all(
        p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
    )
    return torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None
    )


# ---- checkpoints: safetensors for tensors, JSON for the rest; never pickle ----


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": _json_groups(state["param_groups"]), "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, slot = key.split(".", 2)
            state.setdefault(int(idx), {})[slot] = value
    for key, value in meta["scalars"].items():
        idx, slot = key.split(".", 1)
        state.setdefault(int(idx), {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _json_groups(groups: list[dict]) -> list[dict]:
    """Param groups with tensor hyper-parameters (a graphed step's lr) as plain numbers."""
    return [{k: (float(v) if torch.is_tensor(v) else v) for k, v in g.items()} for g in groups]


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    return tensors, {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = meta["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def _task_state(task: Task) -> dict[str, torch.Tensor]:
    if hasattr(task, "state_dict"):
        return task.state_dict()
    return {f"param.{i}": p.detach() for i, p in enumerate(task.trainable_parameters())}


def _load_task_state(task: Task, tensors: dict[str, torch.Tensor]) -> None:
    if hasattr(task, "load_state_dict"):
        task.load_state_dict(tensors)
        return
    with torch.no_grad():
        for i, p in enumerate(task.trainable_parameters()):
            p.copy_(tensors[f"param.{i}"])


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    task: Task,
    optimizer,
    scheduler,
    config: TrainConfig,
    write: bool = True,
) -> Path:
    """Write checkpoint `step-N/` atomically: into a temporary folder, then one rename. Sharded
    (FSDP) state is gathered whole first, which every process must join; only `write` ones write."""
    final = ckpt_dir / f"step-{step:07d}"
    task_state = full_tensors({f"task.{k}": v for k, v in _task_state(task).items()})
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    opt_tensors = full_tensors(opt_tensors)
    if not write:
        return final
    tmp = ckpt_dir / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng_tensors, rng_meta = _rng_state()
    save_tensors(
        tmp / "state.safetensors", {**task_state, **opt_tensors, **rng_tensors}, {"step": str(step)}
    )
    meta = {
        "step": step,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict(),
        "rng": rng_meta,
        "config": asdict(config),
    }
    (tmp / "trainer.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = (
        sorted(ckpt_dir.glob("step-*"))[: -config.keep_checkpoints]
        if config.keep_checkpoints > 0
        else []
    )
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: str | os.PathLike | None) -> Path | None:
    if not output_dir:
        return None
    done = sorted(
        p
        for p in (Path(output_dir) / "checkpoints").glob("step-*")
        if (p / "trainer.json").exists()
    )
    return done[-1] if done else None


def load_checkpoint(path: Path, task: Task, optimizer, scheduler) -> int:
    tensors, _ = read_tensors(path / "state.safetensors")
    meta = json.loads((path / "trainer.json").read_text())
    _load_task_state(task, {k[5:]: v for k, v in tensors.items() if k.startswith("task.")})
    lr_tensors = [g["lr"] if torch.is_tensor(g["lr"]) else None for g in optimizer.param_groups]
    state = _unflatten_optimizer(tensors, meta["optimizer"])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, slots in state[
        "state"
    ].items():  # whole tensors back into shards where params are sharded
        for key, value in slots.items():
            if torch.is_tensor(value) and value.shape == params[idx].shape:
                slots[key] = like(params[idx], value)
    optimizer.load_state_dict(state)
    # A captured step reads lr from its tensor: refill that tensor instead of replacing it.
    for group, lr in zip(optimizer.param_groups, lr_tensors):
        if lr is not None:
            group["lr"] = lr.fill_(float(group["lr"]))
    scheduler.load_state_dict(meta["scheduler"])
    _set_rng_state(tensors, meta["rng"])
    return int(meta["step"])


def train(
    task: Task,
    dataset,
    config: TrainConfig,
    on_event: Callable[[Event], None] | None = None,
    collate: Callable | None = None,
    resume: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Run `config.steps` optimizer steps of `task` on `dataset`; resume from the newest
    checkpoint in `config.output_dir` when there is one.

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
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    emit = on_event or (lambda event: None)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    if hasattr(task, "prepare"):
        task.prepare(accelerator)
    params = [p for p in task.trainable_parameters() if p.requires_grad]
    if not params:
        raise PeftkitError("the task has no trainable parameters: check the adapter targets")
    fsdp = fsdp_requested(config.fsdp) and accelerator.num_processes > 1
    if fsdp:
        if config.cuda_graph:
            raise PeftkitError("cuda_graph=True and FSDP cannot be combined: drop one of them")
        model = shard(
            task,
            task.model,
            accelerator.device,
            accelerator.num_processes,
            config.fsdp_shard_frozen,
        )
        params = [p for p in task.trainable_parameters() if p.requires_grad]  # now the sharded ones
    else:
        model = accelerator.prepare(task.model)
    # Under FSDP saving gathers shards, so every process takes part; process 0 writes.
    saves, writes = accelerator.is_main_process or fsdp, accelerator.is_main_process
    if config.cuda_graph:
        if getattr(task, "graph_unsafe", None):
            raise PeftkitError(f"cuda_graph=True cannot train this task: {task.graph_unsafe}")
        check_graphable(
            accelerator.device,
            accelerator.num_processes,
            config.grad_accum,
            config.mixed_precision,
            config.optimizer,
        )
    optimizer, scheduler = build_optimizer(params, config, accelerator)
    graphed = None
    if config.cuda_graph:
        graphed = GraphedStep(
            lambda batch: task.loss(model, batch),
            params,
            optimizer,
            config.max_grad_norm,
            accelerator.autocast,
        )

    world = accelerator.num_processes
    result = TrainResult(
        step=0, parallel="single" if world == 1 else f"{'fsdp' if fsdp else 'ddp'} x{world}"
    )
    ckpt_dir = Path(config.output_dir) / "checkpoints" if config.output_dir else None
    found = latest_checkpoint(config.output_dir) if resume else None
    if found is not None:
        result.step = result.resumed_from = load_checkpoint(found, task, optimizer, scheduler)
        emit({"kind": "resume", "step": result.step, "path": str(found)})

    data = batches(
        dataset,
        config.batch_size,
        config.seed,
        result.step * config.grad_accum,
        collate,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
    )
    bar = tqdm(
        total=config.steps,
        initial=result.step,
        desc="train",
        unit="step",
        disable=not (config.progress and accelerator.is_main_process),
    )
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, samples, bad = time.perf_counter(), 0, 0
    model.train()
    while result.step < config.steps:
        if should_stop is not None and should_stop():
            path = None
            if ckpt_dir is not None and saves and result.step > (result.resumed_from or 0):
                path = str(
                    save_checkpoint(
                        ckpt_dir, result.step, task, optimizer, scheduler, config, writes
                    )
                )
            emit({"kind": "stopped", "step": result.step, "path": path})
            break
        total = 0.0
        finite = True
        if graphed is not None:
            total = float(graphed(_to_device(next(data), device)))
            samples += config.batch_size
            finite = math.isfinite(total)
        for micro in range(config.grad_accum if graphed is None else 0):
            batch = _to_device(next(data), device)
            sync = micro == config.grad_accum - 1
            if fsdp:
                model.set_requires_gradient_sync(sync)
            ctx = accelerator.no_sync(model) if not (sync or fsdp) else _null()
            with ctx, accelerator.autocast():
                loss = task.loss(model, batch)
            ok = torch.isfinite(loss.detach()).float()
            if accelerator.num_processes > 1:
                # Every rank must agree to skip, or the others would wait in backward's all-reduce.
                ok = accelerator.reduce(ok, reduction="min")
            if not ok:
                finite = False
                break
            accelerator.backward(loss / config.grad_accum)
            total += float(loss.detach()) / config.grad_accum
            samples += config.batch_size
        if not finite:
            if graphed is None:
                optimizer.zero_grad(set_to_none=True)
            bad += 1
            result.skipped_steps += 1
            emit({"kind": "bad_step", "step": result.step, "consecutive": bad})
            if bad >= config.max_bad_steps:
                where = ""
                if ckpt_dir is not None and saves:
                    saved = save_checkpoint(
                        ckpt_dir, result.step, task, optimizer, scheduler, config, writes
                    )
                    where = f"; the last good state is saved in {saved}"
                raise PeftkitError(
                    f"the loss was NaN/inf for {bad} steps in a row at step {result.step}{where}: lower the "
                    "learning rate, use bf16 instead of fp16, or check the data for broken examples"
                )
            continue
        if accelerator.num_processes > 1:
            total = float(accelerator.reduce(torch.tensor(total, device=device), reduction="mean"))
        bad = 0
        if graphed is None:
            apply_gradients(params, optimizer, config, accelerator)
        scheduler.step()
        result.step += 1
        result.losses.append(total)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        emit(
            {
                "kind": "step",
                "step": result.step,
                "total": config.steps,
                "loss": total,
                "lr": scheduler.get_last_lr()[0],
                "elapsed": time.perf_counter() - t0,
            }
        )
        if config.eval_every and result.step % config.eval_every == 0 and hasattr(task, "evaluate"):
            result.metrics = evaluate_task(task, model, accelerator, result.step, emit)
        if (
            ckpt_dir is not None
            and config.checkpoint_every
            and result.step % config.checkpoint_every == 0
            and saves
        ):
            path = save_checkpoint(
                ckpt_dir, result.step, task, optimizer, scheduler, config, writes
            )
            emit({"kind": "checkpoint", "step": result.step, "path": str(path)})
    bar.close()
    elapsed = time.perf_counter() - t0
    result.samples_per_s = samples / elapsed if elapsed > 0 else 0.0
    if device.type == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    if hasattr(task, "evaluate") and not (
        config.eval_every and result.step % config.eval_every == 0
    ):
        result.metrics = evaluate_task(task, model, accelerator, result.step, emit)
    emit({"kind": "done", "step": result.step, "metrics": result.metrics})
    return result


def evaluate_task(
    task, model, accelerator, step: int, emit: Callable[[Event], None]
) -> dict[str, float]:
    """`task.evaluate` in eval mode, without gradients, under the run's autocast; emits an "eval" event."""
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        metrics = task.evaluate(accelerator.unwrap_model(model))
    model.train()
    emit({"kind": "eval", "step": step, "metrics": metrics})
    return metrics


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
