import copy
import types

import pytest
import torch

from peftkit.common_kernels import AdapterConfig, BOFTConfig, OFTConfig, PeftkitError, inject
from peftkit.common_kernels.boft import boft_blocks, butterfly_blocks, butterfly_permutation
from peftkit.common_kernels.oft import rotate_weight

from .conftest import assert_grads_match_peft, peft_model, rel

CASES = [  # (block_size, n_butterfly_factor, targets)
    (4, 1, ["lin", "conv"]),
    (2, 2, ["lin", "conv"]),
    (2, 3, ["lin"]),
]


def block_diagonal_by_torch():
    """Stands in for peft's CUDA block-diagonal extension, without which peft silently drops
    butterfly factors beyond the first (it is what peft's own fallback computes for one factor)."""

    def backward(grad, blocks):
        # The gradient of the block-diagonal matrix's diagonal blocks: g[n, d, i, d, j].
        N, D, H, _ = blocks.shape
        return [torch.diagonal(grad.reshape(N, D, H, D, H), dim1=1, dim2=3).permute(0, 3, 1, 2)]

    return types.SimpleNamespace(
        forward=lambda blocks: [torch.stack([torch.block_diag(*b.unbind(0)) for b in blocks])],
        backward=backward,
    )


def randomized(model, handle=None):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "boft_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
                if "boft_s" in name:
                    p.add_(1.0)


@pytest.mark.parametrize("block_size, factors, targets", CASES)
def test_boft_matches_peft_forward_and_gradients_in_float64(
    base64, inputs64, monkeypatch, block_size, factors, targets
):
    import peft.tuners.boft.layer as peft_boft
    from peft import BOFTConfig as PeftBOFTConfig

    monkeypatch.setattr(peft_boft, "get_fbd_cuda", block_diagonal_by_torch)
    theirs = peft_model(
        base64,
        PeftBOFTConfig(
            boft_block_size=block_size, boft_n_butterfly_factor=factors, target_modules=targets
        ),
    )
    randomized(theirs)
    ours = copy.deepcopy(base64)
    handle = inject(
        ours, BOFTConfig(targets=targets, block_size=block_size, n_butterfly_factor=factors)
    )
    state = {}
    for name, p in theirs.named_parameters():
        if ".boft_" in name:
            module, param = name.split("base_model.model.")[1].split(".default")[0].rsplit(".", 1)
            state[f"{module}.{param}"] = p.detach().reshape(-1) if param == "boft_s" else p.detach()
    handle.load_state_dict(state)
    out_ours, out_theirs = ours(*inputs64), theirs(*inputs64)
    for a, b in zip(out_ours, out_theirs):
        assert rel(a, b) < 1e-6
    sum(o.square().sum() for o in out_ours).backward()
    sum(o.square().sum() for o in out_theirs).backward()
    assert_grads_match_peft(
        handle, theirs, {"boft_R": "boft_R.default", "boft_s": "boft_s.default"}
    )


