"""The training machinery every trainer shares: the engine loop, whole-step CUDA graphs, FSDP,
per-task random streams. The adapter cores never import this package."""

from .engine import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
