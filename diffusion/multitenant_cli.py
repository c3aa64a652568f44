"""`peftkit train-concepts --jobs jobs.yaml`: train several concept adapters together over one
frozen UNet (multitenant.py), each job's folder ending with what train-concept writes.

    model: ./sd15                  # base pipeline for every job (--model overrides); SD3/Flux too
    mixed_precision: auto          # auto (bf16 on a GPU that has it) | no | bf16, for the whole run
    attention: auto                # auto | sdpa | xformers;  cpu: true trains on the CPU
    cuda_graph: auto               # auto (on when training on a GPU) | true | false: each step as one CUDA graph
    output: out                    # a job's output defaults to out/<name>
    defaults: {rank: 16, steps: 800, lr: 1.0e-4}   # any job key, for every job
    jobs:
      - name: dog
        images: photos/dog         # paths are relative to this file's folder
        prompt: a photo of sks dog
      - name: cat
        images: photos/cat
        prompt: a photo of sks cat
        class_prompt: a photo of a cat
        batch_size: 2

Job keys: name, images, prompt, output, class_dir; the concept settings of train-concept
(method, rank, alpha, block_size, targets, class_prompt, num_class_images, prior_weight,
min_snr_gamma, offset_noise, gradient_checkpointing, resolution, weighting_scheme); a validation
loss (validation_images: a folder, or validation_fraction; report_to: none | tensorboard); and the
job's own schedule (steps, batch_size, lr, weight_decay, warmup_steps, schedule, max_grad_norm,
seed, checkpoint_every, keep_checkpoints, optimizer, max_bad_steps, eval_every). Defaults are
train-concept's: 800 steps, batch 1, lr 1e-4, constant schedule, LoRA rank 4, 512 px.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..common_kernels.args import existing_file
from ..common_kernels.errors import PeftkitError
from ..common_kernels.registry import core_names

RUN_KEYS = {
    "model",
    "mixed_precision",
    "attention",
    "cpu",
    "cuda_graph",
    "output",
    "defaults",
    "jobs",
}
PATH_KEYS = {"images", "output", "class_dir"}
TRAIN_KEYS = {
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_steps",
    "schedule",
    "max_grad_norm",
    "seed",
    "checkpoint_every",
    "keep_checkpoints",
    "optimizer",
    "max_bad_steps",
    "eval_every",
    "grad_accum",
}
TRAIN_DEFAULTS = {"steps": 800, "batch_size": 1, "lr": 1e-4, "schedule": "constant"}
REFUSED_KEYS = {"text_encoder_rank", "validation_every", "grad_accum", "buckets", "new_token"}
UNUSED_KEYS = {
    "validation_prompts",
    "validation_steps",
    "bucket_step",
    "bucket_min_side",
    "bucket_max_side",
    "init_word",
    "token_vectors",
    "token_lr",
}


@dataclass
class JobsFile:
    """A parsed jobs.yaml: the run's settings and its jobs."""

    model: str | None
    mixed_precision: str
    attention: str
    cpu: bool
    jobs: list
    cuda_graph: bool | str = "auto"


def _concept_keys() -> dict[str, str]:
    from .dreambooth import ConceptConfig

    return {f.name: str(f.type) for f in fields(ConceptConfig) if f.name != "instance_prompt"}


def _coerce(where: str, key: str, value: Any, kind: str) -> Any:
    """YAML reads `1e-4` as a string (it wants `1.0e-4`) and users write `"16"`: accept both."""
    if isinstance(value, str) and ("float" in kind or kind == "int"):
        try:
            return int(value) if kind == "int" else float(value)
        except ValueError:
            raise PeftkitError(f"{where}: {key} must be a number, got {value!r}") from None
    if kind.startswith("list") and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _job(where: str, raw: Any, defaults: dict, folder: Path, output: str | None, run: dict):
    from ..common_kernels.training.engine import TrainConfig
    from .dreambooth import ConceptConfig
    from .multitenant import ConceptJob

    if not isinstance(raw, dict):
        raise PeftkitError(
            f"{where}: a job is a mapping of keys (name, images, prompt, ...), got {raw!r}"
        )
    spec = {**defaults, **raw}
    concept_keys = _concept_keys()
    train_kinds = {f.name: str(f.type) for f in fields(TrainConfig)}
    allowed = (
        ({"name", "prompt"} | PATH_KEYS | set(concept_keys) | TRAIN_KEYS)
        - REFUSED_KEYS
        - UNUSED_KEYS
    )
    # Refused keys pass on to ConceptJob, whose message says why they cannot apply here.
    unknown = sorted(set(spec) - allowed - REFUSED_KEYS)
    if unknown:
        raise PeftkitError(
            f"{where}: unknown key(s) {unknown}: allowed job keys are {sorted(allowed)}"
        )
    for key in ("images", "prompt"):
        if not spec.get(key):
            raise PeftkitError(
                f"{where}: '{key}' is missing: every job needs images (a folder) and a prompt"
            )
    images = folder / str(spec["images"])
    if not images.is_dir():
        raise PeftkitError(
            f"{where}: image folder {images} does not exist (paths are relative to {folder})"
        )
    name = str(spec.get("name") or images.name)
    where = f"{where} ({name!r})"
    if "output" in spec:
        out = folder / str(spec["output"])
    elif output:
        out = folder / output / name
    else:
        raise PeftkitError(
            f"{where}: no output folder: set 'output' in the job or at the top of the file"
        )
    concept = {
        k: _coerce(where, k, v, concept_keys[k]) for k, v in spec.items() if k in concept_keys
    }
    if concept.get("validation_images"):
        concept["validation_images"] = str(folder / str(concept["validation_images"]))
    train = {k: _coerce(where, k, v, train_kinds[k]) for k, v in spec.items() if k in TRAIN_KEYS}
    if "method" in concept and concept["method"] not in core_names(aliases=True):
        raise PeftkitError(
            f"{where}: unknown method (core) {concept['method']!r}: use one of "
            + ", ".join(core_names(aliases=True))
        )
    try:
        return ConceptJob(
            name,
            images,
            ConceptConfig(instance_prompt=str(spec["prompt"]), **concept),
            TrainConfig(**{**TRAIN_DEFAULTS, **train}, output_dir=str(out), progress=False, **run),
            folder / str(spec["class_dir"]) if spec.get("class_dir") else None,
        )
    except PeftkitError as err:
        raise PeftkitError(f"{where}: {err}") from None
    except TypeError as err:
        raise PeftkitError(
            f"{where}: a value has the wrong type ({err}): check numbers and lists"
        ) from None


