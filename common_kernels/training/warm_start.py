"""A training command's set-up, shortened without changing what it computes: the cyclic garbage
collector kept off the objects the libraries build while they import, and the CUDA context made in
the background meanwhile. Timings: the `set-up` line of a run (engine.timing_line).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import threading
import time
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[Callable[[], None]]:
    """Run a command with the cyclic garbage collector off until it calls the yielded `loaded()`.

    Importing torch, diffusers and transformers and building a pipeline makes millions of objects
    that live as long as the run and almost no garbage, yet each full collection walks them all:
    0.7 s of a 3.3 s set-up on 2 CPU cores. `loaded()` freezes them (`gc.freeze`: later
    collections skip them) and turns the collector back on for the run; leaving the block
    unfreezes them and restores the collector, so an in-process caller is left as it was. The
    load's own cyclic garbage is frozen with them until then (a tiny run: 7,000 small objects,
    no tensors; collecting it first would cost a full pass, 0.3 s).

    Example:
        >>> with collector_paused() as loaded:
        ...     loaded()
    """
    enabled = gc.isenabled()
    gc.disable()

    def loaded() -> None:
        gc.freeze()
        if enabled:
            gc.enable()

    try:
        yield loaded
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def warm_cuda(cpu: bool) -> Callable[[], None]:
    """Start making the CUDA context and the cuBLAS and cuDNN handles (their libraries load on
    first use) in a thread, so they are ready by the time the libraries have imported instead of
    in the run's prepare phase; returns the function that waits for it. Nothing starts on the CPU
    (`cpu`, or no CUDA) or in a multi-process launch, where each process picks its device later.

    Example:
        >>> ready = warm_cuda(cpu=True)
        >>> ready()
    """
    from .engine import launch_world

    if cpu or launch_world()[1] > 1:
        return lambda: None
    # Not a daemon: a command failing while it loads lets the thread finish before the process
    # exits, rather than ending it half-way through CUDA's initialisation.
    thread = threading.Thread(target=_touch_cuda, name="peftkit-warm-cuda")
    thread.start()
    return thread.join


def _touch_cuda() -> None:
    import torch

    # The tensor ops run with the GIL released, so the imports go on meanwhile; a finished thread
    # hands its cuBLAS/cuDNN handles back to torch's pool, where the main thread picks them up.
    try:
        if not torch.cuda.is_available():
            return
        x = torch.ones(1, 1, 8, 8, device="cuda")
        torch.nn.functional.conv2d(x @ x, x[..., :3, :3])
        torch.cuda.synchronize()
    except Exception:  # the run meets any CUDA error again, where it reports it
        return


class Start:
    """What a command wrapped by `fast_start` is handed: `started` (its time.perf_counter() start,
    for the set-up line), `warm(cpu)` once its flags are parsed, `ready()` before its run starts."""

    def __init__(self, started: float, loaded: Callable[[], None]) -> None:
        self.started, self._loaded, self._cuda = started, loaded, lambda: None

    def warm(self, cpu: bool) -> None:
        self._cuda = warm_cuda(cpu)

    def ready(self) -> None:
        # the run may capture a CUDA graph: no other thread may use the GPU then
        self._cuda()
        self._loaded()


def fast_start(command: Callable[[list[str], Start], int]) -> Callable[[list[str]], int]:
    """A training command `command(argv, start)` as the CLI calls it, `command(argv)`, with the
    collector paused while it loads and the CUDA context made meanwhile (`Start`).

    Example:
        >>> @fast_start
        ... def hello(argv, start):
        ...     start.warm(cpu=True)
        ...     start.ready()
        ...     return 0
        >>> hello([])
        0
    """

    @functools.wraps(command)
    def run(argv: list[str]) -> int:
        started = time.perf_counter()
        with collector_paused() as loaded:
            return command(argv, Start(started, loaded))

    return run
