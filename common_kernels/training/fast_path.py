"""The fast path by default: which precision and whether whole-step CUDA graphs a run gets.

Pure decisions from the device, the run's settings and the task, so the CLI, the engine and the
multi-concept trainer choose alike; a run that cannot be captured says why in one line.
"""

from __future__ import annotations

from ..errors import PeftkitError


def add_speed_args(parser) -> None:
    """The flags every training command shares for its fast path (parser: a parser or group)."""
    parser.add_argument(
        "--mixed-precision",
        choices=["auto", "no", "bf16", "fp16"],
        default="auto",
        help="auto (default): bf16 on a GPU that supports it (frozen weights in bf16 too), else fp32",
    )
    parser.add_argument(
        "--no-cuda-graph",
        "--eager",
        dest="cuda_graph",
        action="store_const",
        const=False,
        default="auto",
        help="run eager steps; by default each step is replayed as one CUDA graph on a single GPU "
        "when the run allows it (else one line says why not)",
    )


def resolve_precision(requested: str, device_type: str) -> str:
    """ "auto" is bf16 on a CUDA device that supports it (the frozen base then runs in bf16 too),
    else "no"; any other value stands."""
    import torch

    if requested != "auto":
        return requested
    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def default_device_type(cpu: bool) -> str:
    """The device type a run will train on, known before accelerate starts."""
    import torch

    return "cuda" if torch.cuda.is_available() and not cpu else "cpu"


def graph_plan(
    requested: bool | str,
    device_type: str,
    processes: int = 1,
    grad_accum: int = 1,
    mixed_precision: str = "no",
    optimizer: str = "adamw",
    task_reason: str | None = None,
) -> tuple[bool, str | None]:
    """(capture the step?, why not): False leaves it eager silently; "auto" captures when nothing
    prevents it and otherwise names what did (no reason off a GPU, where graphs never apply);
    True insists and raises PeftkitError naming every blocker and the fix."""
    if requested is False:
        return False, None
    needs = []
    if device_type != "cuda":
        needs.append("a CUDA device")
    if processes > 1:
        needs.append("a single process (DDP/FSDP all-reduces are not captured here)")
    if grad_accum != 1:
        needs.append("grad_accum=1")
    if mixed_precision == "fp16":
        needs.append("mixed_precision 'bf16' or 'no' (fp16 loss scaling syncs with the host)")
    if optimizer != "adamw":
        needs.append("optimizer 'adamw'")
    if requested is True:
        if needs:
            raise PeftkitError(
                "cuda_graph=True needs " + ", ".join(needs) + ": change those settings or set "
                "cuda_graph=False"
            )
        if task_reason:
            raise PeftkitError(f"cuda_graph=True cannot train this task: {task_reason}")
        return True, None
    if device_type != "cuda":
        return False, None
    if needs:
        return False, "the captured step needs " + ", ".join(needs)
    if task_reason:
        return False, task_reason
    return True, None


# Below this many training rows (batch rows x steps) compiling a ViT's blocks costs more than it
# saves: ~11 s more per process (warm cache) for ViT-B/16 steps 1.29x faster, 5.8 ms a 64-row
# step on an H100, so ~120k rows break even; a VTAB-1k run (~100k) stays eager, an 8-configuration
# sweep (~800k) compiles (bench/NOTES.md, 2026-12-02).
COMPILE_MIN_ROWS = 250_000


def compile_plan(requested: bool | str, device_type: str, processes: int, rows: int) -> bool:
    """Whether a run compiles its task's repeated blocks: "auto" on one CUDA device for a run of
    at least COMPILE_MIN_ROWS rows; True / False stand."""
    if requested != "auto":
        return bool(requested)
    return device_type == "cuda" and processes == 1 and rows >= COMPILE_MIN_ROWS


def fallback_line(reason: str) -> str:
    """The one line a run prints when "auto" falls back to eager steps."""
    return f"CUDA graph off, eager steps: {reason} (--no-cuda-graph chooses eager steps silently)"
