"""`peftkit serve` as an attacker and a careless client meet it: concurrent load with an oversized
and a broken-adapter request, a full queue, clients that time out or leave, a stalled worker,
shutdown, hostile payloads, and the API key. Tiny pipeline on the CPU, loopback only."""

import base64
import io
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from peftkit.apps.batcher import AdapterCache, Batcher, Limits, Request, Stopped
from peftkit.apps.serve import Server, create_app
from peftkit.common_kernels import LoRAConfig, inject, remove_adapters, save_adapter

SMALL = dict(steps=2, guidance=3.0, width=16, height=16)
# Room for a request long enough that only cancellation ends it early.
LONG_LIMITS = Limits(max_pixels=16 * 16, max_steps=500)


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
    for i, name in enumerate(["dog", "cat"]):
        handle = inject(pipe.unet, LoRAConfig(targets=["to_q", "to_v"], r=2), name=name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in handle.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        save_adapter(handle, folder / f"{name}.safetensors")
        handle.unload()
    good = (folder / "dog.safetensors").read_bytes()
    (folder / "broken.safetensors").write_bytes(good[: len(good) // 2])
    return folder


@pytest.fixture
def make_batcher(pipe, adapter_dir):
    made = []

    def make(**kwargs):
        cache = AdapterCache(pipe.unet, adapter_dir, 2**30)
        made.append(Batcher(pipe, cache, **{"window_s": 0.05, **kwargs}))
        return made[-1]

    yield make
    for batcher in made:
        batcher.close()
    remove_adapters(pipe.unet)


def _wait_idle(batcher, bound_s=60.0):
    end = time.monotonic() + bound_s
    while (batcher.busy_since is not None or batcher.queue.qsize()) and time.monotonic() < end:
        time.sleep(0.02)


def _running_server(app, batcher):
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"), batcher)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def _image(response) -> np.ndarray:
    png = base64.b64decode(response.json()["image_png_base64"])
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def test_forty_concurrent_requests_answer_while_oversized_and_broken_adapter_ones_fail_alone(
    make_batcher, adapter_dir
):
    batcher = make_batcher(max_batch=8)
    server, thread, url = _running_server(create_app(batcher, timeout_s=120), batcher)
    bodies = [
        {"prompt": f"thing {i}", "adapter": [None, "dog", "cat"][i % 3], "seed": i, **SMALL}
        for i in range(40)
    ]
    bodies += [{"prompt": "x", "adapter": "broken", "seed": 99, **SMALL}] * 2
    bodies.append({"prompt": "huge", **{**SMALL, "width": 2048, "height": 2048, "steps": 100}})
    with httpx.Client(base_url=url, timeout=120) as client:
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: client.post("/generate", json=b), bodies))
        assert [a.status_code for a in answers[:40]] == [200] * 40
        assert [a.status_code for a in answers[40:]] == [422, 422, 413]
        broken = answers[40].json()["detail"]
        assert "adapter 'broken'" in broken and str(adapter_dir) not in broken
        assert "2048x2048" in answers[42].json()["detail"]
        assert batcher.batches_run < 40, "concurrent requests must share batches"
        # Rows that shared a batch with the broken adapter still get their own exact image.
        for i in (0, 1, 2):
            alone = client.post("/generate", json=bodies[i])
            assert np.abs(_image(alone) - _image(answers[i])).max() <= 2
        assert client.get("/health").json()["ok"] is True
    server.should_exit = True
    thread.join(10)


def test_a_row_that_breaks_its_batch_fails_alone_and_the_others_get_their_images(
    make_batcher, monkeypatch
):
    batcher = make_batcher(window_s=0.5)
    forward = batcher._forward

    def poisoned(requests, tickets):
        if any(r.prompt == "poison" for r in requests):
            raise RuntimeError("this row breaks the pipeline")
        return forward(requests, tickets)

    monkeypatch.setattr(batcher, "_forward", poisoned)
    tickets = [batcher.submit(Request(p, seed=i, **SMALL)) for i, p in enumerate("ab")]
    tickets.append(batcher.submit(Request("poison", **SMALL)))
    assert [t.result(timeout=60).size for t in tickets[:2]] == [(16, 16)] * 2
    with pytest.raises(RuntimeError, match="breaks"):
        tickets[2].result(timeout=60)
    assert batcher.batches_run == 2, "the two good rows, each rerun alone"


def test_a_client_that_leaves_stops_its_work_between_denoising_steps(make_batcher):
    batcher = make_batcher(limits=LONG_LIMITS)
    server, thread, url = _running_server(create_app(batcher, timeout_s=600), batcher)
    body = {"prompt": "long", **{**SMALL, "steps": 500}}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=1.0) as client:
        client.post("/generate", json=body)
    _wait_idle(batcher)
    assert 0 < batcher.steps_run < 500 and batcher.batches_run == 0
    server.should_exit = True
    thread.join(10)


