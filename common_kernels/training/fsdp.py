"""Fully sharded data parallel training (FSDP2, `torch.distributed.fsdp.fully_shard`) for the engine.

Under DDP every process holds the whole model, its gradients and its AdamW states. A full-copy
control branch trains every weight of a copied UNet encoder (~360M on SD1.5): its fp32 weights,
gradients and two AdamW moments are ~5.8 GB per process before activations. FSDP shards all of
them (and the frozen UNet) across the N processes: each keeps 1/N and gathers a block's weights
only while that block runs. Gradients are reduce-scattered with the same mean over the global
batch as DDP's all-reduce, so N processes train what one does (tests/diffusion/test_control_fsdp.py).

A task opts in with `fsdp_blocks()`: the modules that become sharding units (each gathered whole
for its forward and backward); everything else in `task.model` forms the root unit. Frozen modules
the task names in `fsdp_frozen()` stay whole on every process by default: they have no gradients
or optimizer states to split, and sharding them saves only their storage at the price of two
gathers per step (on two H200s the frozen SD1.5 UNet's gathers were most of FSDP's step,
bench/NOTES.md); `shard_frozen=True` (`--fsdp-shard-frozen`) shards them too, for bases too big to
hold whole. Sharded
parameters are DTensors: reading them whole (`full_tensors`) is a collective every process must
join, so saving under FSDP runs on every process and only process 0 writes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import PeftkitError


def fsdp_requested(flag: bool) -> bool:
    """`flag` (TrainConfig.fsdp, `--fsdp`) or `accelerate launch --use_fsdp`, which sets this variable."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def shard(
    task,
    model: nn.Module,
    device: torch.device,
    world: int,
    shard_frozen: bool = False,
    precision: str = "no",
) -> nn.Module:
    """Shard `model` (the task's model, on `device`) over the `world` processes of the launch. In
    a bf16 run the units gather their weights in bf16 (what autocast computes with anyway) and
    reduce gradients in fp32: half the bytes of fp32 gathers of a trained fp32 copy, whose shards
    stay fp32 for the optimizer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = getattr(task, "fsdp_blocks", None)
    if blocks is None:
        raise PeftkitError(
            f"{type(task).__name__} cannot train under FSDP (it names no sharding blocks): "
            "launch it without --fsdp / --use_fsdp, which trains it with DDP"
        )
    units = blocks()
    whole: set[nn.Parameter] = set()
    if not shard_frozen and hasattr(task, "fsdp_frozen"):
        whole = {p for module in task.fsdp_frozen() for p in module.parameters()}
        units = [b for b in units if not any(p in whole for p in b.parameters())]
    mesh = init_device_mesh(device.type, (world,))
    options = {"mesh": mesh}
    if precision == "bf16":
        # Inputs keep their dtype: autocast picks each op's precision as without FSDP (a DiT's
        # rotary tables, say, stay fp32).
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for block in units:
        fully_shard(block, **options)
    fully_shard(model.to(device), **options, **({"ignored_params": whole} if whole else {}))
    return model


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every sharded tensor gathered whole (a collective: all processes call it, in the same order)."""
    return {k: v.full_tensor() if is_sharded(v) else v for k, v in tensors.items()}


def like(reference: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` sharded as `reference` is (a plain tensor stays plain): what loads a whole tensor
    from a checkpoint into a sharded parameter or optimizer state."""
    if not is_sharded(reference):
        return full
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every process read the same file, so each cuts its shard locally, no scatter.
    return distribute_tensor(
        full.to(device=reference.device, dtype=reference.dtype),
        reference.device_mesh,
        reference.placements,
        src_data_rank=None,
    )


@torch.no_grad()
def copy_whole_(param: torch.Tensor, full: torch.Tensor) -> None:
    """param <- full, for a plain or a sharded parameter (the shard this process holds)."""
    if is_sharded(param):
        param.to_local().copy_(like(param, full).to_local())
    else:
        param.copy_(full)
