"""Offline hub handling: the probe gives up within its timeout (or at once with HF_HUB_OFFLINE),
and the diffusion and ViT loaders then name the repository, the file and the ways around it."""

import socket
import time

import pytest

from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.hub import hub_reachable


def _hanging_connection(*args, **kwargs):
    # a slow network: the connection opens only after the probe should have given up
    time.sleep(3)
    return socket.socket()


@pytest.fixture
def unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", _hanging_connection)


def test_probe_gives_up_on_a_hanging_connection_and_honours_hf_hub_offline(
    unreachable, monkeypatch
):
    # were the timeout ignored, the late connection would count as reachable
    assert hub_reachable(timeout=0.2) is False
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: socket.socket())
    assert hub_reachable(timeout=0.2) is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable(timeout=0.2) is False


def test_diffusion_base_offline_names_repo_file_and_fixes(unreachable, monkeypatch, tmp_path):
    import peftkit.common_kernels.hub as hub
    from peftkit.diffusion.base import load_base

    monkeypatch.setattr(hub, "PROBE_SECONDS", 0.2)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(PeftkitError) as err:
        load_base("someorg/some-model")
    message = str(err.value)
    for part in (
        "'someorg/some-model'",
        "model_index.json",
        "`hf download someorg/some-model --local-dir ./some-model`",
        "--model ./some-model",
        "--model starter",
    ):
        assert part in message


def test_vit_backbone_offline_names_repo_file_and_fixes(unreachable, monkeypatch, tmp_path):
    import peftkit.common_kernels.hub as hub
    from peftkit.vision.backbones import create_backbone

    monkeypatch.setattr(hub, "PROBE_SECONDS", 0.2)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PeftkitError) as err:
        create_backbone("vit_tiny_patch16_224", num_classes=3, pretrained=True)
    message = str(err.value)
    assert "model.safetensors" in message and "hf download timm/vit_tiny_patch16_224" in message
    assert "--checkpoint" in message and "--model starter" in message