def test_boft_matches_explicit_formula(base64, inputs64):
    ours = copy.deepcopy(base64)
    handle = inject(ours, BOFTConfig(targets=["lin", "conv"], block_size=2, n_butterfly_factor=2))
    randomized(ours)
    x, img = inputs64
    expected = []
    for name in ("lin", "conv"):
        d = handle.layers[name].deltas["default"]
        n = d.geometry.fan_in
        M = torch.eye(n, dtype=torch.float64)
        for i, blocks in enumerate(boft_blocks(d.boft_R)):
            perm = (
                torch.arange(n) if i == 0 else butterfly_permutation(n, d.boft_R.shape[1] // 2, 1)
            )
            P = torch.eye(n, dtype=torch.float64)[perm]  # P[k, perm[k]] = 1
            M = P @ torch.block_diag(*blocks) @ P.T @ M
        W = getattr(base64, name).weight
        expected.append((d.boft_s[:, None] * (W.flatten(1) @ M.T)).reshape(W.shape))
    y, yc = ours(x, img)
    assert rel(y, x @ expected[0].T + base64.lin.bias) < 1e-12
    conv = torch.nn.functional.conv2d(img, expected[1], base64.conv.bias, padding=1)
    assert rel(yc, conv) < 1e-12


@pytest.mark.parametrize("factors", [1, 2])
def test_boft_dense_butterflies_formed_before_the_forward_equal_the_factor_by_factor_path(
    base64, inputs64, factors
):
    """Through the model each layer applies its M^T formed with all layers' before the forward;
    called alone it rotates factor by factor: same outputs and gradients in float64."""
    ours = copy.deepcopy(base64)
    handle = inject(
        ours, BOFTConfig(targets=["lin", "conv"], block_size=2, n_butterfly_factor=factors)
    )
    randomized(ours)
    handle.set_scale(0.6)
    dense = []
    ours.lin.register_forward_hook(lambda m, a, o: dense.append(m.deltas["default"]._rotated))
    x, img = inputs64
    params = handle.trainable_parameters()
    y, yc = ours(x, img)
    alone, alone_c = ours.lin(x), ours.conv(img)
    assert dense[0] is not None and dense[1] is None
    assert rel(y, alone) < 1e-12 and rel(yc, alone_c) < 1e-12
    for g, e in zip(
        torch.autograd.grad(y.square().sum() + yc.square().sum(), params),
        torch.autograd.grad(alone.square().sum() + alone_c.square().sum(), params),
    ):
        assert rel(g, e) < 1e-12


def test_boft_layers_of_one_shape_rotated_together_equal_each_alone_and_see_merges():
    """Three same-shape layers get diag(s) W M^T from one batched GEMM before the forward: equal
    to each layer alone, gradients too, and a merge of another adapter into a base weight
    (an in-place change) is part of the next forward's batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)]).double()
    handle = inject(model, BOFTConfig(targets=["0", "1", "2"], block_size=2, n_butterfly_factor=2))
    randomized(model)
    rotated = []
    model[1].register_forward_hook(lambda m, a, o: rotated.append(m.deltas["default"]._rotated))
    x = torch.randn(4, 8, dtype=torch.float64)
    params = handle.trainable_parameters()
    for _ in range(2):
        y = model(x)
        alone = model[2](model[1](model[0](x)))
        assert rotated[-2] is not None and rotated[-1] is None
        assert rel(y, alone) < 1e-12
        for g, e in zip(
            torch.autograd.grad(y.square().sum(), params),
            torch.autograd.grad(alone.square().sum(), params),
        ):
            assert rel(g, e) < 1e-12
        with torch.no_grad():  # as a merged adapter writes into the base weight
            model[1].base.weight.mul_(1.5)


def test_boft_after_another_rotation_rotates_alone_and_lets_the_base_go():
    """A kernel rotated by OFT first reaches BOFT as a new tensor: the batched rotation of the
    base does not apply; BOFT rotates what it gets and stops holding the base weight."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1)).double()
    inject(model, OFTConfig(targets=["0"], block_size=4), name="oft")
    inject(model, BOFTConfig(targets=["0"], block_size=2, n_butterfly_factor=2), name="boft")
    randomized(model)
    layer = model[0]
    with torch.no_grad():
        layer.deltas["oft"].Q.normal_(std=0.1)
        W = layer.deltas["oft"].merge_weight(layer.base.weight, 1.0)
        W = layer.deltas["boft"].merge_weight(W, 1.0)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    y = model(x)
    assert rel(y, torch.nn.functional.conv2d(x, W, layer.base.bias, padding=1)) < 1e-12
    assert layer.deltas["boft"]._base == ()


def butterfly_rotation(W, blocks, perms):
    """W M^T through M^T's diagonal blocks."""
    return rotate_weight(W, butterfly_blocks(blocks[None], perms)[0])


def test_boft_blocks_are_orthogonal_and_the_butterfly_inverts():
    g = torch.Generator().manual_seed(0)
    R = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=g)
    blocks = boft_blocks(R)
    eye = torch.eye(2, dtype=torch.float64)
    assert (blocks @ blocks.transpose(-1, -2) - eye).abs().max() < 1e-12
    # Three factors of 2x2 blocks: M^T is one 8x8 block, whose factors 1 and 2 are permuted.
    perms = [None] + [butterfly_permutation(8, 4 // 2**i, 1) for i in (1, 2)]
    Mt = butterfly_blocks(blocks[None], perms)[0, 0]
    assert (Mt @ Mt.T - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-12
    W = torch.randn(5, 8, dtype=torch.float64, generator=g)
    rotated = butterfly_rotation(W, blocks, perms)
    assert rel(rotated @ Mt.T, W) < 1e-12


def test_boft_m_factors_give_a_block_diagonal_m_of_block_size_2_to_the_m_minus_1_b():
    """Two factors of 2x2 blocks on 16 columns: M^T has four 4x4 diagonal blocks, zeros elsewhere."""
    g = torch.Generator().manual_seed(1)
    blocks = boft_blocks(torch.randn(2, 8, 2, 2, dtype=torch.float64, generator=g))
    perms = [None, butterfly_permutation(4, 1, 1)]
    diagonal = butterfly_blocks(blocks[None], perms)[0]
    full = torch.eye(16, dtype=torch.float64)
    for i in range(2):  # the factors on all 16 columns, as peft lays them out
        perm = torch.arange(16) if i == 0 else butterfly_permutation(16, 4, 1)
        D = torch.block_diag(*blocks[i].transpose(-1, -2))
        full = full @ D[perm][:, perm]
    assert diagonal.shape == (4, 4, 4)
    assert rel(torch.block_diag(*diagonal), full) < 1e-14


def test_boft_gradcheck():
    g = torch.Generator().manual_seed(0)
    R = torch.randn(2, 4, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    perms = [None, butterfly_permutation(4, 1, 1)]
    assert torch.autograd.gradcheck(
        lambda R, W: butterfly_rotation(W, boft_blocks(R, 0.7), perms), (R, W)
    )


def test_boft_starts_at_the_base_output_and_scale_zero_is_the_base(base64, inputs64):
    ours = copy.deepcopy(base64)
    handle = inject(ours, BOFTConfig(targets=["lin", "conv"], block_size=2, n_butterfly_factor=2))
    for a, b in zip(ours(*inputs64), base64(*inputs64)):
        assert rel(a, b) < 1e-14
    randomized(ours)
    handle.set_scale(0.0)
    for a, b in zip(ours(*inputs64), base64(*inputs64)):
        assert rel(a, b) < 1e-14


def test_boft_config_validation_names_field_and_round_trips(base64):
    with pytest.raises(PeftkitError, match="exactly one of block_size and n_blocks"):
        BOFTConfig(block_size=4, n_blocks=2)
    with pytest.raises(PeftkitError, match="BOFTConfig.n_butterfly_factor"):
        BOFTConfig(n_butterfly_factor=0)
    with pytest.raises(PeftkitError, match=r"BOFT cannot split module 'conv' \(fan_in=36\)"):
        inject(
            copy.deepcopy(base64), BOFTConfig(targets=["conv"], block_size=4, n_butterfly_factor=2)
        )
    config = BOFTConfig(targets=["lin"], n_blocks=4, block_size=0, n_butterfly_factor=3)
    assert AdapterConfig.from_json(config.to_json()) == config
