"""Aspect-ratio buckets: the bucket table, each image's aspect kept within the bucket tolerance,
crops and SDXL size ids, one bucket per batch in a seeded, resumable order, and concept training
on images of several shapes (resume exact, too-small images named)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from peftkit.common_kernels.adapter_file import read_tensors
from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training.engine import TrainConfig, batches
from peftkit.diffusion.base import load_base
from peftkit.diffusion.buckets import (
    assign_buckets,
    bucket_batch_rows,
    bucket_sizes,
    crop_to,
    nearest_bucket,
)
from peftkit.diffusion.data import ConceptDataset
from peftkit.diffusion.dreambooth import UNET_FILE, ConceptConfig, ConceptTask, train_concept


def test_buckets_hold_about_the_resolution_squared_pixels_on_the_step_grid():
    sizes = bucket_sizes(1024, 64, 512, 2048)
    assert (1024, 1024) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and 512 <= min(w, h) and max(w, h) <= 2048
        assert (h, w) in sizes
        # the largest multiple of the step below resolution^2 / w: within one step's strip
        assert 1024**2 - 64 * max(w, h) < w * h <= 1024**2


def test_every_image_keeps_its_aspect_within_the_bucket_tolerance():
    sizes = bucket_sizes(1024, 64, 512, 2048)
    logs = sorted(math.log(w / h) for w, h in sizes)
    tolerance = max(b - a for a, b in zip(logs, logs[1:])) / 2
    rng = np.random.default_rng(0)
    for ratio in np.exp(rng.uniform(logs[0], logs[-1], 500)):
        w, h = sizes[nearest_bucket(int(1000 * ratio), 1000, sizes)]
        assert abs(math.log(w / h) - math.log(ratio)) <= tolerance + 1e-3


def test_crop_covers_the_bucket_and_reports_the_original_size_and_crop():
    image = Image.fromarray(np.arange(30 * 30 * 3, dtype=np.uint8).reshape(30, 30, 3))
    pixels, ids = crop_to(image, 16, 8)
    assert pixels.shape == (3, 8, 16)
    # 30x30 resized to 16x16 to cover 16 wide, then 4 rows cut from the top
    assert ids == [30, 30, 4, 0, 8, 16]
    _, ids = crop_to(Image.new("RGB", (40, 20)), 32, 16)
    assert ids == [20, 40, 0, 0, 16, 32]


def test_too_small_images_are_named():
    sizes = bucket_sizes(64, 16)
    with pytest.raises(PeftkitError, match=r"tiny\.png \(8x8\)") as err:
        assign_buckets(["ok.png", "tiny.png"], [(64, 64), (8, 8)], sizes)
    assert "ok.png" not in str(err.value) and "\n" not in str(err.value)


def test_every_batch_comes_from_one_bucket_in_a_seeded_resumable_order():
    buckets = [0] * 5 + [1] * 4 + [2]
    first = [bucket_batch_rows(buckets, 2, 7, i) for i in range(40)]
    assert all(len({buckets[r] for r in rows.tolist()}) == 1 for rows in first)
    # batch i depends on (seed, i) only: a resumed run draws what the whole run draws
    assert all(torch.equal(bucket_batch_rows(buckets, 2, 7, i), first[i]) for i in (3, 17, 39))
    # one epoch: 2 + 2 + 1 batches; bucket 0 drops one of its 5 rows, the lone image repeats
    epoch = torch.cat(first[:5]).tolist()
    assert len(set(epoch) & set(range(5))) == 4 and {5, 6, 7, 8} <= set(epoch)
    assert epoch.count(9) == 2
    # two processes split each global batch of 2 x 2 rows between them
    both = [bucket_batch_rows(buckets, 2, 7, 0, rank, 2) for rank in (0, 1)]
    assert len({buckets[r] for r in torch.cat(both).tolist()}) == 1


def _shapes(folder):
    """Six images of three aspect ratios (a bright box on a dark field)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(32, 16), (30, 16), (16, 32), (16, 30), (24, 24), (20, 20)]):
        a = np.full((h, w, 3), 30, np.uint8)
        a[h // 4 : h // 2, w // 4 : w // 2] = rng.integers(100, 255, 3)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def _config(**kw):
    return ConceptConfig(
        **{"instance_prompt": "sks toy", "resolution": 16, "rank": 4, "buckets": True, **kw},
        bucket_step=8,
    )


def test_concept_batches_share_a_bucket_and_class_rows_follow_it(tiny_sd_path, tmp_path):
    from accelerate import Accelerator

    images = ConceptDataset(_shapes(tmp_path / "img"), "sks toy", 16)
    classes = ConceptDataset(_shapes(tmp_path / "cls"), "toy", 16)
    config = _config(class_prompt="toy")
    task = ConceptTask(load_base(str(tiny_sd_path)), images, config, classes)
    task.prepare(Accelerator(cpu=True))
    sizes = config.bucket_sizes()
    assert [sizes[b] for b in task.bucket_of[:2]] == [(24, 8), (24, 8)]  # 2:1 images
    assert task.graph_unsafe.startswith("aspect-ratio buckets")
    seen = set()
    for batch in (b for _, b in zip(range(12), batches(task.dataset(), 2, 0, 0, None))):
        rows = task.draw(batch)
        w, h = sizes[task.bucket_of[int(batch["instance"][0])]]
        assert rows.noisy.shape == (4, 4, h // 2, w // 2)  # 2 instance + 2 class rows
        seen.add((w, h))
    assert len(seen) == 3


def test_bucketed_run_resumes_to_the_uninterrupted_adapter(tiny_sd_path, tmp_path):
    folder = _shapes(tmp_path / "img")

    def run(out, steps, every=0):
        tc = TrainConfig(steps, 2, 1e-2, schedule="constant", progress=False, output_dir=str(out))
        tc.checkpoint_every = every
        return train_concept(load_base(str(tiny_sd_path)), folder, _config(), tc)

    run(tmp_path / "whole", 6)
    run(tmp_path / "cut", 3, every=3)
    _, result = run(tmp_path / "cut", 6, every=3)
    assert result.resumed_from == 3 and result.losses[-1] > 0
    whole, _ = read_tensors(tmp_path / "whole" / UNET_FILE)
    cut, _ = read_tensors(tmp_path / "cut" / UNET_FILE)
    for key in whole:
        torch.testing.assert_close(cut[key], whole[key], rtol=1e-5, atol=1e-7)


def test_sdxl_rows_carry_each_images_own_size_and_crop(tiny_sdxl_path, tmp_path):
    from accelerate import Accelerator

    images = ConceptDataset(_shapes(tmp_path / "img"), "sks toy", 16)
    task = ConceptTask(load_base(str(tiny_sdxl_path)), images, _config())
    task.prepare(Accelerator(cpu=True))
    rows = task.draw({"instance": torch.tensor([0, 1]), "class": torch.tensor([0, 0])})
    # 32x16 -> 24x12 covering 24x8: 2 rows cut at the top; 30x16 -> 24x13: 2 rows
    want = torch.tensor([[16, 32, 2, 0, 8, 24], [16, 30, 2, 0, 8, 24]])
    torch.testing.assert_close(rows.cond["extra"]["time_ids"], want.to(torch.float32))


def test_square_images_give_sdxl_their_real_size_too(tmp_path):
    images = ConceptDataset(_shapes(tmp_path / "img"), "sks toy", 16)
    _, ids = images.crops(rows=[0, 4])
    # 32x16: the 16x16 center square starts 8 px in, 8 px at 16/16 scale
    assert ids.tolist() == [[16, 32, 0, 8, 16, 16], [24, 24, 0, 0, 16, 16]]


def test_jobs_trained_together_refuse_buckets(tmp_path, concept_dir):
    from peftkit.diffusion.multitenant_cli import load_jobs

    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        f"output: out\njobs:\n  - {{images: {concept_dir}, prompt: p, buckets: true}}\n"
    )
    with pytest.raises(PeftkitError, match=r"buckets is set, but training jobs together has no"):
        load_jobs(jobs)


def test_images_of_one_bucket_keep_the_captured_step(tiny_sd_path, tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32 + 2 * i, 16), (40 * i, 90, 200)).save(folder / f"{i}.png")
    task = ConceptTask(load_base(str(tiny_sd_path)), ConceptDataset(folder, "sks", 16), _config())
    assert len(set(task.bucket_of)) == 1 and task.graph_unsafe is None
