"""kohya/LyCORIS files both ways, checked against LyCORIS itself (lycoris-lora, a test-only
dependency) on a tiny diffusers UNet in float64: files LyCORIS makes load into peftkit with the
output LyCORIS' own network gives, and files peftkit writes load into LyCORIS with peftkit's output."""

import pytest
import torch

from peftkit.common_kernels import PeftkitError, core, core_names, inject
from peftkit.diffusion import formats

from .tiny_unet import output, randomize, relative, tiny_unet

lycoris = pytest.importorskip("lycoris")


def needs(name):
    if name not in core_names(aliases=True):
        pytest.skip(f"core {name!r} is not registered on this branch")


# (LyCORIS algo, its options, the peftkit core that reads it). linear_alpha 2 and conv_alpha 3 at
# rank 4 give two scales in one file; `lora` on the full preset covers 3x3 convs (LoCon).
MADE_BY_LYCORIS = [
    ("lora", {}, "lora"),
    ("lora", {"rs_lora": True}, "lora"),
    ("lokr", {}, "kron"),
    ("lokr", {"linear_dim": 2, "conv_dim": 2}, "kron"),
    ("lokr", {"linear_dim": 2, "conv_dim": 2, "decompose_both": True}, "kron"),
    ("loha", {}, "loha"),
    ("lora", {"dora_wd": True}, "dora"),
]


@pytest.mark.parametrize("algo,options,ours", MADE_BY_LYCORIS)
def test_lycoris_made_file_loads_with_lycoris_output(algo, options, ours, tmp_path):
    from lycoris import create_lycoris

    needs(ours)
    unet = tiny_unet()
    base = output(unet)
    options = {"linear_dim": 4, "conv_dim": 4, **options}
    network = create_lycoris(unet, 1.0, linear_alpha=2.0, conv_alpha=3.0, algo=algo, **options)
    network.apply_to()
    network.double()
    randomize(network.parameters())
    want = output(unet)
    network.save_weights(str(tmp_path / "ly.safetensors"), torch.float64, None)

    fresh = tiny_unet()
    handles = formats.load_lora_file({"unet": fresh}, tmp_path / "ly.safetensors")
    assert handles["unet"].config.method == ours
    assert len(handles["unet"].layers) == len(network.loras) > 40
    assert relative(want, base) > 0.01
    assert relative(output(fresh), want) < 1e-4


UNET_LINEAR = ["to_q", "to_k", "to_out.0", "proj_in", "ff.net.0.proj", "time_emb_proj"]
UNET_CONV = ["conv_in", "re:.*resnets\\.0\\.conv1"]
# LyCORIS 4.1.3 rebuilds a LoKr module's factors from its tensors and mis-sizes 3x3 convs whose
# second factor is low rank (it counts the kernel into in_dim), so that row keeps convs full (r=64).
WRITTEN_BY_PEFTKIT = [
    ("lora", {"r": 4, "alpha": 6.0}, UNET_LINEAR + UNET_CONV),
    ("lora", {"r": 4, "alpha": 6.0, "rslora": True}, UNET_LINEAR),
    ("kron", {"r": 2, "alpha": 3.0}, UNET_LINEAR),
    ("kron", {"r": 2, "alpha": 3.0, "decompose_both": True}, UNET_LINEAR),
    ("kron", {"r": 64}, UNET_LINEAR + UNET_CONV),
    ("oft", {"block_size": 4}, UNET_LINEAR + UNET_CONV),
    ("loha", {"r": 4, "alpha": 2.0}, UNET_LINEAR + UNET_CONV),
    ("dora", {"r": 4, "alpha": 2.0}, UNET_LINEAR + UNET_CONV),
]


@pytest.mark.parametrize("name,options,targets", WRITTEN_BY_PEFTKIT)
def test_peftkit_kohya_file_loads_in_lycoris_with_peftkit_output(name, options, targets, tmp_path):
    from lycoris import create_lycoris_from_weights

    needs(name)
    unet = tiny_unet()
    base = output(unet)
    handle = inject(unet, core(name).make_config(targets, **options))
    randomize(handle.trainable_parameters())
    unet.double()
    want = output(unet)
    path = formats.save_kohya_lora({"unet": handle}, tmp_path / "k.safetensors")
    tensors = formats.read_tensors(path)[0]
    if name == "oft":
        assert {k.split(".", 1)[1] for k in tensors} == {"diff"}

    # LyCORIS' generic loader names modules `lycoris_<module>`, its kohya one `lora_unet_<module>`.
    renamed = {k.replace("lora_unet_", "lycoris_", 1): v.double() for k, v in tensors.items()}
    fresh = tiny_unet()
    network, _ = create_lycoris_from_weights(1.0, "", fresh, weights_sd=renamed)
    network.apply_to()
    network.double()
    assert len(network.loras) == len(handle.layers)
    assert relative(want, base) > 0.01
    assert relative(output(fresh), want) < 1e-4

    if name != "oft":  # OFT goes out as weight differences, which peftkit does not read back
        again = tiny_unet()
        formats.load_lora_file({"unet": again}, path)
        assert relative(output(again), want) < 1e-6


def test_oft_needs_the_base_weights_for_lycoris(tmp_path):
    unet = tiny_unet()
    handle = inject(unet, core("oft").make_config(["to_q"], block_size=4))
    entries = formats.adapter_set_of({"unet": handle})
    for entry in entries["unet"].values():
        entry.base = None
    with pytest.raises(PeftkitError, match="needs the base weight of .*pass --base"):
        formats.kohya_tensors(entries)


def test_lycoris_layouts_peftkit_lacks_are_refused_by_name(tmp_path):
    from lycoris import create_lycoris

    unet = tiny_unet()
    network = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2.0, algo="diag-oft")
    network.apply_to()
    network.save_weights(str(tmp_path / "oft.safetensors"), torch.float32, None)
    with pytest.raises(PeftkitError, match="diag-OFT rotates outputs"):
        formats.read_adapters(tmp_path / "oft.safetensors")
