"""Base loading: local folders, unreachable hub ids, attention backends."""

import pytest

from peftkit.common_kernels.errors import PeftkitError
from peftkit.diffusion.base import load_base, set_attention_backend, xformers_available


def test_local_folder_loads_as_stable_diffusion(tiny_sd_path):
    base = load_base(str(tiny_sd_path))
    assert base.kind == "sd" and base.source == str(tiny_sd_path)
    hidden, extra = base.encode_prompt(["a photo of sks toy"], resolution=16)
    assert hidden.shape == (1, 16, 32) and extra == {}


def test_unreachable_hub_id_says_how_to_pass_a_local_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(PeftkitError, match=r"--model \./no-such-model"):
        load_base("someone/no-such-model")


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(PeftkitError, match="model_index.json"):
        load_base(str(tmp_path))


def test_missing_path_is_neither_folder_nor_hub_id(tmp_path):
    with pytest.raises(PeftkitError, match="neither an existing folder"):
        load_base(str(tmp_path / "missing"))


def test_sdpa_is_the_default_without_xformers(tiny_sd_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    base = load_base(str(tiny_sd_path))
    assert set_attention_backend(base.unet, "auto") == (
        "xformers" if xformers_available() else "sdpa"
    )
    if not xformers_available():
        assert all(isinstance(p, AttnProcessor2_0) for p in base.unet.attn_processors.values())
        with pytest.raises(PeftkitError, match="xformers"):
            set_attention_backend(base.unet, "xformers")
