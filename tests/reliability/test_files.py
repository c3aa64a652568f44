"""Files under stress: a full disk mid-save keeps the previous files (one file or a whole output
folder), saved files honour the umask, and damaged adapters (NaN weights, unreadable metadata)
are refused at load with a message."""

import errno
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from torch import nn

from peftkit.common_kernels import (
    LoRAConfig,
    PeftkitError,
    adapter_file,
    inject,
    load_adapter,
    save_adapter,
)
from peftkit.diffusion.dreambooth import ConceptConfig, save_concept


def _model(width=8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


def _handle(model, rank, name="default", fill=0.1):
    handle = inject(model, LoRAConfig(targets=["0", "2"], r=rank), name=name)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.fill_(fill)
    return handle


def _fail_on_write(monkeypatch, call: int, error: Exception) -> None:
    """The `call`-th safetensors write raises `error` (a full disk), the others go through."""
    real, calls = adapter_file.save_file, []

    def save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter_file, "save_file", save_file)


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), SafetensorError("No space left on device")],
)
def test_a_full_disk_during_a_save_is_a_message_and_keeps_the_old_file(
    tmp_path, monkeypatch, error
):
    path = tmp_path / "a.safetensors"
    save_adapter(_handle(_model(), rank=4), path)
    before = path.read_bytes()
    _fail_on_write(monkeypatch, 1, error)
    with pytest.raises(PeftkitError, match="disk is full.*previous file there is kept"):
        save_adapter(_handle(_model(), rank=8, fill=0.3), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def _concept_task(rank: int, fill: float):
    return SimpleNamespace(
        config=ConceptConfig(instance_prompt="a photo of sks toy", method="oft", rank=rank),
        unet_handle=_handle(_model(), rank, "unet", fill),
        text_handles=[_handle(_model(), rank, "text", fill)],
        pivotal=None,
        base=SimpleNamespace(component="unet"),
    )


def test_a_failed_concept_save_never_mixes_new_files_with_old_ones(tmp_path, monkeypatch):
    out = tmp_path / "concept"
    written = save_concept(_concept_task(rank=4, fill=0.1), out)
    names = sorted(p.name for p in written)
    assert names == ["text_encoder_adapter.safetensors", "unet_adapter.safetensors"]
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_on_write(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(PeftkitError, match="disk is full"):
        save_concept(_concept_task(rank=8, fill=0.3), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old, "no staging folder left"
    monkeypatch.undo()
    save_concept(_concept_task(rank=8, fill=0.3), out)
    model = _model()
    loaded = load_adapter(model, out / "unet_adapter.safetensors")
    assert loaded.config.r == 8 and '"rank": 8' in (out / "concept.json").read_text()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_get_the_umask_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = save_adapter(_handle(_model(), rank=2), tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_adapter_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path, value):
    handle = _handle(_model(), rank=2)
    with torch.no_grad():
        next(iter(handle.trainable_parameters()))[0, 0] = value
    save_adapter(handle, tmp_path / "bad.safetensors")
    model = _model()
    with pytest.raises(PeftkitError, match=r"NaN or infinite values in tensor '0\."):
        load_adapter(model, tmp_path / "bad.safetensors")
    assert isinstance(model[0], nn.Linear), "the model is left untouched"


def test_unreadable_base_shapes_metadata_is_a_message(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(_handle(_model(8), rank=2), path, extra={"base_shapes": "{not json"})
    with pytest.raises(PeftkitError, match="unreadable 'base_shapes' metadata"):
        load_adapter(_model(16), path)
