"""Atomic training checkpoints and exact resume: safetensors for tensors, JSON for the rest.

A checkpoint `step-N/` holds the task's state, the optimizer's, the schedule's, every RNG's and the
settings it was trained with. Resume takes the newest readable one (a truncated newest falls back to
the one before, and says so) and names the setting that changed when the task no longer fits it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter_file import read_tensors, save_tensors
from ..errors import PeftkitError
from .fsdp import full_tensors, like


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


def _json_scheduler(state: dict) -> dict:
    """A schedule's state with tensor rates (a graphed step's base and last lr) as plain numbers."""
    return {
        k: [float(x) if torch.is_tensor(x) else x for x in v] if isinstance(v, list) else v
        for k, v in state.items()
    }


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


def _task_state(task) -> dict[str, torch.Tensor]:
    if hasattr(task, "state_dict"):
        return task.state_dict()
    return {f"param.{i}": p.detach() for i, p in enumerate(task.trainable_parameters())}


def _load_task_state(task, tensors: dict[str, torch.Tensor]) -> None:
    if hasattr(task, "load_state_dict"):
        task.load_state_dict(tensors)
        return
    with torch.no_grad():
        for i, p in enumerate(task.trainable_parameters()):
            p.copy_(tensors[f"param.{i}"])


def _task_settings(task) -> dict[str, Any]:
    """The task's own settings (rank, method, targets...) when it keeps them in a dataclass."""
    config = getattr(task, "config", None)
    if not dataclasses.is_dataclass(config):
        return {}
    return json.loads(json.dumps(asdict(config), default=str))


def save_checkpoint(
    ckpt_dir: Path, step: int, task, optimizer, scheduler, config, write: bool = True
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
        "scheduler": _json_scheduler(scheduler.state_dict()),
        "rng": rng_meta,
        "config": asdict(config),
        "task_config": _task_settings(task),
    }
    (tmp / "trainer.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    keep = config.keep_checkpoints
    for path in sorted(ckpt_dir.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    return final


def checkpoints(output_dir: str | os.PathLike | None) -> list[Path]:
    """Finished checkpoints in `output_dir`, newest first."""
    if not output_dir:
        return []
    done = [
        p
        for p in (Path(output_dir) / "checkpoints").glob("step-*")
        if (p / "trainer.json").exists()
    ]
    return sorted(done, reverse=True)


def latest_checkpoint(output_dir: str | os.PathLike | None) -> Path | None:
    found = checkpoints(output_dir)
    return found[0] if found else None


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of checkpoint `path`; PeftkitError naming the damaged file."""
    try:
        tensors, _ = read_tensors(path / "state.safetensors")
    except PeftkitError:
        raise PeftkitError(
            f"checkpoint {path} has a damaged state.safetensors (truncated or unreadable): delete "
            "that folder to resume from an older checkpoint, or train into a new output folder"
        ) from None
    try:
        meta = json.loads((path / "trainer.json").read_text())
        int(meta["step"]), meta["optimizer"], meta["scheduler"], meta["rng"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise PeftkitError(
            f"checkpoint {path} has a damaged trainer.json ({type(err).__name__}: {err}): delete "
            "that folder to resume from an older checkpoint, or train into a new output folder"
        ) from None
    return tensors, meta


def check_same_settings(path: Path, task, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint whose task tensors no longer fit the task was trained with other settings:
    name them (e.g. rank 4 -> 8) rather than let a shape error blame the base model."""
    saved = {k[5:]: v.shape for k, v in tensors.items() if k.startswith("task.")}
    own = {k: v.shape for k, v in _task_state(task).items()}
    if saved == own:
        return
    before, now = meta.get("task_config") or {}, _task_settings(task)
    changed = [
        f"{k} {before[k]!r} -> {now[k]!r}" for k in now if k in before and before[k] != now[k]
    ]
    if not changed:
        diff = sorted(set(saved) ^ set(own)) or [k for k in own if saved[k] != own[k]]
        changed = [f"the trained tensors differ (e.g. {diff[0]!r})"]
    raise PeftkitError(
        f"checkpoint {path} was trained with other settings: {', '.join(changed)}; resume with "
        "the settings it was trained with, or train into a new output folder"
    )


def load_checkpoint(path: Path, task, optimizer, scheduler, read=None) -> int:
    """Restore task, optimizer, schedule and RNG state from `path`; returns its step."""
    tensors, meta = read or read_checkpoint(path)
    check_same_settings(path, task, meta, tensors)
    _load_task_state(task, {k[5:]: v for k, v in tensors.items() if k.startswith("task.")})
    lr_tensors = [g["lr"] if torch.is_tensor(g["lr"]) else None for g in optimizer.param_groups]
    state = _unflatten_optimizer(tensors, meta["optimizer"])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # Whole tensors go back into shards where params are sharded (FSDP).
    for idx, slots in state["state"].items():
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


def resume(output_dir, task, optimizer, scheduler, notice=print) -> tuple[int, Path] | None:
    """Load the newest readable checkpoint in `output_dir`: (its step, its path), or None when
    there is none. Damaged newer ones are skipped with one `notice` line each; when every one is
    damaged the newest's problem is raised."""
    found = checkpoints(output_dir)
    first_error = None
    for path in found:
        try:
            read = read_checkpoint(path)
        except PeftkitError as err:
            first_error = first_error or err
            if path != found[-1]:
                notice(f"resume: {path.name} is damaged, falling back to an older checkpoint")
            continue
        return load_checkpoint(path, task, optimizer, scheduler, read), path
    if first_error is not None:
        raise first_error
    return None
