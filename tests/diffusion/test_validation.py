"""The validation loss of a concept run: held-out images scored at fixed noise and timesteps every
N steps, logged beside the training loss in metrics.jsonl (and TensorBoard), across a resume."""

import json
import sys

import pytest

from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training.engine import TrainConfig
from peftkit.common_kernels.training.trackers import METRICS_FILE, MetricsLog
from peftkit.diffusion.base import load_base
from peftkit.diffusion.data import ConceptDataset, held_out
from peftkit.diffusion.dreambooth import ConceptConfig, train_concept

from .conftest import write_concept_images


def _run(tiny_sd_path, images, out, steps=6, train=None, **kw):
    config = ConceptConfig(instance_prompt="sks toy", resolution=16, rank=4, **kw)
    tc = TrainConfig(
        steps=steps,
        batch_size=2,
        lr=3e-2,
        schedule="constant",
        progress=False,
        output_dir=str(out),
        **(train or {}),
    )
    return train_concept(load_base(str(tiny_sd_path)), images, config, tc)


def _lines(out):
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def test_held_out_share_is_seeded_and_disjoint(tmp_path):
    images = ConceptDataset(write_concept_images(tmp_path / "img", count=5), "sks toy", 16)
    train, held = held_out(images, None, 0.4, seed=3)
    again, _ = held_out(images, None, 0.4, seed=3)
    assert len(held) == 2 and len(train) == 3
    assert not set(train.paths) & set(held.paths) and train.paths == again.paths
    with pytest.raises(PeftkitError, match="leaves none to train on"):
        images.split(0.95, seed=0)


def test_validation_loss_is_logged_beside_the_training_loss(tiny_sd_path, concept_dir, tmp_path):
    val = write_concept_images(tmp_path / "val", count=2, seed=5)
    task, result = _run(
        tiny_sd_path, concept_dir, tmp_path / "out", validation_images=str(val), train={}
    )
    lines = _lines(tmp_path / "out")
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "validation_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert [r["loss"] for r in steps] == pytest.approx(result.losses)
    # no cadence given: a tenth of the run (every step here), each with the instance loss too
    assert [r["step"] for r in evals] == list(range(1, 7))
    assert all(r["instance_loss"] > 0 for r in evals)
    # fixed noise and timesteps: scoring the same adapter again gives the same number
    held = task.held
    assert task.fixed_loss(which=held) == pytest.approx(evals[-1]["validation_loss"], rel=1e-6)
    task.unet_handle.disable()
    untrained = task.fixed_loss(which=held)
    assert untrained == pytest.approx(task.fixed_loss(which=held), rel=1e-6)
    assert untrained != pytest.approx(evals[-1]["validation_loss"], rel=1e-4)


def test_resumed_run_logs_every_step_once(tiny_sd_path, concept_dir, tmp_path):
    out = tmp_path / "out"
    kw = {"validation_fraction": 0.25, "train": {"checkpoint_every": 3, "eval_every": 2}}
    _run(tiny_sd_path, concept_dir, out, steps=4, **kw)
    # a crash after step 4's line but before its checkpoint: the line is written again
    _, result = _run(tiny_sd_path, concept_dir, out, steps=6, **kw)
    assert result.resumed_from == 3
    lines = _lines(out)
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in lines if "validation_loss" in r] == [2, 4, 6]


def test_tensorboard_gets_the_scalars(tiny_sd_path, concept_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    _run(tiny_sd_path, concept_dir, out, steps=4, validation_fraction=0.25, report_to="tensorboard")
    (events,) = [p.parent for p in (out / "logs").rglob("events.out.tfevents.*")]
    acc = EventAccumulator(str(events))
    acc.Reload()
    losses = [r for r in _lines(out) if "loss" in r]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in losses], rel=1e-6
    )
    assert len(acc.Scalars("eval/validation_loss")) == 4


def test_tensorboard_gets_sample_images(tmp_path):
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, report_to="tensorboard")
    log.images(3, {"00": Image.new("RGB", (8, 6), (200, 10, 10))})
    log({"kind": "done", "step": 3})
    (events,) = [p.parent for p in (tmp_path / "logs").rglob("events.out.tfevents.*")]
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    (image,) = acc.Images("samples/00")
    assert (image.step, image.width, image.height) == (3, 8, 6)


