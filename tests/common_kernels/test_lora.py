import copy
import math

import pytest
import torch
from torch import nn

from peftkit.common_kernels import (
    LoRAConfig,
    PeftkitError,
    inject,
    lora_conv_delta,
    lora_linear_delta,
)

from .conftest import peft_model, peft_params, rel


def test_lora_matches_peft_on_linear_and_conv_in_float64(base64, inputs64):
    from peft import LoraConfig

    for rslora in (False, True):
        theirs = peft_model(
            base64, LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "conv"], use_rslora=rslora)
        )
        state = peft_params(
            theirs, {"lora_A.default.weight": "A", "lora_B.default.weight": "B"}, nn.init.normal_
        )
        ours = copy.deepcopy(base64)
        handle = inject(ours, LoRAConfig(targets=["lin", "conv"], r=4, alpha=8, rslora=rslora))
        handle.load_state_dict(state)
        for a, b in zip(ours(*inputs64), theirs(*inputs64)):
            assert rel(a, b) < 1e-6


@pytest.mark.parametrize("apply", ["factored", "weight"])
def test_lora_matches_explicit_formula(base64, inputs64, apply):
    ours = copy.deepcopy(base64)
    handle = inject(ours, LoRAConfig(targets=["lin", "conv"], r=3, alpha=6, apply=apply))
    for p in handle.trainable_parameters():
        nn.init.normal_(p)
    x, img = inputs64
    A, B = handle.layers["lin"].deltas["default"].A, handle.layers["lin"].deltas["default"].B
    W, b = base64.lin.weight, base64.lin.bias
    expected = x @ W.T + b + 2.0 * x @ (B @ A).T
    Ac, Bc = handle.layers["conv"].deltas["default"].A, handle.layers["conv"].deltas["default"].B
    kernel = base64.conv.weight + 2.0 * (Bc.flatten(1) @ Ac.flatten(1)).reshape(
        base64.conv.weight.shape
    )
    expected_conv = torch.nn.functional.conv2d(img, kernel, base64.conv.bias, padding=1)
    y, yc = ours(x, img)
    assert rel(y, expected) < 1e-12
    assert rel(yc, expected_conv) < 1e-12


@pytest.mark.parametrize("apply", ["factored", "weight"])
def test_lora_starts_at_the_base_output(base64, inputs64, apply):
    ours = copy.deepcopy(base64)
    inject(ours, LoRAConfig(targets=["lin", "conv"], r=4, apply=apply))
    for a, b in zip(ours(*inputs64), base64(*inputs64)):
        assert torch.equal(a, b)


def test_lora_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: lora_linear_delta(x, A, B, 0.7), (x, A, B))
    from peftkit.common_kernels.delta import Geometry

    geo = Geometry("conv2d", 2, 3, (3, 3), (1, 1), (1, 1), (1, 1))
    img = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    Ac = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    Bc = torch.randn(3, 2, 1, 1, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, A, B: lora_conv_delta(x, A, B, 0.7, geo), (img, Ac, Bc)
    )


def test_lora_scaling_rules():
    assert LoRAConfig(r=16, alpha=32).scaling == 2.0
    assert LoRAConfig(r=16, alpha=32, rslora=True).scaling == 32 / math.sqrt(16)
    assert LoRAConfig(r=4).scaling == 1.0


def test_lora_rank_too_big_names_module_and_fix():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(PeftkitError, match=r"rank r=8 .* module '0'.*lower r"):
        inject(model, LoRAConfig(targets=["0"], r=8))


def test_lora_config_validation_names_field():
    with pytest.raises(PeftkitError, match="LoRAConfig.r"):
        LoRAConfig(r=0)
    with pytest.raises(PeftkitError, match="LoRAConfig.dropout"):
        LoRAConfig(dropout=1.5)
    with pytest.raises(PeftkitError, match="apply='weight' cannot apply input dropout"):
        LoRAConfig(dropout=0.1, apply="weight")


def test_weight_mode_gradients_equal_factored_mode(base64, inputs64):
    grads = {}
    for apply in ("factored", "weight"):
        model = copy.deepcopy(base64)
        handle = inject(model, LoRAConfig(targets=["lin", "conv"], r=3, apply=apply))
        torch.manual_seed(5)
        for p in handle.trainable_parameters():
            nn.init.normal_(p)
        y, yc = model(*inputs64)
        (y.square().sum() + yc.square().sum()).backward()
        grads[apply] = [p.grad for p in handle.trainable_parameters()]
    for a, b in zip(grads["factored"], grads["weight"]):
        assert rel(a, b) < 1e-12


def test_lora_dropout_only_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    handle = inject(model, LoRAConfig(targets=["0"], r=4, dropout=0.5))
    for p in handle.trainable_parameters():
        nn.init.normal_(p)
    x = torch.randn(8, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
