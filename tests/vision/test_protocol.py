"""The VTAB-1k protocol end to end: the grid is tuned on train800 -> val200, each task's best val200
configuration is retrained on train800val200 and tested once, and the table says which means are
which and marks diverged runs."""

import json

import pytest
import torch

from peftkit.apps.cli import main
from peftkit.common_kernels.errors import PeftkitError
from peftkit.vision.protocol import select
from peftkit.vision.sweep import parse_grid, table

TINY_JSON = '{"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}'


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second thread, and lose much when the cores are busy.
    torch.set_num_threads(1)


def _row(task, method, point, top1, trainable=1000):
    return {"task": task, "method": method, "point": point, "top1": top1, "trainable": trainable}


def test_select_takes_the_best_val200_run_first_on_ties_and_none_when_all_diverged():
    rows = [
        _row("dtd", "lora", "lr0.001", 40.0),
        _row("dtd", "lora", "lr0.01", 55.0),
        _row("dtd", "lora", "lr0.1", 55.0),
        _row("dtd", "ssf", "lr0.001", None),
        _row("eurosat", "lora", "lr0.001", None),
        _row("eurosat", "lora", "lr0.01", 70.0),
    ]
    chosen = select(rows)
    assert chosen[("dtd", "lora")]["point"] == "lr0.01"
    assert chosen[("dtd", "ssf")] is None
    assert chosen[("eurosat", "lora")]["top1"] == 70.0


def test_table_marks_a_diverged_run_and_leaves_its_means_undefined():
    rows = [
        _row("dtd", "lora", "", 50.0),
        _row("eurosat", "lora", "", 90.0),
        _row("dtd", "ssf", "", None),
        _row("eurosat", "ssf", "", 80.0),
    ]
    header, body = table(rows)
    assert header[2:] == [
        "dtd",
        "eurosat",
        "Natural mean",
        "Specialized mean",
        "Mean (groups)",
        "Mean (tasks)",
    ]
    assert body[0][2:] == ["50.0", "90.0", "50.0", "90.0", "70.0", "70.0"]
    assert body[1][2:] == ["NaN", "80.0", "NaN", "80.0", "NaN", "NaN"]


def test_grid_names_its_keys_and_refuses_unknown_ones():
    assert parse_grid(["lr=1e-3,1e-2", "weight-decay=0"]) == {
        "lr": [1e-3, 1e-2],
        "weight_decay": [0],
    }
    with pytest.raises(PeftkitError, match="KEY one of"):
        parse_grid(["momentum=0.9"])


def test_auto_protocol_retrains_the_best_val200_configuration_and_tests_it_once(tmp_path):
    args = ["vit-train", "--sweep", "--protocol", "auto", "--data", "builtin:color"]
    args += ["--method", "linear", "--model", "vit_tiny_patch16_224", "--random-init"]
    args += ["--model-kwargs", TINY_JSON, "--builtin-sizes", "48,24", "--epochs", "2"]
    args += ["--batch-size", "16", "--warmup-epochs", "0", "--cpu", "--no-progress"]
    args += ["--grid", "lr=1e-4,3e-2", "--output", str(tmp_path)]
    assert main(args) == 0
    tuned = {
        p.parent.name: json.loads(p.read_text())
        for p in (tmp_path / "tune" / "color" / "linear").glob("*/results.json")
    }
    assert sorted(tuned) == ["lr0.0001", "lr0.03"]
    assert all(r["splits"] == ["train800", "val200"] for r in tuned.values())
    assert all(r["trained_with"] == 2 for r in tuned.values())  # the grid trained in one pass
    best = max(tuned, key=lambda k: tuned[k]["top1"])
    final = json.loads((tmp_path / "final" / "color" / "linear" / "results.json").read_text())
    assert final["splits"] == ["train800val200", "test"]
    assert final["config"]["lr"] == tuned[best]["config"]["lr"]
    assert len(final["history"]) == 1  # test top-1 read once, at the end
    md = (tmp_path / "results.md").read_text()
    assert f"| color | linear | {best} | {tuned[best]['top1']:.1f} | {final['top1']:.1f} |" in md
    assert "Mean (groups): the mean of the group means" in md
    assert (tmp_path / "tune" / "results.md").is_file()
