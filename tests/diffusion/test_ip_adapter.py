import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training.engine import TrainConfig, train
from peftkit.diffusion.base import load_base
from peftkit.diffusion.control import ControlConfig, ControlTask, attach_control
from peftkit.diffusion.control_cli import train_ip_adapter
from peftkit.diffusion.image_encoder import ImageEncoder
from peftkit.diffusion.ip_adapter import (
    IPAdapterConfig,
    attach_ip_adapter,
    cross_attention_layers,
    load_ip_adapter,
    save_ip_adapter,
)
from peftkit.diffusion.ip_adapter_task import IPAdapterTask
from peftkit.diffusion.pairs import load_pairs

from .resume_check import assert_resume_is_exact

CPU = SimpleNamespace(
    device=torch.device("cpu"), mixed_precision="no", process_index=0, num_processes=1
)


def _load(path):
    return load_base(str(path))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("ip")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        a = np.full((16, 16, 3), 30, np.uint8)
        a[2 + i : 14, 4:12] = rng.integers(60, 255, 3)
        Image.fromarray(a).save(root / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "text": "a box"}))
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    return root / "train.jsonl"


def _config(variant, clip_path):
    return IPAdapterConfig(
        variant=variant, num_tokens=4, resampler_dim=32, resampler_heads=1, image_encoder=clip_path
    )


def _task(tiny_sd_path, manifest, clip_path, variant="basic"):
    pipe = _load(tiny_sd_path)
    encoder = ImageEncoder(clip_path, variant)
    return IPAdapterTask(
        pipe, load_pairs(manifest, need_condition=False), _config(variant, clip_path), encoder, 16
    )


