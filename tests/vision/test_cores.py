"""The cores from common_kernels on the ViT sites, checked against their formulas in float64."""

import pytest
import torch

from peftkit.common_kernels.errors import PeftkitError
from peftkit.vision.methods import VisionAdapter, ViTMethodConfig
from peftkit.vision.vpt import VPTConfig

SITES = [
    "blocks.0.attn.qkv",
    "blocks.0.attn.proj",
    "blocks.0.mlp.fc1",
    "blocks.0.mlp.fc2",
    "blocks.1.attn.qkv",
    "blocks.1.attn.proj",
    "blocks.1.mlp.fc1",
    "blocks.1.mlp.fc2",
]


def _adapted(kit, spec, **options):
    model = kit.tiny_vit()
    adapter = VisionAdapter(model, ViTMethodConfig.parse(spec, **options))
    return model, adapter


def _randomize(adapter):
    torch.manual_seed(3)
    with torch.no_grad():
        for _name, p in adapter.core.named_parameters():
            p.normal_(0, 0.2)


def _skew(vec, b):
    Q = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    rows, cols = torch.triu_indices(b, b, 1)
    Q[:, rows, cols] = vec
    return Q - Q.transpose(1, 2)


def _delta_op(kit, adapter, kind):
    plain = kit.reference_vit.__globals__["plain_op"]
    layers = adapter.core.layers

    def op(name, module, x):
        if name not in layers:
            return plain(name, module, x)
        d = layers[name].deltas["vision"]
        W, b = module.base.weight, module.base.bias
        if kind == "lora":  # y = W x + b + (alpha / r) B A x
            return x @ W.T + b + d.scaling * (x @ d.A.T @ d.B.T)
        if kind == "oft":  # y = W (R x) + b, R = blockdiag((I + Q_i)(I - Q_i)^-1)
            Q = _skew(d.Q, d.block_size)
            eye = torch.eye(d.block_size, dtype=x.dtype)
            R = torch.block_diag(*[(eye + q) @ torch.linalg.inv(eye - q) for q in Q])
            return (x @ R.T) @ W.T + b
        if kind == "dora":  # y = m (W + s B A) x / ||W + s B A||_row + b
            V = W + d.scaling * d.B @ d.A
            return x @ (d.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)).T + b
        if kind == "loha":  # y = W x + b + s ((w1a w1b) * (w2a w2b)) x
            return x @ (W + d.scaling * (d.w1a @ d.w1b) * (d.w2a @ d.w2b)).T + b
        if kind == "boft":  # one factor: y = diag(s) W M^T x + b, M = blockdiag((I - S)(I + S)^-1)
            S = (d.boft_R[0] - d.boft_R[0].transpose(1, 2)) / 2
            eye = torch.eye(S.shape[-1], dtype=x.dtype)
            M = torch.block_diag(*[(eye - q) @ torch.linalg.inv(eye + q) for q in S])
            return x @ (d.boft_s[:, None] * W @ M.T).T + b
        W2 = d.W2a @ d.W2b if hasattr(d, "W2a") else d.W2  # y = W x + b + s (W1 ⊗ W2) x
        return x @ (W + d.scaling * torch.kron(d.W1, W2)).T + b

    return op


@pytest.mark.parametrize(
    "spec,options",
    [
        ("lora", {"r": 2}),
        ("oft", {"block_size": 8}),
        ("kron", {"r": 2}),
        ("dora", {"r": 2}),
        ("loha", {"r": 2}),
        ("boft", {"block_size": 8}),
    ],
)
def test_core_starts_at_base_then_matches_float64_formula(images, kit, spec, options):
    base = kit.tiny_vit()(images)
    model, adapter = _adapted(kit, spec, **options)
    assert sorted(adapter.core.layers) == sorted(SITES)
    torch.testing.assert_close(
        model(images), base, rtol=0, atol=1e-6 if spec in ("oft", "dora") else 0
    )
    _randomize(adapter)
    model.double()
    x = images.double()
    torch.testing.assert_close(
        model(x), kit.reference_vit(model, x, op=_delta_op(kit, adapter, spec)), rtol=0, atol=1e-10
    )


@pytest.mark.parametrize(
    "spec,options",
    [
        ("lora", {"r": 2}),
        ("oft", {"block_size": 8}),
        ("kron", {"r": 2}),
        ("ssf+lora", {"r": 2}),
        ("dora", {"r": 2}),
        ("loha", {"r": 2}),
        ("boft", {"block_size": 8}),
    ],
)
def test_merged_model_is_a_plain_vit_with_the_same_output(images, kit, spec, options):
    plain = kit.tiny_vit()
    names = sorted(n for n, _ in plain.named_parameters())
    model, adapter = _adapted(kit, spec, **options)
    _randomize(adapter)
    expected = model(images).detach()
    exported = adapter.reparameterize()
    got = exported(images).detach()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    assert sorted(n for n, _ in exported.named_parameters()) == names
    assert all(type(exported.get_submodule(n)) is torch.nn.Linear for n in SITES)


def test_lora_parameter_count_and_sites(kit):
    _, adapter = _adapted(kit, "lora", r=2, core_sites=["qkv", "fc2"])
    d, r, depth = 32, 2, 2
    assert adapter.parameter_counts()["trainable_without_head"] == depth * (
        r * (d + 3 * d) + r * (4 * d + d)
    )


def test_vpt_composes_with_lora_and_starts_at_vpt_alone(images, kit):
    torch.manual_seed(7)
    model = kit.tiny_vit()
    vpt_only = VisionAdapter(model, ViTMethodConfig(vpt=VPTConfig(length=2, deep=True)))
    prompts = model.peftkit_vpt.prompts.detach().clone()
    want = model(images).detach()
    vpt_only.unload()
    both = VisionAdapter(model, ViTMethodConfig.parse("vpt-deep+lora", vpt_length=2, r=2))
    with torch.no_grad():
        model.peftkit_vpt.prompts.copy_(prompts)
    torch.testing.assert_close(model(images), want, rtol=0, atol=0)
    keys = set(both.state_dict())
    assert "vpt.prompts" in keys and "lora.blocks.0.attn.qkv.A" in keys and "head.weight" in keys
    assert both.config.name == "vpt-deep+lora"


def test_open_clip_cores_wrap_the_mlp_and_merge(images, kit):
    model = kit.tiny_clip()
    with torch.no_grad():
        base = model(images)
    adapter = VisionAdapter(model, ViTMethodConfig.parse("lora", r=2, core_sites=["fc1", "fc2"]))
    assert sorted(adapter.core.layers) == [
        f"visual.transformer.resblocks.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(images), base, rtol=0, atol=0)
        _randomize(adapter)
        expected = model(images)
        adapter.reparameterize()
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)


def test_method_config_round_trips_and_rejects_unknown_names():
    config = ViTMethodConfig.parse("vpt-deep+ssf+kron+bitfit", vpt_length=4, r=4, factor=4)
    assert ViTMethodConfig.from_json(config.to_json()) == config
    assert config.name == "bitfit+vpt-deep+ssf+kron"
    with pytest.raises(PeftkitError, match="unknown method"):
        ViTMethodConfig.parse("prefix")
    with pytest.raises(PeftkitError, match="no field"):
        ViTMethodConfig.from_dict({"prompt": 3})
