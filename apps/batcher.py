"""The serve worker: one thread runs the pipeline over batches of requests, each row routed to its
own adapter (common_kernels per-sample routing). What keeps one request from stalling the rest: a
bounded queue, limits on pixels x steps x rows per call, a check between denoising steps that stops
work nobody waits for any more (client gone, timed out, shutdown), and isolation of rows whose
adapter cannot load or whose batch fails.
"""

# No "from __future__ import annotations": FastAPI reads the endpoint annotations at runtime.
import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from peftkit.common_kernels import AdapterHandle, PeftkitError, load_adapter, routing

log = logging.getLogger("peftkit.serve")


@dataclass(frozen=True)
class Request:
    prompt: str
    adapter: str | None = None
    scale: float = 1.0
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    negative_prompt: str = ""

    def batch_key(self) -> tuple:
        return (self.steps, self.guidance, self.width, self.height)

    def work(self) -> int:
        return self.width * self.height * self.steps


@dataclass(frozen=True)
class Limits:
    """What one request and one pipeline call may cost: pixels per image, denoising steps, and
    pixel-steps summed over a call's rows (by default one maximal request alone)."""

    max_pixels: int
    max_steps: int = 100
    max_work: int | None = None

    @classmethod
    def for_pipe(cls, pipe, max_steps: int = 100) -> "Limits":
        """Up to twice the base's native side (2048 px is 16x the work of 512 px on SD 1.5)."""
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return cls(max_pixels=(2 * native) ** 2, max_steps=max_steps)

    @property
    def work(self) -> int:
        return self.max_work or self.max_pixels * self.max_steps

    def check(self, request: Request) -> None:
        pixels = request.width * request.height
        if pixels > self.max_pixels:
            raise TooLarge(
                f"{request.width}x{request.height} is {pixels} pixels, over this server's limit "
                f"of {self.max_pixels}: ask for a smaller image"
            )
        if request.steps > self.max_steps:
            raise TooLarge(f"{request.steps} steps is over this server's limit of {self.max_steps}")
        if request.work() > self.work:
            raise TooLarge(
                f"width x height x steps = {request.work()} is over this server's limit of "
                f"{self.work}: fewer steps or a smaller image"
            )


class UnknownAdapter(PeftkitError):
    pass


class TooLarge(PeftkitError):
    pass


class QueueFull(PeftkitError):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Stopped(PeftkitError):
    """The work was abandoned: its client left or timed out, or the server is shutting down."""


class Ticket(Future):
    """A queued request's future image; `abandon` stops its work at the next denoising step."""

    def __init__(self, request: Request) -> None:
        super().__init__()
        self.request = request
        self.abandoned = threading.Event()

    def abandon(self) -> None:
        self.abandoned.set()
        self.cancel()  # still queued: never runs


