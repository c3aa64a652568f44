"""`peftkit app` through gradio_client on the tiny pipeline and a tiny ViT: train then generate,
Textual Inversion and two concepts at once, adapter import, upload validation, the ViT tuner, and
the job runner underneath (queue limits, errors as messages, cancel through the engine)."""

import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from peftkit.apps import app as app_module
from peftkit.apps.app import build_app, launch
from peftkit.apps.jobs import CANCELLED, DONE, FAILED, JobRunner
from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training.engine import TrainConfig, train

TINY_VIT = {
    "model": "vit_tiny_patch16_224",
    "pretrained": False,
    "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
}


@pytest.fixture(scope="module")
def served(tiny_sd_path, tmp_path_factory):
    from gradio_client import Client

    torch.set_num_threads(2)
    blocks = build_app(str(tiny_sd_path), TINY_VIT, "cpu", tmp_path_factory.mktemp("app-runs"))
    _, url, _ = launch(blocks, port=None, block=False)
    assert url.startswith("http://127.0.0.1:")
    yield Client(url, verbose=False), blocks
    blocks.close()
    blocks.peftkit_runner.shutdown()


def _train(client, method="LoRA", steps=12, identifier="sks", files=(), lr=1e-2):
    return client.predict(
        list(files), True, method, steps, 2, lr, identifier, "toy", api_name="/train"
    )


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_train_then_generate_with_the_adapter_scale_side_by_side_with_the_base(served):
    client, blocks = served
    status, _, files, adapter, _, prompt = _train(client)
    assert "**done** · step 12/12" in status and status.endswith("concept-1")
    assert {f.rsplit("/", 1)[-1] for f in files} == {
        "unet_adapter.safetensors",
        "pytorch_lora_weights.safetensors",
    }
    folder = adapter["value"]
    assert folder.endswith("concept-1/adapter") and prompt["value"] == "a photo of sks toy"
    job = json.loads((blocks.peftkit_root / "concept-1" / "job.json").read_text())
    assert job["status"] == DONE and len(job["losses"]) == 12

    def generate(scale):
        return client.predict(
            "a photo of sks toy", 3, 2, 3.0, folder, scale, None, 1.0, api_name="/generate"
        )

    base, adapted = generate(1.0)
    base_off, adapted_off = generate(0.0)
    assert np.array_equal(
        _pixels(base), _pixels(base_off)
    )  # the base column never sees the adapter
    assert np.array_equal(_pixels(base_off), _pixels(adapted_off))  # scale 0 is the base model
    assert np.abs(_pixels(base) - _pixels(adapted)).max() > 0  # scale 1 changes the image
    assert len(list((blocks.peftkit_root / "generated").glob("*.png"))) == 4


def test_textual_inversion_and_two_concepts_combined(served):
    client, blocks = served
    status, _, files, adapter, _, prompt = _train(
        client, "Textual Inversion", steps=6, identifier="tix", lr=5e-2
    )
    assert "**done**" in status and files[0].endswith("learned_embeds.safetensors")
    assert prompt["value"] == "a photo of a <tix>"
    ti_folder = adapter["value"]
    lora_folder = next(v for _, v in adapter["choices"] if v.endswith("concept-1/adapter"))
    base, both = client.predict(
        "a photo of a <tix> and sks toy",
        1,
        2,
        3.0,
        lora_folder,
        1.0,
        ti_folder,
        1.0,
        api_name="/generate",
    )
    assert np.abs(_pixels(base) - _pixels(both)).max() > 0
    # generating again reuses the loaded embedding instead of failing on a duplicate token
    again = client.predict(
        "a photo of a <tix>", 1, 2, 3.0, ti_folder, 1.0, None, 1.0, api_name="/generate"
    )
    assert len(again) == 2


def test_a_previously_trained_adapter_file_can_be_imported(served, tmp_path):
    from gradio_client import handle_file

    client, blocks = served
    source = blocks.peftkit_root / "concept-1" / "adapter" / "unet_adapter.safetensors"
    adapter, _ = client.predict(handle_file(str(source)), api_name="/import_adapter")
    assert adapter["value"].endswith("imported/unet_adapter.safetensors")
    base, adapted = client.predict(
        "sks toy", 0, 2, 3.0, adapter["value"], 1.0, None, 1.0, api_name="/generate"
    )
    assert np.abs(_pixels(base) - _pixels(adapted)).max() > 0
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="safetensors|corrupt|read") as err:
        client.predict(handle_file(str(junk)), api_name="/import_adapter")
    assert "Traceback" not in str(err.value)


def test_bad_uploads_are_refused_with_a_message(served, tmp_path):
    from gradio_client import handle_file

    client, _ = served
    good = []
    for i in range(2):
        good.append(tmp_path / f"ok{i}.png")
        Image.new("RGB", (32, 32), (i * 100, 50, 50)).save(good[-1])
    fake, tiny = tmp_path / "fake.png", tmp_path / "tiny.png"
    fake.write_text("this is not a picture")
    Image.new("RGB", (4, 4)).save(tiny)
    cases = [
        (good, "upload 3 to 20 images of your concept; got 2"),
        ([*good, fake], "fake.png is not an image that can be read"),
        ([*good, tiny], "tiny.png is only 4x4 pixels"),
    ]
    for files, message in cases:
        status = _train(client, files=[handle_file(str(p)) for p in files])[0]
        assert (
            status.startswith("**not started** · ")
            and message in status
            and "Traceback" not in status
        )
    status = client.predict([], False, "LoRA", 3, 2, 0, "sks", "toy", api_name="/train")[0]
    assert "no images: upload 3-20 images" in status


