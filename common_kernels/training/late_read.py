"""The host ahead of the GPU under CUDA graphs: a captured step's loss is read one step late and
its learning rate is chosen on the device, so the host draws and launches step k+1 while step k
runs. Reading each loss at once (and the schedule's lr tensor for the progress event) made the
host wait for every step, adding its own per-step work to the GPU's (issue 13).
"""

from __future__ import annotations

import torch


class LateLoss:
    """The losses of a launched step, copied into pinned host memory behind it on the stream;
    `read()` waits for that copy alone, by which time the next step is already queued."""

    def __init__(self, losses: torch.Tensor) -> None:
        self.ready = None
        if losses.is_cuda:
            self.host = torch.empty(losses.shape, dtype=losses.dtype, pin_memory=True)
            self.host.copy_(losses, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = losses.detach().clone()

    def read(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def lr_table(scheduler, steps: int) -> torch.Tensor:
    """(steps + 1, groups): the learning rate of each param group after g good steps, as
    `scheduler` (a LambdaLR over tensor learning rates) sets it: its fp32 base rate times the
    factor in fp32, the arithmetic of `base_lr * factor` on a tensor."""
    bases = torch.stack([torch.as_tensor(b, dtype=torch.float32) for b in scheduler.base_lrs])
    factors = [[f(g) for f in scheduler.lr_lambdas] for g in range(steps + 1)]
    return torch.tensor(factors, dtype=torch.float32, device=bases.device) * bases


class DeviceSchedule:
    """Called inside the captured step, before the optimizer steps, with its found_inf flag:
    sets the learning rate tensors `rates` to `table`'s row for the good steps so far, then
    counts this step if it was finite. The count lives on the device, so the host need not know
    whether a step was good before launching the next; a skipped step leaves the rate as it was,
    exactly as the host's schedule, which steps only on good steps, would."""

    def __init__(self, table: torch.Tensor, rates: list[torch.Tensor], done: int) -> None:
        self.table, self.rates = table, rates
        self.good = torch.full((1,), done, dtype=torch.long, device=table.device)

    def __call__(self, found_inf: torch.Tensor) -> None:
        row = self.table.index_select(0, self.good.clamp(max=self.table.shape[0] - 1))[0]
        for rate, value in zip(self.rates, row.unbind()):
            rate.copy_(value)
        self.good += (found_inf == 0).long()
