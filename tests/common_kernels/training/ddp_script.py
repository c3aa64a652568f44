"""Run by test_engine_ddp.py under `accelerate launch` (2 CPU processes, gloo) and alone."""

import json
import sys

import torch

from peftkit.common_kernels import LoRAConfig, inject
from peftkit.common_kernels.training import TrainConfig, train
from peftkit.common_kernels.training.launch import exit_process


class Task:
    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
        )
        self.handle = inject(self.model, LoRAConfig(targets=["0", "2"], r=2))

    def trainable_parameters(self):
        return self.handle.trainable_parameters()

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()


def main(out: str, batch_size: int) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=g)
    data = [(x[i], torch.stack([x[i].sum(), x[i][0]])) for i in range(64)]
    task = Task()
    train(
        task, data, TrainConfig(steps=12, batch_size=batch_size, lr=0.05, cpu=True, progress=False)
    )
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({k: v.tolist() for k, v in task.handle.state_dict().items()}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    exit_process(0)  # as the `peftkit` script ends
