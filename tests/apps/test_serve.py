import base64
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from peftkit.apps.batcher import AdapterCache, Batcher, Request
from peftkit.apps.serve import create_app
from peftkit.common_kernels import LoRAConfig, adapted_layers, inject, remove_adapters, save_adapter

SETTINGS = dict(steps=2, guidance=3.0, width=16, height=16)


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd_path, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def adapter_dir(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(["dog", "cat", "owl"]):
        handle = inject(
            pipe.unet, LoRAConfig(targets=["to_q", "to_k", "to_v", "to_out.0"], r=2), name=name
        )
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in handle.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        save_adapter(handle, folder / f"{name}.safetensors")
        handle.unload()
    assert not adapted_layers(pipe.unet)
    return folder


@pytest.fixture(autouse=True)
def clean_unet(pipe):
    yield
    remove_adapters(pipe.unet)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_concurrent_requests_for_different_adapters_share_one_batch_and_match_solo_runs(
    pipe, adapter_dir
):
    batcher = Batcher(
        pipe, AdapterCache(pipe.unet, adapter_dir, max_bytes=2**30), max_batch=8, window_s=0.5
    )
    requests = [
        Request("a dog", adapter="dog", seed=1, **SETTINGS),
        Request("a cat", adapter="cat", seed=2, **SETTINGS),
        Request("plain", adapter=None, seed=3, **SETTINGS),
        Request("an owl", adapter="owl", scale=0.5, seed=4, **SETTINGS),
    ]
    futures = [None] * len(requests)

    def send(i):
        futures[i] = batcher.submit(requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together = [f.result(timeout=120) for f in futures]
    assert batcher.batches_run == 1, "four requests within the window must run as one batch"
    alone = [batcher.submit(r).result(timeout=120) for r in requests]
    assert batcher.batches_run == 5
    for a, b in zip(together, alone):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2
    assert (
        np.abs(
            pixels(together[0])
            - pixels(batcher.submit(Request("a dog", seed=1, **SETTINGS)).result())
        ).max()
        > 2
    ), "the adapter must change the image"


def test_lru_cache_evicts_beyond_its_budget_and_restores_the_unet(pipe, adapter_dir):
    cache = AdapterCache(pipe.unet, adapter_dir, max_bytes=1)
    cache.acquire(["dog"])
    cache.acquire(["cat"])
    assert list(cache.loaded) == ["cat"]
    cache.acquire(["dog", "owl"])
    assert sorted(cache.loaded) == ["dog", "owl"]
    assert {n for layer in adapted_layers(pipe.unet) for n in layer.deltas} == {"dog", "owl"}


def test_http_api_answers_and_rejects_unknown_adapters_and_bad_payloads(pipe, adapter_dir):
    from fastapi.testclient import TestClient

    client = TestClient(
        create_app(Batcher(pipe, AdapterCache(pipe.unet, adapter_dir, 2**30), window_s=0.01))
    )
    assert client.get("/adapters").json()["available"] == ["cat", "dog", "owl"]
    ok = client.post("/generate", json={"prompt": "a dog", "adapter": "dog", **SETTINGS})
    assert ok.status_code == 200
    image = Image.open(io.BytesIO(base64.b64decode(ok.json()["image_png_base64"])))
    assert image.size == (16, 16)
    missing = client.post("/generate", json={"prompt": "x", "adapter": "horse", **SETTINGS})
    assert missing.status_code == 404 and "unknown adapter 'horse'" in missing.json()["detail"]
    assert client.post("/generate", json={"adapter": "dog"}).status_code == 422
    assert client.post("/generate", json={"prompt": "x", "width": 17}).status_code == 422
    assert (
        client.post(
            "/generate", content=b"not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
