"""The app's tabs under careless and hostile input, without a browser: Cancel during evaluation
frees the worker, numeric inputs are bounded on the server, server folders stay inside the
--data-root allow-list (saying nothing about paths outside it), and rejected uploads leave nothing
behind (neither our partial folder nor Gradio's temporary copies)."""

import math

import numpy as np
import pytest
from PIL import Image

from peftkit.apps import personalize_tab
from peftkit.apps.jobs import CANCELLED, DONE, JobRunner
from peftkit.apps.personalize_tab import Personalizer, validate_uploads
from peftkit.apps.vit_tab import ViTTuner
from peftkit.common_kernels.errors import PeftkitError

TINY_VIT = {
    "model": "vit_tiny_patch16_224",
    "pretrained": False,
    "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
}
# task, folder, method, steps, rank, lr, batch size, built-in train and eval sizes
RUN = ("color", "", "lora", 2, 2, 1e-2, 8, 16, 600)


@pytest.fixture
def runner(tmp_path):
    runner = JobRunner(tmp_path / "runs", workers=1)
    yield runner
    runner.shutdown()


def test_cancel_during_evaluation_stops_it_and_the_next_job_runs(runner, monkeypatch):
    from peftkit.vision import train

    build = train.build_model

    def cancelling_on_eval(*args, **kwargs):
        model, size = build(*args, **kwargs)

        def cancel(module, inputs):
            if not module.training:  # the first evaluation batch: Cancel arrives mid-evaluation
                next(iter(runner.jobs.values())).cancel()

        model.register_forward_pre_hook(cancel)
        return model, size

    monkeypatch.setattr(train, "build_model", cancelling_on_eval)
    tuner = ViTTuner(TINY_VIT, "cpu", runner)
    job = tuner.submit(*RUN)  # evaluates 600 images in batches of 256
    assert job.wait(120)
    assert job.status == CANCELLED and job.evals == [] and job.result is None
    monkeypatch.setattr(train, "build_model", build)
    following = tuner.submit(*RUN[:-1], 24)
    assert following.wait(120) and following.status == DONE
    assert sum(sum(row) for row in following.result["confusion"]) == 24


@pytest.mark.parametrize(
    "field,value,message",
    [
        (3, 0, "steps must be between 1 and 5000"),
        (3, 10**9, "steps must be between 1 and 5000"),
        (4, 0, "rank must be between 1 and 64"),
        (5, math.nan, "learning rate must be above 0"),
        (5, 50.0, "learning rate must be above 0"),
        (6, 100_000, "batch size must be between 1 and 256"),
        (8, 10**7, "built-in eval images must be between 1 and 2000"),
    ],
)
def test_vit_inputs_are_bounded_on_the_server(runner, field, value, message):
    run = list(RUN)
    run[field] = value
    with pytest.raises(PeftkitError, match=message):
        ViTTuner(TINY_VIT, "cpu", runner).submit(*run)
    assert not runner.jobs


def test_personalize_inputs_are_bounded_on_the_server(runner, tmp_path):
    p = Personalizer("starter", "cpu", runner, tmp_path)
    with pytest.raises(PeftkitError, match="steps must be between 1 and 2000"):
        p.submit(tmp_path, "LoRA", 10**6, 4, 0.0, "sks", "toy")
    with pytest.raises(PeftkitError, match="learning rate must be between 0 and 1"):
        p.submit(tmp_path, "LoRA", 10, 4, math.inf, "sks", "toy")
    with pytest.raises(PeftkitError, match="sampler steps must be between 1 and 100"):
        p.generate("a toy", 0, [], steps=10**6)
    with pytest.raises(PeftkitError, match="guidance must be between 0 and 30"):
        p.generate("a toy", 0, [], guidance=math.nan)
    assert not runner.jobs and p._gen is None, "refused before anything loads"


def test_server_folders_stay_inside_the_data_roots_and_outside_ones_all_read_alike(
    runner, tmp_path
):
    root, outside = tmp_path / "data", tmp_path / "private"
    (root / "dtd").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    tuner = ViTTuner(TINY_VIT, "cpu", runner, data_roots=[root])
    assert tuner.data_folder("dtd") == (root / "dtd").resolve()
    assert tuner.data_folder(str(root / "dtd")) == (root / "dtd").resolve()
    with pytest.raises(PeftkitError, match="not a folder in the data root"):
        tuner.data_folder("missing")
    refusals = set()
    for text in (str(outside), str(tmp_path / "nothing"), "escape", "../private", "/etc"):
        with pytest.raises(PeftkitError) as refused:
            tuner.data_folder(text)
        refusals.add(str(refused.value))
    assert len(refusals) == 1, "the answer must not depend on whether the path exists"
    assert str(outside) not in refusals.pop()
    with pytest.raises(PeftkitError, match="--data-root"):
        ViTTuner(TINY_VIT, "cpu", runner).data_folder(str(root / "dtd"))


def _image(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def test_a_rejected_upload_leaves_no_partial_folder(tmp_path):
    files = [_image(tmp_path / f"{i}.png", i) for i in range(3)]
    (tmp_path / "fake.png").write_bytes(b"not an image")
    with pytest.raises(PeftkitError, match="fake.png is not an image"):
        validate_uploads(files + [str(tmp_path / "fake.png")], tmp_path / "stored")
    assert not (tmp_path / "stored").exists()


def test_gradio_copies_of_rejected_uploads_are_deleted_and_accepted_ones_kept(
    runner, tmp_path, monkeypatch
):
    cache = tmp_path / "gradio-cache"
    monkeypatch.setattr("gradio.utils.get_upload_folder", lambda: str(cache))
    p = Personalizer("starter", "cpu", runner, tmp_path / "app")

    def uploads(count):
        folders = [cache / f"h{i}" for i in range(count)]
        for f in folders:
            f.mkdir(parents=True)
        return [_image(f / "x.png", i) for i, f in enumerate(folders)]

    with pytest.raises(PeftkitError, match="got 1000"):
        p.images_folder(uploads(1000), use_samples=False)
    assert not any(cache.iterdir()) and not (tmp_path / "app" / "uploads").exists()
    outside, junk = tmp_path / "mine.png", tmp_path / "junk.png"
    _image(outside, 7)
    junk.write_bytes(b"junk")
    files = uploads(3)
    with pytest.raises(PeftkitError, match="not an image"):
        p.images_folder(files + [str(outside), str(junk)], use_samples=False)
    assert not any(cache.iterdir()) and outside.is_file(), "only Gradio's copies are deleted"
    with pytest.raises(PeftkitError, match="x.png is no longer on the server: upload"):
        p.images_folder(files, use_samples=False)
    files = uploads(3)
    stored = p.images_folder(files, use_samples=False)
    assert len(list(stored.glob("*.png"))) == 3 and p.images_folder(files, False) != stored
    assert len(list((tmp_path / "app" / "uploads").iterdir())) == 2, "accepted twice, kept"
    assert personalize_tab.MAX_IMAGES < 1000
