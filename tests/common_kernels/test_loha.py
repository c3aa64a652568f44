import copy

import pytest
import torch
from torch import nn

from peftkit.common_kernels import AdapterConfig, LoHaConfig, PeftkitError, inject
from peftkit.common_kernels.delta import Geometry
from peftkit.common_kernels.loha import LoHaDelta, khatri_rao_factors, loha_delta_weight

from .conftest import assert_grads_match_peft, peft_model, peft_params, rel

PEFT_NAMES = {f"hada_w{i}_{ab}.default": f"w{i}{ab}" for i in (1, 2) for ab in "ab"}


@pytest.mark.parametrize("apply", ["factored", "weight"])
def test_loha_matches_peft_forward_and_gradients_in_float64(base64, inputs64, apply):
    from peft import LoHaConfig as PeftLoHaConfig

    theirs = peft_model(base64, PeftLoHaConfig(r=4, alpha=6, target_modules=["lin", "conv"]))
    state = peft_params(theirs, PEFT_NAMES, nn.init.normal_)
    ours = copy.deepcopy(base64)
    handle = inject(ours, LoHaConfig(targets=["lin", "conv"], r=4, alpha=6, apply=apply))
    handle.load_state_dict(state)
    out_ours, out_theirs = ours(*inputs64), theirs(*inputs64)
    for a, b in zip(out_ours, out_theirs):
        assert rel(a, b) < 1e-6
    sum(o.square().sum() for o in out_ours).backward()
    sum(o.square().sum() for o in out_theirs).backward()
    assert_grads_match_peft(handle, theirs, {v: k for k, v in PEFT_NAMES.items()})


@pytest.mark.parametrize("apply", ["factored", "weight"])
def test_loha_matches_explicit_formula(base64, inputs64, apply):
    ours = copy.deepcopy(base64)
    handle = inject(ours, LoHaConfig(targets=["lin", "conv"], r=3, alpha=6, apply=apply))
    for p in handle.trainable_parameters():
        nn.init.normal_(p)
    x, img = inputs64
    d = handle.layers["lin"].deltas["default"]
    delta = 2.0 * (d.w1a @ d.w1b) * (d.w2a @ d.w2b)
    expected = x @ (base64.lin.weight + delta).T + base64.lin.bias
    dc = handle.layers["conv"].deltas["default"]
    delta_c = 2.0 * (dc.w1a @ dc.w1b) * (dc.w2a @ dc.w2b)
    kernel = base64.conv.weight + delta_c.reshape(base64.conv.weight.shape)
    expected_conv = torch.nn.functional.conv2d(img, kernel, base64.conv.bias, padding=1)
    y, yc = ours(x, img)
    assert rel(y, expected) < 1e-12
    assert rel(yc, expected_conv) < 1e-12


def test_khatri_rao_factors_multiply_to_the_hadamard_product():
    g = torch.Generator().manual_seed(0)
    w1a, w2a = (torch.randn(6, 3, dtype=torch.float64, generator=g) for _ in range(2))
    w1b, w2b = (torch.randn(3, 7, dtype=torch.float64, generator=g) for _ in range(2))
    U, V = khatri_rao_factors(w1a, w1b, w2a, w2b)
    assert U.shape == (6, 9) and V.shape == (9, 7)
    assert rel(U @ V, loha_delta_weight(w1a, w1b, w2a, w2b, 1.0)) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_loha_gradcheck(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        geo, x = Geometry("linear", 5, 4), torch.randn(3, 5, dtype=torch.float64, generator=g)
    else:
        geo = Geometry("conv2d", 2, 3, (3, 3), (1, 1), (1, 1), (1, 1))
        x = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=g)
    delta = LoHaDelta(geo, LoHaConfig(r=2, alpha=3.0, apply="factored")).double()
    names = ("w1a", "w1b", "w2a", "w2b")
    params = [getattr(delta, n).detach().normal_(generator=g).requires_grad_() for n in names]
    x.requires_grad_()

    def run(x, *params):
        for name, p in zip(names, params):
            delattr(delta, name)
            setattr(delta, name, p)
        return delta.delta(x, torch.tensor(0.7, dtype=torch.float64))

    assert torch.autograd.gradcheck(run, (x, *params))


def test_loha_starts_at_the_base_output(base64, inputs64):
    ours = copy.deepcopy(base64)
    inject(ours, LoHaConfig(targets=["lin", "conv"], r=4))
    for a, b in zip(ours(*inputs64), base64(*inputs64)):
        assert torch.equal(a, b)


def test_loha_config_validation_names_field_and_round_trips():
    with pytest.raises(PeftkitError, match="LoHaConfig.r"):
        LoHaConfig(r=0)
    with pytest.raises(PeftkitError, match="LoHaConfig.alpha"):
        LoHaConfig(alpha=-1.0)
    with pytest.raises(PeftkitError, match="LoHaConfig.apply"):
        LoHaConfig(apply="fast")
    with pytest.raises(PeftkitError, match=r"rank r=8 .* module '0'.*lower r"):
        inject(nn.Sequential(nn.Linear(4, 3)), LoHaConfig(targets=["0"], r=8))
    config = LoHaConfig(targets=["lin"], r=2, alpha=3.0, apply="weight")
    assert AdapterConfig.from_json(config.to_json()) == config
