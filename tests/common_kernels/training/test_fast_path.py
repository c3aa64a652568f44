"""The fast path by default: the precision and graph decisions as pure functions, and the one-line
notice a run prints when it falls back to eager steps."""

import pytest
import torch

from peftkit.common_kernels import PeftkitError
from peftkit.common_kernels.training import engine
from peftkit.common_kernels.training.fast_path import graph_plan, resolve_precision

from .test_engine import Regression, cfg, dataset


def test_auto_graphs_a_plain_single_gpu_run():
    assert graph_plan("auto", "cuda") == (True, None)
    assert graph_plan("auto", "cuda", mixed_precision="bf16") == (True, None)


@pytest.mark.parametrize(
    "settings,reason",
    [
        ({"grad_accum": 2}, "grad_accum=1"),
        ({"mixed_precision": "fp16"}, "fp16 loss scaling"),
        ({"processes": 2}, "a single process"),
        ({"optimizer": "adamw8bit"}, "optimizer 'adamw'"),
        ({"task_reason": "gradient checkpointing restores RNG"}, "gradient checkpointing"),
    ],
)
def test_auto_falls_back_to_eager_naming_what_prevents_capture(settings, reason):
    graphed, why = graph_plan("auto", "cuda", **settings)
    assert not graphed and reason in why


def test_auto_off_a_gpu_and_an_explicit_no_are_silent():
    assert graph_plan("auto", "cpu", grad_accum=4) == (False, None)
    assert graph_plan(False, "cuda", mixed_precision="fp16") == (False, None)


def test_an_explicit_yes_raises_with_every_blocker():
    with pytest.raises(PeftkitError, match="needs a CUDA device, grad_accum=1: change"):
        graph_plan(True, "cpu", grad_accum=2)
    with pytest.raises(PeftkitError, match="cannot train this task: host ids"):
        graph_plan(True, "cuda", task_reason="host ids")


def test_auto_precision_is_bf16_on_a_capable_gpu_and_fp32_on_the_cpu(monkeypatch):
    assert resolve_precision("auto", "cpu") == "no"
    assert resolve_precision("fp16", "cpu") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", "cuda") == "no"


def test_a_fallback_is_announced_once_per_run(monkeypatch, capsys):
    monkeypatch.setattr(
        engine, "graph_plan", lambda *a: (False, "the captured step needs grad_accum=1")
    )
    result = engine.train(Regression(), dataset(), cfg(steps=12))
    lines = [l for l in capsys.readouterr().out.splitlines() if "CUDA graph off" in l]
    assert result.step == 12 and len(lines) == 1 and "grad_accum=1" in lines[0]


def test_the_run_reports_set_up_apart_from_training(capsys):
    result = engine.train(Regression(), dataset(), cfg(steps=5, progress=True))
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("set-up")]
    assert len(line) == 1 and "5 steps in" in line[0] and "ms/step" in line[0]
    assert set(result.timing) == {"load", "prepare", "capture", "train", "eval"}
    assert result.timing["capture"] == 0.0 and result.timing["train"] > 0
    assert result.timing["eval"] == 0.0 and "evaluations" not in line[0]


class Evaluated(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.evaluations = 0

    def evaluate(self, model):
        self.evaluations += 1
        return {"calls": float(self.calls)}


def test_evaluations_between_steps_are_timed_apart_from_the_steps(capsys):
    task = Evaluated()
    result = engine.train(task, dataset(), cfg(steps=4, eval_every=2, progress=True))
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("set-up")][0]
    assert task.evaluations == 2  # steps 2 and 4; the last step's makes the final one needless
    assert result.timing["eval"] > 0 and "; evaluations " in line


def test_train_config_rejects_unknown_auto_values():
    with pytest.raises(PeftkitError, match="TrainConfig.cuda_graph must be one of"):
        cfg(cuda_graph="sometimes")
    with pytest.raises(PeftkitError, match="TrainConfig.mixed_precision must be one of"):
        cfg(mixed_precision="fp8")


def test_commands_default_to_auto_and_eager_opts_out():
    import argparse

    from peftkit.common_kernels.training.fast_path import add_speed_args

    parser = argparse.ArgumentParser()
    add_speed_args(parser)
    default = parser.parse_args([])
    assert (default.mixed_precision, default.cuda_graph) == ("auto", "auto")
    assert parser.parse_args(["--eager"]).cuda_graph is False
    assert parser.parse_args(["--no-cuda-graph"]).cuda_graph is False
    assert cfg(cuda_graph=parser.parse_args(["--eager"]).cuda_graph).cuda_graph is False
