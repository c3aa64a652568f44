"""LoRA / Textual Inversion interop, checked through the real diffusers and peft code paths on the
tiny SD pipeline (`tiny_sd_path`, saved to disk and loaded with from_pretrained)."""

import pytest
import torch
from safetensors.torch import save_file

from peftkit.common_kernels import KronConfig, LoRAConfig, PeftkitError, inject, load_adapter
from peftkit.diffusion import formats, ti_format
from peftkit.diffusion.convert_cli import convert

UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "ff.net.0.proj",
    "re:.*resnets\\.0\\.conv1",
]
# kohya trains all six CLIP projections; diffusers recognises kohya text-encoder files by their out_proj keys.
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def load_pipe(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, torch_dtype=torch.float32
    )


def components(pipe):
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


def randomize(handles, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for handle in handles.values():
            for _, p in handle.named_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@torch.no_grad()
def outputs(pipe):
    ids = pipe.tokenizer(
        ["a cat"], padding="max_length", max_length=16, return_tensors="pt"
    ).input_ids
    hidden = pipe.text_encoder(ids)[0]
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 16, 32, generator=gen)
    return hidden, pipe.unet(sample, 10, context).sample


def assert_close(got, want, tol=1e-5):
    for g, w in zip(got, want):
        assert ((g - w).norm() / w.norm()).item() < tol


@pytest.fixture(scope="module")
def lora_pipe(tiny_sd_path):
    """A peftkit-LoRA'd pipeline (nonzero B, alpha != r) and its outputs, next to the base outputs."""
    pipe = load_pipe(tiny_sd_path)
    base = outputs(pipe)
    handles = {
        "unet": inject(pipe.unet, LoRAConfig(targets=UNET_TARGETS, r=4, alpha=6.0)),
        "text_encoder": inject(pipe.text_encoder, LoRAConfig(targets=TEXT_TARGETS, r=2, alpha=8.0)),
    }
    randomize(handles)
    adapted = outputs(pipe)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(adapted, base))
    return pipe, handles, adapted


def test_diffusers_file_loads_with_load_lora_weights_and_matches_peftkit(
    lora_pipe, tiny_sd_path, tmp_path
):
    _, handles, want = lora_pipe
    formats.save_diffusers_lora(handles, tmp_path / formats.DIFFUSERS_FILE)
    pipe = load_pipe(tiny_sd_path)
    pipe.load_lora_weights(tmp_path, weight_name=formats.DIFFUSERS_FILE)
    assert_close(outputs(pipe), want)


def test_kohya_round_trip_is_exact_and_diffusers_reads_it(lora_pipe, tiny_sd_path, tmp_path):
    _, handles, want = lora_pipe
    formats.save_kohya_lora(handles, tmp_path / "k.safetensors")
    keys = set(formats.read_tensors(tmp_path / "k.safetensors")[0])
    assert (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
        in keys
    )
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys

    pipe = load_pipe(tiny_sd_path)
    loaded = formats.load_lora_file(components(pipe), tmp_path / "k.safetensors")
    for c, handle in handles.items():
        assert (
            loaded[c].config.r == handle.config.r and loaded[c].config.alpha == handle.config.alpha
        )
        theirs = loaded[c].state_dict()
        assert theirs.keys() == handle.state_dict().keys()
        assert all(torch.equal(theirs[k], v) for k, v in handle.state_dict().items())
    assert_close(outputs(pipe), want)

    plain = load_pipe(tiny_sd_path)
    plain.load_lora_weights(tmp_path, weight_name="k.safetensors")
    assert_close(outputs(plain), want)


def test_kohya_names_split_without_a_model(lora_pipe, tmp_path):
    _, handles, _ = lora_pipe
    formats.save_kohya_lora(handles, tmp_path / "k.safetensors")
    lora = formats.localize(formats.read_adapters(tmp_path / "k.safetensors"))
    assert sorted(lora["unet"]) == sorted(handles["unet"].layers)
    assert sorted(lora["text_encoder"]) == sorted(handles["text_encoder"].layers)


def test_peft_made_lora_imports_equal_to_peft_output(tiny_sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_pipe(tiny_sd_path)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_v", "proj_out"],
        init_lora_weights=False,
        rank_pattern={"proj_out": 2},
        alpha_pattern={"to_v": 3},
    )
    pipe.unet.add_adapter(config)
    want = outputs(pipe)[1]
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=config.to_dict(),
    )
    fresh = load_pipe(tiny_sd_path)
    base = outputs(fresh)[1]
    handles = formats.load_lora_file(components(fresh), tmp_path / formats.DIFFUSERS_FILE)
    got = outputs(fresh)[1]
    assert (want - base).abs().max() > 1e-3
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert handles["unet"].config.r == 4