def _inputs(pipe, embed_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    size, dim = pipe.unet.config.sample_size, pipe.unet.config.cross_attention_dim
    return (
        torch.randn(2, 4, size, size, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 7, dim, generator=g),
        torch.randn(2, *embed_shape, generator=g),
    )


def _randomize(adapter):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("variant", ["basic", "plus"])
def test_scale_zero_gives_the_base_output_exactly(tiny_sd_path, manifest, clip_path, variant):
    task = _task(tiny_sd_path, manifest, clip_path, variant)
    base_pipe = _load(tiny_sd_path)
    _randomize(task.adapter)
    x, t, text, embeds = _inputs(base_pipe, task.encoder.negative().shape[1:])
    with torch.no_grad():
        base = base_pipe.unet(x, t, text).sample
        task.adapter.set_scale(0.0)
        assert torch.equal(task.model(x, t, text, embeds), base)
        task.adapter.set_scale(1.0)
        assert (task.model(x, t, text, embeds) - base).abs().max() > 1e-4


def test_every_cross_attention_layer_gets_its_own_image_key_and_value(
    tiny_sd_path, manifest, clip_path
):
    task = _task(tiny_sd_path, manifest, clip_path)
    n_cross = sum(1 for name in task.base.unet.attn_processors if name.endswith("attn2.processor"))
    assert (
        len(task.adapter.processors) == n_cross == len(cross_attention_layers(task.base.unet)) > 0
    )
    keys = task.adapter.file_tensors()
    assert {f"ip_adapter.{2 * j + 1}.to_k_ip.weight" for j in range(n_cross)} <= set(keys)


@pytest.mark.parametrize("variant", ["basic", "plus"])
def test_saved_file_loads_in_diffusers_with_the_same_unet_output(
    tiny_sd_path, manifest, clip_path, tmp_path, variant
):
    task = _task(tiny_sd_path, manifest, clip_path, variant)
    _randomize(task.adapter)
    path = save_ip_adapter(task.adapter, tmp_path / "ip.safetensors")
    theirs = _load(tiny_sd_path).pipe
    theirs.load_ip_adapter(
        str(tmp_path), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None
    )
    theirs.set_ip_adapter_scale(0.6)
    task.adapter.set_scale(0.6)
    x, t, text, embeds = _inputs(theirs, task.encoder.negative().shape[1:])
    with torch.no_grad():
        ours = task.model(x, t, text, embeds)
        ref = theirs.unet(x, t, text, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
    assert (ours - ref).norm() / ref.norm() < 1e-5
    # and peftkit reads its own file back
    again = load_ip_adapter(_load(tiny_sd_path).unet, path)
    for (k, a), b in zip(task.adapter.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_training_lowers_the_loss(tiny_sd_path, manifest, clip_path):
    torch.manual_seed(0)
    task = _task(tiny_sd_path, manifest, clip_path)
    task.prepare(CPU)
    before = task.evaluate(task.model)["loss"]
    result = train(
        task,
        task.dataset(),
        TrainConfig(steps=12, batch_size=4, lr=3e-3, schedule="constant", progress=False, cpu=True),
    )
    assert result.metrics["loss"] < before


def test_image_prompt_generation_with_control_branch_and_concept_lora(
    tiny_sd_path, manifest, clip_path, tmp_path
):
    from peftkit.common_kernels import LoRAConfig, inject

    task = _task(tiny_sd_path, manifest, clip_path)
    _randomize(task.adapter)
    path = save_ip_adapter(task.adapter, tmp_path / "ip.safetensors")
    base = _load(tiny_sd_path)
    pipe = base.pipe
    control = ControlTask(base, [], ControlConfig()).controlnet
    lora = inject(
        pipe.unet, LoRAConfig(targets=["to_q", "to_v"], r=2)
    )  # a concept adapter on the base
    att_c = attach_control(pipe, control, scale=0.5)
    att_ip = attach_ip_adapter(att_c.pipe, path, scale=0.7)
    image = Image.open(manifest.parent / "0.png")
    px = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = att_ip.pipe(
        "a box",
        num_inference_steps=2,
        height=px,
        width=px,
        guidance_scale=5.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **att_c.kwargs(image),
        **att_ip.kwargs(image),
    )
    assert out.images.shape == (1, px, px, 3) and np.isfinite(out.images).all()
    assert lora.num_parameters() > 0


def test_attach_refuses_token_counts_diffusers_cannot_read(
    tiny_sd_path, manifest, clip_path, tmp_path
):
    pipe = _load(tiny_sd_path)
    config = IPAdapterConfig(num_tokens=2, image_encoder=clip_path)
    task = IPAdapterTask(pipe, [], config, ImageEncoder(clip_path), 16)
    path = save_ip_adapter(task.adapter, tmp_path / "ip2.safetensors")
    with pytest.raises(PeftkitError, match="reads 4"):
        attach_ip_adapter(_load(tiny_sd_path).pipe, path)


def test_config_validates_and_round_trips():
    config = IPAdapterConfig(variant="plus", num_tokens=16)
    assert IPAdapterConfig.from_json(config.to_json()) == config
    with pytest.raises(PeftkitError, match="variant"):
        IPAdapterConfig(variant="full")
    with pytest.raises(PeftkitError, match="sum < 1"):
        IPAdapterConfig(drop_image=0.5, drop_text=0.5)
    with pytest.raises(PeftkitError, match="--image-encoder"):
        ImageEncoder("")


def test_train_ip_adapter_command_writes_a_loadable_file(
    tiny_sd_path, manifest, clip_path, tmp_path
):
    code = train_ip_adapter(
        [
            "--model",
            str(tiny_sd_path),
            "--data",
            str(manifest),
            "--output",
            str(tmp_path),
            "--image-encoder",
            clip_path,
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--resolution",
            "16",
            "--lr",
            "1e-3",
            "--cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    pipe = _load(tiny_sd_path).pipe
    pipe.load_ip_adapter(
        str(tmp_path), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None
    )
    assert type(pipe.unet.encoder_hid_proj).__name__ == "MultiIPAdapterImageProjection"


def test_open_clip_image_tower_feeds_the_basic_variant(tiny_sd_path, manifest, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    (tmp_path / "peftkit-tiny-clip.json").write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {
                    "image_size": 32,
                    "layers": 1,
                    "width": 32,
                    "patch_size": 8,
                    "head_width": 16,
                },
                "text_cfg": {
                    "context_length": 8,
                    "vocab_size": 64,
                    "width": 16,
                    "heads": 2,
                    "layers": 1,
                },
            }
        )
    )
    open_clip.add_model_config(str(tmp_path / "peftkit-tiny-clip.json"))
    model = open_clip.create_model("peftkit-tiny-clip")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors"
    )
    encoder = ImageEncoder(f"open_clip:peftkit-tiny-clip:{tmp_path / 'w.safetensors'}")
    assert encoder.embed_dim == 16
    task = IPAdapterTask(
        _load(tiny_sd_path),
        load_pairs(manifest, need_condition=False),
        IPAdapterConfig(),
        encoder,
        16,
    )
    result = train(
        task, task.dataset(), TrainConfig(steps=2, batch_size=2, lr=1e-3, progress=False, cpu=True)
    )
    assert result.step == 2 and task.embeds.shape == (4, 16)
    with pytest.raises(PeftkitError, match="plus variant"):
        ImageEncoder(f"open_clip:peftkit-tiny-clip:{tmp_path / 'w.safetensors'}", "plus")


def test_image_caption_pairs_may_sit_flat_in_a_folder(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "dog.png")
    (tmp_path / "dog.txt").write_text("a dog\n")
    (example,) = load_pairs(tmp_path, need_condition=False)
    assert example.image.name == "dog.png" and example.text == "a dog" and example.condition is None
    with pytest.raises(PeftkitError, match="no images/ folder"):
        load_pairs(tmp_path)


def test_sdxl_trains_and_generates_with_an_image_prompt(
    tiny_sdxl_path, manifest, clip_path, tmp_path
):
    base = _load(tiny_sdxl_path)
    assert base.kind == "sdxl"
    task = IPAdapterTask(
        base,
        load_pairs(manifest, need_condition=False),
        _config("basic", clip_path),
        ImageEncoder(clip_path),
        16,
    )
    result = train(
        task, task.dataset(), TrainConfig(steps=2, batch_size=2, lr=1e-3, progress=False, cpu=True)
    )
    assert result.step == 2 and set(task.extra) == {"text_embeds", "time_ids"}
    path = save_ip_adapter(task.adapter, tmp_path / "ip.safetensors")
    att = attach_ip_adapter(_load(tiny_sdxl_path).pipe, path, scale=0.5)
    out = att.pipe(
        "a box",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **att.kwargs(Image.open(manifest.parent / "0.png")),
    )
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()


def _prepared(tiny_sd_path, manifest, clip_path, seed=0):
    """A prepared task dropping often (0.3 each), so a few rows exercise the dropout draws."""
    config = dataclasses.replace(
        _config("basic", clip_path), drop_image=0.3, drop_text=0.3, drop_both=0.3
    )
    task = IPAdapterTask(
        _load(tiny_sd_path),
        load_pairs(manifest, need_condition=False),
        config,
        ImageEncoder(clip_path, "basic"),
        16,
        seed=seed,
    )
    _randomize(task.adapter)
    task.prepare(CPU)
    return task


def test_a_step_is_drawn_loss_of_draw_and_draws_leave_the_global_rng_alone(
    tiny_sd_path, manifest, clip_path
):
    task = _prepared(tiny_sd_path, manifest, clip_path)
    batch = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    start = task.stream.state.clone()
    with torch.no_grad():
        loss = task.loss(task.model, batch)
    task.stream.state = start
    global_rng = torch.get_rng_state()
    drawn = task.draw(batch)
    assert torch.equal(torch.get_rng_state(), global_rng)
    _, drop_image, drop_text = drawn[:3]
    assert drop_image.any() and drop_text.any()
    with torch.no_grad():
        assert torch.equal(task.drawn_loss(task.model, drawn), loss)
    task.stream.state = start
    torch.manual_seed(99)
    assert all(torch.equal(a, b) for a, b in zip(task.draw(batch), drawn))


def test_each_process_keeps_its_slice_of_the_global_batch_draws(tiny_sd_path, manifest, clip_path):
    task = _prepared(tiny_sd_path, manifest, clip_path)
    batch, start = torch.tensor([0, 2, 3]), task.stream.state.clone()
    whole = task.draw(batch.repeat(2))
    task.stream.state, task.rank, task.world = start, 1, 2
    mine = task.draw(batch)
    assert all(torch.equal(a, b[3:]) for a, b in zip(mine, whole))


def test_evaluation_loss_is_fixed_across_training_draws(tiny_sd_path, manifest, clip_path):
    task = _prepared(tiny_sd_path, manifest, clip_path)
    first = task.evaluate(task.model)["loss"]
    stream = task.stream.state.clone()
    task.draw(torch.tensor([0, 1]))
    task.draw(torch.tensor([2, 3]))
    moved = task.stream.state.clone()
    assert task.evaluate(task.model)["loss"] == first
    assert torch.equal(task.stream.state, moved) and not torch.equal(moved, stream)


def test_resumed_run_ends_with_the_uninterrupted_adapter(
    tiny_sd_path, manifest, clip_path, tmp_path
):
    assert_resume_is_exact(
        lambda seed: IPAdapterTask(
            _load(tiny_sd_path),
            load_pairs(manifest, need_condition=False),
            _config("basic", clip_path),
            ImageEncoder(clip_path, "basic"),
            16,
            seed=seed,
        ),
        tmp_path,
    )