def load_jobs(path: str | Path) -> JobsFile:
    """Read and check a jobs file before anything loads: every message names the job and the fix."""
    import yaml

    from .multitenant import check_compatible

    path = Path(path)
    if not path.is_file():
        raise PeftkitError(f"jobs file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise PeftkitError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list) or not doc["jobs"]:
        raise PeftkitError(
            f"{path}: expected a mapping with a non-empty 'jobs' list (see peftkit train-concepts -h)"
        )
    unknown = sorted(set(doc) - RUN_KEYS)
    if unknown:
        raise PeftkitError(
            f"{path}: unknown top-level key(s) {unknown}: allowed are {sorted(RUN_KEYS)} "
            "(job settings go under 'jobs' or 'defaults')"
        )
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PeftkitError(f"{path}: 'defaults' must be a mapping of job keys")
    mixed_precision = str(doc.get("mixed_precision", "auto"))
    if mixed_precision not in ("auto", "no", "bf16"):
        raise PeftkitError(
            f"{path}: mixed_precision must be 'no' or 'bf16' (or auto) when jobs train together, "
            f"got {mixed_precision!r}"
        )
    run = {"mixed_precision": mixed_precision, "cpu": bool(doc.get("cpu", False))}
    jobs = [
        _job(f"{path}: job {i + 1}", raw, defaults, path.parent, doc.get("output"), run)
        for i, raw in enumerate(doc["jobs"])
    ]
    try:
        check_compatible(jobs)
    except PeftkitError as err:
        raise PeftkitError(f"{path}: {err}") from None
    graph = doc.get("cuda_graph", "auto")
    if graph not in (True, False, "auto"):
        raise PeftkitError(f"{path}: cuda_graph must be auto, true or false, got {graph!r}")
    model = doc.get("model")
    return JobsFile(
        str(path.parent / model) if model and (path.parent / model).exists() else model,
        mixed_precision,
        str(doc.get("attention", "auto")),
        run["cpu"],
        jobs,
        graph,
    )


def train_concepts(argv: list[str]) -> int:
    """Train several concept adapters together: one batch, one adapter per row, over one frozen UNet."""
    from tqdm.auto import tqdm

    from .base import load_base
    from .cli import _summary
    from .multitenant import ConceptTrainer

    parser = argparse.ArgumentParser(
        prog="peftkit train-concepts",
        description=train_concepts.__doc__,
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--jobs",
        required=True,
        type=existing_file,
        help="jobs.yaml describing the run and its jobs",
    )
    parser.add_argument("--model", help="base pipeline (overrides the file's 'model')")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    spec = load_jobs(args.jobs)
    model = args.model or spec.model
    if not model:
        raise PeftkitError(
            f"{args.jobs} names no base model: add 'model: <folder or hub id>' or pass --model"
        )
    bar = tqdm(
        total=sum(j.train.steps for j in spec.jobs),
        desc="train-concepts",
        unit="step",
        disable=args.no_progress,
    )

    def on_event(event: dict) -> None:
        if event["kind"] == "step":
            bar.update(1)
            bar.set_postfix(job=event["job"], loss=f"{event['loss']:.4f}")
        elif event["kind"] == "join" and event["step"]:
            bar.update(event["step"])

    trainer = ConceptTrainer(
        load_base(model, attention=spec.attention),
        spec.mixed_precision,
        spec.cpu,
        on_event,
        cuda_graph=spec.cuda_graph,
    )
    for job in spec.jobs:
        trainer.add_job(job)
    statuses = trainer.run()
    bar.close()
    for job in spec.jobs:
        status = statuses[job.name]
        if status.status == "failed":
            print(f"job {job.name!r} failed: {status.error}")
        else:
            _summary(job.train.output_dir, status.result)
    return 0 if all(s.status == "done" for s in statuses.values()) else 1
