"""Batched sweeps: K configurations of one task trained in one pass over one frozen ViT.

Each step joins the configurations' batches (configuration k's rows are the k-th block) and runs
one forward and backward, each block through its configuration's own adapter (sweep_adapters.py),
as one CUDA graph on a GPU. Every configuration keeps its own initialization (its seed), data order
and crops, AdamW param group (lr, weight decay), schedule and clipping, so it ends where
`train_vit` alone ends. A configuration whose loss turns NaN/inf skips the step alone (the step is
redone eagerly without its rows) and fails after `max_bad_steps` in a row; the others go on.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training.data_cache import batches, cache_dataset, eval_batches
from peftkit.common_kernels.training.engine import TrainConfig, TrainResult, launch_world, train
from peftkit.common_kernels.training.fast_path import compile_plan, default_device_type

from .fgvc import crop_generator
from .methods import VisionAdapter, ViTMethodConfig
from .sweep_adapters import SweepAdapters
from .train import (
    ViTTrainConfig,
    backbone_blocks,
    build_model,
    eager_blocks,
    engine_config,
    load_data,
    run_results,
    write_run,
)

# What configurations of one group may set each their own way.
OWN_FIELDS = ("lr", "weight_decay", "warmup_epochs", "label_smoothing", "seed", "output_dir")


def group_key(config: ViTTrainConfig) -> str | None:
    """Configurations with equal keys train in one pass; None: this one trains alone (full
    fine-tuning would need K backbones, dropout K random streams, fp16 K loss scales)."""
    method = ViTMethodConfig.parse(config.method, **config.method_options)
    dropout = (method.vpt and method.vpt.dropout) or (
        method.adaptformer and method.adaptformer.dropout
    )
    # open_clip's attention reads its out_proj bias directly, where no hook sees it.
    clip_bitfit = method.base_tuning == "bitfit" and (
        config.open_clip or "open_clip_config" in config.model_kwargs
    )
    if method.base_tuning == "full" or dropout or clip_bitfit or config.grad_accum > 1:
        return None
    if config.mixed_precision == "fp16":
        return None
    shared = {k: v for k, v in asdict(config).items() if k not in OWN_FIELDS}
    # A random-init backbone and a built-in task's images come from the seed.
    if not (config.pretrained or config.checkpoint) or config.data.startswith("builtin:"):
        shared["seed"] = config.seed
    return json.dumps(shared, sort_keys=True, default=str)


def group_configs(configs: list[ViTTrainConfig]) -> list[list[ViTTrainConfig]]:
    """`configs` in the groups that share a pass, in first-seen order (one-element groups alone)."""
    groups: dict[Any, list[ViTTrainConfig]] = {}
    for i, config in enumerate(configs):
        key = group_key(config)
        groups.setdefault(i if key is None else key, []).append(config)
    return list(groups.values())


class SweepDiverged(PeftkitError):
    """Every configuration of a group failed."""


class SweepTask:
    """The engine's task for a group: joined batches, per-configuration losses, param groups and
    NaN guards, and one evaluation pass over every live configuration. Under CUDA graphs the live
    configurations' step is captured (`graph_loss`); a step that is not finite is redone eagerly
    by `loss`, which drops the diverged configurations' rows, as eager steps always do."""

    def __init__(self, model, sweep: SweepAdapters, engines: list[TrainConfig], data, configs):
        self.model, self.sweep, self.engines, self.data = model, sweep, engines, data
        self.smoothing = [c.label_smoothing for c in configs]
        self.eval_batch_size = max(1, configs[0].eval_batch_size // len(configs))
        self.status = ["running"] * len(configs)
        self.bad, self.last_bad = [0] * len(configs), [-2] * len(configs)
        self.failed_at: dict[int, int] = {}
        self.history: list[list[dict[str, float]]] = [[] for _ in configs]
        self.device, self.eval_seconds, self.step = torch.device("cpu"), 0.0, 0
        # Random crops (FGVC): each configuration draws its batches' from its own seed, as alone.
        self.transform = data.train.transform if crop_generator(data.train) else None
        seeds = [c.seed for c in configs] if self.transform is not None else []
        self.crops = [torch.Generator().manual_seed(seed) for seed in seeds]

    def prepare(self, accelerator) -> None:
        if accelerator.num_processes > 1:
            raise PeftkitError(
                "a batched sweep trains in one process: start it without `accelerate launch`"
            )
        self.device = accelerator.device
        self.train_set = cache_dataset(self.data.train, self.device) or self.data.train
        self.eval_set = cache_dataset(self.data.eval, self.device) or self.data.eval

    def live(self) -> list[int]:
        return [k for k, s in enumerate(self.status) if s == "running"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for k in range(len(self.engines)) for _, p in self.sweep.named(k)]

    def compile_regions(self) -> list[nn.Module]:
        return backbone_blocks(self.model)

    def param_groups(self, params, config) -> list[tuple[list[nn.Parameter], TrainConfig]]:
        """One group per configuration, with its own settings (`config` is the group's shared one)."""
        return [([p for _, p in self.sweep.named(k)], c) for k, c in enumerate(self.engines)]

    def batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every configuration's batch in its own seeded order (as alone), joined in blocks;
        `step` is the index of the batch last drawn."""
        streams = [batches(self.train_set, c.batch_size, c.seed, start, None) for c in self.engines]
        for step in itertools.count(start):
            self.step = step
            parts = []
            for k, stream in enumerate(streams):
                if self.transform is not None:
                    self.transform.generator = self.crops[k]
                parts.append(next(stream))
            yield (
                torch.cat([p[0] for p in parts]),
                torch.cat([torch.as_tensor(p[1]) for p in parts]),
            )

    def _losses(self, model, batch, which: list[int], routed: bool = False) -> list[torch.Tensor]:
        """The losses of configurations `which` on their row blocks of the joined `batch`
        (`routed`: their routing is held already, as `graph_context` holds it)."""
        if len(which) == len(self.engines):
            images, labels = batch
        else:  # slices, not an index list: that would be copied from the host in a capture
            images, labels = (
                torch.cat([t.unflatten(0, (len(self.engines), -1))[k] for k in which])
                for t in batch
            )
        logits = model(images) if routed else self.sweep.forward(model, images, which)
        logits, labels = (t.unflatten(0, (len(which), -1)) for t in (logits, labels))
        return [
            F.cross_entropy(logits[j], labels[j], label_smoothing=self.smoothing[k])
            for j, k in enumerate(which)
        ]

    def graph_key(self) -> tuple[int, ...]:
        return tuple(self.live())

    def graph_context(self):
        live = self.live()
        return self.sweep.routed(live, len(live) * self.engines[0].batch_size)

    def graph_loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The live configurations' summed loss, no host work: what a CUDA graph captures."""
        return sum(self._losses(model, batch, self.live(), routed=True))

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The summed loss of the configurations whose loss is finite; the others skip the step,
        and fail after max_bad_steps batches in a row."""
        live = self.live()
        losses = self._losses(model, batch, live)
        values = torch.stack([loss.detach().float() for loss in losses]).tolist()
        good = [k for k, v in zip(live, values) if math.isfinite(v)]
        for k in set(live) - set(good):
            self.bad[k] = self.bad[k] + 1 if self.last_bad[k] == self.step - 1 else 1
            self.last_bad[k] = self.step
            for _, p in self.sweep.named(k):
                p.grad = None  # a captured step's gradient: the eager update must skip it
                if self.bad[k] >= self.engines[k].max_bad_steps:
                    p.requires_grad_(False)  # out of the captured step from now on
            if self.bad[k] >= self.engines[k].max_bad_steps:
                self.status[k], self.failed_at[k] = "failed", self.step
        if not self.live():
            raise SweepDiverged("every configuration of this group diverged")
        if len(good) == len(live) or not good:
            return sum(losses)  # not finite: the engine skips the step
        # Masked routes would carry a bad configuration's NaN into the others' gradients.
        return sum(self._losses(model, batch, good))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 and loss of every live configuration on the eval split, all in one pass."""
        start, live = time.perf_counter(), self.live()
        if not live:
            return {}
        correct = torch.zeros(len(live), device=self.device)
        loss = torch.zeros(len(live), dtype=torch.float64, device=self.device)
        total = 0
        with eager_blocks():
            for images, labels in eval_batches(self.eval_set, self.eval_batch_size, self.device):
                images, labels = images.to(self.device), labels.to(self.device)
                joined = images.expand(len(live), *images.shape).flatten(0, 1)
                logits = self.sweep.forward(model, joined, live).float()
                logits = logits.unflatten(0, (len(live), -1))
                correct += (logits.argmax(-1) == labels).sum(-1)
                loss += (
                    F.cross_entropy(
                        logits.flatten(0, 1), labels.repeat(len(live)), reduction="none"
                    )
                    .view(len(live), -1)
                    .sum(-1)
                )
                total += labels.numel()
        metrics = {}
        for j, k in enumerate(live):
            own = {"top1": 100.0 * float(correct[j]) / total, "eval_loss": float(loss[j]) / total}
            self.history[k].append({**own, "eval_examples": total})
            metrics.update({f"{name}/{k}": v for name, v in own.items()})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.eval_seconds += time.perf_counter() - start
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            f"{k}.{key}": p.detach()
            for k in range(len(self.engines))
            for key, p in self.sweep.named(k)
        }
        failed = [self.failed_at.get(k, -1) for k in range(len(self.engines))]
        crops = {f"crops.{k}": g.get_state() for k, g in enumerate(self.crops)}
        return {
            **state,
            **crops,
            "bad": torch.tensor(self.bad),
            "last_bad": torch.tensor(self.last_bad),
            "failed_at": torch.tensor(failed),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k in range(len(self.engines)):
                for key, p in self.sweep.named(k):
                    p.copy_(state[f"{k}.{key}"])
        for k, generator in enumerate(self.crops):
            generator.set_state(state[f"crops.{k}"])
        self.bad, self.last_bad = state["bad"].tolist(), state["last_bad"].tolist()
        for k, at in enumerate(state["failed_at"].tolist()):
            if at >= 0:
                self.status[k], self.failed_at[k] = "failed", at
                for _, p in self.sweep.named(k):
                    p.requires_grad_(False)


def train_together(
    configs: list[ViTTrainConfig],
    group_dir: str | None = None,
    on_event: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict[str, Any]]:
    """Train `configs` (one group of `group_configs`) in one pass; checkpoints go to `group_dir`
    (a rerun resumes every configuration there), each configuration's adapter and results.json
    to its own output_dir, as `train_vit` writes them. Returns each one's results, with "status"
    "done", "failed" (its loss diverged; "error" says where) or "stopped" (`should_stop`)."""
    entered = time.perf_counter()
    first = configs[0]
    if len({group_key(c) for c in configs}) != 1 or group_key(first) is None:
        raise PeftkitError(
            "these configurations cannot share a pass: split them with group_configs"
        )
    data = load_data(first)
    spec, base_name = first.backbone_spec(), first.checkpoint or (first.open_clip or first.model)
    method = ViTMethodConfig.parse(first.method, **first.method_options)
    built: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    states = []
    for c in configs:
        # Each configuration starts where train_vit would start it: its seed's head, then its
        # adapter drawn from the random state the model build leaves.
        if c.seed not in built:
            torch.manual_seed(c.seed)
            model, _ = build_model(spec, data.num_classes, c.pretrained, c.checkpoint)
            built[c.seed] = (model, torch.get_rng_state())
        model, rng = built[c.seed]
        torch.set_rng_state(rng)
        adapter = VisionAdapter(model, method, base_model=base_name)
        states.append({k: v.clone() for k, v in adapter.state_dict().items()})
        adapter.unload()
    model = built[first.seed][0]
    del built
    sweep = SweepAdapters(model, method, states)
    rank, world = launch_world()
    engines = [engine_config(c, len(data.train), world)[0] for c in configs]
    per_epoch = engine_config(first, len(data.train), world)[1]
    task = SweepTask(model, sweep, engines, data, configs)
    # Divergence is each configuration's own (SweepTask.loss); the group stops when all diverged.
    # The group compiles by its own rows: K configurations' batches every step.
    rows = len(configs) * engines[0].steps * engines[0].batch_size
    compiled = compile_plan(first.compile, default_device_type(first.cpu), world, rows)
    engine = replace(engines[0], output_dir=group_dir, max_bad_steps=2**31, compile=compiled)
    start = time.perf_counter()
    try:
        result = train(
            task, data.train, engine, on_event=on_event, should_stop=should_stop, started=entered
        )
    except SweepDiverged:
        result = None
    seconds = time.perf_counter() - start - task.eval_seconds
    # Stopped early: nothing is written, so the group reruns as the same group and resumes.
    stopped = result is not None and result.step < engine.steps
    final = [{key: p.detach().clone() for key, p in sweep.named(k)} for k in range(len(configs))]
    sweep.remove()
    out = []
    for k, c in enumerate(configs):
        adapter = VisionAdapter(model, method, base_model=base_name)
        adapter.load_state_dict(final[k])
        if result is None:
            task.status[k] = "failed"
            task.failed_at.setdefault(k, task.step)
        done = result.step - (result.resumed_from or 0) if result else 0
        rate = done * c.batch_size / seconds if seconds > 0 else 0.0
        results = run_results(
            c,
            data,
            adapter,
            result or TrainResult(step=task.step),
            task.history[k],
            engines[k],
            per_epoch,
            rate,
        )
        results.update(status=task.status[k].replace("running", "done"), trained_with=len(configs))
        if k in task.failed_at:
            results.update(
                top1=None,
                error=f"the loss was NaN/inf for {engines[k].max_bad_steps} steps in a row at "
                f"step {task.failed_at[k]}: lower the learning rate",
            )
        if stopped:
            results["status"] = "stopped"
        elif c.output_dir and rank == 0:
            write_run(c, adapter, data, results)
        adapter.unload()
        out.append(results)
    return out
