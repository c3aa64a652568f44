"""The training machinery every trainer shares: the engine loop, one parameter set's bookkeeping
(run.py), checkpoints, whole-step CUDA graphs and the fast-path choice, FSDP, per-task random
streams and the data cache. The adapter cores never import this package."""

from .engine import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
