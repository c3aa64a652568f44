import copy

import pytest
import torch
from torch import nn

from peftkit.common_kernels import (
    BOFTConfig,
    OFTConfig,
    PeftkitError,
    cayley,
    inject,
    oft_rotation,
    rotate_input,
    skew,
)

from .conftest import peft_model, peft_params, rel


def test_oft_matches_peft_exact_cayley_in_float64(base64, inputs64):
    from peft import OFTConfig as PeftOFT

    for block_size in (4, 8):
        theirs = peft_model(
            base64,
            PeftOFT(
                r=0,
                oft_block_size=block_size,
                target_modules=["lin"],
                use_cayley_neumann=False,
                coft=False,
            ),
        )
        state = peft_params(
            theirs, {"oft_R.default.weight": "Q"}, lambda p: nn.init.normal_(p, std=0.3)
        )
        ours = copy.deepcopy(base64)
        inject(ours, OFTConfig(targets=["lin"], block_size=block_size)).load_state_dict(state)
        assert rel(ours(*inputs64)[0], theirs(*inputs64)[0]) < 1e-6


def test_oft_matches_explicit_formula_linear_and_conv(base64, inputs64):
    ours = copy.deepcopy(base64)
    handle = inject(ours, OFTConfig(targets=["lin", "conv"], block_size=4))
    for p in handle.trainable_parameters():
        nn.init.normal_(p, std=0.5)
    x, img = inputs64

    def full_rotation(Q, b):
        blocks = []
        for q in Q:
            S = torch.zeros(b, b, dtype=torch.float64)
            iu = torch.triu_indices(b, b, 1)
            S[iu[0], iu[1]] = q
            S = S - S.T
            I = torch.eye(b, dtype=torch.float64)
            blocks.append((I + S) @ torch.linalg.inv(I - S))
        return torch.block_diag(*blocks)

    R = full_rotation(handle.layers["lin"].deltas["default"].Q, 4)
    assert torch.allclose(R @ R.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    expected = x @ (base64.lin.weight @ R).T + base64.lin.bias
    Rc = full_rotation(handle.layers["conv"].deltas["default"].Q, 4)
    W = base64.conv.weight
    kernel = (W.flatten(1) @ Rc).reshape(W.shape)
    expected_conv = torch.nn.functional.conv2d(img, kernel, base64.conv.bias, padding=1)
    y, yc = ours(x, img)
    assert rel(y, expected) < 1e-12
    assert rel(yc, expected_conv) < 1e-12


def test_oft_starts_at_identity(base64, inputs64):
    ours = copy.deepcopy(base64)
    inject(ours, OFTConfig(targets=["lin", "conv"], block_size=4))
    for a, b in zip(ours(*inputs64), base64(*inputs64)):
        assert rel(a, b) < 1e-15


def test_oft_gradcheck():
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, x: rotate_input(x, oft_rotation(v, 4, 2)), (vec, x))
    assert torch.autograd.gradcheck(
        lambda v, x: rotate_input(x, oft_rotation(v, 4, 2, coft_eps=0.5)), (vec, x)
    )


def test_coft_keeps_each_block_within_radius():
    vec = torch.randn(4, 6, dtype=torch.float64) * 10
    eps = 0.2
    R = oft_rotation(vec, 4, 4, coft_eps=eps)
    Q_limited = torch.linalg.solve(
        R + torch.eye(4, dtype=torch.float64), R - torch.eye(4, dtype=torch.float64)
    )
    assert torch.all(torch.linalg.matrix_norm(Q_limited) <= eps / 2 + 1e-9)


def test_block_share_uses_one_block_for_all():
    model = nn.Sequential(nn.Linear(16, 8))
    handle = inject(model, OFTConfig(targets=["0"], block_size=4, block_share=True))
    delta = handle.layers["0"].deltas["default"]
    assert delta.Q.shape == (1, 6)
    nn.init.normal_(delta.Q)
    R = delta.rotation()
    assert R.shape == (4, 4, 4) and torch.allclose(R[0], R[3])


def test_cayley_is_orthogonal_and_skew_is_skew():
    S = skew(torch.randn(3, 10, dtype=torch.float64), 5)
    assert torch.allclose(S, -S.transpose(1, 2))
    R = cayley(S)
    assert torch.allclose(
        R @ R.transpose(1, 2), torch.eye(5, dtype=torch.float64).expand(3, 5, 5), atol=1e-12
    )


def test_oft_bad_block_size_is_explained():
    with pytest.raises(PeftkitError, match="divisor of 10"):
        inject(nn.Sequential(nn.Linear(10, 4)), OFTConfig(targets=["0"], block_size=4))
    with pytest.raises(PeftkitError, match="exactly one of block_size and n_blocks"):
        OFTConfig(block_size=4, n_blocks=2)


@pytest.mark.parametrize(
    "config",
    [
        OFTConfig(targets=["0", "2", "4"], block_size=4, coft=True, eps=0.5),
        BOFTConfig(targets=["0", "2", "4"], block_size=4, n_butterfly_factor=2),
    ],
)
def test_batched_rotations_equal_per_layer_rotations_with_gradients(config):
    """The model-level hook builds all layers' R at once; outputs and gradients must not change."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 8)
    ).double()
    handle = inject(model, config)
    for p in handle.trainable_parameters():
        nn.init.normal_(p, std=0.4)
    handle.set_scale(0.8)
    x = torch.randn(6, 16, dtype=torch.float64)
    seen = []
    model[2].register_forward_hook(
        lambda m, i, o: seen.append(m.deltas["default"]._batched is not None)
    )
    batched = model(x)
    batched.square().sum().backward()
    grads = [p.grad.clone() for p in handle.trainable_parameters()]
    for p in handle.trainable_parameters():
        p.grad = None
    assert all(handle.layers[n].deltas["default"]._batched is None for n in handle.layers), (
        "cache not released"
    )
    y = x
    for module in model:  # calling layers one by one bypasses the model-level hook
        y = module(y)
    y.square().sum().backward()
    assert seen == [True, False], (
        "the whole-model call must use the batched rotations, the layer calls not"
    )
    assert rel(batched, y) < 1e-12
    for g, p in zip(grads, handle.trainable_parameters()):
        assert rel(g, p.grad) < 1e-10
