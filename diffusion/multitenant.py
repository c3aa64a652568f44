"""Multi-tenant concept training: K DreamBooth jobs, each with its own images, prompt, settings,
seed and schedule, trained together in one process over one frozen UNet.

Every step runs one UNet forward and backward over a batch that joins each job's rows. Per-sample
routing (`common_kernels.inject.routing`) sends every row through its own job's adapter. The jobs'
rows come in contiguous runs, so on a GPU each Linear layer forms every job's merged weight
W + s_k B_k A_k in one batched GEMM and runs all runs through one batched GEMM over them (the
segmented GEMM of Punica/S-LoRA, `AdaptedLayer._segmented_forward`): the FLOPs of one adapter, plus
K weight-sized copies. On the CPU LoRAs of one shape run as one gathered factored pass
(`LoRADelta.routed_delta`). Other cores route through the same segmented GEMM, with each
job's own folded weight.

Each job ends with the adapter `train_concept` gives it alone, to floating-point rounding:
- the same rows, latent draws, noise and timesteps: its own seeded data order (`engine.batches`)
  and random stream (`dreambooth.RandomStream`); its adapter is initialized from its seed;
- the step's loss is the sum of the jobs' own mean losses, and rows never meet inside the UNet
  (GroupNorm and attention act per sample), so a job's adapter gets exactly its own loss's gradient;
- its own AdamW state, LR schedule, step count and gradient clipping (one global clip norm would
  couple the jobs).

On a GPU, `cuda_graph="auto"` (or True) replays each step's routed forward, scoring, backward, clipping and
AdamW steps as one CUDA graph (captured once per set of jobs; only each job's draws stay eager,
and those for the next step are made while the GPU replays this one), so a step costs about its
GPU time instead of thousands of kernel launches.

    trainer = ConceptTrainer(load_base("./sd15"), mixed_precision="bf16")
    trainer.add_job(ConceptJob("dog", "photos/dog", ConceptConfig("a photo of sks dog", rank=16),
                               TrainConfig(steps=800, batch_size=2, output_dir="out/dog")))
    trainer.run()    # or call trainer.step() in a loop that adds and removes jobs between steps
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..common_kernels.errors import PeftkitError
from ..common_kernels.inject import adapted_layers, routing
from ..common_kernels.registry import core
from ..common_kernels.training.engine import TrainConfig, TrainResult, accelerator_for, batches
from ..common_kernels.training.fast_path import default_device_type, graph_plan, resolve_precision
from ..common_kernels.training.graphed_step import GraphedStep
from ..common_kernels.training.run import Run
from ..common_kernels.training.trackers import MetricsLog
from .base import DiffusionBase
from .data import ConceptDataset, class_images, held_out
from .dreambooth import (
    ConceptConfig,
    ConceptModel,
    ConceptRows,
    ConceptTask,
    save_concept,
    with_validation_cadence,
)


@dataclass
class ConceptJob:
    """One concept to train. `train` is the job's own schedule (steps, batch_size, lr, weight_decay,
    warmup_steps, schedule, max_grad_norm, seed, output_dir, checkpoint_every, keep_checkpoints,
    optimizer, max_bad_steps, eval_every); precision and device belong to the trainer."""

    name: str
    images: str | Path
    concept: ConceptConfig
    train: TrainConfig
    class_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise PeftkitError(
                f"job name {self.name!r} must be letters, digits, '_' or '-' (it names the adapter)"
            )
        refused = {
            "text_encoder_rank": (
                self.concept.text_encoder_rank,
                "text-encoder LoRA (all jobs share the text encoder's cached outputs)",
            ),
            "validation_every": (self.concept.validation_every, "validation images"),
            "buckets": (self.concept.buckets, "aspect buckets (all jobs' rows share one shape)"),
            "new_token": (
                self.concept.new_token,
                "new token embeddings (all jobs share the text encoder's cached outputs)",
            ),
            "grad_accum": (self.train.grad_accum - 1, "gradient accumulation"),
            "cuda_graph": (self.train.cuda_graph is True, "per-job CUDA graphs (the trainer's)"),
        }
        for key, (value, what) in refused.items():
            if value:
                raise PeftkitError(
                    f"job {self.name!r}: {key} is set, but training jobs together has no {what}: "
                    "remove it, or train this job alone with peftkit train-concept"
                )


def check_compatible(jobs: list[ConceptJob]) -> None:
    """Jobs that share batches need one core, one rank (LoRA/LoKr) and one resolution, and distinct
    names and output folders."""
    first = jobs[0]
    for job in jobs[1:]:
        a, b = first.concept, job.concept
        if b.method != a.method:
            raise PeftkitError(
                f"job {job.name!r} uses method {b.method!r} but job {first.name!r} uses {a.method!r}: "
                "jobs trained together share one core; train the others in a second run"
            )
        if core(b.method).uses_rank and b.rank != a.rank:
            raise PeftkitError(
                f"job {job.name!r} has rank {b.rank} but job {first.name!r} has rank {a.rank}: jobs "
                "trained together share one rank (their adapters run as one batched matmul)"
            )
        if b.resolution != a.resolution:
            raise PeftkitError(
                f"job {job.name!r} trains at resolution {b.resolution} but job {first.name!r} at "
                f"{a.resolution}: jobs trained together share one resolution"
            )
    for key, what in ((lambda j: j.name, "name"), (lambda j: j.train.output_dir, "output folder")):
        seen = [key(j) for j in jobs if key(j) is not None]
        twice = sorted({str(v) for v in seen if seen.count(v) > 1})
        if twice:
            raise PeftkitError(
                f"several jobs have the {what} {twice[0]!r}: give each job its own {what}"
            )


@dataclass
class JobStatus:
    """Where a job stands: status is running, done, removed (left early, adapter saved) or failed."""

    name: str
    status: str
    result: TrainResult
    files: list[Path] = field(default_factory=list)
    error: str | None = None


class _Running(Run):
    """A job in the trainer: the engine's bookkeeping of one parameter set (run.py), plus the
    job's data order and the rows it drew ahead. Its events carry the job's name; it evaluates
    with the other jobs' adapters off, and its checkpoints leave out rows drawn ahead."""

    def __init__(self, trainer: ConceptTrainer, job: ConceptJob, task: ConceptTask, params) -> None:
        log = (
            MetricsLog(job.train.output_dir, job.concept.report_to)
            if job.train.output_dir
            else None
        )

        def emit(event: dict) -> None:
            if log is not None:
                log(event)
            trainer._emit({**event, "job": job.name})

        super().__init__(
            task,
            params,
            job.train,
            trainer.accelerator,
            trainer.model,
            emit,
            graphed=trainer.cuda_graph,
            register=False,
        )
        self.trainer, self.job = trainer, job
        # The next step's rows, drawn while this step ran, and the random stream from before them.
        self.ahead: tuple[ConceptRows, torch.Tensor] | None = None

    def start_data(self) -> None:
        self.data = batches(
            self.task.dataset(),
            self.job.train.batch_size,
            self.job.train.seed,
            self.result.step,
            None,
        )

    def evaluate(self) -> None:
        with self.trainer._solo(self):
            super().evaluate()

    def checkpoint(self) -> Path:
        now = self.task.stream.state
        # Rows drawn ahead belong to the next step, not to this checkpoint.
        if self.ahead is not None:
            self.task.stream.state = self.ahead[1]
        try:
            return super().checkpoint()
        finally:
            self.task.stream.state = now


