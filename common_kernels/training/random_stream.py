"""A task's own random numbers, kept apart from the global RNG.

Concept jobs draw latents, noise and timesteps from their own stream, so a job draws the same
numbers alone or beside other jobs in one batch, and checkpoints restore it like task state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class RandomStream:
    """A task's own random numbers (latent draws, noise, timesteps): the torch RNG state of one
    device, swapped in while the task draws and kept between draws. A concept job therefore draws
    the same numbers whether it trains alone or beside other jobs in one batch (multitenant.py),
    and a checkpoint restores it like any other task state."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.state = torch.Generator(self.device).manual_seed(seed).get_state()

    @contextlib.contextmanager
    def drawing(self) -> Iterator[None]:
        """Within the block the device's global RNG is this stream. Outside, nothing changes."""
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.cuda.set_rng_state(self.state, self.device) if cuda else torch.set_rng_state(
                self.state
            )
            yield
            self.state = torch.cuda.get_rng_state(self.device) if cuda else torch.get_rng_state()