def test_convert_cli_kohya_to_diffusers_to_peftkit(lora_pipe, tiny_sd_path, tmp_path, capsys):
    _, handles, want = lora_pipe
    formats.save_kohya_lora(handles, tmp_path / "k.safetensors")
    assert (
        convert(
            [str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors"), "--to", "diffusers"]
        )
        == 0
    )
    assert convert([str(tmp_path / "d.safetensors"), str(tmp_path / "pk"), "--to", "peftkit"]) == 0
    n_unet, n_text = len(handles["unet"].layers), len(handles["text_encoder"].layers)
    assert f"(text_encoder: {n_text}, unet: {n_unet}) -> peftkit" in capsys.readouterr().out
    pipe = load_pipe(tiny_sd_path)
    load_adapter(pipe.unet, tmp_path / "pk" / "unet.safetensors")
    load_adapter(pipe.text_encoder, tmp_path / "pk" / "text_encoder.safetensors")
    assert_close(outputs(pipe), want)
    unet_file = str(tmp_path / "pk" / "unet.safetensors")
    assert convert([unet_file, str(tmp_path / "k2.safetensors"), "--to", "kohya"]) == 0
    back = formats.read_adapters(tmp_path / "k2.safetensors")["unet"]
    for module, entry in formats.read_adapters(tmp_path / "k.safetensors")["unet"].items():
        again = back[module]
        assert torch.equal(again.tensors["A"], entry.tensors["A"])
        assert torch.allclose(again.tensors["B"] * again.scale, entry.tensors["B"] * entry.scale)


def test_convert_with_base_checks_the_file_fits(lora_pipe, tiny_sd_path, tmp_path):
    _, handles, _ = lora_pipe
    formats.save_kohya_lora(handles, tmp_path / "k.safetensors")
    out = tmp_path / "pk"
    assert (
        convert(
            [
                str(tmp_path / "k.safetensors"),
                str(out),
                "--to",
                "peftkit",
                "--base",
                str(tiny_sd_path),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder.safetensors", "unet.safetensors"]
    tensors = formats.read_tensors(tmp_path / "k.safetensors")[0]
    tensors["lora_unet_conv_in.lora_down.weight"] = torch.zeros(2, 7, 3, 3)
    tensors["lora_unet_conv_in.lora_up.weight"] = torch.zeros(32, 2, 1, 1)
    save_file(tensors, str(tmp_path / "other.safetensors"))
    with pytest.raises(PeftkitError, match="does not fit unet module 'conv_in'"):
        convert(
            [
                str(tmp_path / "other.safetensors"),
                str(tmp_path / "x"),
                "--to",
                "peftkit",
                "--base",
                str(tiny_sd_path),
            ]
        )


def test_textual_inversion_file_loads_in_diffusers_like_peftkit(tiny_sd_path, tmp_path):
    vectors = {"<toy>": torch.randn(2, 32)}
    ti_format.save_textual_inversion(tmp_path / "toy.safetensors", vectors)
    assert torch.equal(
        ti_format.load_textual_inversion_file(tmp_path / "toy.safetensors")["<toy>"],
        vectors["<toy>"],
    )
    ours, theirs = load_pipe(tiny_sd_path), load_pipe(tiny_sd_path)
    ti_format.add_tokens(ours.tokenizer, ours.text_encoder, vectors)
    theirs.load_textual_inversion(str(tmp_path / "toy.safetensors"))
    base = load_pipe(tiny_sd_path)

    def encode(pipe, prompt):
        ids = pipe.tokenizer(
            [prompt], padding="max_length", max_length=16, return_tensors="pt"
        ).input_ids
        return pipe.text_encoder(ids)[0]

    with torch.no_grad():
        # The pipeline expands a multi-vector token to "<toy> <toy>_1" before tokenizing.
        expanded = theirs.maybe_convert_prompt("a <toy> b", theirs.tokenizer)
        assert expanded == "a <toy> <toy>_1 b"
        got, want = encode(ours, expanded), encode(theirs, expanded)
        assert ((got - want).norm() / want.norm()).item() < 1e-5
        assert (got - encode(base, "a b")).abs().max() > 1e-3


def test_a1111_embedding_reads_token_from_file_name(tmp_path):
    save_file({"emb_params": torch.ones(3, 8)}, str(tmp_path / "mystyle.safetensors"))
    assert ti_format.load_textual_inversion_file(tmp_path / "mystyle.safetensors")[
        "mystyle"
    ].shape == (3, 8)


def test_file_for_another_base_names_the_module(lora_pipe, tmp_path):
    _, handles, _ = lora_pipe
    formats.save_diffusers_lora(handles, tmp_path / "d.safetensors")
    torch.manual_seed(0)
    other = torch.nn.Module()
    other.text_model = torch.nn.Linear(3, 3)
    missing = (
        "text_encoder module 'text_model.encoder.layers.0.mlp.fc1', which this model does not have"
    )
    with pytest.raises(PeftkitError, match=missing):
        formats.load_lora_file(
            {"unet": torch.nn.Linear(2, 2), "text_encoder": other}, tmp_path / "d.safetensors"
        )
    tensors = formats.read_tensors(tmp_path / "d.safetensors")[0]
    key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(2, 5)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    misfit = r"does not fit text_encoder module 'encoder.layers.0.self_attn.q_proj': its weight is \(32, 32\)"
    with pytest.raises(PeftkitError, match=misfit):
        formats.load_lora_file(components(lora_pipe[0]), tmp_path / "bad.safetensors", name="other")


def test_old_diffusers_processor_keys_load(lora_pipe, tiny_sd_path, tmp_path):
    _, handles, want = lora_pipe
    attn = {
        "unet": {
            "to_q": "to_q_lora",
            "to_k": "to_k_lora",
            "to_v": "to_v_lora",
            "to_out.0": "to_out_lora",
        },
        "text_encoder": {
            "q_proj": "to_q_lora",
            "k_proj": "to_k_lora",
            "v_proj": "to_v_lora",
            "out_proj": "to_out_lora",
        },
    }
    old = {}
    for key, value in formats.diffusers_tensors(formats.adapter_set_of(handles)).items():
        component = key.split(".")[0]
        stem, _, kind = key.rpartition(".lora_")
        parent, _, leaf = stem.rpartition(".")
        leaf, parent = (leaf, parent) if leaf != "0" else ("to_out.0", parent.rpartition(".")[0])
        if leaf in attn[component]:
            processor = ".processor" if component == "unet" else ""
            old[
                f"{parent}{processor}.{attn[component][leaf]}.{'down' if kind == 'A.weight' else 'up'}.weight"
            ] = value
    save_file(old, str(tmp_path / "old.safetensors"))
    pipe = load_pipe(tiny_sd_path)
    loaded = formats.load_lora_file(components(pipe), tmp_path / "old.safetensors")
    n_attn = sum(
        name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in handles["unet"].layers
    )
    assert len(loaded["unet"].layers) == n_attn > 0 and len(loaded["text_encoder"].layers) == 4
    ours = handles["unet"].state_dict()
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    scaling = handles["unet"].layers[q].deltas["default"].scaling
    assert torch.allclose(loaded["unet"].state_dict()[q + ".B"], ours[q + ".B"] * scaling)


def test_sdxl_kohya_prefixes_round_trip(tmp_path):
    def lora(r, d_in, d_out, alpha):
        return formats.Entry(
            "lora", {"A": torch.randn(r, d_in), "B": torch.randn(d_out, r)}, alpha / r
        )

    lora = {
        "unet": {"mid_block.attentions.0.proj_in": lora(2, 8, 8, 1.0)},
        "text_encoder": {"text_model.encoder.layers.0.mlp.fc1": lora(2, 8, 16, 2.0)},
        "text_encoder_2": {"text_model.encoder.layers.1.self_attn.out_proj": lora(4, 8, 8, 4.0)},
    }
    tensors = formats.kohya_tensors(lora)
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha" in tensors
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in tensors
    save_file(tensors, str(tmp_path / "xl.safetensors"))
    back = formats.read_adapters(tmp_path / "xl.safetensors")
    assert {c: sorted(e) for c, e in back.items()} == {c: sorted(e) for c, e in lora.items()}
    for c, entries in lora.items():
        for m, entry in entries.items():
            assert back[c][m].tensors.keys() == entry.tensors.keys()
            assert all(torch.equal(back[c][m].tensors[k], t) for k, t in entry.tensors.items())
            assert back[c][m].alpha == entry.alpha


def test_bad_inputs_raise_clear_errors(lora_pipe, tmp_path):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PeftkitError, match="not an adapter file peftkit knows"):
        formats.read_adapters(tmp_path / "plain.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    with pytest.raises(PeftkitError, match="truncated or corrupt"):
        formats.read_adapters(tmp_path / "cut.safetensors")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    kron = inject(model, KronConfig(targets=["0"], r=2))
    with pytest.raises(PeftkitError, match="only carries LoRA and DoRA: write the kohya"):
        formats.save_diffusers_lora({"unet": kron}, tmp_path / "x.safetensors")
    with pytest.raises(PeftkitError, match="same file"):
        convert(
            [
                str(tmp_path / "plain.safetensors"),
                str(tmp_path / "plain.safetensors"),
                "--to",
                "kohya",
            ]
        )