def test_tensorboard_missing_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(PeftkitError, match=r"pip install 'peftkit\[tensorboard\]'"):
        MetricsLog(tmp_path, report_to="tensorboard")
    with pytest.raises(PeftkitError, match="report_to"):
        ConceptConfig(instance_prompt="sks", report_to="wandb")


def test_a_train_concepts_job_logs_its_validation_loss(tiny_sd_path, tmp_path):
    from peftkit.diffusion.multitenant_cli import train_concepts

    write_concept_images(tmp_path / "dog", count=3)
    write_concept_images(tmp_path / "dog-val", count=2, seed=4)
    write_concept_images(tmp_path / "cat", count=3, seed=1)
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"""
model: {tiny_sd_path}
output: out
defaults: {{resolution: 16, rank: 4, steps: 4, batch_size: 2, lr: 1.0e-2}}
jobs:
  - {{name: dog, images: dog, prompt: a photo of sks dog, validation_images: dog-val, eval_every: 2}}
  - {{name: cat, images: cat, prompt: a photo of sks cat}}
""")
    assert train_concepts(["--jobs", str(jobs), "--no-progress"]) == 0
    dog, cat = (_lines(tmp_path / "out" / name) for name in ("dog", "cat"))
    assert [r["step"] for r in dog if "validation_loss" in r] == [2, 4]
    assert [r["step"] for r in cat if "loss" in r] == [1, 2, 3, 4]
    assert not any("validation_loss" in r for r in cat)


def test_train_concept_command_takes_the_new_flags(tiny_sd_path, tmp_path):
    from peftkit.diffusion.cli import train_concept as command

    images = write_concept_images(tmp_path / "img", count=4)
    for i in range(4):
        (images / f"img{i}.txt").write_text("a photo of <toy> thing")
    out = tmp_path / "out"
    argv = ["--model", str(tiny_sd_path), "--images", str(images), "--output", str(out)]
    argv += ["--prompt", "a photo of <toy> thing", "--resolution", "16", "--steps", "2"]
    argv += ["--batch-size", "2", "--no-progress", "--cpu", "--validation-fraction", "0.25"]
    argv += ["--eval-every", "1", "--new-token", "<toy>", "--init-word", "toy", "--buckets"]
    argv += ["--bucket-step", "8", "--token-lr", "5e-3"]
    assert command(argv) == 0
    concept = json.loads((out / "concept.json").read_text())
    assert concept["buckets"] and concept["new_token"] == "<toy>" and concept["token_lr"] == 5e-3
    assert [r["step"] for r in _lines(out) if "validation_loss" in r] == [1, 2]
    assert (out / "learned_embeds.safetensors").is_file()


def test_fixed_loss_forwards_stay_within_the_pixel_budget(
    tiny_sd_path, concept_dir, tmp_path, monkeypatch
):
    """Each forward of a fixed-noise score holds at most FIXED_PIXELS (memory beside a training
    step), and the score is still the mean over every image x repeat."""
    from peftkit.diffusion import dreambooth

    task, _ = _run(tiny_sd_path, concept_dir, tmp_path / "out", steps=1)
    seen, drawn = [], task.drawn_loss

    def counting(model, rows):
        seen.append(rows)
        return drawn(model, rows)

    monkeypatch.setattr(task, "drawn_loss", counting)
    whole = task.fixed_loss(repeats=3)
    assert len(seen) == 1  # every image x 3 at 16 px: one forward
    monkeypatch.setattr(dreambooth, "FIXED_PIXELS", 5 * 16 * 16)
    seen.clear()
    parts = task.fixed_loss(repeats=3)
    n = len(task.sets[0])
    assert len(seen) == -(-n * 3 // 5)
    sizes = [rows.noisy.shape[0] for rows in seen]
    assert max(sizes) <= 5 and sum(sizes) == n * 3
    # other chunks draw other noise: the same estimate, not the same number
    assert parts == pytest.approx(whole, rel=0.5)
