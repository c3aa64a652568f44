import pytest
import torch

from peftkit.common_kernels.errors import PeftkitError
from peftkit.vision.methods import VisionAdapter, ViTMethodConfig
from peftkit.vision.ssf import SSFConfig, fold_scale_shift, scale_shift


def _ssf_model(kit, **config):
    model = kit.tiny_vit()
    adapter = VisionAdapter(model, ViTMethodConfig(ssf=SSFConfig(**config)))
    return model, adapter


def test_ssf_forward_matches_float64_formula(images, kit):
    model, _ = _ssf_model(kit)
    model.double()
    pairs = model.peftkit_ssf

    def op(name, module, x):  # y = gamma ⊙ op(x) + beta after every chosen op
        y = kit.reference_vit.__globals__["plain_op"](name, module, x)
        key = name.replace(".", "__")
        if key not in pairs:
            return y
        g, b = pairs[key].gamma, pairs[key].beta
        return y * g.view(-1, 1, 1) + b.view(-1, 1, 1) if y.dim() == 4 else y * g + b

    assert (
        len(pairs) == 2 * 6 + 2
    )  # qkv, proj, fc1, fc2, norm1, norm2 per block; final norm; patch embedding
    x = images.double()
    torch.testing.assert_close(model(x), kit.reference_vit(model, x, op=op), rtol=0, atol=1e-12)


def test_ssf_init_follows_the_paper():
    torch.manual_seed(0)
    from peftkit.vision.ssf import ScaleShift

    pair = ScaleShift(100_000, 0.02)
    assert pair.gamma.mean().item() == pytest.approx(1.0, abs=1e-3)
    assert pair.gamma.std().item() == pytest.approx(0.02, rel=0.02)
    assert pair.beta.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert pair.beta.std().item() == pytest.approx(0.02, rel=0.02)


def test_reparameterized_ssf_equals_ssf_model_and_is_a_plain_vit(images, kit):
    plain_count = sum(p.numel() for p in kit.tiny_vit().parameters())
    model, adapter = _ssf_model(
        kit, init_std=0.3
    )  # far from identity, so folding is really exercised
    expected = model(images).detach()
    exported = adapter.reparameterize()
    got = exported(images).detach()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    assert sum(p.numel() for p in exported.parameters()) == plain_count
    assert not any("peftkit" in n for n, _ in exported.named_modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in exported.modules())


def test_fold_into_linear_conv_and_layernorm_is_exact():
    torch.manual_seed(0)
    g, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    for module, x, dim in [
        (torch.nn.Linear(4, 6, bias=False), torch.randn(2, 4), -1),
        (torch.nn.Conv2d(3, 6, 2, stride=2), torch.randn(2, 3, 4, 4), 1),
        (torch.nn.LayerNorm(6), torch.randn(2, 6), -1),
    ]:
        module.double()
        x = x.double()
        want = scale_shift(module(x), g, b, dim)
        fold_scale_shift(module, g, b)
        torch.testing.assert_close(module(x), want, rtol=0, atol=1e-12)


def test_ssf_on_open_clip_reparameterizes(images, kit):
    model = kit.tiny_clip()
    adapter = VisionAdapter(
        model,
        ViTMethodConfig(
            ssf=SSFConfig(sites=["fc1", "fc2", "norm1", "norm2", "norm", "patch"], init_std=0.2)
        ),
    )
    expected = model(images).detach()
    adapter.reparameterize()
    got = model(images).detach()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_ssf_config_rejects_unknown_sites():
    with pytest.raises(PeftkitError, match="sites"):
        SSFConfig(sites=["attn"])
