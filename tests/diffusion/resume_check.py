"""A task trained 4 steps in one go against 2 steps, a checkpoint and a resume to 4: shared by the
control-branch and IP-Adapter tests."""

import torch

from peftkit.common_kernels.training.engine import TrainConfig, train


def assert_resume_is_exact(make_task, tmp_path, seed: int = 3) -> None:
    """`make_task(seed)` builds a fresh task; the resumed run ends with the same state, bit for
    bit, its random stream included."""

    def run(out, steps):
        task = make_task(seed)
        config = TrainConfig(
            steps=steps,
            batch_size=2,
            lr=1e-2,
            schedule="constant",
            progress=False,
            cpu=True,
            seed=seed,
            output_dir=str(out),
            checkpoint_every=2,
        )
        return task, train(task, task.dataset(), config)

    whole, _ = run(tmp_path / "whole", 4)
    run(tmp_path / "cut", 2)
    resumed, result = run(tmp_path / "cut", 4)
    assert result.resumed_from == 2
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and "rng.stream" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
