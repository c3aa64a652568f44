import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training.engine import TrainConfig, train
from peftkit.diffusion.base import load_base
from peftkit.diffusion.control import (
    ControlConfig,
    ControlTask,
    attach_control,
    conditioning_channels,
    load_control,
    save_control,
)
from peftkit.diffusion.control_cli import train_control
from peftkit.diffusion.pairs import load_pairs, load_pixels

from .conftest import write_box_pairs
from .resume_check import assert_resume_is_exact

CPU = SimpleNamespace(
    device=torch.device("cpu"), mixed_precision="no", process_index=0, num_processes=1
)


@pytest.fixture(scope="module")
def base(tiny_sd_path):
    return load_base(str(tiny_sd_path))


@pytest.fixture(scope="module")
def pipe(base):
    return base.pipe


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory):
    return write_box_pairs(tmp_path_factory.mktemp("pairs"))


def _inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    dim = pipe.unet.config.cross_attention_dim
    px = size * pipe.vae_scale_factor
    return (
        torch.randn(2, 4, size, size, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 7, dim, generator=g),
        torch.rand(2, 3, px, px, generator=g),
    )


def _task(base, pair_folder, mode="full", **kw):
    return ControlTask(base, load_pairs(pair_folder), ControlConfig(mode=mode, **kw), resolution=16)


def _randomize(task):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in task.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_zero_conv_branch_leaves_unet_output_exactly_unchanged_at_init(
    base, pipe, pair_folder, mode
):
    task = _task(base, pair_folder, mode)
    x, t, text, _ = _inputs(pipe)
    with torch.no_grad():
        base = pipe.unet(x, t, text).sample
        for seed in (1, 2):
            condition = torch.rand(
                2, 3, *_inputs(pipe)[3].shape[-2:], generator=torch.Generator().manual_seed(seed)
            )
            assert torch.equal(task.model(x, t, text, condition), base)


def test_conditioning_encoder_downsamples_pixels_to_latents():
    assert conditioning_channels(8) == (16, 32, 96, 256)  # the SD1.5 ControlNet's encoder
    assert conditioning_channels(2) == (16, 32)
    with pytest.raises(PeftkitError, match="power of 2"):
        conditioning_channels(6)


def test_lora_variant_trains_only_adapter_conditioning_encoder_and_zero_convs(
    base, pipe, pair_folder
):
    task = _task(base, pair_folder, "lora")
    names = [n for n, p in task.controlnet.named_parameters() if p.requires_grad]
    assert any(".deltas.control." in n for n in names)
    assert all(
        ".deltas." in n
        or n.startswith(
            ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")
        )
        for n in names
    )
    full = _task(base, pair_folder, "full")
    assert sum(p.numel() for p in task.trainable_parameters()) < sum(
        p.numel() for p in full.trainable_parameters()
    )


def test_training_lowers_the_loss_and_makes_the_output_depend_on_the_condition(
    base, pipe, pair_folder
):
    torch.manual_seed(0)
    task = _task(base, pair_folder, "full")
    task.prepare(CPU)
    before = task.evaluate(task.model)["loss"]
    result = train(
        task,
        task.dataset(),
        TrainConfig(steps=12, batch_size=4, lr=2e-3, schedule="constant", progress=False, cpu=True),
    )
    assert result.metrics["loss"] < before
    x, t, text, condition = _inputs(pipe)
    with torch.no_grad():
        a = task.model(x, t, text, condition)
        b = task.model(x, t, text, 1.0 - condition)
    assert (a - b).abs().max() > 1e-6


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_saved_folder_loads_in_diffusers_with_the_same_residuals(
    base, pipe, pair_folder, tmp_path, mode
):
    task = _task(base, pair_folder, mode)
    _randomize(task)
    folder = save_control(task.controlnet, tmp_path / "cn", task.handle, task.config)
    loaded = load_control(folder)
    assert type(loaded).__name__ == "ControlNetModel"
    x, t, text, condition = _inputs(pipe)
    with torch.no_grad():
        ours = task.controlnet(x, t, text, condition, conditioning_scale=0.7, return_dict=False)
        theirs = loaded(x, t, text, condition, conditioning_scale=0.7, return_dict=False)
    for a, b in zip([*ours[0], ours[1]], [*theirs[0], theirs[1]]):
        assert a.abs().max() > 0
        assert (a - b).norm() / a.norm() < 1e-5
    # saving again replaces the folder atomically
    save_control(task.controlnet, folder, task.handle, task.config)
    assert not list(tmp_path.glob(".cn.*"))


def test_attached_branch_runs_in_the_diffusers_controlnet_pipeline(
    base, pipe, pair_folder, tmp_path
):
    task = _task(base, pair_folder, "full")
    _randomize(task)
    folder = save_control(task.controlnet, tmp_path / "cn", None, task.config)
    att = attach_control(pipe, folder, scale=0.5)
    cond = Image.open(pair_folder / "conditions" / "0.png")
    px = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = att.pipe(
        "a box",
        num_inference_steps=2,
        height=px,
        width=px,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **att.kwargs(cond),
    )
    assert out.images.shape == (1, px, px, 3) and np.isfinite(out.images).all()


