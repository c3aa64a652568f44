"""The app's concept queue: jobs queued while another trains join it (one ConceptTrainer, one
batch), leave saved when done or cancelled, and a job with other settings waits its turn."""

import pytest

from peftkit.apps.concept_queue import ConceptQueue
from peftkit.apps.demo import SAMPLES, concept_job, open_base
from peftkit.apps.jobs import CANCELLED, DONE, FAILED, JobRunner
from peftkit.common_kernels.adapter_file import read_tensors
from peftkit.diffusion.dreambooth import UNET_FILE


@pytest.fixture
def queue(tiny_sd_path):
    return ConceptQueue(lambda: open_base(str(tiny_sd_path), "cpu"), "cpu")


def _submit(queue, runner, steps, rank=4, images=SAMPLES):
    job = runner.track("concept")
    out = job.output_dir / "adapter"
    queue.submit(
        job,
        lambda base: concept_job(
            job.id, images, "a photo of sks toy", "lora", steps, rank, out, resolution=16
        ),
        lambda: out,
    )
    return job


def test_a_job_queued_while_another_trains_joins_it_and_both_finish(queue, tmp_path):
    runner = JobRunner(tmp_path, workers=1)
    first = _submit(queue, runner, steps=12)
    second = _submit(queue, runner, steps=3)
    assert first.wait(300) and second.wait(300)
    assert (first.status, second.status) == (DONE, DONE), (first.message, second.message)
    assert queue.peak == 2  # they trained in the same batches
    assert (first.step, second.step) == (12, 3) and len(second.losses) == 3
    for job in (first, second):
        adapter, _ = read_tensors(job.result / UNET_FILE)
        assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if k.endswith("B"))


def test_cancel_leaves_saved_and_a_job_with_another_rank_waits_then_runs(queue, tmp_path):
    runner = JobRunner(tmp_path, workers=1)
    long = _submit(queue, runner, steps=500)
    other = _submit(queue, runner, steps=2, rank=8)
    while long.step < 2:
        assert not long.wait(0.05), long.message
    assert (
        other.snapshot()["status"] == "queued" and "waiting for the running jobs" in other.message
    )
    runner.cancel(long.id)
    assert long.wait(120) and other.wait(300)
    assert long.status == CANCELLED and (long.output_dir / "adapter" / UNET_FILE).is_file()
    assert other.status == DONE and queue.peak == 1


def test_a_job_with_a_bad_image_folder_fails_with_a_message(queue, tmp_path):
    runner = JobRunner(tmp_path, workers=1)
    job = _submit(queue, runner, steps=2, images=tmp_path / "nowhere")
    assert job.wait(120)
    assert (
        job.status == FAILED
        and "nowhere" in job.message
        and (job.output_dir / "error.log").is_file()
    )
