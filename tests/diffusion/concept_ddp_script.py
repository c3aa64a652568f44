"""Run by test_concept_ddp.py: train_concept on the starter model, alone or as one of two gloo
processes under torch.distributed.run (what `accelerate launch` starts)."""

import sys
from pathlib import Path

from peftkit.common_kernels.training import TrainConfig
from peftkit.common_kernels.training.launch import exit_process
from peftkit.diffusion.base import load_base
from peftkit.diffusion.dreambooth import ConceptConfig, train_concept

SAMPLES = Path(__file__).resolve().parents[2] / "assets" / "samples" / "concept"


def main(out: str, batch_size: int) -> None:
    config = ConceptConfig(instance_prompt="a photo of sks toy", rank=4, resolution=32)
    train = TrainConfig(
        steps=3, batch_size=batch_size, lr=1e-3, cpu=True, progress=False, output_dir=out
    )
    train_concept(load_base("starter"), SAMPLES, config, train)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    exit_process(0)  # as the `peftkit` script ends
