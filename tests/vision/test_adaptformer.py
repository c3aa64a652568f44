import pytest
import torch
import torch.nn.functional as F

from peftkit.common_kernels.errors import PeftkitError
from peftkit.vision.adaptformer import AdaptFormerConfig
from peftkit.vision.methods import VisionAdapter, ViTMethodConfig


def test_adaptformer_starts_exactly_at_the_base_output(images, kit):
    model = kit.tiny_vit()
    base = model(images)
    VisionAdapter(model, ViTMethodConfig(adaptformer=AdaptFormerConfig(bottleneck=8)))
    assert torch.equal(model(images), base)
    ups = [a.up.weight for a in model.peftkit_adaptformer]
    assert all(torch.count_nonzero(w) == 0 for w in ups)
    assert all(torch.count_nonzero(a.down.weight) > 0 for a in model.peftkit_adaptformer)


def test_adaptformer_forward_matches_float64_formula(images, kit):
    model = kit.tiny_vit()
    VisionAdapter(model, ViTMethodConfig(adaptformer=AdaptFormerConfig(bottleneck=8, scale=0.3)))
    model.double()
    with torch.no_grad():
        for a in model.peftkit_adaptformer:
            a.up.weight.normal_()
            a.up.bias.normal_()
    adapters = model.peftkit_adaptformer

    def extra(i, h):  # Eq. 4-5: x' = x + MLP(LN(x)) + s * W_up ReLU(W_down LN(x))
        a = adapters[i]
        return 0.3 * (F.relu(h @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)

    x = images.double()
    torch.testing.assert_close(
        model(x), kit.reference_vit(model, x, mlp_extra=extra), rtol=0, atol=1e-12
    )


def test_adaptformer_parameter_count_and_unload(images, kit):
    model = kit.tiny_vit()
    base = model(images)
    adapter = VisionAdapter(model, ViTMethodConfig(adaptformer=AdaptFormerConfig(bottleneck=8)))
    d, b, depth = 32, 8, 2
    assert adapter.parameter_counts()["trainable_without_head"] == depth * (d * b + b + b * d + d)
    with torch.no_grad():
        model.peftkit_adaptformer[0].up.weight.fill_(1.0)
    assert not torch.equal(model(images), base)
    adapter.unload()
    assert torch.equal(model(images), base)
    assert not hasattr(model, "peftkit_adaptformer")


def test_adaptformer_on_open_clip_starts_at_base(images, kit):
    model = kit.tiny_clip()
    # no_grad in both: nn.MultiheadAttention switches kernels when its inputs require grad.
    with torch.no_grad():
        base = model(images)
        VisionAdapter(model, ViTMethodConfig(adaptformer=AdaptFormerConfig(bottleneck=4)))
        assert torch.equal(model(images), base)


def test_adaptformer_config_rejects_bad_values():
    with pytest.raises(PeftkitError, match="bottleneck"):
        AdaptFormerConfig(bottleneck=0)
    with pytest.raises(PeftkitError, match="scale"):
        AdaptFormerConfig(scale=0)
