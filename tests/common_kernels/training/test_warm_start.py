"""The set-up shortcuts leave a run as it was: the collector restored after a command, CUDA left
untouched on the CPU, and a failing CUDA warm-up silent (the run reports its errors itself)."""

import gc
import threading

import pytest
import torch

from peftkit.common_kernels.training.warm_start import collector_paused, warm_cuda


def test_collector_is_off_while_loading_frozen_for_the_run_and_restored_after():
    with collector_paused() as loaded:
        assert not gc.isenabled()
        loaded()
        assert gc.isenabled() and gc.get_freeze_count() > 0
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_collector_is_restored_when_loading_fails_and_stays_off_if_it_was():
    with pytest.raises(ValueError), collector_paused():
        raise ValueError("no images")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused() as loaded:
            loaded()
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()


def _warming() -> bool:
    return any(t.name == "peftkit-warm-cuda" for t in threading.enumerate())


def test_cpu_runs_and_multi_process_launches_start_no_warm_up(monkeypatch):
    warm_cuda(cpu=True)()
    monkeypatch.setenv("WORLD_SIZE", "2")
    warm_cuda(cpu=False)()
    assert not _warming()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_warm_up_without_cuda_leaves_cuda_uninitialized():
    warm_cuda(cpu=False)()
    assert not torch.cuda.is_initialized()


def test_a_failing_cuda_warm_up_is_silent(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "ones", broken)
    warm_cuda(cpu=False)()
    assert not _warming()


def test_fast_start_hands_the_command_its_start_and_restores_the_collector():
    from peftkit.common_kernels.training.warm_start import fast_start

    seen = {}

    @fast_start
    def command(argv, start):
        """A training command."""
        seen["collecting while loading"] = gc.isenabled()
        start.warm(cpu=True)
        start.ready()
        seen["collecting in the run"] = gc.isenabled()
        seen["started"] = start.started
        if argv:
            raise ValueError(argv[0])
        return 0

    assert command([]) == 0 and command.__doc__ == "A training command."
    assert seen["collecting while loading"] is False and seen["collecting in the run"] is True
    assert seen["started"] > 0 and gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(ValueError, match="no images"):
        command(["no images"])
    assert gc.isenabled() and gc.get_freeze_count() == 0
