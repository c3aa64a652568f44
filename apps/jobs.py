"""The background job runner the app tabs share: a queue with a concurrency limit, progress events,
cancellation through the training engine's `should_stop`, errors kept as one-line messages (the
traceback goes to the job's error.log, never to the page), and every job's results in its own
output folder.

    runner = JobRunner("app-runs", workers=1)
    job = runner.submit("vit", lambda job: train_vit(config, on_event=job.emit, should_stop=job.should_stop))
    job.wait(); job.status, job.message, job.result

A job's function receives the `Job`: it reports progress with `job.emit(event)` (the engine's
event dicts: kind step/eval/done/...), checks `job.should_stop()` (or hands it to the engine), and
writes its files under `job.output_dir`. Threads, not processes: the model stays in memory for the
tab that trained it, and torch releases the GIL in its kernels.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common_kernels.adapter_file import atomic_write
from ..common_kernels.errors import PeftkitError

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


@dataclass
class Job:
    """One unit of background work and everything the page shows about it."""

    id: str
    kind: str
    output_dir: Path
    status: str = QUEUED
    message: str = "waiting in the queue"
    step: int = 0
    total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    result: Any = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        """Record an engine event (or any dict with a "kind")."""
        with self._lock:
            kind = event.get("kind")
            if kind == "step":
                self.step, self.total = int(event["step"]), int(event.get("total", self.total))
                self.losses.append((self.step, float(event["loss"])))
            elif kind == "eval":
                self.evals.append((int(event["step"]), dict(event["metrics"])))
            elif kind == "message":
                self.message = str(event["text"])

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def cancel(self) -> None:
        """Ask the job to stop: a queued job never starts; a running one stops at its next check."""
        self._stop.set()

    @property
    def progress(self) -> float:
        """Fraction done, 0..1 (1 once finished)."""
        if self.status in FINISHED:
            return 1.0
        return self.step / self.total if self.total else 0.0

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job finished; False on timeout."""
        return self._done.wait(timeout)

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of what the page shows (safe to read while the job runs)."""
        with self._lock:
            return {
                "id": self.id,
                "kind": self.kind,
                "status": self.status,
                "message": self.message,
                "step": self.step,
                "total": self.total,
                "progress": self.progress,
                "losses": list(self.losses),
                "evals": list(self.evals),
                "output_dir": str(self.output_dir),
            }

    def begin(self) -> None:
        """Mark the job running (the runner does this for the jobs it runs itself)."""
        with self._lock:
            self.status, self.message, self.started = RUNNING, "running", time.time()
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def finish(self, status: str, message: str) -> None:
        """End the job as done, failed or cancelled, with the message the page shows."""
        with self._lock:
            self.status, self.message, self.finished = status, message, time.time()
        record = {k: v for k, v in self.snapshot().items() if k not in ("losses", "evals")}
        record.update(
            created=self.created,
            started=self.started,
            finished=self.finished,
            losses=[loss for _, loss in self.losses],
        )
        atomic_write(
            self.output_dir / "job.json",
            lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)),
        )
        self._done.set()


def error_message(err: BaseException) -> str:
    """What the page says about a failed job: the PeftkitError text (written for users), or the
    exception type and first line for anything else."""
    if isinstance(err, PeftkitError):
        return str(err)
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def in_range(label: str, value: float, low: float, high: float) -> float:
    """`value` when finite and within [low, high], else a PeftkitError naming the field: the
    page's sliders bound what a browser sends, this bounds what any API client sends."""
    if not math.isfinite(value) or not low <= value <= high:
        raise PeftkitError(f"{label} must be between {low:g} and {high:g}, got {value:g}")
    return value


def whole_number(value) -> int:
    """A whole number from the page (sliders send floats), or a PeftkitError for NaN/inf/text."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise PeftkitError(f"expected a whole number, got {value!r}") from None


def progress_markdown(snap: dict[str, Any]) -> str:
    """A job snapshot as the page shows it: a progress bar and one status line."""
    pct = int(round(100 * snap["progress"]))
    loss = f" · loss {snap['losses'][-1][1]:.4f}" if snap["losses"] else ""
    bar = f"<progress value='{pct}' max='100' style='width:100%'></progress>"
    return f"{bar}\n\n**{snap['status']}** · step {snap['step']}/{snap['total'] or '?'} ({pct}%){loss} · {snap['message']}"


def refused_markdown(message: str) -> str:
    """What the page says when a job could not even be queued (bad input, full queue)."""
    return f"**not started** · {message}"


class JobRunner:
    """Runs submitted jobs on `workers` threads, at most `max_pending` waiting; each job writes to
    `<root>/<kind>-<n>/`."""

    def __init__(self, root: str | Path, workers: int = 1, max_pending: int = 8) -> None:
        if workers < 1 or max_pending < 0:
            raise PeftkitError(
                f"JobRunner needs workers >= 1 and max_pending >= 0, got {workers}, {max_pending}"
            )
        self.root, self.workers, self.max_pending = Path(root), workers, max_pending
        self.jobs: dict[str, Job] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="peftkit-job")
        self._counts: dict[str, itertools.count] = {}
        self._lock = threading.Lock()

    def submit(self, kind: str, fn: Callable[[Job], Any]) -> Job:
        """Queue `fn(job)`; raises PeftkitError when the queue is full."""
        job = self.track(kind)
        self._pool.submit(self._run, job, fn)
        return job

    def track(self, kind: str) -> Job:
        """A queued job that something else runs (apps/concept_queue.py trains concept jobs together,
        not one per worker): counted against the queue's limit, listed and cancelled like the
        others; whoever runs it calls `begin` and `finish`."""
        with self._lock:
            pending = sum(j.status == QUEUED for j in self.jobs.values())
            busy = sum(j.status == RUNNING for j in self.jobs.values())
            if pending + busy >= self.workers + self.max_pending:
                raise PeftkitError(
                    f"{pending} jobs are already waiting: try again when one has finished, "
                    "or cancel one"
                )
            counter = self._counts.setdefault(kind, itertools.count(1))
            job_id = f"{kind}-{next(counter)}"
            while (self.root / job_id).exists():  # an earlier session's results stay untouched
                job_id = f"{kind}-{next(counter)}"
            job = Job(id=job_id, kind=kind, output_dir=self.root / job_id)
            self.jobs[job_id] = job
        return job

    def _run(self, job: Job, fn: Callable[[Job], Any]) -> None:
        if job.should_stop():
            job.finish(CANCELLED, "cancelled before it started")
            return
        job.begin()
        try:
            job.result = fn(job)
        except Exception as err:  # every failure becomes a message on the page
            (job.output_dir / "error.log").write_text(traceback.format_exc())
            if job.should_stop():  # stopped mid-evaluation or mid-loading: that is a cancel
                job.finish(CANCELLED, f"cancelled at step {job.step}")
            else:
                job.finish(FAILED, error_message(err))
            return
        if job.should_stop():
            job.finish(
                CANCELLED, f"cancelled at step {job.step}; results so far are in {job.output_dir}"
            )
        else:
            job.finish(DONE, f"done: results in {job.output_dir}")

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise PeftkitError(f"no job {job_id!r}: known jobs are {sorted(self.jobs)[-5:]}")
        return self.jobs[job_id]

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.cancel()
        return job

    def shutdown(self, cancel: bool = True) -> None:
        """Stop taking jobs; with `cancel`, ask running and queued ones to stop; wait for them."""
        if cancel:
            for job in self.jobs.values():
                job.cancel()
        self._pool.shutdown(wait=True)
