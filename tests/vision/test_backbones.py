import pytest
import torch
from safetensors.torch import save_file

from peftkit.common_kernels.errors import PeftkitError
from peftkit.vision.backbones import create_backbone, normalization, vit_layout


def test_local_safetensors_checkpoint_loads_and_drops_a_head_of_another_size(tmp_path, images, kit):
    source = kit.tiny_vit(num_classes=7, seed=3)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_backbone(
        "vit_tiny_patch16_224", num_classes=5, checkpoint=str(path), **kit.TINY
    ).eval()
    assert torch.equal(model.forward_features(images), source.forward_features(images))
    assert model.head.out_features == 5


def test_pickle_checkpoints_are_refused(tmp_path, kit):
    with pytest.raises(PeftkitError, match=r"\.safetensors"):
        create_backbone("vit_tiny_patch16_224", checkpoint=str(tmp_path / "vit.pth"), **kit.TINY)


def test_unreachable_hub_tells_how_to_pass_a_local_file(monkeypatch, kit):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PeftkitError) as err:
        create_backbone("vit_base_patch16_224", pretrained=True)
    message = str(err.value)
    assert "timm/vit_base_patch16_224" in message and "hf download timm/" in message
    assert "--checkpoint " in message and "--model starter" in message


def test_unknown_model_names_are_reported(kit):
    with pytest.raises(PeftkitError, match="timm has no model"):
        create_backbone("vit_gigantic_patch3")
    with pytest.raises(PeftkitError, match="open_clip has no model"):
        create_backbone(open_clip="ViT-Z-99")


def test_layouts_of_timm_and_open_clip(kit):
    timm_layout = vit_layout(kit.tiny_vit())
    assert timm_layout.site_names("qkv") == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert timm_layout.patch_size == (4, 4) and timm_layout.num_prefix_tokens == 1
    clip = kit.tiny_clip()
    clip_layout = vit_layout(clip)
    assert clip_layout.site_names("fc2") == [
        f"visual.transformer.resblocks.{i}.mlp.c_proj" for i in range(2)
    ]
    assert normalization(clip)[0][0] == pytest.approx(0.4815, abs=1e-4)
    with pytest.raises(PeftkitError, match="not a supported ViT"):
        vit_layout(torch.nn.Linear(2, 2))
