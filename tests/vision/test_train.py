"""Training on the engine: every method learns a built-in task on CPU, runs resume exactly, the CLI
trains/evaluates/sweeps, adapters round-trip through their file."""

import csv
import json

import pytest
import torch

from peftkit.apps.cli import main
from peftkit.common_kernels.errors import PeftkitError
from peftkit.vision.train import ViTTrainConfig, train_vit

TINY_JSON = '{"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}'
# Per-method learning rates, as in the VTAB-1k recipes (small-parameter methods take larger steps);
# SSF on a random-init backbone needs more epochs to move off it.
RECIPES = {"bitfit": (3e-3, 10), "full": (3e-3, 10), "ssf": (3e-3, 20)}


def _config(kit, tmp_path=None, **overrides):
    base = dict(
        data="builtin:color",
        model="vit_tiny_patch16_224",
        pretrained=False,
        model_kwargs=dict(kit.TINY),
        builtin_sizes=(320, 200),
        epochs=10,
        batch_size=32,
        lr=1e-2,
        warmup_epochs=1,
        progress=False,
        cpu=True,
        eval_every_epochs=100,
        output_dir=str(tmp_path) if tmp_path else None,
    )
    return ViTTrainConfig(**{**base, **overrides})


@pytest.mark.parametrize(
    "method",
    [
        "linear",
        "bitfit",
        "full",
        "vpt-shallow",
        "vpt-deep",
        "adaptformer",
        "ssf",
        "lora",
        "oft",
        "kron",
        "vpt-deep+lora",
    ],
)
def test_every_method_learns_a_builtin_task_well_above_chance(kit, method):
    lr, epochs = RECIPES.get(method, (1e-2, 10))
    results = train_vit(_config(kit, method=method, lr=lr, epochs=epochs))
    print(f"\n{method}: top-1 {results['top1']:.1f}% (chance 25%)")
    assert results["top1"] >= 45.0  # 4 classes: chance is 25%
    assert results["history"] and results["images_per_s"] > 0


def test_interrupted_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(
    kit, tmp_path
):
    common = dict(method="vpt-deep+lora", epochs=2, checkpoint_every_epochs=1, eval_every_epochs=1)
    whole = train_vit(_config(kit, tmp_path / "whole", **common))
    steps = []
    stopped = train_vit(
        _config(kit, tmp_path / "cut", **common),
        on_event=lambda e: steps.append(e.get("step")),
        should_stop=lambda: len(steps) > 0 and steps[-1] is not None and steps[-1] >= 13,
    )
    assert stopped["steps"] == 13
    resumed = train_vit(_config(kit, tmp_path / "cut", **common))
    assert resumed["resumed_from"] == 13 and resumed["steps"] == whole["steps"] == 20
    from safetensors.torch import load_file

    a, b = (
        load_file(tmp_path / "whole" / "adapter.safetensors"),
        load_file(tmp_path / "cut" / "adapter.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed["top1"] == pytest.approx(whole["top1"])


def test_cli_trains_then_evaluates_the_saved_adapter(kit, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "vit-train",
            "--data",
            "builtin:color",
            "--model",
            "vit_tiny_patch16_224",
            "--random-init",
            "--model-kwargs",
            TINY_JSON,
            "--method",
            "ssf+lora",
            "--r",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--lr",
            "1e-2",
            "--builtin-sizes",
            "64,40",
            "--cpu",
            "--no-progress",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "ssf+lora" and results["trainable"] > 0
    assert {"top1", "trainable_pct_of_backbone", "images_per_s", "peak_memory_gib"} <= set(results)
    assert "top-1" in capsys.readouterr().out
    # The weights' source (here: seeded random init) is recorded in the adapter file.
    code = main(
        [
            "vit-eval",
            "--adapter",
            str(out / "adapter.safetensors"),
            "--data",
            "builtin:color",
            "--builtin-sizes",
            "64,40",
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    assert code == 0
    assert json.loads((tmp_path / "eval.json").read_text())["top1"] == pytest.approx(
        results["top1"]
    )


def test_sweep_writes_a_vtab_style_table(kit, tmp_path):
    code = main(
        [
            "vit-train",
            "--sweep",
            "--data",
            "builtin:color,builtin:location",
            "--method",
            "linear,lora",
            "--model",
            "vit_tiny_patch16_224",
            "--random-init",
            "--model-kwargs",
            TINY_JSON,
            "--steps",
            "2",
            "--batch-size",
            "16",
            "--builtin-sizes",
            "32,16",
            "--cpu",
            "--no-progress",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    rows = list(csv.reader((tmp_path / "results.csv").open()))
    assert rows[0] == [
        "Method",
        "Params (M)",
        "color",
        "location",
        "Built-in mean",
        "Mean (groups)",
        "Mean (tasks)",
    ]
    assert [r[0] for r in rows[1:]] == ["linear", "lora"]
    assert "| Method | Params (M) |" in (tmp_path / "results.md").read_text()


def test_adapter_file_loads_onto_a_fresh_backbone_and_refuses_another(kit, tmp_path):
    from peftkit.vision.data import BuiltinTask, Preprocess
    from peftkit.vision.methods import load_vision_adapter
    from peftkit.vision.train import evaluate_model

    results = train_vit(
        _config(
            kit, tmp_path, method="vpt-shallow+adaptformer+ssf", epochs=1, builtin_sizes=(64, 40)
        )
    )
    model = kit.tiny_vit(num_classes=4)  # seed 0 = the run's random init
    adapter = load_vision_adapter(model, tmp_path / "adapter.safetensors")
    assert adapter.config.name == "vpt-shallow+adaptformer+ssf"
    data = BuiltinTask("color", "test", Preprocess(16, (0.5,) * 3, (0.5,) * 3), size=40)
    assert evaluate_model(model, data, 64, torch.device("cpu"))["top1"] == pytest.approx(
        results["top1"]
    )
    wider = kit.tiny_vit(num_classes=4, embed_dim=64)
    with pytest.raises(PeftkitError, match="shape"):
        load_vision_adapter(wider, tmp_path / "adapter.safetensors")
    assert not hasattr(wider, "peftkit_vpt")


def test_bad_method_and_protocol_are_user_errors(kit):
    with pytest.raises(PeftkitError, match="unknown method"):
        _config(kit, method="prompt")
    with pytest.raises(PeftkitError, match="protocol"):
        train_vit(_config(kit, protocol="dev"))