def test_a_request_past_its_timeout_answers_504_and_its_work_stops(make_batcher):
    batcher = make_batcher(limits=LONG_LIMITS)
    client = TestClient(create_app(batcher, timeout_s=0.5))
    answer = client.post("/generate", json={"prompt": "long", **{**SMALL, "steps": 500}})
    assert answer.status_code == 504 and "stopped" in answer.json()["detail"]
    _wait_idle(batcher)
    assert 0 < batcher.steps_run < 500 and batcher.batches_run == 0
    quick = client.post("/generate", json={"prompt": "next", **SMALL})
    assert quick.status_code == 200, "the worker is free again"


def test_a_full_queue_answers_429_with_retry_after(make_batcher):
    batcher = make_batcher(limits=LONG_LIMITS, max_queue=1, max_batch=1)
    running = batcher.submit(Request("long", **{**SMALL, "steps": 500}))
    while batcher.busy_since is None:
        time.sleep(0.01)
    waiting = batcher.submit(Request("waits", **SMALL))
    answer = TestClient(create_app(batcher)).post("/generate", json={"prompt": "x", **SMALL})
    assert answer.status_code == 429 and int(answer.headers["retry-after"]) >= 1
    running.abandon()
    assert waiting.result(timeout=60).size == (16, 16)
    with pytest.raises(Stopped):
        running.result(timeout=60)


def test_health_reports_a_stalled_worker_and_recovers(make_batcher, monkeypatch):
    batcher = make_batcher()
    release = threading.Event()
    forward = batcher._forward
    monkeypatch.setattr(batcher, "_forward", lambda *a: release.wait(60) and forward(*a))
    client = TestClient(create_app(batcher, stall_s=0.2))
    ticket = batcher.submit(Request("stuck", **SMALL))
    while batcher.busy_since is None:
        time.sleep(0.01)
    time.sleep(0.3)
    stalled = client.get("/health")
    assert stalled.status_code == 503 and stalled.json()["busy"] is True
    release.set()
    assert ticket.result(timeout=60).size == (16, 16)
    assert client.get("/health").status_code == 200


def test_sigterm_stops_running_work_at_once_and_waiting_requests_hear_it(make_batcher):
    batcher = make_batcher(limits=LONG_LIMITS)
    server, thread, url = _running_server(create_app(batcher, timeout_s=600), batcher)
    answers = []

    def ask():
        with httpx.Client(base_url=url, timeout=120) as client:
            answers.append(client.post("/generate", json={"prompt": "l", **SMALL, "steps": 500}))

    asker = threading.Thread(target=ask)
    asker.start()
    while batcher.steps_run == 0:
        time.sleep(0.01)
    server.handle_exit(signal.SIGTERM, None)
    asker.join(60)
    thread.join(60)
    assert not thread.is_alive() and not batcher._thread.is_alive()
    assert answers[0].status_code == 503 and "shutting down" in answers[0].json()["detail"]
    assert batcher.steps_run < 500


@pytest.mark.parametrize(
    "raw",
    [
        '{"prompt": "x", "guidance": NaN}',
        '{"prompt": "x", "scale": Infinity}',
        '{"prompt": "x", "steps": "5"}',
        '{"prompt": "x", "steps": 2.5}',
        '{"prompt": 5}',
        '{"prompt": "x", "width": 16.0}',
        '{"prompt": "x", "adapter": "../dog"}',
        '{"prompt": "x", "surprise": 1}',
    ],
)
def test_hostile_fields_answer_422_without_echoing_them(make_batcher, raw):
    client = TestClient(create_app(make_batcher()))
    answer = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert all(set(e) == {"loc", "msg"} for e in answer.json()["detail"])


def test_an_unexpected_error_is_a_500_that_hides_internals(make_batcher, monkeypatch):
    batcher = make_batcher()

    def explode(*args):
        raise RuntimeError("secret /srv/internal/path")

    monkeypatch.setattr(batcher, "_forward", explode)
    client = TestClient(create_app(batcher), raise_server_exceptions=False)
    answer = client.post("/generate", json={"prompt": "x", **SMALL})
    assert answer.status_code == 500 and "secret" not in answer.text
    assert client.get("/health").json()["worker_alive"] is True


def test_api_key_is_required_in_either_header_when_set(make_batcher):
    client = TestClient(create_app(make_batcher(), api_key="s3cret"))
    assert client.get("/adapters").status_code == 401
    assert client.get("/adapters", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/adapters", headers={"X-API-Key": "s3cret"}).status_code == 200
    bearer = {"Authorization": "Bearer s3cret"}
    assert client.get("/adapters", headers=bearer).json()["available"] == ["broken", "cat", "dog"]
    assert client.post("/generate", json={"prompt": "x", **SMALL}).status_code == 401
    assert json.loads(client.get("/health").text)["ok"] is True
