"""Run by test_dit_fsdp.py: a Flux concept LoRA (and CLIP LoRA) trained by train_concept, alone or
as one of two gloo processes under torch.distributed.run with FSDP; process 0 writes how the run
was spread to <out>/parallel.txt."""

import sys
from pathlib import Path

from peftkit.common_kernels.training import TrainConfig
from peftkit.common_kernels.training.launch import exit_process, launch_world
from peftkit.diffusion.base import load_base
from peftkit.diffusion.dreambooth import ConceptConfig, train_concept


def main(model: str, images: str, out: str, batch_size: int) -> None:
    config = ConceptConfig(
        "a photo of sks toy", resolution=16, rank=4, targets=["all-linear"], text_encoder_rank=2
    )
    train = TrainConfig(
        steps=3,
        batch_size=batch_size,
        lr=1e-2,
        schedule="constant",
        cpu=True,
        progress=False,
        fsdp=True,
        output_dir=out,
    )
    _, result = train_concept(load_base(model), images, config, train)
    if launch_world()[0] == 0:
        (Path(out) / "parallel.txt").write_text(result.parallel)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
    exit_process(0)  # as the `peftkit` script ends
