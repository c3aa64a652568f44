import copy

import pytest
import torch
from torch import nn

from peftkit.common_kernels import KronConfig, PeftkitError, factorize, inject, kron_linear_delta

from .conftest import peft_model, peft_params, rel


@pytest.mark.parametrize("apply", ["factored", "weight"])
@pytest.mark.parametrize("r", [1, 8])
def test_lokr_matches_peft_on_linear_and_conv_in_float64(base64, inputs64, r, apply):
    from peft import LoKrConfig

    theirs = peft_model(base64, LoKrConfig(r=r, alpha=3, target_modules=["lin", "conv"]))
    mapping = {
        f"lokr_{k}.default": v
        for k, v in {"w1": "W1", "w2": "W2", "w2_a": "W2a", "w2_b": "W2b"}.items()
    }
    state = peft_params(theirs, mapping, nn.init.normal_)
    ours = copy.deepcopy(base64)
    handle = inject(ours, KronConfig(targets=["lin", "conv"], r=r, alpha=3, apply=apply))
    assert {k: v.shape for k, v in state.items()} == {
        k: v.shape for k, v in handle.state_dict().items()
    }
    handle.load_state_dict(state)
    for a, b in zip(ours(*inputs64), theirs(*inputs64)):
        assert rel(a, b) < 1e-6


def test_factorize_matches_peft_rule():
    from peft.tuners.lokr.layer import factorization

    for dim in [1, 2, 7, 12, 16, 24, 64, 96, 127, 128, 320, 640, 768, 1280, 2304, 3072]:
        for factor in (-1, 2, 4, 8, 16):
            assert factorize(dim, factor) == factorization(dim, factor), (dim, factor)


def test_factored_apply_equals_the_kronecker_product():
    g = torch.Generator().manual_seed(0)
    W1 = torch.randn(3, 4, dtype=torch.float64, generator=g)
    W2 = torch.randn(5, 6, dtype=torch.float64, generator=g)
    x = torch.randn(2, 7, 24, dtype=torch.float64, generator=g)
    expected = 0.5 * x @ torch.kron(W1, W2).T
    assert rel(kron_linear_delta(x, W1, W2, 0.5), expected) < 1e-13
    W2a, W2b = (
        torch.randn(5, 2, dtype=torch.float64, generator=g),
        torch.randn(2, 6, dtype=torch.float64, generator=g),
    )
    assert (
        rel(kron_linear_delta(x, W1, (W2a, W2b), 0.5), 0.5 * x @ torch.kron(W1, W2a @ W2b).T)
        < 1e-13
    )


def test_kron_gradcheck():
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(2, 12, dtype=torch.float64, generator=g, requires_grad=True),
        torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True),
        torch.randn(4, 4, dtype=torch.float64, generator=g, requires_grad=True),
    )
    assert torch.autograd.gradcheck(lambda x, a, b: kron_linear_delta(x, a, b, 1.3), args)


@pytest.mark.parametrize("init", ["w1_zero", "w2_zero"])
def test_kron_starts_at_the_base_output(base64, inputs64, init):
    ours = copy.deepcopy(base64)
    inject(ours, KronConfig(targets=["lin", "conv"], r=2, init=init, decompose_both=True))
    for a, b in zip(ours(*inputs64), base64(*inputs64)):
        assert torch.equal(a, b)


def test_kron_config_validation():
    with pytest.raises(PeftkitError, match="KronConfig.factor"):
        KronConfig(factor=0)


@pytest.mark.parametrize("decompose_both", [False, True])
def test_batched_weight_space_deltas_equal_per_layer_ones_with_gradients(decompose_both):
    """The model-level hook forms all equal-shaped Kronecker deltas at once; nothing may change."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Conv2d(16, 8, 1)

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x))))[:, :, None, None])

    model = Net().double()

    def forward(x, whole):
        if whole:
            return model(x)
        return Net.forward(model, x)  # calls the layers without the model-level hook

    handle = inject(
        model,
        KronConfig(targets=["a", "b", "c"], r=1, apply="weight", decompose_both=decompose_both),
    )
    for p in handle.trainable_parameters():
        nn.init.normal_(p)
    handle.set_scale(0.7)
    x = torch.randn(5, 16, dtype=torch.float64)
    seen = []
    model.a.register_forward_hook(
        lambda m, i, o: seen.append(m.deltas["default"]._batched is not None)
    )
    outs, grads = [], []
    for whole in (True, False):
        out = forward(x, whole)
        out.square().sum().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in handle.trainable_parameters()])
        for p in handle.trainable_parameters():
            p.grad = None
    assert seen == [True, False], (
        "the whole-model call must use the batched deltas, the layer calls not"
    )
    assert rel(outs[0], outs[1]) < 1e-12
    for a, b in zip(*grads):
        assert rel(a, b) < 1e-10
    assert all(layer.deltas["default"]._batched is None for layer in handle.layers.values())
