"""This process's place in a launch (`accelerate launch`, torchrun) and how a command leaves it:
the engine sizes epochs by it, the `peftkit` script and the tests' launched scripts end by it."""

from __future__ import annotations

import gc
import os
import sys
from typing import NoReturn


def launch_world() -> tuple[int, int]:
    """(rank, number of processes) of this launch, as `accelerate launch`/torchrun set them:
    known before the engine starts, for sizing epochs and choosing who writes the final files."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def end_launch() -> None:
    """Leave the launch's process group, once a command is done (its saves gather across the
    processes, so not earlier)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process whose command is done, with exit status `code`.

    One of several launched processes leaves its group and ends at once (os._exit after flushing
    stdout and stderr): the interpreter's own teardown frees c10d/gloo objects still referenced by
    the trained model and can abort there ("terminate called without an active exception", about
    one launch in a hundred on 2 CPU cores), failing a launch that trained and saved. Nothing is
    lost by skipping it: saves are atomic and closed, trackers finish on the run's "done" event.
    A lone process ends through sys.exit without the last garbage collections (gc.freeze), which
    walk every object torch, diffusers and transformers made (0.6 s of a tiny train-concept run)."""
    end_launch()
    if launch_world()[1] > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    gc.freeze()
    sys.exit(code)
