"""The app's concept jobs trained together: one `diffusion.multitenant.ConceptTrainer` over one
loaded base, stepped by one background thread. A job queued while others train joins them at the
next step (each batch then mixes every job's rows, each routed to its own adapter); a finished or
cancelled job leaves, saved, and the others go on. Each job ends with the adapter it would have
trained alone (multitenant.py), in its own folder.

Jobs train together when they share the core, rank and resolution; a job that differs waits until
the running ones have left. Textual Inversion jobs do not come here (they train token embeddings,
not UNet adapters): the Personalize tab runs them on the job runner as before.

    queue = ConceptQueue(lambda: open_base("starter", "cpu"), "cpu")
    job = runner.track("concept")
    queue.submit(job, lambda base: ConceptJob(job.id, "photos/", ConceptConfig("a photo of sks toy"),
                                              TrainConfig(steps=400, output_dir=str(job.output_dir))))
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from typing import Any

from ..common_kernels.errors import PeftkitError
from .jobs import CANCELLED, DONE, FAILED, Job, error_message


class ConceptQueue:
    """Trains the submitted concept jobs together; `peak` is the most that ever trained at once."""

    def __init__(self, load_base: Callable[[], Any], device: str) -> None:
        self._load_base, self.device = load_base, device
        self._lock = threading.Lock()
        # (app job, factory building its ConceptJob from the loaded base, called when done)
        self._waiting: list[tuple[Job, Callable[[Any], Any], Callable[[], Any] | None]] = []
        self._owners: dict[str, tuple[Job, Callable[[], Any] | None]] = {}
        self._thread: threading.Thread | None = None
        self._trainer = None
        self.peak = 0

    def submit(
        self, job: Job, make: Callable[[Any], Any], on_done: Callable[[], Any] | None = None
    ) -> None:
        """Queue `job`: `make(base)` gives its ConceptJob (named job.id); `on_done()` runs after its
        files are saved and its return value becomes job.result."""
        with self._lock:
            self._waiting.append((job, make, on_done))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="peftkit-concepts", daemon=True
                )
                self._thread.start()

    # ---- the training thread ----
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._waiting and not self._owners:
                        self._thread = None
                        return
                self._admit()
                for name, (job, _) in list(self._owners.items()):
                    if job.should_stop():
                        self._trainer.remove_job(
                            name
                        )  # saves it; the "removed" event finishes the job
                if self._trainer is not None and self._trainer.jobs:
                    self._trainer.step()
        except Exception as err:  # a broken trainer fails every job it held, with the reason
            for job, _ in list(self._owners.values()):
                (job.output_dir / "error.log").write_text(traceback.format_exc())
                job.finish(FAILED, error_message(err))
            with self._lock:
                self._owners.clear()
                self._thread = None

    def _admit(self) -> None:
        """Start every waiting job that can train beside the running ones (a new trainer when none run)."""
        from ..diffusion.multitenant import ConceptTrainer

        with self._lock:
            waiting, self._waiting = self._waiting, []
        kept = []
        for job, make, on_done in waiting:
            if job.should_stop():
                job.finish(CANCELLED, "cancelled before it started")
                continue
            try:
                if self._trainer is None:
                    self._trainer = ConceptTrainer(
                        self._load_base(),
                        cpu=self.device == "cpu",
                        on_event=self._event,
                        mixed_precision="auto",
                        cuda_graph=self.device.startswith("cuda"),
                    )
                concept = make(self._trainer.base)
                try:
                    self._trainer.check_joinable(concept)
                except PeftkitError as err:
                    if not self._trainer.jobs:
                        raise
                    job.emit(
                        {
                            "kind": "message",
                            "text": f"waiting for the running jobs to finish ({err})",
                        }
                    )
                    kept.append((job, make, on_done))
                    continue
                job.begin()
                self._owners[job.id] = (job, on_done)
                self._trainer.add_job(concept)
                self.peak = max(self.peak, len(self._trainer.jobs))
                job.emit(
                    {
                        "kind": "message",
                        "text": f"training with {len(self._trainer.jobs) - 1} other job(s)",
                    }
                )
            except Exception as err:
                self._owners.pop(job.id, None)
                job.output_dir.mkdir(parents=True, exist_ok=True)
                (job.output_dir / "error.log").write_text(traceback.format_exc())
                job.finish(FAILED, error_message(err))
        with self._lock:
            self._waiting = kept + self._waiting

    def _event(self, event: dict) -> None:
        owner = self._owners.get(event.get("job"))
        if owner is None:
            return
        job, on_done = owner
        kind = event["kind"]
        if kind in ("step", "eval", "message"):
            job.emit(event)
            return
        if kind not in ("done", "removed", "failed"):
            return
        del self._owners[job.id]
        if kind == "failed":
            job.finish(FAILED, event.get("error") or "training failed")
            return
        try:
            job.result = on_done() if on_done is not None else None
        except Exception as err:
            job.finish(FAILED, error_message(err))
            return
        if kind == "removed":
            job.finish(
                CANCELLED,
                f"cancelled at step {event['step']}; results so far are in {job.output_dir}",
            )
        else:
            job.finish(DONE, f"done: results in {job.output_dir}")
