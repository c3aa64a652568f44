import copy
import os

import pytest
import torch
from torch import nn

from peftkit.common_kernels import (
    BOFTConfig,
    DoRAConfig,
    KronConfig,
    LoHaConfig,
    LoRAConfig,
    OFTConfig,
    PeftkitError,
    inject,
    load_adapter,
    read_adapter_config,
    save_adapter,
)


def tiny(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(targets=["0", "2"], r=2),
        OFTConfig(targets=["0", "2"], block_size=4),
        KronConfig(targets=["0", "2"], r=2),
        DoRAConfig(targets=["0", "2"], r=2),
        LoHaConfig(targets=["0", "2"], r=2),
        BOFTConfig(targets=["0", "2"], block_size=2, n_butterfly_factor=2),
    ],
)
def test_save_load_round_trip_gives_the_same_outputs(tmp_path, config):
    model = tiny()
    handle = inject(copy.deepcopy(model), config, base_model="tiny-mlp")
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.normal_(std=0.2)
    path = save_adapter(handle, tmp_path / "a.safetensors")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    x = torch.randn(3, 8)
    loaded_model = copy.deepcopy(model)
    loaded = load_adapter(loaded_model, path)
    assert loaded.config == config and loaded.base_model == "tiny-mlp"
    assert torch.allclose(loaded_model(x), handle.model(x))
    cfg, meta = read_adapter_config(path)
    assert (
        cfg == config
        and meta["method"] == config.method
        and meta["base_fingerprint"] == handle.fingerprint()
    )


def test_loading_onto_other_shapes_names_the_first_mismatched_module(tmp_path):
    handle = inject(tiny(8), LoRAConfig(targets=["0", "2"], r=2), base_model="tiny-8")
    path = save_adapter(handle, tmp_path / "a.safetensors")
    other = tiny(16)
    with pytest.raises(
        PeftkitError,
        match=r"module '0' has weight shape \(16, 8\) here but \(8, 8\) in base 'tiny-8'",
    ):
        load_adapter(other, path)
    from peftkit.common_kernels import adapted_layers

    assert not adapted_layers(other), "a failed load must leave the model untouched"
    with pytest.raises(PeftkitError, match="no such modules"):
        load_adapter(nn.ModuleDict({"x": nn.Linear(8, 8)}), path)


def test_corrupt_truncated_and_missing_files_give_clear_errors(tmp_path):
    handle = inject(tiny(), LoRAConfig(targets=["0"], r=2))
    path = save_adapter(handle, tmp_path / "a.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PeftkitError, match="truncated or corrupt"):
        load_adapter(tiny(), tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(PeftkitError, match="truncated or corrupt"):
        load_adapter(tiny(), tmp_path / "junk.safetensors")
    with pytest.raises(PeftkitError, match="does not exist"):
        load_adapter(tiny(), tmp_path / "missing.safetensors")


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    handle = inject(tiny(), LoRAConfig(targets=["0"], r=2))
    path = save_adapter(handle, tmp_path / "a.safetensors")
    before = path.read_bytes()
    import peftkit.common_kernels.adapter_file as af

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(af, "save_file", boom)
    with pytest.raises(PeftkitError, match="previous file there is kept"):
        save_adapter(handle, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
