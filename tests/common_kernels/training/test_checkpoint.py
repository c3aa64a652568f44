"""Resume when checkpoints are damaged or the settings changed: the newest readable checkpoint is
used (and the run says so), a damaged trainer.json is a one-line error, and a changed setting is
named as such."""

import json

import pytest
import torch

from peftkit.common_kernels import LoRAConfig, PeftkitError, inject
from peftkit.common_kernels.training import train
from peftkit.common_kernels.training.engine import latest_checkpoint

from .test_engine import Regression, cfg, dataset


def _checkpointed(tmp_path, steps=20):
    train(Regression(), dataset(), cfg(tmp_path, steps=steps, checkpoint_every=10))
    return sorted((tmp_path / "checkpoints").glob("step-*"))


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    older, newest = _checkpointed(tmp_path)
    state = newest / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    events = []
    result = train(Regression(), dataset(), cfg(tmp_path, steps=20), on_event=events.append)
    assert result.resumed_from == 10 and events[0]["path"] == str(older)
    assert "step-0000020 is damaged, falling back" in capsys.readouterr().out


def test_the_resumed_run_from_the_fallback_equals_an_uninterrupted_one(tmp_path):
    _, newest = _checkpointed(tmp_path)
    (newest / "state.safetensors").write_bytes(b"\0" * 10)
    resumed = Regression()
    train(resumed, dataset(), cfg(tmp_path, steps=20))
    whole = Regression()
    train(whole, dataset(), cfg(steps=20))
    for key, value in whole.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6), key


def test_a_damaged_trainer_json_is_a_one_line_error(tmp_path):
    train(Regression(), dataset(), cfg(tmp_path, steps=10, checkpoint_every=10))
    only = latest_checkpoint(tmp_path)
    (only / "trainer.json").write_text('{"step": 10, "optim')
    with pytest.raises(PeftkitError) as err:
        train(Regression(), dataset(), cfg(tmp_path, steps=20))
    message = str(err.value)
    assert "damaged trainer.json" in message and "\n" not in message
    assert str(only) in message and "new output folder" in message


class RankedRegression(Regression):
    """Regression whose settings live in a dataclass, as concept and TI tasks keep theirs."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.handle.unload()
        self.config = LoRAConfig(targets=["0", "2"], r=rank)
        self.handle = inject(self.model, self.config)


def test_resuming_with_a_changed_rank_names_the_setting(tmp_path):
    train(RankedRegression(1), dataset(), cfg(tmp_path, steps=10, checkpoint_every=10))
    meta = json.loads((latest_checkpoint(tmp_path) / "trainer.json").read_text())
    assert meta["task_config"]["r"] == 1
    with pytest.raises(PeftkitError, match=r"trained with other settings: r 1 -> 2; resume"):
        train(RankedRegression(2), dataset(), cfg(tmp_path, steps=20))
