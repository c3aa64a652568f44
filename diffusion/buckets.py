"""Aspect-ratio bucketing (NovelAI's 2022 notes "Improvements on Stable Diffusion"; kohya sd-scripts):
instead of a center square, each image is resized and cropped to the bucket of about
resolution^2 pixels whose aspect ratio is nearest its own (in log ratio), and every batch is drawn
from one bucket, so it has one shape. Buckets: width w from min_side to max_side in steps of
`step`, height the largest multiple of `step` with w x h <= resolution^2 (and the transposes).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..common_kernels.errors import PeftkitError


def bucket_sizes(
    resolution: int, step: int = 64, min_side: int = 0, max_side: int = 0
) -> list[tuple[int, int]]:
    """The (width, height) buckets, sorted by aspect ratio; min_side/max_side 0 mean
    resolution/2 and 2 x resolution, rounded to `step`."""
    min_side = min_side or max(step, resolution // 2 // step * step)
    max_side = max_side or resolution * 2 // step * step
    if step < 8 or step % 8:
        raise PeftkitError(f"bucket step must be a positive multiple of 8, got {step}")
    if not step <= min_side <= resolution <= max_side:
        raise PeftkitError(
            f"bucket sides must satisfy step <= min_side <= resolution <= max_side, got "
            f"step {step}, min_side {min_side}, resolution {resolution}, max_side {max_side}"
        )
    area = resolution * resolution
    sizes = set()
    first = -(-min_side // step) * step  # the first multiple of step >= min_side
    for width in range(first, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest width/height in log ratio."""
    ratio = math.log(width / height)
    return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i][0] / sizes[i][1]) - ratio))


def crop_to(image: Image.Image, width: int, height: int) -> tuple[torch.Tensor, list[int]]:
    """`image` resized to cover width x height and center-cropped to it: (3, height, width) floats
    in [0, 1], and SDXL's size conditioning [original h, original w, crop top, crop left, height,
    width] (the crop in resized pixels, as diffusers' SDXL scripts compute it)."""
    w, h = image.size
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    top, left = (rh - height) // 2, (rw - width) // 2
    resized = image.resize((rw, rh), Image.Resampling.BICUBIC)
    pixels = resized.crop((left, top, left + width, top + height))
    tensor = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return tensor, [h, w, top, left, height, width]


def bucket_batch_rows(
    buckets: list[int], batch_size: int, seed: int, index: int, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """Rows of batch `index` for process `rank`, all from one bucket: each epoch (seeded by
    seed and epoch alone, so a resumed run draws what the whole run would) shuffles every
    bucket's rows into global batches of batch_size x world, then shuffles the batches. A bucket
    smaller than one global batch repeats its rows to fill it; a short last batch is dropped."""
    total = batch_size * world
    groups: dict[int, list[int]] = {}
    for row, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).append(row)
    per_epoch = sum(max(1, len(rows) // total) for rows in groups.values())
    epoch, pos = divmod(index, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    epoch_batches = []
    for bucket in sorted(groups):
        rows = torch.tensor(groups[bucket])
        order = rows[torch.randperm(len(rows), generator=generator)]
        for b in range(max(1, len(rows) // total)):
            epoch_batches.append(order[torch.arange(b * total, (b + 1) * total) % len(rows)])
    chosen = epoch_batches[int(torch.randperm(per_epoch, generator=generator)[pos])]
    return chosen[rank * batch_size : (rank + 1) * batch_size]


def assign_buckets(
    names: list[str], image_sizes: list[tuple[int, int]], sizes: list[tuple[int, int]]
) -> list[int]:
    """The bucket of each image (its nearest aspect ratio); images with fewer pixels than the
    smallest bucket would be upscaled, so they are refused by name."""
    smallest = min(w * h for w, h in sizes)
    small = [f"{n} ({w}x{h})" for n, (w, h) in zip(names, image_sizes) if w * h < smallest]
    if small:
        raise PeftkitError(
            f"{len(small)} image(s) have fewer pixels than the smallest bucket "
            f"({smallest} px): {', '.join(small[:5])}; remove or replace them, or lower "
            "the resolution"
        )
    return [nearest_bucket(w, h, sizes) for w, h in image_sizes]


class BucketedRows:
    """A task's rows with a bucket each; the engine's `batches` asks `batch_rows` for every batch,
    so each batch comes from one bucket, in an order fixed by the seed and batch number."""

    def __init__(self, rows: list[dict[str, int]], buckets: list[int]) -> None:
        self.rows, self.buckets = rows, buckets

    def __len__(self) -> int:
        return len(self.rows)

    def batch_rows(
        self, batch_size: int, seed: int, index: int, rank: int = 0, world: int = 1
    ) -> torch.Tensor:
        return bucket_batch_rows(self.buckets, batch_size, seed, index, rank, world)

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: torch.tensor([self.rows[i][k] for i in rows.tolist()]) for k in self.rows[0]}
