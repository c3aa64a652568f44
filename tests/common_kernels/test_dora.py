import copy

import pytest
import torch
from torch import nn

from peftkit.common_kernels import AdapterConfig, DoRAConfig, PeftkitError, dora_weight, inject

from .conftest import assert_grads_match_peft, peft_model, rel


def peft_dora(base, **kwargs):
    from peft import LoraConfig

    model = peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "conv"], use_dora=True, **kwargs),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
                if "magnitude" in name:
                    p.add_(2.0)
    return model


def copy_from_peft(theirs, handle) -> None:
    """peft's lora_A/lora_B/magnitude (conv magnitude shaped (1, d_out, 1, 1)) into ours."""
    state = {}
    for name, p in theirs.named_parameters():
        for key, ours in (
            ("lora_A.default.weight", "A"),
            ("lora_B.default.weight", "B"),
            ("lora_magnitude_vector.default.weight", "magnitude"),
        ):
            if name.endswith(key):
                module = name.split("base_model.model.")[1].split(".lora_")[0]
                value = p.detach()
                state[f"{module}.{ours}"] = value.flatten() if ours == "magnitude" else value
    handle.load_state_dict(state)


def test_dora_matches_peft_forward_and_gradients_in_float64(base64, inputs64):
    for rslora in (False, True):
        theirs = peft_dora(base64, use_rslora=rslora)
        ours = copy.deepcopy(base64)
        handle = inject(ours, DoRAConfig(targets=["lin", "conv"], r=4, alpha=8, rslora=rslora))
        copy_from_peft(theirs, handle)
        out_ours, out_theirs = ours(*inputs64), theirs(*inputs64)
        for a, b in zip(out_ours, out_theirs):
            assert rel(a, b) < 1e-6
        sum(o.square().sum() for o in out_ours).backward()
        sum(o.square().sum() for o in out_theirs).backward()
        names = {"A": "lora_A", "B": "lora_B", "magnitude": "lora_magnitude_vector"}
        assert_grads_match_peft(
            handle, theirs, {k: f"{v}.default.weight" for k, v in names.items()}
        )


def test_dora_matches_explicit_formula(base64, inputs64):
    ours = copy.deepcopy(base64)
    handle = inject(ours, DoRAConfig(targets=["lin", "conv"], r=3, alpha=6))
    for p in handle.trainable_parameters():
        nn.init.normal_(p)
    x, img = inputs64
    d = handle.layers["lin"].deltas["default"]
    V = base64.lin.weight + 2.0 * d.B @ d.A
    expected = x @ (d.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)).T + base64.lin.bias
    dc = handle.layers["conv"].deltas["default"]
    Vc = base64.conv.weight + 2.0 * (dc.B.flatten(1) @ dc.A.flatten(1)).reshape(
        base64.conv.weight.shape
    )
    kernel = dc.magnitude[:, None, None, None] * Vc / Vc.flatten(1).norm(dim=1)[:, None, None, None]
    expected_conv = torch.nn.functional.conv2d(img, kernel, base64.conv.bias, padding=1)
    y, yc = ours(x, img)
    assert rel(y, expected) < 1e-12
    assert rel(yc, expected_conv) < 1e-12


def test_dora_starts_at_the_base_output(base64, inputs64):
    ours = copy.deepcopy(base64)
    inject(ours, DoRAConfig(targets=["lin", "conv"], r=4))
    for a, b in zip(ours(*inputs64), base64(*inputs64)):
        assert rel(a, b) < 1e-14


def test_dora_gradcheck_with_the_norm_held_constant():
    g = torch.Generator().manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)

    W, A, B, m, x = make(4, 5), make(2, 5), make(4, 2), make(4), make(3, 5)
    # The norm depends on A and B only, so finite differences in x and m see the same function.
    assert torch.autograd.gradcheck(lambda x, m: x @ dora_weight(W, A, B, m, 0.7)[0].T, (x, m))
    # The norm is a constant in backward: the gradient is that of m / c * (W + s B A) with c fixed.
    y = (x @ dora_weight(W, A, B, m, 0.7)[0].T).sum()
    c = (W + 0.7 * B @ A).norm(dim=1).detach()
    z = (x @ ((m / c)[:, None] * (W + 0.7 * B @ A)).T).sum()
    for a, b in zip(torch.autograd.grad(y, (A, B, m)), torch.autograd.grad(z, (A, B, m))):
        assert rel(a, b) < 1e-12


def test_dora_config_validation_names_field_and_round_trips():
    with pytest.raises(PeftkitError, match="DoRAConfig.r"):
        DoRAConfig(r=0)
    with pytest.raises(PeftkitError, match="DoRAConfig.dropout"):
        DoRAConfig(dropout=0.1)
    with pytest.raises(PeftkitError, match="DoRAConfig.apply must be 'weight'"):
        DoRAConfig(apply="factored")
    config = DoRAConfig(targets=["lin"], r=2, alpha=3.0, rslora=True)
    assert AdapterConfig.from_json(config.to_json()) == config


def test_dora_weight_keeps_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    handle = inject(model, DoRAConfig(targets=["0"], r=2))
    for p in handle.trainable_parameters():
        nn.init.normal_(p, std=0.1)
    layer = model[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = layer.deltas["default"].transform_weight(
            layer.base.weight, layer.deltas["default"].scale
        )
    outside = layer.deltas["default"].transform_weight(
        layer.base.weight, layer.deltas["default"].scale
    )
    assert inside.dtype == torch.float32 and torch.equal(inside, outside)
