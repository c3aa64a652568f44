import pytest
import torch
from torch import nn

from peftkit.common_kernels import LoRAConfig, PeftkitError, inject
from peftkit.common_kernels.training import TrainConfig, train
from peftkit.common_kernels.training.engine import latest_checkpoint, lr_factor


class Regression:
    """y = W* x with a LoRA on a frozen random linear layer; dropout exercises RNG resume."""

    def __init__(self, nan_after: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.Linear(8, 2))
        self.handle = inject(self.model, LoRAConfig(targets=["0", "2"], r=2))
        self.calls, self.nan_after = 0, nan_after

    def trainable_parameters(self):
        return self.handle.trainable_parameters()

    def state_dict(self):
        return self.handle.state_dict()

    def load_state_dict(self, state):
        self.handle.load_state_dict(state)

    def loss(self, model, batch):
        self.calls += 1
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        if self.nan_after is not None and self.calls > self.nan_after:
            return loss * float("nan")
        return loss


def dataset(n=64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 8, generator=g)
    target = torch.randn(2, 8, generator=g)
    return [(x[i], x[i] @ target.T) for i in range(n)]


def cfg(tmp_path=None, **kw):
    base = dict(
        steps=40,
        batch_size=8,
        lr=0.02,
        warmup_steps=2,
        progress=False,
        cpu=True,
        output_dir=str(tmp_path) if tmp_path else None,
    )
    return TrainConfig(**{**base, **kw})


def test_training_lowers_the_loss():
    result = train(Regression(), dataset(), cfg(steps=60))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.5 * first


def killed_and_resumed(tmp_path, **options):
    """(uninterrupted task, resumed task, resumed result, its events): a run with `options`
    checkpointing every 10 steps, killed at step 25, then resumed from step 20."""
    full = Regression()
    train(full, dataset(), cfg(**options))

    class Killed(Exception):
        pass

    def kill_at_25(event):
        if event["kind"] == "step" and event["step"] == 25:
            raise Killed

    with pytest.raises(Killed):
        train(Regression(), dataset(), cfg(tmp_path, checkpoint_every=10, **options), kill_at_25)
    assert latest_checkpoint(tmp_path).name == "step-0000020"
    resumed, events = Regression(), []
    result = train(
        resumed, dataset(), cfg(tmp_path, checkpoint_every=10, **options), on_event=events.append
    )
    assert result.resumed_from == 20 and events[0]["kind"] == "resume"
    return full, resumed, result, events


def test_resumed_run_ends_with_the_same_adapter_as_an_uninterrupted_one(tmp_path):
    full, resumed, _, _ = killed_and_resumed(tmp_path, grad_accum=2)
    for key, value in full.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6), key
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) == 2


def test_nan_losses_are_skipped_then_stop_with_a_saved_checkpoint(tmp_path):
    task = Regression(nan_after=10)
    with pytest.raises(PeftkitError, match="NaN/inf for 3 steps.*last good state is saved"):
        train(task, dataset(), cfg(tmp_path))
    assert latest_checkpoint(tmp_path).name == "step-0000010"


def test_schedule_warms_up_then_decays():
    c = TrainConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, c) == pytest.approx(0.1)
    assert lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(55, c) == pytest.approx(0.5)
    assert lr_factor(100, c) == pytest.approx(0.0)


def test_bad_config_and_empty_data_are_explained():
    with pytest.raises(PeftkitError, match="TrainConfig.schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(PeftkitError, match="training set is empty"):
        train(Regression(), [], cfg(steps=1))


def test_a_stop_request_saves_a_checkpoint(tmp_path):
    steps = []
    result = train(
        Regression(),
        dataset(),
        cfg(tmp_path),
        on_event=lambda e: steps.append(e.get("step")),
        should_stop=lambda: len(steps) >= 7,
    )
    assert result.step == 7
    assert latest_checkpoint(tmp_path).name == "step-0000007"


def test_cuda_graph_mode_explains_what_it_needs():
    with pytest.raises(PeftkitError, match="cuda_graph=True needs a CUDA device, grad_accum=1"):
        train(Regression(), dataset(), cfg(cuda_graph=True, grad_accum=2))


def test_graphed_step_rejects_changing_batch_shapes():
    from peftkit.common_kernels.training.graphed_step import copy_batch

    static = {"x": torch.zeros(2, 3), "tag": "a"}
    copy_batch(static, {"x": torch.ones(2, 3), "tag": "a"})
    assert torch.equal(static["x"], torch.ones(2, 3))
    with pytest.raises(
        PeftkitError, match=r"fixed batch shapes.*batch\['x'\] changed from \(2, 3\) to \(1, 3\)"
    ):
        copy_batch(static, {"x": torch.ones(1, 3), "tag": "a"})
    with pytest.raises(PeftkitError, match="batch of tensors only"):
        copy_batch(static, {"x": torch.ones(2, 3), "tag": "b"})


def test_one_process_trains_runs_of_different_precisions_one_after_another():
    # The app and the benches train many runs in one process; accelerate's process-wide state
    # used to refuse the second precision ("AcceleratorState has already been initialized").
    first = train(Regression(), dataset(), cfg(steps=5, mixed_precision="no"))
    second = train(Regression(), dataset(), cfg(steps=5, mixed_precision="bf16"))
    assert len(first.losses) == len(second.losses) == 5
