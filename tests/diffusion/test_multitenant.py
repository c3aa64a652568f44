"""Multi-tenant concept training on the tiny pipeline: jobs trained together end with the adapters
each gets alone, one routed forward of three adapters equals three separate ones, jobs join and
leave (and resume) between steps, and bad jobs files get messages naming the job and the fix.

Tolerance: a job trained through the trainer alone is bit-identical to train_concept; beside other
jobs its LoRA runs in the gathered batched matmul instead of two plain matmuls, which changes
rounding only: every adapter tensor within 5e-4 relative (norm) after 4-6 AdamW steps (most within
5e-5; AdamW divides by the gradient scale, so the smallest gradients pass their rounding on)."""

import dataclasses
import json

import pytest
import torch

from peftkit.common_kernels.adapter_file import read_tensors
from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.inject import adapted_layers, routing
from peftkit.common_kernels.training.engine import TrainConfig
from peftkit.diffusion.base import load_base
from peftkit.diffusion.data import ConceptDataset
from peftkit.diffusion.dreambooth import UNET_FILE, ConceptConfig, ConceptTask, train_concept
from peftkit.diffusion.multitenant import ConceptJob, ConceptTrainer
from peftkit.diffusion.multitenant_cli import load_jobs, train_concepts

from .conftest import write_concept_images

TOLERANCE = 5e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    return [write_concept_images(root / f"concept{i}", count=3 + i, seed=i) for i in range(3)]


def _job(folders, i, out, **train):
    concept = ConceptConfig(instance_prompt=f"a photo of sks{'abc'[i]} toy", resolution=16, rank=4)
    config = TrainConfig(
        **{
            "steps": 4,
            "batch_size": 2,
            "lr": 1e-2,
            "schedule": "constant",
            "seed": i,
            "progress": False,
            "output_dir": str(out),
            **train,
        }
    )
    return ConceptJob(f"job{i}", folders[i], concept, config)


def _alone(tiny_sd_path, job, out):
    config = dataclasses.replace(job.train, output_dir=str(out))
    train_concept(load_base(str(tiny_sd_path)), job.images, job.concept, config)
    return read_tensors(out / UNET_FILE)[0]


def _assert_same_adapter(ours, alone, tolerance=TOLERANCE):
    assert ours.keys() == alone.keys()
    for key in alone:
        err = float((ours[key] - alone[key]).norm() / alone[key].norm())
        assert err < tolerance, (key, err)


def test_three_jobs_trained_together_equal_each_trained_alone(tiny_sd_path, folders, tmp_path):
    # Different images, prompts, seeds, batch sizes, lengths, schedules and losses; job a clips hard,
    # so a shared clip norm would show.
    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text(f"""
model: {tiny_sd_path}
output: out
defaults: {{resolution: 16, rank: 4, lr: 1e-2}}
jobs:
  - {{name: a, images: {folders[0]}, prompt: a photo of sksa toy, steps: 4, max_grad_norm: 0.05, seed: 0}}
  - {{name: b, images: {folders[1]}, prompt: a photo of sksb toy, steps: 6, batch_size: 2, seed: 1,
      schedule: cosine, warmup_steps: 2, min_snr_gamma: 5.0, offset_noise: 0.1, lr: 3e-3}}
  - {{name: c, images: {folders[2]}, prompt: a photo of sksc toy, steps: 5, batch_size: 3, seed: 2, alpha: 8}}
""")
    assert train_concepts(["--jobs", str(jobs_file), "--no-progress"]) == 0
    for job in load_jobs(jobs_file).jobs:
        out = tmp_path / "out" / job.name
        alone = _alone(tiny_sd_path, job, tmp_path / "alone" / job.name)
        _assert_same_adapter(read_tensors(out / UNET_FILE)[0], alone)
        written = {p.name for p in (tmp_path / "alone" / job.name).iterdir()}
        assert (
            written <= {p.name for p in out.iterdir()}
            and "pytorch_lora_weights.safetensors" in written
        )
        assert json.loads((out / "train.json").read_text())["steps"] == job.train.steps


def test_one_job_in_the_trainer_is_bit_identical_to_train_concept(tiny_sd_path, folders, tmp_path):
    job = _job(folders, 0, tmp_path / "trainer", max_grad_norm=0.05, batch_size=1)
    trainer = ConceptTrainer(load_base(str(tiny_sd_path)))
    trainer.add_job(job)
    status = trainer.run()["job0"]
    alone = _alone(tiny_sd_path, job, tmp_path / "alone")
    ours = read_tensors(tmp_path / "trainer" / UNET_FILE)[0]
    assert all(torch.equal(ours[k], alone[k]) for k in alone)
    assert status.status == "done" and status.result.metrics["instance_loss"] > 0


