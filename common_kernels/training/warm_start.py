"""A training command's set-up, shortened without changing what it computes: the cyclic garbage
collector kept off the objects the libraries build while they import. Timings: the `set-up` line
of a run (engine.timing_line).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[Callable[[], None]]:
    """Run a command with the cyclic garbage collector off until it calls the yielded `loaded()`.

    Importing torch, diffusers and transformers and building a pipeline makes millions of objects
    that live as long as the run and almost no garbage, yet each full collection walks them all:
    0.7 s of a 3.3 s set-up on 2 CPU cores. `loaded()` freezes them (`gc.freeze`: later
    collections skip them) and turns the collector back on for the run; leaving the block
    unfreezes them and restores the collector, so an in-process caller is left as it was.

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
