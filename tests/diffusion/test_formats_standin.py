"""The LoHa and DoRA format paths, run before those cores exist: minimal stand-in cores with the
agreed contract (LoHa: w1a d_out x r, w1b r x fan_in, w2a, w2b; DoRA: LoRA's A, B + magnitude
(d_out,)) are registered for one test each, and the LyCORIS/peft/diffusers interop tests run on
them. Where the real core is registered these tests skip: the interop tests cover it directly."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from peftkit.common_kernels import AdapterConfig, core_names, registry
from peftkit.common_kernels.delta import Delta

from . import test_formats_lycoris as lycoris_tests
from . import test_formats_peft as peft_tests


@dataclass
class StandInConfig(AdapterConfig):
    r: int = 4
    alpha: float | None = None
    rslora: bool = False

    @property
    def scaling(self) -> float:
        return (self.r if self.alpha is None else self.alpha) / self.r


class StandInLoHa(Delta):
    """W + s (w1a w1b) * (w2a w2b), in weight space."""

    kohya_names: ClassVar[dict[str, str]] = {
        "w1a": "hada_w1_a",
        "w1b": "hada_w1_b",
        "w2a": "hada_w2_a",
        "w2b": "hada_w2_b",
    }
    additive, side = False, "weight"

    def __init__(self, geometry, config, name=""):
        super().__init__(geometry)
        r, d_out, fan_in = config.r, geometry.out_features, geometry.fan_in
        self.scaling = config.scaling
        self.w1a, self.w2a = (nn.Parameter(torch.zeros(d_out, r)) for _ in range(2))
        self.w1b, self.w2b = (nn.Parameter(torch.zeros(r, fan_in)) for _ in range(2))

    def transform_weight(self, weight, scale):
        hadamard = (self.w1a @ self.w1b) * (self.w2a @ self.w2b)
        return weight + scale * self.scaling * hadamard.reshape(weight.shape)


class StandInDoRA(Delta):
    """magnitude * (W + s B A) / ||W + s B A|| per output row."""

    kohya_names: ClassVar[dict[str, str]] = {
        "A": "lora_down.weight",
        "B": "lora_up.weight",
        "magnitude": "dora_scale",
    }
    additive, side = False, "weight"

    def __init__(self, geometry, config, name=""):
        super().__init__(geometry)
        r, kernel = config.r, geometry.weight_shape[2:]
        self.scaling = config.scaling
        self.A = nn.Parameter(torch.zeros(r, geometry.in_features, *kernel))
        self.B = nn.Parameter(torch.zeros(geometry.out_features, r, *[1] * len(kernel)))
        self.magnitude = nn.Parameter(torch.ones(geometry.out_features))

    def transform_weight(self, weight, scale):
        low_rank = self.B.flatten(1) @ self.A.flatten(1)
        adapted = weight + scale * self.scaling * low_rank.reshape(weight.shape)
        norm = adapted.flatten(1).norm(dim=1)
        return adapted * (self.magnitude / norm).reshape(-1, *[1] * (weight.dim() - 1))


STAND_INS = {"loha": StandInLoHa, "dora": StandInDoRA}


@pytest.fixture()
def stand_in(request, monkeypatch):
    name = request.param
    if name in core_names():
        pytest.skip(f"the real {name!r} core is registered: the interop tests cover it")
    config = type(f"StandIn{name}Config", (StandInConfig,), {"method": name})
    config = dataclass(config)
    monkeypatch.setitem(registry._CORES, name, registry.Core(name, config, STAND_INS[name]))
    monkeypatch.setitem(registry._NAMES, name, name)
    return name


@pytest.mark.parametrize("stand_in", ["loha", "dora"], indirect=True)
def test_lycoris_files_of_the_core_load_and_write_exactly(stand_in, tmp_path):
    (tmp_path / "made").mkdir(), (tmp_path / "written").mkdir()
    made = next(row for row in lycoris_tests.MADE_BY_LYCORIS if row[2] == stand_in)
    lycoris_tests.test_lycoris_made_file_loads_with_lycoris_output(*made, tmp_path / "made")
    written = next(row for row in lycoris_tests.WRITTEN_BY_PEFTKIT if row[0] == stand_in)
    run = lycoris_tests.test_peftkit_kohya_file_loads_in_lycoris_with_peftkit_output
    run(*written, tmp_path / "written")


@pytest.mark.parametrize("stand_in", ["dora"], indirect=True)
def test_dora_peft_folder_and_diffusers_file_are_exact(stand_in, tmp_path):
    (tmp_path / "folder").mkdir()
    peft_tests.test_peft_folder_imports_equal_to_peft_output(
        peft_tests.CONFIGS[-1], tmp_path / "folder"
    )
    peft_tests.test_dora_file_loads_with_diffusers_load_lora_weights(tmp_path)
