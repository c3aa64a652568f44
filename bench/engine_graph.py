"""The training engine with and without `cuda_graph=True` on a real adapter task (ViT-B/16 + LoRA,
bs 64, bf16): same final adapter (asserted), and the time per step of each.

    python bench/engine_graph.py --out results/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import build  # noqa: E402

from peftkit.common_kernels import LoRAConfig, inject  # noqa: E402
from peftkit.common_kernels.training import TrainConfig, train  # noqa: E402


class ViTLoRA:
    def __init__(self) -> None:
        self.model, _ = build("vit", 1)
        self.model = self.model.to(torch.bfloat16)
        self.handle = inject(self.model, LoRAConfig(targets=["qkv"], r=16))
        self.model.head.requires_grad_(True)

    def trainable_parameters(self):
        return self.handle.trainable_parameters() + list(self.model.head.parameters())

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).float(), y)


def run(cuda_graph: bool, steps: int, data) -> tuple[ViTLoRA, float]:
    task = ViTLoRA()
    times = []
    config = TrainConfig(
        steps=steps,
        batch_size=64,
        lr=1e-3,
        warmup_steps=5,
        mixed_precision="bf16",
        cuda_graph=cuda_graph,
        progress=False,
        max_grad_norm=1.0,
    )
    last = [time.perf_counter()]

    def on_event(event):
        if event["kind"] == "step":
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

    train(task, data, config, on_event=on_event)
    steady = sorted(times[10:])
    return task, 1000 * steady[len(steady) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    # On the GPU already: the benchmark times the step, not host-side collation.
    data = [
        (
            torch.randn(3, 224, 224, generator=g).cuda(),
            torch.randint(0, 100, (), generator=g).cuda(),
        )
        for _ in range(256)
    ]
    eager, eager_ms = run(False, args.steps, data)
    graphed, graph_ms = run(True, args.steps, data)
    worst = 0.0
    for (_name, a), b in zip(
        eager.handle.named_parameters(), graphed.handle.trainable_parameters()
    ):
        worst = max(worst, float((a - b).norm() / a.norm().clamp_min(1e-12)))
    row = dict(
        task="vit-b16 lora r16 bs64 bf16",
        steps=args.steps,
        eager_ms=round(eager_ms, 2),
        graph_ms=round(graph_ms, 2),
        speedup=round(eager_ms / graph_ms, 2),
        max_rel_param_diff=worst,
    )
    print(json.dumps(row))
    assert worst < 5e-2, f"graphed training diverged from eager: {worst}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_graph.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
