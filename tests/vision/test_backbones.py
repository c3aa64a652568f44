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


# ---- Swin, DINOv2, open_clip towers ----

SWIN = dict(img_size=32, embed_dim=32, depths=(1, 1), num_heads=(1, 2), window_size=4)
DINO = dict(img_size=28, embed_dim=32, depth=2, num_heads=2)


def _swin(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return create_backbone("swin_tiny_patch4_window7_224", num_classes=num_classes, **SWIN).eval()


def test_swin_layout_has_per_stage_widths_and_refuses_vpt_in_one_line():
    from peftkit.vision.methods import VisionAdapter, ViTMethodConfig

    layout = vit_layout(_swin())
    assert layout.blocks == ["layers.0.blocks.0", "layers.1.blocks.0"]
    assert layout.block_dims == [32, 64] and layout.head == "head.fc"
    assert layout.site_names("fc2") == ["layers.0.blocks.0.mlp.fc2", "layers.1.blocks.0.mlp.fc2"]
    with pytest.raises(PeftkitError) as err:
        VisionAdapter(_swin(), ViTMethodConfig.parse("vpt-deep+lora"))
    message = str(err.value)
    assert "\n" not in message and "vpt-deep" in message and "swin" in message
    assert "lora" not in message.split("(")[0]


@pytest.mark.parametrize("method", ["lora", "oft", "kron", "ssf", "adaptformer", "bitfit", "full"])
def test_swin_takes_the_cores_ssf_adaptformer_and_baselines_starting_at_the_base(method):
    from peftkit.vision.methods import VisionAdapter, ViTMethodConfig

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _swin()
    base = model.forward_head(model.forward_features(x), pre_logits=True).detach()
    adapter = VisionAdapter(model, ViTMethodConfig.parse(method, block_size=16, bottleneck=8))
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    if method != "ssf":  # SSF starts near (not at) identity: gamma ~ N(1, 0.02)
        torch.testing.assert_close(features, base, rtol=0, atol=1e-6)
    model(x).logsumexp(-1).sum().backward()
    grads = [p.grad for p in adapter.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_ssf_and_lora_on_swin_fold_into_a_plain_swin():
    from peftkit.vision.methods import VisionAdapter, ViTMethodConfig
    from peftkit.vision.ssf import SSFConfig

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).double()
    model = _swin().double()
    config = ViTMethodConfig.parse("ssf+lora", r=2)
    config.ssf = SSFConfig(init_std=0.3)
    adapter = VisionAdapter(model, config)
    with torch.no_grad():
        for _, p in adapter.core.named_parameters():
            p.normal_(0, 0.1)
        expected = model(x)
        plain = adapter.reparameterize()
        torch.testing.assert_close(plain(x), expected, rtol=1e-10, atol=1e-10)
    assert not any("peftkit" in n or ".base." in n for n, _ in plain.named_parameters())


def test_swin_t_trainable_counts_follow_the_closed_forms():
    from peftkit.vision.methods import VisionAdapter, ViTMethodConfig

    dims = [96] * 2 + [192] * 2 + [384] * 6 + [768] * 2  # Swin-T: depths 2, 2, 6, 2
    expected = {
        "lora": sum(8 * 16 * d for d in dims),  # r (d_in + d_out) over qkv, proj, fc1, fc2
        "ssf": sum(2 * 11 * d for d in dims) + 2 * 768 + 2 * 96,  # + final norm, patch conv
        "adaptformer": sum(64 * 2 * d + 64 + d for d in dims),
    }
    for method, count in expected.items():
        with torch.device("meta"):
            model = create_backbone("swin_tiny_patch4_window7_224", num_classes=100)
        counts = VisionAdapter(model, ViTMethodConfig.parse(method)).parameter_counts()
        assert counts["trainable_without_head"] == count, method
        assert counts["backbone"] == 27_519_354


def test_dinov2_registers_stay_ahead_of_the_prompts():
    from peftkit.vision.methods import VisionAdapter, ViTMethodConfig

    torch.manual_seed(0)
    model = create_backbone("vit_small_patch14_reg4_dinov2", num_classes=3, **DINO).eval()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    x = torch.randn(2, 3, 28, 28)
    model(x)
    VisionAdapter(model, ViTMethodConfig.parse("vpt-shallow", vpt_length=3))
    model(x)
    plain, prompted = seen
    assert vit_layout(model).num_prefix_tokens == 5 and prompted.shape[1] == plain.shape[1] + 3
    assert torch.equal(prompted[:, :5], plain[:, :5])  # [CLS] and the 4 registers
    assert torch.equal(prompted[:, 8:], plain[:, 5:])  # the patches follow the prompts


def test_a_local_dinov2_checkpoint_loads_at_another_input_size(tmp_path):
    torch.manual_seed(0)
    source = create_backbone("vit_small_patch14_dinov2", num_classes=0, **DINO)
    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_backbone(
        "vit_small_patch14_dinov2", num_classes=4, checkpoint=str(path), **{**DINO, "img_size": 42}
    )
    assert torch.equal(model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert model.pos_embed.shape[1] == 1 + 3 * 3 and source.pos_embed.shape[1] == 1 + 2 * 2
    assert model(torch.randn(1, 3, 42, 42)).shape == (1, 4)
    with pytest.raises(PeftkitError, match="does not fit timm model.*model name"):
        create_backbone("vit_small_patch14_dinov2", checkpoint=str(path), img_size=28, depth=2)


def test_open_clip_attention_split_is_exact_and_reaches_qkv(kit):
    import copy

    from open_clip.transformer import VisionTransformer

    from peftkit.vision.backbones import CLIPVisionClassifier
    from peftkit.vision.methods import VisionAdapter, ViTMethodConfig

    torch.manual_seed(0)
    tower = VisionTransformer(**kit.TINY_CLIP).double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    model = CLIPVisionClassifier(copy.deepcopy(tower), 5).double().eval()
    torch.testing.assert_close(model.visual(x), tower(x), rtol=0, atol=1e-12)
    adapter = VisionAdapter(model, ViTMethodConfig.parse("lora", r=2))
    assert "visual.transformer.resblocks.1.attn.qkv" in adapter.core.layers
    with torch.no_grad():
        for _, p in adapter.core.named_parameters():
            p.normal_(0, 0.1)
        expected = model(x)
        adapter.reparameterize()
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_open_clip_offline_names_the_repository_and_the_checkpoint_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PeftkitError) as err:
        create_backbone(open_clip="ViT-B-16", pretrained=True)
    message = str(err.value)
    assert "hf download timm/vit_base_patch16_clip_224.openai" in message
    assert "--checkpoint ./vit_base_patch16_clip_224.openai/open_clip_model.safetensors" in message


def test_a_local_open_clip_safetensors_checkpoint_loads_its_tower(tmp_path):
    import json

    import open_clip

    configs = tmp_path / "configs"
    configs.mkdir()
    tiny = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 16,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (configs / "peftkit-tiny-clip.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(configs)
    torch.manual_seed(0)
    clip = open_clip.create_model("peftkit-tiny-clip")
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    model = create_backbone(open_clip="peftkit-tiny-clip", num_classes=3, checkpoint=str(path))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.visual(x), clip.visual.eval()(x), rtol=0, atol=1e-6)
    with pytest.raises(PeftkitError, match=r"\.safetensors"):
        create_backbone(open_clip="peftkit-tiny-clip", checkpoint=str(tmp_path / "clip.pt"))


def test_dinov2_offline_names_its_hub_repository(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PeftkitError) as err:
        create_backbone("vit_small_patch14_dinov2.lvd142m", pretrained=True)
    assert "hf download timm/vit_small_patch14_dinov2.lvd142m" in str(err.value)


def _hub_cache(tmp_path, monkeypatch, repo, files):
    """A Hugging Face hub cache holding `files` of `repo`, with the hub out of reach."""
    import huggingface_hub.constants

    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name, write in files.items():
        write(snapshot / name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_cached_dinov2_loads_offline_and_an_hf_hub_repository_too(tmp_path, monkeypatch):
    import json

    torch.manual_seed(0)
    source = create_backbone("vit_small_patch14_dinov2", num_classes=0, **DINO)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    config = {"architecture": "vit_small_patch14_dinov2", "model_args": DINO}
    config["pretrained_cfg"] = {"mean": [0.25] * 3, "std": [0.5] * 3, "num_classes": 0}
    files = {
        "model.safetensors": lambda path: save_file(state, str(path)),
        "config.json": lambda path: path.write_text(json.dumps(config)),
    }
    _hub_cache(tmp_path, monkeypatch, "timm/vit_small_patch14_dinov2.lvd142m", files)
    _hub_cache(tmp_path, monkeypatch, "someone/tiny-dinov2", files)
    named = create_backbone(
        "vit_small_patch14_dinov2.lvd142m", pretrained=True, num_classes=3, **DINO
    )
    repo = create_backbone("hf-hub:someone/tiny-dinov2", pretrained=True, num_classes=3)
    for model in (named, repo):
        assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert normalization(repo)[0] == (0.25, 0.25, 0.25)  # the repository's own normalization
    with pytest.raises(PeftkitError, match="hf download someone/other"):
        create_backbone("hf-hub:someone/other", pretrained=True)


def test_an_open_clip_tower_refuses_another_input_size(kit):
    from peftkit.vision.train import build_model

    spec = {"model_kwargs": {"open_clip_config": kit.TINY_CLIP}, "img_size": 32}
    with pytest.raises(PeftkitError, match="own input size \\(16\\).*drop --img-size"):
        build_model(spec, 3, False, None)
    assert build_model({**spec, "img_size": 16}, 3, False, None)[1] == 16
