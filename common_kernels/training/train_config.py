"""What a training run is told (`TrainConfig`) and what it reports (`TrainResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PeftkitError


@dataclass
class TrainConfig:
    """`batch_size` is per process: the global batch is batch_size x processes x grad_accum.
    `mixed_precision` "auto" is bf16 on a GPU that has it, else "no"; `cuda_graph` "auto" replays
    each step as one CUDA graph on a single GPU when nothing in the run prevents it."""

    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"
    seed: int = 0
    output_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    optimizer: str = "adamw"
    max_bad_steps: int = 3
    progress: bool = True
    cpu: bool = False
    cuda_graph: bool | str = "auto"
    # Compile the task's `compile_regions()` (its repeated blocks) in place before the first step.
    compile: bool = False
    # With several processes: shard the model, gradients and AdamW states (fsdp.py).
    fsdp: bool = False
    # Under FSDP also shard the task's frozen modules (else whole on each process).
    fsdp_shard_frozen: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise PeftkitError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise PeftkitError(f"TrainConfig.lr must be > 0, got {self.lr}")
        choices = {
            "schedule": ("cosine", "constant", "linear"),
            "mixed_precision": ("auto", "no", "bf16", "fp16"),
            "optimizer": ("adamw", "adamw8bit"),
            "cuda_graph": ("auto", True, False),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if not any(value is a or (isinstance(a, str) and value == a) for a in allowed):
                raise PeftkitError(
                    f"TrainConfig.{name} must be one of {list(allowed)}, got {value!r}"
                )


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    samples_per_s: float = 0.0
    peak_memory_gib: float = 0.0
    resumed_from: int | None = None
    skipped_steps: int = 0
    parallel: str = "single"  # or "ddp xN" / "fsdp xN": how the run was spread over processes
    # Seconds: set-up ("prepare", "capture") apart from the steps themselves ("train").
    timing: dict[str, float] = field(default_factory=dict)