class AdapterCache:
    """Adapter files `<folder>/<name>.safetensors`, injected into the UNet on demand; least
    recently used ones are unloaded once their parameters exceed `max_bytes`."""

    def __init__(self, unet: torch.nn.Module, folder: str | Path, max_bytes: int) -> None:
        self.unet, self.folder, self.max_bytes = unet, Path(folder), max_bytes
        self.loaded: OrderedDict[str, AdapterHandle] = OrderedDict()

    def available(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.safetensors"))

    @staticmethod
    def _bytes(handle: AdapterHandle) -> int:
        return sum(p.numel() * p.element_size() for p in handle.trainable_parameters())

    def acquire(self, names: list[str]) -> dict[str, PeftkitError]:
        """Load every adapter in `names` that can be, evicting others if over budget; returns the
        ones that could not, each with a message naming the adapter and not the server's paths."""
        failed: dict[str, PeftkitError] = {}
        for name in names:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            path = self.folder / f"{name}.safetensors"
            if not path.is_file():
                failed[name] = UnknownAdapter(
                    f"unknown adapter {name!r}: available adapters are {self.available()}"
                )
                continue
            try:
                handle = load_adapter(self.unet, path, name=name)
            except PeftkitError as err:
                why = str(err).replace(str(path), f"{name}.safetensors")
                failed[name] = PeftkitError(
                    f"adapter {name!r} cannot be used: {why.replace(str(self.folder), '<adapters>')}"
                )
                continue
            except Exception:
                log.exception("loading adapter %r failed", name)
                failed[name] = PeftkitError(
                    f"adapter {name!r} cannot be used: it failed to load (see the server's log)"
                )
                continue
            handle.disable()  # rows reach it only through routing
            self.loaded[name] = handle
        keep = set(names)
        while sum(self._bytes(h) for h in self.loaded.values()) > self.max_bytes:
            victim = next((n for n in self.loaded if n not in keep), None)
            if victim is None:
                break
            self.loaded.pop(victim).unload()
        return failed


class Batcher:
    """One worker thread runs the pipeline; `submit` returns a Ticket (a Future of a PIL image)."""

    def __init__(
        self,
        pipe,
        cache: AdapterCache,
        max_batch: int = 8,
        window_s: float = 0.02,
        limits: Limits | None = None,
        max_queue: int = 64,
    ) -> None:
        self.pipe, self.cache, self.max_batch, self.window_s = pipe, cache, max_batch, window_s
        self.limits = limits or Limits.for_pipe(pipe)
        self.queue: queue.Queue[Ticket] = queue.Queue(maxsize=max_queue)
        self.batches_run = self.steps_run = 0
        self.seconds_per_batch = 1.0
        self.busy_since: float | None = None
        self.last_progress = time.monotonic()
        self.closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="peftkit-batcher")
        self._thread.start()

    def submit(self, request: Request) -> Ticket:
        self.limits.check(request)
        if self.closing.is_set():
            raise Stopped("the server is shutting down: try again later")
        ticket = Ticket(request)
        try:
            self.queue.put_nowait(ticket)
        except queue.Full:
            waits = self.queue.qsize() / self.max_batch + 1
            raise QueueFull(
                f"the server is busy ({self.queue.qsize()} requests waiting): retry later",
                max(1, round(waits * self.seconds_per_batch)),
            ) from None
        return ticket

    def health(self, stall_s: float) -> dict:
        """ok is False when the worker died or a batch made no denoising step for `stall_s`."""
        now = time.monotonic()
        quiet = now - self.last_progress if self.busy_since is not None else 0.0
        alive = self._thread.is_alive()
        return {
            "ok": alive and quiet < stall_s and not self.closing.is_set(),
            "worker_alive": alive,
            "busy": self.busy_since is not None,
            "seconds_since_progress": round(quiet, 3),
            "queued": self.queue.qsize(),
            "batches_run": self.batches_run,
        }

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop within one denoising step: the running batch and every queued request fail."""
        self.closing.set()
        try:
            self.queue.put_nowait(None)  # type: ignore[arg-type]  # wakes an idle worker
        except queue.Full:
            pass  # a full queue wakes the worker by itself
        self._thread.join(timeout_s)

    def _collect(self) -> list[Ticket]:
        items = [self.queue.get()]
        deadline = time.monotonic() + self.window_s
        while len(items) < self.max_batch and items[-1] is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                items.append(self.queue.get(timeout=left))
            except queue.Empty:
                break
        # A ticket abandoned while it waited is dropped here (cancel() already told its caller).
        return [t for t in items if t is not None and t.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while not self.closing.is_set():
            tickets = self._collect()
            groups: dict[tuple, list[Ticket]] = {}
            for ticket in tickets:
                groups.setdefault(ticket.request.batch_key(), []).append(ticket)
            for group in groups.values():
                for part in _split_scales(group):
                    rows = max(1, self.limits.work // part[0].request.work())
                    for start in range(0, len(part), rows):
                        self._run(part[start : start + rows])
        self._fail_queued()

    def _fail_queued(self) -> None:
        while True:
            try:
                ticket = self.queue.get_nowait()
            except queue.Empty:
                return
            if ticket is not None and ticket.set_running_or_notify_cancel():
                ticket.set_exception(Stopped("the server is shutting down: try again later"))

    def _run(self, tickets: list[Ticket]) -> None:
        if self.closing.is_set():
            for t in tickets:
                t.set_exception(Stopped("the server is shutting down: try again later"))
            return
        failed = self.cache.acquire(
            sorted({t.request.adapter for t in tickets if t.request.adapter})
        )
        for t in tickets:
            if t.request.adapter in failed:
                t.set_exception(failed[t.request.adapter])
        tickets = [t for t in tickets if t.request.adapter not in failed]
        if not tickets:
            return
        started = self.busy_since = self.last_progress = time.monotonic()
        try:
            images = self._forward([t.request for t in tickets], tickets)
        except Stopped as err:
            for t in tickets:
                t.set_exception(err)
            return
        except Exception as err:
            if len(tickets) > 1:  # find the row that breaks the batch; the others still answer
                for t in tickets:
                    self._run([t])
                return
            if not isinstance(err, PeftkitError):
                log.exception("generation failed for %r", tickets[0].request)
            tickets[0].set_exception(err)
            return
        finally:
            self.busy_since = None
        self.batches_run += 1
        self.seconds_per_batch = 0.8 * self.seconds_per_batch + 0.2 * (time.monotonic() - started)
        for ticket, image in zip(tickets, images):
            ticket.set_result(image)

    def _forward(self, requests: list[Request], tickets: list[Ticket]) -> list:
        names = sorted({r.adapter for r in requests if r.adapter})
        for r in requests:
            if r.adapter:
                self.cache.loaded[r.adapter].set_scale(r.scale)
        ids = [names.index(r.adapter) if r.adapter else -1 for r in requests]
        first = requests[0]
        cfg = first.guidance > 1.0

        def between_steps(pipe, step, timestep, kwargs):
            self.steps_run += 1
            self.last_progress = time.monotonic()
            if self.closing.is_set():
                raise Stopped("the server is shutting down: try again later")
            if all(t.abandoned.is_set() for t in tickets):
                raise Stopped("every client of this batch left or timed out")
            return kwargs

        with routing(self.pipe.unet, ids * 2 if cfg else ids, names), torch.no_grad():
            return self.pipe(
                prompt=[r.prompt for r in requests],
                negative_prompt=[r.negative_prompt for r in requests] if cfg else None,
                generator=[torch.Generator(self.pipe.device).manual_seed(r.seed) for r in requests],
                num_inference_steps=first.steps,
                guidance_scale=first.guidance,
                width=first.width,
                height=first.height,
                callback_on_step_end=between_steps,
            ).images


def _split_scales(group: list[Ticket]) -> list[list[Ticket]]:
    """An adapter has one scale per forward: rows asking the same adapter at other scales wait
    for a later pass."""
    parts: list[list[Ticket]] = []
    for ticket in group:
        request = ticket.request
        for part in parts:
            if all(
                t.request.adapter != request.adapter or t.request.scale == request.scale
                for t in part
            ):
                part.append(ticket)
                break
        else:
            parts.append([ticket])
    return parts