@pytest.mark.parametrize("draw_ahead", [False, True])
def test_jobs_join_and_leave_between_steps_and_resume(tiny_sd_path, folders, tmp_path, draw_ahead):
    # With draw_ahead the leaving job has its next rows drawn: its checkpoint must not count them.
    events = []
    trainer = ConceptTrainer(
        load_base(str(tiny_sd_path)), on_event=events.append, draw_ahead=draw_ahead
    )
    first = _job(folders, 0, tmp_path / "first", steps=4, checkpoint_every=10)
    late = _job(folders, 1, tmp_path / "late", steps=3)
    trainer.add_job(first)
    trainer.step()
    trainer.step()
    trainer.add_job(late)
    trainer.step()
    left = trainer.remove_job("job0")
    assert left.status == "removed" and left.result.step == 3 and trainer.jobs == ["job1"]
    assert all("job0" not in layer.deltas for layer in adapted_layers(trainer.base.unet))
    assert trainer.run()["job1"].status == "done"
    assert {e["kind"] for e in events} >= {"join", "step", "removed", "done"}
    _assert_same_adapter(
        read_tensors(tmp_path / "late" / UNET_FILE)[0],
        _alone(tiny_sd_path, late, tmp_path / "late-alone"),
    )
    # The leaving job saved its adapter after 3 steps and a checkpoint; rejoining resumes there.
    short = dataclasses.replace(first, train=dataclasses.replace(first.train, steps=3))
    _assert_same_adapter(
        read_tensors(tmp_path / "first" / UNET_FILE)[0],
        _alone(tiny_sd_path, short, tmp_path / "first-3"),
    )
    trainer.add_job(first)
    assert trainer.results()["job0"].result.resumed_from == 3
    assert trainer.run()["job0"].result.step == 4
    _assert_same_adapter(
        read_tensors(tmp_path / "first" / UNET_FILE)[0],
        _alone(tiny_sd_path, first, tmp_path / "first-4"),
    )
    with pytest.raises(PeftkitError, match="no running job named 'job0'"):
        trainer.remove_job("job0")


def test_a_job_with_nan_losses_fails_alone_and_the_others_train_on(tiny_sd_path, folders, tmp_path):
    trainer = ConceptTrainer(load_base(str(tiny_sd_path)))
    trainer.add_job(_job(folders, 0, tmp_path / "good", steps=3))
    trainer.add_job(_job(folders, 1, tmp_path / "bad", steps=3, max_bad_steps=2))
    broken = trainer._running["job1"].task
    broken.score = lambda rows, pred: pred.sum() * float("nan")
    statuses = trainer.run()
    assert statuses["job1"].status == "failed" and "NaN" in statuses["job1"].error
    assert (
        statuses["job1"].result.skipped_steps == 2 and not (tmp_path / "bad" / UNET_FILE).exists()
    )
    assert statuses["job0"].status == "done" and len(statuses["job0"].result.losses) == 3
    assert all(
        torch.isfinite(p).all() for p in read_tensors(tmp_path / "good" / UNET_FILE)[0].values()
    )


def test_cuda_graph_steps_need_a_gpu(tiny_sd_path):
    # The graphed step itself is checked against the eager one on a GPU (bench/multitenant.py).
    with pytest.raises(PeftkitError, match="cuda_graph=True needs a CUDA device"):
        ConceptTrainer(load_base(str(tiny_sd_path)), cpu=True, cuda_graph=True)


@pytest.mark.parametrize("method", ["lora", "kron", "oft"])
def test_a_mixed_batch_of_three_adapters_equals_three_separate_forwards(
    tiny_sd_path, folders, method
):
    base = load_base(str(tiny_sd_path))
    config = ConceptConfig(
        instance_prompt="sks toy", resolution=16, rank=4, block_size=8, method=method
    )
    tasks = [
        ConceptTask(base, ConceptDataset(folders[i], "sks toy", 16), config, seed=i, name=f"c{i}")
        for i in range(3)
    ]
    torch.manual_seed(0)
    with torch.no_grad():
        for task in tasks:
            for p in task.unet_handle.trainable_parameters():
                p.normal_(std=0.1)
    x, t = torch.randn(6, 4, 8, 8), torch.tensor([10, 200, 400, 600, 800, 999])
    hidden, _ = base.encode_prompt(["sks toy"] * 6)
    ids = [0, 2, 1, 0, 2, 1]
    with torch.no_grad():
        with routing(base.unet, ids, [task.unet_handle.name for task in tasks]):
            mixed = base.unet(x, t, encoder_hidden_states=hidden).sample
        for k, task in enumerate(tasks):
            for other in tasks:
                (other.unet_handle.enable if other is task else other.unet_handle.disable)()
            rows = [i for i, j in enumerate(ids) if j == k]
            alone = base.unet(x[rows], t[rows], encoder_hidden_states=hidden[rows]).sample
            assert float((mixed[rows] - alone).norm() / alone.norm()) < 1e-5


