"""The graphed loop reads each loss one step late: the run it trains, skips and checkpoints must be
the one it trained when it read every loss at once. On the CPU no step can be captured, so a
stand-in replays GraphedStep's body eagerly at each launch; the engine's late reads, device-side
schedule and skip logic then run as they do on a GPU."""

import json

import pytest
import torch

from peftkit.common_kernels import PeftkitError
from peftkit.common_kernels.training import engine, train
from peftkit.common_kernels.training.checkpoint import read_checkpoint
from peftkit.common_kernels.training.engine import latest_checkpoint, lr_factor
from peftkit.common_kernels.training.graphed_step import GraphedStep, clone_batch, copy_batch
from peftkit.common_kernels.training.late_read import DeviceSchedule, LateLoss, lr_table
from peftkit.common_kernels.training.trackers import METRICS_FILE, MetricsLog
from peftkit.common_kernels.training.train_config import TrainConfig

from .test_engine import Regression, cfg, dataset, killed_and_resumed


class EagerReplay(GraphedStep):
    """GraphedStep with its body run for real at every launch instead of replayed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.launches = 0

    def launch(self, inputs):
        if self.static is None:
            self.static, self.graph = clone_batch(inputs), "stand-in"
        copy_batch(self.static, inputs)
        self.launches += 1
        self.losses = self._body(warmup=False)
        return self.losses


class NanAt(Regression):
    """NaN losses at the given calls (1-based) only."""

    def __init__(self, calls: set[int]) -> None:
        super().__init__()
        self.bad_calls = calls

    def loss(self, model, batch):
        loss = super().loss(model, batch)
        return loss * float("nan") if self.calls in self.bad_calls else loss


@pytest.fixture
def graphed(monkeypatch):
    """Runs asking for cuda_graph="auto" take the graphed path on the CPU."""
    monkeypatch.setattr(engine, "graph_plan", lambda requested, *a: (requested == "auto", None))
    monkeypatch.setattr(engine, "GraphedStep", EagerReplay)


def schedule(groups: int = 2):
    configs = [TrainConfig(steps=30, warmup_steps=4, lr=lr) for lr in (3e-4, 7e-3)][:groups]
    params = [torch.nn.Parameter(torch.ones(2)) for _ in configs]
    specs = [{"params": [p], "lr": torch.tensor(c.lr)} for p, c in zip(params, configs)]
    optimizer = torch.optim.AdamW(specs, lr=torch.tensor(1e-3), fused=True, capturable=True)
    factors = [lambda s, c=c: lr_factor(s, c) for c in configs]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def test_lr_table_holds_the_rates_the_schedule_sets_step_by_step():
    optimizer, scheduler = schedule()
    table = lr_table(scheduler, 30)
    for good in range(31):
        set_by_host = torch.stack([g["lr"] for g in optimizer.param_groups])
        assert torch.equal(table[good], set_by_host), good
        optimizer.step()
        scheduler.step()


def test_device_schedule_keeps_the_rate_over_skipped_steps():
    optimizer, scheduler = schedule()
    table = lr_table(scheduler, 30)
    rates = [g["lr"] for g in optimizer.param_groups]
    device_side = DeviceSchedule(table, rates, done=2)
    bad = {3, 4, 9}
    good = 2
    for step in range(12):
        device_side(torch.tensor(1.0 if step in bad else 0.0))
        assert torch.equal(torch.stack(rates), table[good]), step
        good += step not in bad
    assert int(device_side.good) == good == 2 + 12 - len(bad)


def test_late_loss_reads_the_launched_values_not_later_ones():
    losses = torch.tensor([0.25, 2.0])
    late = LateLoss(losses)
    losses.fill_(7.0)  # the captured output buffer, overwritten by the next replay
    assert late.read() == [0.25, 2.0]


def test_graphed_run_with_late_reads_trains_and_skips_as_the_eager_run(tmp_path, graphed):
    runs = {}
    for mode in (False, "auto"):
        task, out = NanAt({5, 6, 17}), tmp_path / str(mode)
        events = []
        log = MetricsLog(out)
        result = train(
            task,
            dataset(),
            cfg(out, steps=25, schedule="cosine", cuda_graph=mode),
            on_event=lambda e, events=events, log=log: (events.append(e), log(e)),
        )
        rows = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
        runs[mode] = task, result, events, rows
    (eager, r_eager, ev_eager, log_eager), (late, r_late, ev_late, log_late) = runs.values()
    assert r_late.timing["capture"] == 0.0  # the stand-in, not a capture
    assert r_late.step == r_eager.step == 25
    assert r_late.skipped_steps == r_eager.skipped_steps == 3
    assert [e["kind"] for e in ev_late] == [e["kind"] for e in ev_eager]
    assert r_late.losses == pytest.approx(r_eager.losses, rel=1e-5)
    assert [r["step"] for r in log_late] == [r["step"] for r in log_eager] == list(range(1, 26))
    assert [r["lr"] for r in log_late] == pytest.approx([r["lr"] for r in log_eager], rel=1e-6)
    for key, value in eager.state_dict().items():
        assert torch.allclose(late.state_dict()[key], value, atol=1e-5), key


def test_late_reads_checkpoint_the_state_of_their_step_and_resume_exactly(tmp_path, graphed):
    full, resumed, _, _ = killed_and_resumed(tmp_path, steps=30, cuda_graph="auto")
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_late_reads_stop_at_max_bad_steps_with_the_last_good_state_saved(tmp_path, graphed):
    train(
        Regression(),
        dataset(),
        cfg(tmp_path / "clean", checkpoint_every=10, keep_checkpoints=0, cuda_graph="auto"),
    )
    clean, _ = read_checkpoint(tmp_path / "clean" / "checkpoints" / "step-0000010")
    task = Regression(nan_after=10)
    with pytest.raises(PeftkitError, match="NaN/inf for 3 steps.*last good state is saved"):
        train(task, dataset(), cfg(tmp_path / "nan", cuda_graph="auto"))
    assert latest_checkpoint(tmp_path / "nan").name == "step-0000010"
    # no step past the third bad one was launched, and none of the bad ones changed anything
    assert task.calls == 13
    for key, value in task.state_dict().items():
        assert torch.equal(clean[f"task.{key}"], value), key