class ConceptTrainer:
    """Trains the jobs added to it, all in every step, over `base`'s one frozen UNet. Jobs join
    (`add_job`) and leave (`remove_job`, or on reaching their steps) between steps; a leaving job
    saves what train-concept writes into its output_dir. Thread-safe: calls wait for a running step.
    `mixed_precision` "auto" is bf16 on a GPU that has it (jobs asking "auto" take the trainer's);
    `cuda_graph` "auto" captures steps on a GPU. `draw_ahead` (default: on with graphs) draws each job's next rows while the current step
    runs; jobs end with the same adapters either way.

    Example:
        >>> trainer = ConceptTrainer(load_base("tests/fixtures/tiny-sd"))   # doctest: +SKIP
        >>> job = ConceptJob("toy", "photos/", ConceptConfig("sks toy"), TrainConfig(steps=4))
        >>> trainer.add_job(job)   # doctest: +SKIP
        >>> trainer.run()["toy"].status   # doctest: +SKIP
        'done'
    """

    def __init__(
        self,
        base: DiffusionBase,
        mixed_precision: str = "no",
        cpu: bool = False,
        on_event: Callable[[dict], None] | None = None,
        cuda_graph: bool | str = "auto",
        draw_ahead: bool | None = None,
    ) -> None:
        if mixed_precision not in ("auto", "no", "bf16"):
            raise PeftkitError(
                f"mixed_precision must be 'no' or 'bf16' (or 'auto') when training jobs together, "
                f"got {mixed_precision!r} (fp16 loss scaling would couple the jobs' optimizers)"
            )
        self.mixed_precision = resolve_precision(mixed_precision, default_device_type(cpu))
        self.base = base
        self.accelerator = accelerator_for(self.mixed_precision, cpu)
        if self.accelerator.num_processes > 1:
            raise PeftkitError(
                "training jobs together runs in one process: start it without `accelerate launch`, "
                "or train each job alone with train-concept on several GPUs"
            )
        self.cuda_graph, _ = graph_plan(cuda_graph, self.accelerator.device.type)
        # Drawing ahead hides a job's ~1 ms of draw launches behind the previous step's GPU work;
        # only a graphed step leaves the host idle to do it (eager steps are busy launching).
        self.draw_ahead = self.cuda_graph if draw_ahead is None else draw_ahead
        self._graph: GraphedStep | None = None
        self._graph_names: list[str] = []
        # Text encoders stay frozen here, so the resolution their conditioning needs is never read.
        self.model = self.accelerator.prepare(ConceptModel(base, [], resolution=0))
        self.model.train()
        self._emit = on_event or (lambda event: None)
        self._running: dict[str, _Running] = {}
        self._finished: dict[str, JobStatus] = {}
        self._lock = threading.RLock()

    # ---- jobs joining and leaving ----
    def add_job(self, job: ConceptJob, resume: bool = True) -> None:
        """Add `job` before the next step: read its images (and class images), inject its adapter,
        cache its latents and prompt embeddings, and resume from the newest checkpoint in its
        output_dir when there is one."""
        with self._lock:
            asked = job.train.mixed_precision  # "auto" takes the trainer's
            if asked not in ("auto", self.mixed_precision):
                raise PeftkitError(
                    f"job {job.name!r} asks for mixed_precision {job.train.mixed_precision!r} but the "
                    f"trainer runs {self.mixed_precision!r}: jobs trained together share one precision"
                )
            check_compatible([r.job for r in self._running.values()] + [job])
            instances, validation = held_out(
                ConceptDataset(job.images, job.concept.instance_prompt, job.concept.resolution),
                job.concept.validation_images,
                job.concept.validation_fraction,
                job.train.seed,
            )
            job.train = with_validation_cadence(job.train, job.concept)
            classes = self._class_images(job) if job.concept.class_prompt else None
            task = ConceptTask(
                self.base,
                instances,
                job.concept,
                classes,
                seed=job.train.seed,
                name=job.name,
                validation=validation,
            )
            try:
                task.prepare(self.accelerator)
                params = [p for p in task.trainable_parameters() if p.requires_grad]
                run = _Running(self, job, task, params)
                if resume:
                    run.resume()
                run.start_data()
            except BaseException:
                task.unet_handle.unload()
                raise
            self._running[job.name] = run
            self._finished.pop(job.name, None)
            self._emit(
                {
                    "kind": "join",
                    "job": job.name,
                    "step": run.result.step,
                    "total": job.train.steps,
                    "resumed_from": run.result.resumed_from,
                }
            )

    def check_joinable(self, job: ConceptJob) -> None:
        """Raise PeftkitError when `job` cannot train beside the running jobs (another core, rank or
        resolution, or a name or output folder in use); a queue then holds it until they leave."""
        with self._lock:
            check_compatible([r.job for r in self._running.values()] + [job])

    def remove_job(self, name: str, save: bool = True) -> JobStatus:
        """Stop job `name` now; with `save`, write its adapter files and a checkpoint to resume from."""
        with self._lock:
            if name not in self._running:
                raise PeftkitError(
                    f"no running job named {name!r}: running jobs are {sorted(self._running)}"
                )
            return self._leave(self._running[name], "removed", save=save)

    def results(self) -> dict[str, JobStatus]:
        """Every job seen: finished ones (done, removed, failed) and the running ones, by name."""
        with self._lock:
            running = {n: JobStatus(n, "running", r.result) for n, r in self._running.items()}
            return {**self._finished, **running}

    @property
    def jobs(self) -> list[str]:
        """Names of the running jobs, in the order they joined (their row order in a batch)."""
        return list(self._running)

    # ---- training ----
    def step(self) -> dict[str, float]:
        """One optimizer step of every running job in one UNet forward and backward. Returns each
        job's loss (NaN/inf: that job skipped the step); jobs that reach their steps leave."""
        with self._lock:
            running = list(self._running.values())
            if not running:
                return {}
            drawn = [self._draw(r) for r in running]
            values = None
            if self.cuda_graph:
                losses = self._graphed(running, drawn).launch(drawn)
                if self.draw_ahead:
                    self._draw_next(running)
                values = losses.tolist()
                if not all(math.isfinite(v) for v in values):
                    # Nothing was updated (found_inf); a bad job's NaN can reach other jobs'
                    # gradients through masked routes, so redo the step eagerly without it.
                    self._graph.skip_pending()
                    values = None
            stepped = values is not None  # the graph took the optimizer steps
            if values is None:
                values = self._eager(running, drawn)
                if self.draw_ahead and not self.cuda_graph:
                    self._draw_next(running)
            for r, value in zip(running, values):
                self._advance(r, value, math.isfinite(value), stepped)
            return {r.job.name: v for r, v in zip(running, values)}

    def _graphed(self, running: list[_Running], drawn: list) -> GraphedStep:
        """The captured step of this set of jobs: each job's clipping and AdamW step after one
        routed forward and backward (captured again when jobs join or leave)."""
        names = [r.job.name for r in running]
        if self._graph is None or self._graph_names != names:
            self._graph = None  # frees the old graph's memory before capturing the new one
            self._graph_names = names
            self._graph = GraphedStep(
                lambda rows: self._losses(running, rows),
                [(r.params, r.optimizer, r.job.train.max_grad_norm) for r in running],
                self.accelerator.autocast,
                context=lambda: self._routed(running, drawn),
                warmups=1,
            )
        return self._graph

    @contextlib.contextmanager
    def _routed(self, running: list[_Running], drawn: list) -> Iterator[torch.Tensor | None]:
        """Routing for a capture; yields the device tensor of row ids the captured kernels read."""
        with self._routing(running, drawn):
            layers = adapted_layers(self.base.unet)
            yield next((l.adapter_ids for l in layers if l.adapter_ids is not None), None)

    def _draw(self, r: _Running) -> ConceptRows:
        """`r`'s rows for this step: drawn ahead during the last step, or now."""
        if r.ahead is not None:
            rows, r.ahead = r.ahead[0], None
            return rows
        with self.accelerator.autocast():
            return r.task.draw(next(r.data))

    def _draw_next(self, running: list[_Running]) -> None:
        """Draw the next step's rows of every job that will have one. They come from the job's own
        data order and random stream, in the order a step-by-step run draws them; a checkpoint
        taken before they are used saves the stream from before them (`_checkpoint`)."""
        for r in running:
            if r.result.step + 1 < r.job.train.steps:
                before = r.task.stream.state
                with self.accelerator.autocast():
                    r.ahead = (r.task.draw(next(r.data)), before)

    def _routing(self, running: list[_Running], drawn: list):
        """Each row through its own job's adapter (row order: the jobs' rows in turn)."""
        ids = [k for k, d in enumerate(drawn) for _ in range(d.noisy.shape[0])]
        return routing(self.base.unet, ids, [r.job.name for r in running])

    def _losses(self, running: list[_Running], drawn: list) -> list:
        """The jobs' losses from one UNet call over all their rows; routing must be active."""
        sizes = [d.noisy.shape[0] for d in drawn]
        cond = {
            "hidden": torch.cat([d.cond["hidden"] for d in drawn]),
            "extra": {
                k: torch.cat([d.cond["extra"][k] for d in drawn]) for k in drawn[0].cond["extra"]
            },
        }
        pred = self.model(
            torch.cat([d.noisy for d in drawn]), torch.cat([d.t for d in drawn]), **cond
        )
        return [r.task.score(d, p) for r, d, p in zip(running, drawn, pred.split(sizes))]

    def _eager(self, running: list[_Running], drawn: list) -> list[float]:
        with self.accelerator.autocast(), self._routing(running, drawn):
            losses = self._losses(running, drawn)
        values = torch.stack([loss.detach().float() for loss in losses]).tolist()
        finite = [math.isfinite(v) for v in values]
        if any(finite):
            self.accelerator.backward(sum(loss for loss, ok in zip(losses, finite) if ok))
        return values

    def run(self, should_stop: Callable[[], bool] | None = None) -> dict[str, JobStatus]:
        """Step until every job has left; `should_stop()` True makes all jobs leave, saved."""
        while self._running:
            if should_stop is not None and should_stop():
                for name in list(self._running):
                    self.remove_job(name)
                break
            self.step()
        return self.results()

    def _advance(self, r: _Running, loss: float, finite: bool, stepped: bool = False) -> None:
        if not finite:
            error = r.skip()
            if error:
                self._leave(
                    r, "failed", error=f"{error}: lower the learning rate or check the images"
                )
            return
        r.advance(loss, r.job.train.batch_size, stepped)
        if r.done:
            self._leave(r, "done")

    def _leave(
        self, r: _Running, status: str, save: bool = True, error: str | None = None
    ) -> JobStatus:
        if self._graph is not None:
            # The set of jobs changes (captured again at the next step): its memory pool is
            # freed before the leaving job's evaluation runs eagerly.
            self._graph.release()
            self._graph = None
        result = r.finish(evaluate=status == "done")
        files: list[Path] = []
        if save and r.job.train.output_dir:
            if status != "done":
                files += [p for p in [r.save_progress()] if p is not None]
            if status != "failed":
                files += save_concept(r.task, r.job.train.output_dir)
        r.task.unet_handle.unload()
        del self._running[r.job.name]
        done = JobStatus(r.job.name, status, result, files, error)
        self._finished[r.job.name] = done
        self._emit(
            {
                "kind": status,
                "job": r.job.name,
                "step": result.step,
                "metrics": result.metrics,
                "files": [str(f) for f in files],
                "error": error,
            }
        )
        return done

    @contextlib.contextmanager
    def _solo(self, keep: _Running | None) -> Iterator[None]:
        """Only `keep`'s adapter (or none) is active: the plain forward then is the job's own model."""
        others = [r.task.unet_handle for r in self._running.values() if r is not keep]
        for handle in others:
            handle.disable()
        try:
            yield
        finally:
            for handle in others:
                handle.enable()

    def _class_images(self, job: ConceptJob) -> ConceptDataset:
        folder = job.class_dir
        if folder is None:
            if not job.train.output_dir:
                raise PeftkitError(
                    f"job {job.name!r}: prior preservation needs class_dir or an output_dir"
                )
            folder = Path(job.train.output_dir) / "class_images"
        # With every adapter off, missing class images come from the base model, as in a solo run.
        with self._solo(None):
            return class_images(
                self.base,
                folder,
                job.concept.class_prompt,
                job.concept.num_class_images,
                job.concept.resolution,
                seed=job.train.seed,
                device=self.accelerator.device,
            )
