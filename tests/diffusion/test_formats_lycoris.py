"""kohya/LyCORIS files both ways, checked against LyCORIS itself (lycoris-lora, a test-only
dependency) on a tiny diffusers UNet in float64: files LyCORIS makes load into peftkit with the
output LyCORIS' own network gives, and files peftkit writes load into LyCORIS with peftkit's output."""

import pytest
import torch

from peftkit.common_kernels import PeftkitError, core, core_names, inject
from peftkit.common_kernels.adapter_file import save_tensors
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
    ("lokr", {"linear_dim": 2, "conv_dim": 2, "use_tucker": True}, "kron"),
    ("lora", {"use_tucker": True}, "lora"),
    ("loha", {"use_tucker": True}, "loha"),
    ("lora", {"use_tucker": True, "dora_wd": True}, "dora"),
    # LyCORIS orders a factor larger than dim / factor the other way round from peft, and
    # unbalanced_factorization gives W1 the output's larger factor.
    ("lokr", {"linear_dim": 2, "conv_dim": 2, "factor": 8}, "kron"),
    (
        "lokr",
        {"linear_dim": 2, "conv_dim": 2, "factor": 4, "unbalanced_factorization": True},
        "kron",
    ),
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
    if options.get("use_tucker"):  # the file really holds Tucker convs
        cores = {"lora": "lora_mid.weight", "loha": "hada_t1", "lokr": "lokr_t2"}
        assert any(
            k.endswith(cores[algo]) for k in formats.read_tensors(tmp_path / "ly.safetensors")[0]
        )

    fresh = tiny_unet()
    handles = formats.load_lora_file({"unet": fresh}, tmp_path / "ly.safetensors")
    assert handles["unet"].config.method == ours
    assert len(handles["unet"].layers) == len(network.loras) > 40
    assert relative(want, base) > 1e-3  # Tucker LoHa's product of six 0.1-sized factors is small
    got = output(fresh)
    assert relative(got, want) < 1e-4
    assert relative(got - base, want - base) < 1e-4  # the adapter's own effect, not only the sum


def _tucker(t, u, d):
    """LyCORIS' Tucker product written out: W[o, c, h, w] = sum_ij u[i, o] t[i, j, h, w] d[j, c]."""
    return torch.einsum("ijhw,io,jc->ochw", t, u, d)


def test_tucker_locon_and_loha_read_to_the_exact_delta(tmp_path):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    R, out, cin, alpha = 3, 6, 5, 2.0
    t, u, d = rand(R, R, 3, 3), rand(R, out), rand(R, cin)
    t2, u2, d2 = rand(R, R, 3, 3), rand(R, out), rand(R, cin)
    files = {
        "lora": (
            {
                "lora_mid.weight": t,
                "lora_up.weight": u.T.reshape(out, R, 1, 1),
                "lora_down.weight": d.reshape(R, cin, 1, 1),
            },
            _tucker(t, u, d),
        ),
        "loha": (
            {"hada_t1": t, "hada_w1_a": u, "hada_w1_b": d, "hada_t2": t2}
            | {"hada_w2_a": u2, "hada_w2_b": d2},
            _tucker(t, u, d) * _tucker(t2, u2, d2),
        ),
    }
    for name, (tensors, product) in files.items():
        path = tmp_path / f"{name}.safetensors"
        stored = {f"lora_unet_conv.{k}": v for k, v in tensors.items()}
        save_tensors(path, stored | {"lora_unet_conv.alpha": torch.tensor(alpha)}, {})
        model = torch.nn.Sequential()
        model.add_module("conv", torch.nn.Conv2d(cin, out, 3, padding=1).double())
        before = model.conv.weight.detach().clone()
        handle = formats.load_lora_file({"unet": model}, path)["unet"]
        assert handle.config.method == name and handle.config.r == R
        handle.merge()
        got = model.conv.base.weight.detach() - before
        want = alpha / R * product
        assert ((got - want).norm() / want.norm()).item() < 1e-14


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
    network = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2.0, algo="full")
    network.apply_to()
    network.save_weights(str(tmp_path / "full.safetensors"), torch.float32, None)
    with pytest.raises(PeftkitError, match="'full' weight differences.*export one of .*diag-oft"):
        formats.read_adapters(tmp_path / "full.safetensors")


def output32(unet):
    """`output` of a float32 UNet: LyCORIS' OFT inverts in float32 whatever the model's dtype."""
    with torch.no_grad():
        return output(_Cast(unet)).double()


class _Cast(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, t, context):
        return self.unet(sample.float(), t, context.float())


# LyCORIS' own output-side OFT and BOFT, plain and with its row rescale and norm constraint (the
# constraint 1e-3 * d_out binds at these weights). Tolerance 1e-4: LyCORIS runs them in float32.
LYCORIS_OFT = [
    ("diag-oft", {}, "diag-oft"),
    ("diag-oft", {"rescaled": True, "constraint": 1e-3}, "diag-oft"),
    ("boft", {}, "lycoris-boft"),
    ("boft", {"rescaled": True, "constraint": 1e-3}, "lycoris-boft"),
]


@pytest.mark.parametrize("algo,options,ours", LYCORIS_OFT)
def test_lycoris_oft_and_boft_files_load_with_lycoris_output(algo, options, ours, tmp_path):
    from lycoris import create_lycoris

    unet = tiny_unet().float()
    base = output32(unet)
    network = create_lycoris(
        unet, 1.0, linear_dim=4, conv_dim=4, algo=algo, preset="full", **options
    )
    network.apply_to()
    randomize(network.parameters())
    want = output32(unet)
    network.save_weights(str(tmp_path / "ly.safetensors"), torch.float32, None)

    fresh = tiny_unet()
    handle = formats.load_lora_file({"unet": fresh}, tmp_path / "ly.safetensors")["unet"]
    assert handle.config.method == ours and handle.config.rescaled == ("rescaled" in options)
    assert len(handle.layers) == len(network.loras) > 40
    assert relative(want, base) > 0.1
    assert relative(output(fresh), want) < 1e-4


@pytest.mark.parametrize("name", ["diag-oft", "lycoris-boft"])
def test_peftkit_lycoris_oft_file_loads_in_lycoris_with_peftkit_output(name, tmp_path):
    from lycoris import create_lycoris_from_weights

    unet = tiny_unet()
    base = output(unet)
    config = core(name).make_config(
        UNET_LINEAR + UNET_CONV, block_size=4, constraint=1e-3, rescaled=True
    )
    handle = inject(unet, config)
    randomize(handle.trainable_parameters())
    want = output(unet)
    path = formats.save_kohya_lora({"unet": handle}, tmp_path / "k.safetensors")
    tensors = formats.read_tensors(path)[0]
    assert {k.split(".", 1)[1] for k in tensors} == {"oft_blocks", "rescale", "alpha"}

    renamed = {k.replace("lora_unet_", "lycoris_", 1): v.float() for k, v in tensors.items()}
    fresh = tiny_unet().float()
    network, _ = create_lycoris_from_weights(1.0, "", fresh, weights_sd=renamed)
    network.apply_to()
    assert len(network.loras) == len(handle.layers)
    assert relative(want, base) > 0.1
    assert relative(output32(fresh), want) < 1e-4

    again = tiny_unet()
    formats.load_lora_file({"unet": again}, path)
    assert relative(output(again), want) < 1e-6  # the constraint went through float32
