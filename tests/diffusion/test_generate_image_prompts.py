"""Generation with a control branch and an IP-Adapter, from the API and from `peftkit generate`."""

import numpy as np
import pytest
import torch
from PIL import Image

from peftkit.common_kernels.errors import PeftkitError
from peftkit.diffusion.base import load_base
from peftkit.diffusion.cli import generate
from peftkit.diffusion.control import ControlConfig, ControlTask, save_control
from peftkit.diffusion.generate import attach_image_prompts, generate_grid
from peftkit.diffusion.image_encoder import ImageEncoder
from peftkit.diffusion.ip_adapter import IPAdapterConfig, save_ip_adapter
from peftkit.diffusion.ip_adapter_task import IPAdapterTask

KW = dict(steps=2, guidance=3.0, resolution=64)


@pytest.fixture(scope="module")
def image_prompt_files(tiny_sd_path, clip_path, tmp_path_factory):
    """A fresh (zero-conv) control branch, the same with its zero convs perturbed, an IP-Adapter
    with random weights, and a condition / reference image."""
    root = tmp_path_factory.mktemp("image-prompts")
    base = load_base(str(tiny_sd_path))
    branch = ControlTask(base, [], ControlConfig()).controlnet
    save_control(branch, root / "fresh")
    with torch.no_grad():
        for name, p in branch.named_parameters():
            if (
                "zero_conv" in name
                or "controlnet_down_blocks" in name
                or "controlnet_mid_block" in name
            ):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    save_control(branch, root / "moved")
    task = IPAdapterTask(
        base,
        [],
        IPAdapterConfig(num_tokens=4, image_encoder=clip_path),
        ImageEncoder(clip_path),
        16,
    )
    with torch.no_grad():
        for p in task.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    save_ip_adapter(task.adapter, root / "ip.safetensors")
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 16:48] = (255, 255, 255)
    Image.fromarray(pixels).save(root / "edges.png")
    return root


def _pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_zero_conv_branch_draws_the_base_image_and_a_trained_one_does_not(
    tiny_sd_path, image_prompt_files
):
    root = image_prompt_files
    plain = generate_grid(load_base(str(tiny_sd_path)), ["a box"], seeds=[1], **KW)[0][0]
    for folder, same in (("fresh", True), ("moved", False)):
        base = load_base(str(tiny_sd_path))
        attached = attach_image_prompts(
            base, control=str(root / folder), control_image=str(root / "edges.png")
        )
        image = generate_grid(base, ["a box"], seeds=[1], image_prompts=attached, **KW)[0][0]
        assert (np.abs(_pixels(image) - _pixels(plain)).max() <= 1) == same, folder


def test_ip_adapter_at_scale_zero_draws_the_base_image(tiny_sd_path, image_prompt_files):
    root = image_prompt_files
    plain = generate_grid(load_base(str(tiny_sd_path)), ["a box"], seeds=[2], **KW)[0][0]
    images = {}
    for scale in (0.0, 1.0):
        base = load_base(str(tiny_sd_path))
        attached = attach_image_prompts(
            base,
            ip_adapter=str(root / "ip.safetensors"),
            ip_image=str(root / "edges.png"),
            ip_scale=scale,
            guidance=KW["guidance"],
        )
        images[scale] = generate_grid(base, ["a box"], seeds=[2], image_prompts=attached, **KW)[0][
            0
        ]
    assert np.abs(_pixels(images[0.0]) - _pixels(plain)).max() <= 1
    assert np.abs(_pixels(images[1.0]) - _pixels(plain)).max() > 1


def test_generate_command_with_control_and_image_prompt_together(
    tiny_sd_path, image_prompt_files, tmp_path
):
    root = image_prompt_files
    rc = generate(
        [
            "--model",
            str(tiny_sd_path),
            "--prompt",
            "a box",
            "--seeds",
            "0,1",
            "--output",
            str(tmp_path),
            "--steps",
            "2",
            "--resolution",
            "64",
            "--guidance",
            "3",
            "--cpu",
            "--control",
            str(root / "moved"),
            "--control-image",
            str(root / "edges.png"),
            "--ip-adapter",
            str(root / "ip.safetensors"),
            "--ip-image",
            str(root / "edges.png"),
        ]
    )
    assert rc == 0 and (tmp_path / "grid.png").is_file() and (tmp_path / "p0-s1.png").is_file()


def test_image_prompt_arguments_are_checked(tiny_sd_path, image_prompt_files):
    base = load_base(str(tiny_sd_path))
    with pytest.raises(PeftkitError, match="--control-image"):
        attach_image_prompts(base, control=str(image_prompt_files / "fresh"))
    with pytest.raises(PeftkitError, match="does not exist"):
        attach_image_prompts(
            base,
            control=str(image_prompt_files / "fresh"),
            control_image=str(image_prompt_files / "missing.png"),
        )