def test_vit_tuner_trains_with_curves_confusion_matrix_and_comparison_table(served, tmp_path):
    client, _ = served
    runs = [
        client.predict("color", "", method, 8, 2, 1e-2, 16, 32, 24, api_name="/vit_train")
        for method in ("linear", "lora")
    ]
    for status, loss, acc, confusion, _ in runs:
        assert "**done** · step 8/8" in status
        assert len(loss["data"]) == 8 and len(acc["data"]) >= 1
        counts = np.array([row[1:] for row in confusion["data"]])
        assert counts.shape == (4, 4) and counts.sum() == 24
    table = runs[-1][4]
    assert table["headers"][:3] == ["method", "task", "trainable params"]
    (linear, lora) = table["data"]
    assert linear[0] == "linear" and lora[0] == "lora" and lora[2] > linear[2]
    status = client.predict(
        "color", str(tmp_path / "missing"), "lora", 2, 2, 1e-2, 16, 32, 24, api_name="/vit_train"
    )[0]
    assert status.startswith("**not started**") and "data roots" in status


def test_app_binds_localhost_and_shares_only_when_asked(monkeypatch, tiny_sd_path, tmp_path):
    calls = []
    monkeypatch.setattr(
        app_module, "launch", lambda blocks, host, port, share: calls.append((host, port, share))
    )
    assert (
        app_module.app(
            ["--base", str(tiny_sd_path), "--output", str(tmp_path / "a"), "--device", "cpu"]
        )
        == 0
    )
    assert (
        app_module.app(
            [
                "--base",
                str(tiny_sd_path),
                "--output",
                str(tmp_path / "b"),
                "--device",
                "cpu",
                "--share",
                "--port",
                "8123",
            ]
        )
        == 0
    )
    assert calls == [("127.0.0.1", 7860, False), ("127.0.0.1", 8123, True)]


# ---- the job runner ----


class _Fit:
    """A task that trains for as long as it is allowed (slowly enough to be cancelled)."""

    def __init__(self):
        self.model = torch.nn.Linear(2, 1)

    def trainable_parameters(self):
        return list(self.model.parameters())

    def loss(self, model, batch):
        time.sleep(0.01)
        return model(batch).pow(2).mean()


def test_runner_runs_one_job_at_a_time_and_refuses_a_full_queue(tmp_path):
    runner = JobRunner(tmp_path, workers=1, max_pending=1)
    gate, order = threading.Event(), []
    first = runner.submit("x", lambda job: (gate.wait(5), order.append("first")))
    second = runner.submit("x", lambda job: order.append("second"))
    with pytest.raises(PeftkitError, match="already waiting"):
        runner.submit("x", lambda job: None)
    deadline = time.time() + 5
    while first.status != "running" and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert first.status == "running" and second.status == "queued"
    gate.set()
    assert second.wait(5) and order == ["first", "second"]
    assert (first.id, second.id) == ("x-1", "x-2")
    assert json.loads((tmp_path / "x-2" / "job.json").read_text())["status"] == DONE
    runner.shutdown()


def test_runner_turns_errors_into_messages_and_keeps_the_traceback_in_a_log(tmp_path):
    runner = JobRunner(tmp_path)

    def fail(job):
        raise ValueError("bad value\nsecond line")

    job = runner.submit("x", fail)
    job.wait(5)
    assert job.status == FAILED and job.message == "ValueError: bad value"
    assert "Traceback" in (job.output_dir / "error.log").read_text()
    user = runner.submit(
        "x", lambda job: (_ for _ in ()).throw(PeftkitError("no images found in photos/"))
    )
    user.wait(5)
    assert user.message == "no images found in photos/"
    runner.shutdown()


def test_cancel_stops_a_running_training_through_should_stop_and_skips_a_queued_job(tmp_path):
    runner = JobRunner(tmp_path, workers=1)
    data = [torch.randn(2) for _ in range(8)]
    running = runner.submit(
        "fit",
        lambda job: train(
            _Fit(),
            data,
            TrainConfig(
                steps=10_000, batch_size=2, lr=1e-2, progress=False, output_dir=str(job.output_dir)
            ),
            on_event=job.emit,
            should_stop=job.should_stop,
        ),
    )
    queued = runner.submit("fit", lambda job: pytest.fail("a cancelled job must not start"))
    deadline = time.time() + 10
    while running.step < 3 and time.time() < deadline:
        time.sleep(0.02)
    queued.cancel()
    runner.cancel(running.id)
    assert running.wait(10) and queued.wait(10)
    assert running.status == CANCELLED and 3 <= running.result.step < 10_000
    assert (running.output_dir / "checkpoints").is_dir()  # the engine saved where it stopped
    assert queued.status == CANCELLED and queued.message == "cancelled before it started"
    runner.shutdown()
