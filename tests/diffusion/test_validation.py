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
