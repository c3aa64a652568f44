"""The set-up shortcuts leave a run as it was: the collector restored after a command."""

import gc

import pytest

from peftkit.common_kernels.training.warm_start import collector_paused


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
