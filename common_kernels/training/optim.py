"""The optimizer, its learning-rate schedule and one update: what the loop steps for a parameter set."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError
from .graphed_step import graph_optimizer
from .train_config import TrainConfig


def lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(
    params: list[nn.Parameter],
    config: TrainConfig,
    accelerator,
    register: bool = True,
    graphed: bool = False,
    groups: list[tuple[list[nn.Parameter], TrainConfig]] | None = None,
) -> tuple[Any, Any]:
    """The optimizer and LR schedule the loop steps for `params` (`graphed`: capturable AdamW with a
    tensor learning rate). Trainers that update several parameter sets from one backward
    (multi-tenant concept training) build one pair per set, with register=False when sets come and
    go: accelerate keeps every optimizer it prepares, and their states, for the accelerator's
    lifetime. Unregistered optimizers get no fp16 loss scaling. `groups`: the params split into
    (params, config) groups, each with its own learning rate, weight decay and schedule (a sweep's
    configurations trained together; pivotal tuning's token embeddings)."""
    groups = groups or [(params, config)]
    specs = [{"params": ps, "lr": c.lr, "weight_decay": c.weight_decay} for ps, c in groups]
    if graphed:
        optimizer = graph_optimizer(specs, config.lr, config.weight_decay, accelerator.device)
    else:
        optimizer = _optimizer(specs, params, config)
        if register:
            optimizer = accelerator.prepare_optimizer(optimizer)
    factors = [lambda s, c=c: lr_factor(s, c) for _, c in groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def apply_gradients(
    params: list[nn.Parameter],
    optimizer,
    config: TrainConfig,
    accelerator,
    set_to_none: bool = True,
) -> None:
    """Clip the gradient norm of `params` alone, take the optimizer step, clear the gradients. The
    norm covers exactly the parameters the optimizer owns, so parameter sets stepped side by side
    are clipped as each would be trained alone; so is each param group of an optimizer with several."""
    if config.max_grad_norm:
        groups = optimizer.param_groups
        for clipped in [g["params"] for g in groups] if len(groups) > 1 else [params]:
            accelerator.clip_grad_norm_(clipped, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=set_to_none)


def _optimizer(
    groups: list[dict], params: list[nn.Parameter], config: TrainConfig
) -> torch.optim.Optimizer:
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise PeftkitError(
                "optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes, "
                "or use optimizer='adamw'"
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=config.lr, weight_decay=config.weight_decay)
    # Fused AdamW on the GPU: one kernel per step instead of ~10 multi-tensor launches per parameter
    # chunk; with several jobs stepping side by side (multitenant.py) those launches were the step.
    fused = bool(params) and all(
        p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
    )
    return torch.optim.AdamW(
        groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None
    )
