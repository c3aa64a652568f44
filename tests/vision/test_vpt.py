import math

import pytest
import torch

from peftkit.common_kernels.errors import PeftkitError
from peftkit.vision.methods import VisionAdapter, ViTMethodConfig
from peftkit.vision.vpt import VPTConfig, vpt_init_bound

P = 3


def _block_inputs(model, x):
    seen = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        for b in model.blocks
    ]
    out = model(x)
    for h in hooks:
        h.remove()
    return out, seen


@pytest.mark.parametrize("deep", [False, True])
def test_prompt_tokens_sit_after_cls_and_are_replaced_per_block_when_deep(images, deep, kit):
    model = kit.tiny_vit()
    _, plain = _block_inputs(model, images)
    adapter = VisionAdapter(model, ViTMethodConfig(vpt=VPTConfig(length=P, deep=deep)))
    prompts = model.peftkit_vpt.prompts.detach()
    assert prompts.shape == ((2 if deep else 1), P, 32)
    _, seen = _block_inputs(model, images)
    n_patches = (16 // 4) ** 2
    for t in seen:
        assert t.shape == (3, 1 + P + n_patches, 32)
    first = seen[0]
    assert torch.equal(first[:, 0], plain[0][:, 0])  # [CLS] (+ its position embedding) first
    assert torch.equal(first[:, 1 : 1 + P], prompts[0].expand(3, -1, -1))
    assert torch.equal(first[:, 1 + P :], plain[0][:, 1:])  # patches follow, untouched
    if deep:
        assert torch.equal(seen[1][:, 1 : 1 + P], prompts[1].expand(3, -1, -1))
    else:  # shallow: block 1 sees block 0's prompt outputs, not the prompts
        assert not torch.allclose(seen[1][:, 1 : 1 + P], prompts[0].expand(3, -1, -1))
    adapter.unload()
    assert not hasattr(model, "peftkit_vpt")


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_forward_matches_float64_formula(images, deep, kit):
    model = kit.tiny_vit()
    VisionAdapter(model, ViTMethodConfig(vpt=VPTConfig(length=P, deep=deep)))
    model.double()
    prompts = model.peftkit_vpt.prompts.detach()

    def tokens(
        i, t
    ):  # Eq. 4-7: insert after [CLS]; deep replaces them before every block; dropped at the end
        if i == 0:
            return torch.cat([t[:, :1], prompts[0].expand(len(t), -1, -1), t[:, 1:]], 1)
        if i == len(model.blocks):
            return torch.cat([t[:, :1], t[:, 1 + P :]], 1)
        if deep:
            return torch.cat([t[:, :1], prompts[i].expand(len(t), -1, -1), t[:, 1 + P :]], 1)
        return t

    x = images.double()
    torch.testing.assert_close(
        model(x), kit.reference_vit(model, x, tokens=tokens), rtol=0, atol=1e-12
    )


def test_vpt_init_is_the_official_uniform_bound(kit):
    torch.manual_seed(0)
    model = kit.tiny_vit(embed_dim=64, num_heads=2)
    VisionAdapter(model, ViTMethodConfig(vpt=VPTConfig(length=200, deep=True)))
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 64))
    assert vpt_init_bound((4, 4), 64) == pytest.approx(bound)
    p = model.peftkit_vpt.prompts.detach()
    assert p.abs().max() <= bound
    assert p.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_prompt_dropout_acts_only_in_training(images, kit):
    model = kit.tiny_vit()
    VisionAdapter(model, ViTMethodConfig(vpt=VPTConfig(length=P, dropout=0.5)))
    assert torch.equal(model(images), model(images))
    model.train()
    assert not torch.equal(model(images), model(images))


def test_prompts_are_dropped_before_the_final_norm_so_pooling_sees_cls_and_patches(images, kit):
    model = kit.tiny_vit(global_pool="avg")
    VisionAdapter(model, ViTMethodConfig(vpt=VPTConfig(length=P, deep=True)))
    assert model.forward_features(images).shape == (3, 1 + 16, 32)


def test_vpt_on_open_clip_tower_counts_tokens(images, kit):
    model = kit.tiny_clip()
    seen = []
    model.visual.transformer.resblocks[1].register_forward_pre_hook(
        lambda m, a: seen.append(a[0].shape)
    )
    out_plain = model(images)
    adapter = VisionAdapter(model, ViTMethodConfig(vpt=VPTConfig(length=P, deep=True)))
    model(images)
    assert seen[-1] == (3, 1 + P + 16, 32)
    adapter.unload()
    torch.testing.assert_close(model(images), out_plain, rtol=0, atol=0)


def test_vpt_config_rejects_bad_values():
    with pytest.raises(PeftkitError, match="length"):
        VPTConfig(length=0)
    with pytest.raises(PeftkitError, match="dropout"):
        VPTConfig(dropout=1.0)
