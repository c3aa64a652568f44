"""LyCORIS' output-side OFT and BOFT (diag_oft.py, lycoris_boft.py) against LyCORIS 4.1.3's own
modules (a test-only dependency, which inverts in float32: tolerance 1e-5), plus gradcheck and
the scale's meaning."""

import copy

import pytest
import torch

from peftkit.common_kernels import inject
from peftkit.common_kernels.registry import core

from .conftest import rel

CASES = [  # (peftkit core, LyCORIS module, rescaled, constraint)
    ("diag-oft", "DiagOFTModule", False, 0.0),
    ("diag-oft", "DiagOFTModule", True, 2e-3),
    ("lycoris-boft", "ButterflyOFTModule", False, 0.0),
    ("lycoris-boft", "ButterflyOFTModule", True, 2e-3),
]


def layers():
    torch.manual_seed(0)
    return {"lin": torch.nn.Linear(12, 16), "conv": torch.nn.Conv2d(3, 8, 3, padding=1)}


@pytest.mark.parametrize("kind", ["lin", "conv"])
@pytest.mark.parametrize("name, module, rescaled, constraint", CASES)
@pytest.mark.parametrize("multiplier", [1.0, 0.4])
def test_weight_equals_lycoris_module(kind, name, module, rescaled, constraint, multiplier):
    lycoris_modules = pytest.importorskip("lycoris.modules")
    if multiplier != 1.0 and rescaled:
        pytest.skip("LyCORIS applies the rescale whole at any multiplier; peftkit scales it too")
    base = layers()[kind]
    theirs = getattr(lycoris_modules, module)(
        "m", copy.deepcopy(base), 1.0, lora_dim=4, constraint=constraint, rescaled=rescaled
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        theirs.oft_blocks.copy_(torch.randn(theirs.oft_blocks.shape, generator=g) * 0.3)
        if rescaled:
            theirs.rescale.copy_(1 + 0.2 * torch.randn(theirs.rescale.shape, generator=g))
    want = theirs.get_merged_weight(multiplier)[0].double()

    ours = torch.nn.Sequential(copy.deepcopy(base)).double()
    config = core(name).make_config(["0"], block_size=4, constraint=constraint, rescaled=rescaled)
    handle = inject(ours, config)
    handle.load_state_dict(
        {f"0.{k}": v.double() for k, v in theirs.state_dict().items() if k != "alpha"}
    )
    handle.set_scale(multiplier)
    handle.merge()
    merged = ours[0].base.weight
    assert rel(merged, want.reshape(merged.shape)) < 1e-5


@pytest.mark.parametrize("name", ["diag-oft", "lycoris-boft"])
def test_gradcheck_and_scale_zero_is_the_base(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    base = model(x)
    handle = inject(model, core(name).make_config(["0"], block_size=4, rescaled=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    assert rel(model(x), base) > 0.01
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = [model.get_parameter(n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(
        lambda *v: torch.func.functional_call(model, dict(zip(names, v)), (x,)), values
    )
    handle.set_scale(0.0)
    assert rel(model(x), base) < 1e-12