def _write_jobs(tmp_path, folders, body, header="output: out\n"):
    path = tmp_path / "jobs.yaml"
    path.write_text(header + body.format(a=folders[0], b=folders[1]))
    return path


BAD_JOBS = {
    "missing folder": (
        "jobs:\n  - {{images: nowhere, prompt: p}}\n",
        r"image folder .*nowhere does not exist",
    ),
    "unknown core": (
        "jobs:\n  - {{images: {a}, prompt: p, method: nope}}\n",
        r"unknown method \(core\) 'nope'",
    ),
    "mixed cores": (
        "jobs:\n  - {{images: {a}, prompt: p}}\n  - {{images: {b}, prompt: q, method: kron}}\n",
        r"job 'concept1' uses method 'kron' but job 'concept0' uses 'lora'",
    ),
    "mixed ranks": (
        "jobs:\n  - {{images: {a}, prompt: p, rank: 4}}\n  - {{images: {b}, prompt: q, rank: 8}}\n",
        r"job 'concept1' has rank 8 but job 'concept0' has rank 4",
    ),
    "unknown key": (
        "jobs:\n  - {{images: {a}, prompt: p, learning_rate: 1}}\n",
        r"job 1: unknown key\(s\) \['learning_rate'\]: allowed job keys are \['alpha', 'batch_size'",
    ),
    "no prompt": ("jobs:\n  - {{images: {a}}}\n", r"job 1: 'prompt' is missing"),
    "text encoder": (
        "jobs:\n  - {{images: {a}, prompt: p, text_encoder_rank: 4}}\n",
        r"text_encoder_rank is set",
    ),
    "same name": (
        "jobs:\n  - {{images: {a}, prompt: p, name: x}}\n  - {{images: {b}, prompt: q, name: x}}\n",
        r"several jobs have the name 'x'",
    ),
    "bad number": (
        "jobs:\n  - {{images: {a}, prompt: p, lr: fast}}\n",
        r"lr must be a number, got 'fast'",
    ),
    "bad value": (
        "jobs:\n  - {{images: {a}, prompt: p, steps: 0}}\n",
        r"job 1 \('concept0'\): TrainConfig.steps must be >= 1",
    ),
    "no jobs": ("jobs: []\n", r"non-empty 'jobs' list"),
    "fp16": (
        "mixed_precision: fp16\njobs:\n  - {{images: {a}, prompt: p}}\n",
        r"mixed_precision must be 'no' or 'bf16'",
    ),
    "bad graph": (
        "cuda_graph: sometimes\njobs:\n  - {{images: {a}, prompt: p}}\n",
        r"cuda_graph must be auto, true or false, got 'sometimes'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
def test_bad_jobs_files_name_the_job_and_the_fix(tmp_path, folders, case):
    body, message = BAD_JOBS[case]
    with pytest.raises(PeftkitError, match=message):
        load_jobs(_write_jobs(tmp_path, folders, body))


def test_a_good_jobs_file_reads_numbers_lists_and_defaults(tmp_path, folders):
    path = _write_jobs(
        tmp_path,
        folders,
        "defaults: {{rank: 8, lr: 1e-4}}\njobs:\n"
        "  - {{images: {a}, prompt: p, targets: 'attn, ff', output: mine}}\n"
        "  - {{images: {b}, prompt: q}}\n",
    )
    spec = load_jobs(path)
    first, second = spec.jobs
    assert (
        first.train.lr == 1e-4
        and first.concept.rank == 8
        and first.concept.targets == ["attn", "ff"]
    )
    assert first.train.output_dir == str(tmp_path / "mine")
    assert second.train.output_dir == str(tmp_path / "out" / "concept1")
    assert (second.train.steps, second.train.batch_size, second.train.schedule) == (
        800,
        1,
        "constant",
    )
    assert spec.cuda_graph == "auto"  # graphed steps wherever training runs on a GPU
    with pytest.raises(PeftkitError, match="no base model"):
        train_concepts(["--jobs", str(path), "--no-progress"])
