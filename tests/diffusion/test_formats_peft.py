"""peft `save_pretrained` folders (adapter_config.json + adapter_model.safetensors) import exactly:
alpha != r, rank_pattern, alpha_pattern and use_rslora, compared with peft's own output in float64;
without their config they are refused, naming the missing file."""

import shutil

import pytest

from peftkit.common_kernels import PeftkitError, core_names
from peftkit.diffusion import formats

from .tiny_unet import output, randomize, relative, tiny_unet

TARGETS = ["to_q", "to_v", "proj_in", "conv1"]
CONFIGS = [
    {"r": 4, "lora_alpha": 8},
    {"r": 4, "lora_alpha": 8, "rank_pattern": {"proj_in": 2}, "alpha_pattern": {"to_v": 3}},
    {"r": 4, "lora_alpha": 6, "use_rslora": True, "rank_pattern": {"conv1": 2}},
    {"r": 4, "lora_alpha": 3, "use_dora": True},
]


def peft_folder(folder, options):
    """A tiny UNet with a peft LoRA (random weights) saved with save_pretrained; its output."""
    from peft import LoraConfig, get_peft_model

    unet = tiny_unet()
    model = get_peft_model(unet, LoraConfig(target_modules=TARGETS, **options))
    randomize([p for n, p in model.named_parameters() if "lora_" in n])
    model.save_pretrained(folder)
    return output(model.base_model.model)


@pytest.mark.parametrize("options", CONFIGS)
def test_peft_folder_imports_equal_to_peft_output(options, tmp_path):
    if options.get("use_dora") and "dora" not in core_names():
        pytest.skip("core 'dora' is not registered on this branch")
    want = peft_folder(tmp_path / "peft", options)
    fresh = tiny_unet()
    base = output(fresh)
    handles = formats.load_lora_file({"unet": fresh}, tmp_path / "peft")
    assert handles["unet"].config.method == ("dora" if options.get("use_dora") else "lora")
    assert relative(want, base) > 0.01
    assert relative(output(fresh), want) < 1e-10

    other = tiny_unet()  # the weights file itself finds adapter_config.json beside it
    formats.load_lora_file({"unet": other}, tmp_path / "peft" / "adapter_model.safetensors")
    assert relative(output(other), want) < 1e-10


def test_peft_weights_without_their_config_are_refused(tmp_path):
    peft_folder(tmp_path / "peft", CONFIGS[0])
    (tmp_path / "peft" / "adapter_config.json").unlink()
    with pytest.raises(PeftkitError, match=r"peft folder .*peft' has no adapter_config.json"):
        formats.read_adapters(tmp_path / "peft")
    shutil.copy(tmp_path / "peft" / "adapter_model.safetensors", tmp_path / "w.safetensors")
    with pytest.raises(PeftkitError, match=r"adapter_config.json' is missing: its lora_alpha"):
        formats.read_adapters(tmp_path / "w.safetensors")


def test_peft_folder_converts_to_kohya_with_its_scale(tmp_path):
    from peftkit.diffusion.convert_cli import convert

    want = peft_folder(tmp_path / "peft", CONFIGS[1])
    assert convert([str(tmp_path / "peft"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    fresh = tiny_unet()
    formats.load_lora_file({"unet": fresh}, tmp_path / "k.safetensors")
    assert relative(output(fresh), want) < 1e-10


def test_dora_file_loads_with_diffusers_load_lora_weights(tmp_path):
    if "dora" not in core_names():
        pytest.skip("core 'dora' is not registered on this branch")
    from peftkit.common_kernels import core, inject

    unet = tiny_unet()
    handle = inject(unet, core("dora").make_config(TARGETS, rank=4, alpha=2.0))
    randomize(handle.trainable_parameters())
    want = output(unet)
    formats.save_diffusers_lora({"unet": handle}, tmp_path / formats.DIFFUSERS_FILE)
    tensors = formats.read_tensors(tmp_path / formats.DIFFUSERS_FILE)[0]
    assert any(k.endswith(".lora_magnitude_vector") for k in tensors)
    fresh = tiny_unet()
    fresh.load_lora_adapter(tensors, prefix="unet", adapter_name="dora")
    assert relative(output(fresh), want) < 1e-6