def test_missing_condition_image_names_the_file_and_the_fix(pair_folder, tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(PeftkitError, match=r"lonely\.png.*--condition-from"):
        load_pairs(tmp_path)
    assert load_pairs(tmp_path, need_condition=False)[0].condition is None


def test_condition_size_mismatch_names_both_sizes(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 12)).save(tmp_path / "a_c.png")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"image": "a.png", "condition": "a_c.png", "text": "x"}) + "\n"
    )
    with pytest.raises(PeftkitError, match=r"m\.jsonl:1: .*16x12.*16x16.*same size"):
        load_pixels(load_pairs(tmp_path / "m.jsonl"), 16)


def test_manifest_errors_name_file_line_and_column(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "typo.jsonl").write_text(
        '{"image": "a.png", "condition": "a.png"}\n{"imgae": "a.png"}\n'
    )
    with pytest.raises(
        PeftkitError, match=r"typo\.jsonl:2: unknown column\(s\) \['imgae'\].*allowed columns"
    ):
        load_pairs(tmp_path / "typo.jsonl")
    (tmp_path / "nocond.csv").write_text("image,text\na.png,a cat\n")
    with pytest.raises(PeftkitError, match=r"nocond\.csv:2: column 'condition' is missing"):
        load_pairs(tmp_path / "nocond.csv")
    (tmp_path / "gone.csv").write_text("image,condition\na.png,b.png\n")
    with pytest.raises(PeftkitError, match=r"gone\.csv:2: condition file .*b\.png does not exist"):
        load_pairs(tmp_path / "gone.csv")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(PeftkitError, match=r"bad\.jsonl:1: not valid JSON"):
        load_pairs(tmp_path / "bad.jsonl")


def test_config_validates_and_round_trips():
    config = ControlConfig(mode="lora", conditioning_scale=0.5)
    assert ControlConfig.from_json(config.to_json()) == config
    with pytest.raises(PeftkitError, match="mode"):
        ControlConfig(mode="half")
    with pytest.raises(PeftkitError, match="unknown adapter core .nope."):
        ControlConfig(mode="lora", adapter={"method": "nope"})


def test_train_control_command_writes_a_controlnet_folder(tiny_sd_path, pair_folder, tmp_path):
    (tmp_path / "images").mkdir()
    for p in (pair_folder / "images").glob("*.png"):
        (tmp_path / "images" / p.name).write_bytes(p.read_bytes())
    code = train_control(
        [
            "--model",
            str(tiny_sd_path),
            "--data",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
            "--condition-from",
            "canny",
            "--mode",
            "lora",
            "--adapter",
            "oft",
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
    loaded = load_control(tmp_path / "out" / "controlnet")
    assert type(loaded).__name__ == "ControlNetModel"
    assert json.loads((tmp_path / "out" / "train.json").read_text())["steps"] == 2


def _prepared(base, pair_folder, seed=0):
    task = ControlTask(
        base, load_pairs(pair_folder), ControlConfig(mode="lora"), resolution=16, seed=seed
    )
    _randomize(task)
    task.prepare(CPU)
    return task


def test_a_step_is_drawn_loss_of_draw_and_draws_leave_the_global_rng_alone(base, pair_folder):
    task = _prepared(base, pair_folder)
    batch = torch.tensor([0, 2, 1])
    start = task.stream.state.clone()
    with torch.no_grad():
        loss = task.loss(task.model, batch)
    task.stream.state = start
    global_rng = torch.get_rng_state()
    drawn = task.draw(batch)
    assert torch.equal(torch.get_rng_state(), global_rng)
    with torch.no_grad():
        assert torch.equal(task.drawn_loss(task.model, drawn), loss)
    # The same stream state draws the same numbers whatever the global RNG holds; it moves on.
    task.stream.state = start
    torch.manual_seed(99)
    again = task.draw(batch)
    assert all(torch.equal(a, b) for a, b in zip(again, drawn))
    assert not torch.equal(task.draw(batch)[1], drawn[1])


def test_each_process_keeps_its_slice_of_the_global_batch_draws(base, pair_folder):
    task = _prepared(base, pair_folder)
    batch, start = torch.tensor([0, 2]), task.stream.state.clone()
    whole = task.draw(batch.repeat(2))
    task.stream.state, task.rank, task.world = start, 1, 2
    mine = task.draw(batch)
    assert all(torch.equal(a, b[2:]) for a, b in zip(mine, whole))


def test_evaluation_loss_is_fixed_across_training_draws(base, pair_folder):
    task = _prepared(base, pair_folder)
    first = task.evaluate(task.model)["loss"]
    stream = task.stream.state.clone()
    task.draw(torch.tensor([0, 1]))
    task.draw(torch.tensor([2, 3]))
    moved = task.stream.state.clone()
    assert task.evaluate(task.model)["loss"] == first
    assert torch.equal(task.stream.state, moved) and not torch.equal(moved, stream)


def test_resumed_run_ends_with_the_uninterrupted_branch(base, pair_folder, tmp_path):
    assert_resume_is_exact(
        lambda seed: ControlTask(
            base, load_pairs(pair_folder), ControlConfig(mode="lora"), resolution=16, seed=seed
        ),
        tmp_path,
    )
