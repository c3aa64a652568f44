"""`peftkit inspect` describes files from their header alone; `peftkit convert` carries LoKr and OFT
between formats (OFT to kohya only with the base weights)."""

import pytest
import torch

from peftkit.common_kernels import KronConfig, OFTConfig, PeftkitError, inject, save_adapter
from peftkit.diffusion import formats
from peftkit.diffusion.convert_cli import convert
from peftkit.diffusion.inspect_cli import describe, inspect

from .tiny_unet import output, randomize, relative

TARGETS = ["to_q", "to_k", "to_out.0", "proj_in", "time_emb_proj"]


@pytest.fixture()
def kron_unet(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet").double()
    handle = inject(unet, KronConfig(targets=TARGETS, r=2, alpha=3.0), base_model="tiny/unet")
    randomize(handle.trainable_parameters())
    return unet, handle, output(unet)


def test_inspect_reads_only_the_header(kron_unet, tmp_path, monkeypatch, capsys):
    _, handle, _ = kron_unet
    formats.save_kohya_lora({"unet": handle}, tmp_path / "k.safetensors")
    save_adapter(handle, tmp_path / "p.safetensors")

    def no_weights(*args, **kwargs):
        raise AssertionError("inspect loaded the weights")

    monkeypatch.setattr("peftkit.common_kernels.adapter_file.load_file", no_weights)
    n = len(handle.layers)
    kohya = describe(tmp_path / "k.safetensors")
    assert "format: kohya / A1111 / LyCORIS" in kohya
    assert f"cores: kron ({n} modules)" in kohya and f"components: unet ({n})" in kohya
    assert f"rank: 2 x{n}" in kohya and f"alpha: 3 x{n}" in kohya
    assert any(line.startswith(f"targets: {n}, e.g. ") for line in kohya)
    assert "F32" in kohya[0]

    assert inspect([str(tmp_path / "p.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "format: peftkit" in printed and "base model: tiny/unet" in printed
    assert f"base fingerprint: {handle.fingerprint()}" in printed and "alpha: 3 x" in printed


def test_inspect_refuses_what_is_not_an_adapter(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PeftkitError, match="not an adapter file peftkit knows"):
        describe(tmp_path / "plain.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\xff\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(PeftkitError, match="truncated or corrupt"):
        describe(tmp_path / "cut.safetensors")


def test_convert_carries_lokr_through_every_format_that_holds_it(
    kron_unet, tiny_sd_path, tmp_path, capsys
):
    from diffusers import UNet2DConditionModel

    from peftkit.common_kernels import load_adapter

    _, handle, want = kron_unet
    save_adapter(handle, tmp_path / "p.safetensors")
    kohya = [str(tmp_path / "p.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]
    assert convert(kohya) == 0
    back = [str(tmp_path / "k.safetensors"), str(tmp_path / "p2.safetensors"), "--to", "peftkit"]
    with pytest.raises(PeftkitError, match="does not say the base layer's shape .*pass --base"):
        convert(back)  # a low-rank LoKr factor reads the same on Linear and Conv2d layers
    assert convert([*back, "--base", str(tiny_sd_path)]) == 0
    n = len(handle.layers)
    assert f"{n} kron modules (unet: {n}) -> peftkit" in capsys.readouterr().out
    fresh = UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet").double()
    load_adapter(fresh, tmp_path / "p2.safetensors")
    assert relative(output(fresh), want) < 1e-6
    diffusers = [str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors")]
    with pytest.raises(PeftkitError, match="only carries LoRA and DoRA: write the kohya/LyCORIS"):
        convert([*diffusers, "--to", "diffusers"])


def test_convert_writes_oft_for_lycoris_only_with_the_base(tiny_sd_path, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet")
    handle = inject(unet, OFTConfig(targets=["to_q", "to_v"], block_size=4))
    randomize(handle.trainable_parameters())
    merged = {n: layer.base.weight.detach().clone() for n, layer in handle.layers.items()}
    save_adapter(handle, tmp_path / "oft.safetensors")
    handle.merge()
    merged = {
        n: layer.base.weight.detach().clone() - merged[n] for n, layer in handle.layers.items()
    }
    out = tmp_path / "k.safetensors"
    with pytest.raises(PeftkitError, match="needs the base weight of .*pass --base"):
        convert([str(tmp_path / "oft.safetensors"), str(out), "--to", "kohya"])
    args = [
        str(tmp_path / "oft.safetensors"),
        str(out),
        "--to",
        "kohya",
        "--base",
        str(tiny_sd_path),
    ]
    assert convert(args) == 0
    diffs = formats.read_tensors(out)[0]
    for name, want in merged.items():
        got = diffs[f"lora_unet_{name.replace('.', '_')}.diff"]
        assert relative(got, want) < 1e-5
