"""train-concept's options from issue 14: one job from a YAML file (train-concepts' job keys),
the LR schedule choice, caption dropout and random flips, defaults shared with the demo and the
app, defaults shown in --help, the base model's native size, and the smoothed final loss."""

import json
from types import SimpleNamespace

import pytest
import torch

from peftkit.common_kernels.errors import PeftkitError
from peftkit.diffusion.base import load_base
from peftkit.diffusion.cli import smoothed_loss, train_concept
from peftkit.diffusion.concept_defaults import CONCEPT_DEFAULTS
from peftkit.diffusion.data import ConceptDataset
from peftkit.diffusion.dreambooth import CONFIG_FILE, ConceptConfig, ConceptTask


def _prepared(tiny_sd_path, concept_dir, **kw):
    base = load_base(str(tiny_sd_path))
    config = ConceptConfig(instance_prompt="a photo of sks toy", resolution=16, rank=2, **kw)
    task = ConceptTask(base, ConceptDataset(concept_dir, config.instance_prompt, 16), config)
    task.prepare(
        SimpleNamespace(
            device=torch.device("cpu"), mixed_precision="no", process_index=0, num_processes=1
        )
    )
    return task


def test_caption_dropout_trains_that_share_of_rows_on_the_empty_prompt(tiny_sd_path, concept_dir):
    task = _prepared(tiny_sd_path, concept_dir, caption_dropout=0.5)
    empty = task.empty[0][0]
    rows = [task.draw({"instance": torch.arange(4)}) for _ in range(50)]
    hidden = torch.cat([r.cond["hidden"] for r in rows])
    dropped = torch.tensor([torch.equal(h, empty) for h in hidden])
    assert 0.35 < dropped.float().mean() < 0.65  # 200 rows at p = 0.5
    kept = hidden[~dropped]
    captions = task.conds[0][0]
    assert all(any(torch.equal(h, c) for c in captions) for h in kept)


def test_flip_draws_the_mirrored_images_latents_half_of_the_time(tiny_sd_path, concept_dir):
    task = _prepared(tiny_sd_path, concept_dir, flip=True)
    (mean, _), (mirrored, _) = task.latents[0][None], task.mirrored[0][None]
    assert not torch.allclose(mean, mirrored, atol=1e-3)
    torch.manual_seed(0)
    picks = []
    for _ in range(60):
        latents, _ = task._rows(0, torch.zeros(1, dtype=torch.long), None)
        picks.append(float((latents - mirrored[0]).norm()) < float((latents - mean[0]).norm()))
    assert 0.25 < sum(picks) / len(picks) < 0.75


def test_caption_dropout_out_of_range_names_the_field():
    with pytest.raises(PeftkitError, match="caption_dropout"):
        ConceptConfig(instance_prompt="sks toy", caption_dropout=1.0)


def test_help_shows_the_shared_defaults(capsys):
    with pytest.raises(SystemExit):
        train_concept(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"--steps STEPS optimizer steps (default: {CONCEPT_DEFAULTS.steps})" in text
    assert f"--rank RANK rank (cores with one) (default: {CONCEPT_DEFAULTS.rank})" in text
    assert "--lr-schedule {constant,linear,cosine}" in text and "--config CONFIG" in text


def test_demo_app_and_train_concept_share_one_set_of_defaults():
    from peftkit.apps.demo import _parser, concept_job

    demo = _parser().parse_args([])
    assert (demo.steps, demo.rank) == (CONCEPT_DEFAULTS.steps, CONCEPT_DEFAULTS.rank)
    job = concept_job("x", ".", "a photo of sks flower", "oft", output_dir="o")
    assert job.train.steps == CONCEPT_DEFAULTS.steps
    assert job.train.lr == CONCEPT_DEFAULTS.lr_for("oft")
    assert job.train.schedule == CONCEPT_DEFAULTS.lr_schedule
    assert job.concept.rank == CONCEPT_DEFAULTS.rank


def test_smoothed_loss_is_the_mean_of_the_last_steps():
    assert smoothed_loss([5.0] * 10 + [1.0, 3.0], window=2) == 2.0
    assert smoothed_loss([]) is None


def test_config_file_trains_one_job_with_native_size_and_schedule(
    tiny_sd_path, concept_dir, tmp_path, capsys
):
    job = tmp_path / "job.yaml"
    job.write_text(
        f"images: {concept_dir}\nprompt: a photo of sks toy\noutput: out\nmethod: kron\n"
        "rank: 2\nsteps: 3\nschedule: cosine\nwarmup_steps: 1\ncaption_dropout: 0.2\nflip: true\n"
    )
    assert (
        train_concept(
            ["--model", str(tiny_sd_path), "--config", str(job), "--cpu", "--no-progress"]
        )
        == 0
    )
    out = tmp_path / "out"
    config = json.loads((out / CONFIG_FILE).read_text())
    assert (config["method"], config["rank"], config["resolution"]) == ("kron", 2, 16)
    assert config["caption_dropout"] == 0.2 and config["flip"] is True
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss_window"] == 3
    assert f"final loss {summary['final_loss']:.4f}" in capsys.readouterr().out


def test_config_file_with_an_unknown_key_names_it(tiny_sd_path, concept_dir, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"images: {concept_dir}\nprompt: a photo of sks toy\noutput: out\nrnak: 4\n")
    with pytest.raises(PeftkitError, match="rnak"):
        train_concept(["--model", str(tiny_sd_path), "--config", str(job), "--cpu"])
