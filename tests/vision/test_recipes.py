"""Run defaults seen on small real image sets: every image per epoch, warm-up longer than the run,
per-method learning rates, the summary line, and --help listing defaults."""

import pytest
import torch

from peftkit.apps.cli import main
from peftkit.common_kernels.training.data_cache import batch_rows
from peftkit.vision.cli import _summary
from peftkit.vision.recipes import method_defaults
from peftkit.vision.train import ViTTrainConfig, train_vit, warmup_steps


def test_an_epoch_of_120_images_at_batch_64_sees_all_of_them():
    for epoch in range(3):
        rows = torch.cat([batch_rows(120, 64, 0, 2 * epoch + i) for i in range(2)])
        assert rows.shape == (128,) and set(rows.tolist()) == set(range(120))
    # two processes of 32 split the same global batches
    halves = [batch_rows(120, 32, 0, 1, rank, 2) for rank in range(2)]
    assert torch.equal(torch.cat(halves), batch_rows(120, 64, 0, 1))


def test_per_method_defaults_follow_their_recipes():
    assert method_defaults("lora") == (1e-3, 1e-4)
    assert method_defaults("ssf") == (5e-3, 5e-5)
    assert method_defaults("full") == (1.25e-4, 0.05)
    assert method_defaults("kron") == method_defaults("lora")  # no recipe of its own
    assert method_defaults("ssf+lora") == (1e-3, 1e-4)  # the smaller rate of the parts
    assert method_defaults("full+vpt-deep") == (1.25e-4, 0.05)
    given = ViTTrainConfig(method="ssf", lr=2e-2)
    assert given.optimizer_settings() == (2e-2, 5e-5)


def test_a_warm_up_not_shorter_than_the_run_is_scaled_and_said():
    assert warmup_steps(10, 16, 1600) == (160, None)
    steps, note = warmup_steps(10, 16, 50)
    assert steps == 5 and "160 steps" in note and "5 steps" in note and "\n" not in note


def test_a_short_run_reports_its_epoch_warm_up_and_method_rate(kit, capsys):
    results = train_vit(
        ViTTrainConfig(
            data="builtin:color",
            model="vit_tiny_patch16_224",
            pretrained=False,
            model_kwargs=dict(kit.TINY),
            method="ssf",
            builtin_sizes=(15, 4),
            epochs=2,
            batch_size=8,  # 15 images: 2 steps per epoch (the last one filled up)
            progress=False,
            cpu=True,
        )
    )
    assert results["steps_per_epoch"] == 2 and results["steps"] == 4
    assert (results["lr"], results["weight_decay"], results["warmup_steps"]) == (5e-3, 5e-5, 0)
    assert "warm-up of 20 steps (10 epochs)" in capsys.readouterr().out


def _results(**over):
    base = dict(method="full", task="dtd", splits=["train800val200", "test"], top1=75.0)
    base.update(trainable=1100, trainable_without_head=1000, backbone=1000, images_per_s=10.0)
    base.update(trainable_pct_of_backbone=100.0)
    return {**base, "peak_memory_gib": 0.0, **over}


def test_full_fine_tuning_is_all_of_the_backbone_and_the_cpu_has_no_peak(kit):
    from peftkit.vision.methods import VisionAdapter, ViTMethodConfig

    counts = VisionAdapter(kit.tiny_vit(), ViTMethodConfig.parse("full")).parameter_counts()
    assert counts["trainable_pct_of_backbone"] == 100.0 and counts["trainable"] > counts["backbone"]
    line = _summary(_results())
    assert "100.000% of backbone + 100 head" in line and "peak" not in line
    assert "peak 3.25 GiB" in _summary(_results(peak_memory_gib=3.25))


def test_vit_train_help_lists_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["vit-train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    assert "--epochs EPOCHS passes over the training split (default: 100)" in out
    assert "--batch-size BATCH_SIZE images per step and process (default: 64)" in out
    assert "default: the method's (lora 1e-3, ssf 5e-3" in out and "(default: None)" not in out
