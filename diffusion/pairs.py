"""Paired training data for the control-branch and IP-Adapter trainers.

Sources (`load_pairs`):
- a manifest, JSONL (one object per line) or CSV (header row), with columns `image` (required),
  `condition` (the control image; required for control training unless conditions are extracted)
  and `text` (aliases `prompt`, `caption`; optional). Paths are relative to the manifest's folder.
- a folder with `images/` and, for control training, `conditions/` holding files of the same stem;
  a caption for `images/cat.png` is read from `images/cat.txt` when present. Without conditions
  (IP-Adapter) the images may also sit directly in the folder. A folder holding
  `metadata.jsonl` or `metadata.csv` is read as that manifest.

Training caches what the frozen parts compute once: VAE latent moments (`encode_latents`, also
used by the concept trainer), text embeddings and condition pixels, so a step runs only the UNet
(and the trained branch); the objective itself is `objective.denoising_loss`, and `fixed_loss`
is both trainers' evaluation.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..common_kernels.errors import PeftkitError
from ..common_kernels.training.random_stream import RandomStream
from .data import IMAGE_SUFFIXES, square_pixels

COLUMNS = {
    "image": "image",
    "condition": "condition",
    "conditioning_image": "condition",
    "text": "text",
    "prompt": "text",
    "caption": "text",
}


@dataclass
class PairExample:
    image: Path
    condition: Path | None
    text: str
    where: str  # "file:line" for error messages


def _manifest_rows(path: Path) -> list[tuple[str, dict]]:
    rows = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PeftkitError(
                    f"{path}:{n}: not valid JSON ({err.msg}): write one JSON object per line, "
                    'e.g. {"image": "a.png", "condition": "a_edges.png", "text": "a cat"}'
                ) from None
            if not isinstance(row, dict):
                raise PeftkitError(
                    f"{path}:{n}: expected a JSON object with keys image/condition/text, got {row!r}"
                )
            rows.append((f"{path}:{n}", row))
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):
                rows.append(
                    (
                        f"{path}:{n}",
                        {k.strip().lstrip("\ufeff"): v for k, v in row.items() if k is not None},
                    )
                )
    else:
        raise PeftkitError(f"manifest {path} must end in .jsonl or .csv")
    if not rows:
        raise PeftkitError(
            f"manifest {path} has no rows: add one line per (image, condition, text) example"
        )
    return rows


def _from_manifest(path: Path, need_condition: bool) -> list[PairExample]:
    examples = []
    for where, row in _manifest_rows(path):
        unknown = sorted(k for k in row if k not in COLUMNS)
        if unknown:
            raise PeftkitError(
                f"{where}: unknown column(s) {unknown}: allowed columns are image, condition "
                "(or conditioning_image), text (or prompt, caption); rename or remove them"
            )
        fields = {COLUMNS[k]: v for k, v in row.items() if v not in (None, "")}
        if "image" not in fields:
            raise PeftkitError(
                f"{where}: column 'image' is missing or empty: give the image path relative to "
                f"{path.parent}"
            )
        if need_condition and "condition" not in fields:
            raise PeftkitError(
                f"{where}: column 'condition' is missing or empty: give the condition image path, "
                "or pass --condition-from canny|luminance|segment to compute it from the image"
            )
        condition = path.parent / fields["condition"] if "condition" in fields else None
        examples.append(
            PairExample(
                path.parent / fields["image"], condition, str(fields.get("text", "")), where
            )
        )
    return examples


def _from_folder(root: Path, need_condition: bool) -> list[PairExample]:
    images_dir, cond_dir = root / "images", root / "conditions"
    if not images_dir.is_dir() and not need_condition:
        images_dir = root  # image/caption pairs may sit flat in the folder
    elif not images_dir.is_dir():
        raise PeftkitError(
            f"{root} has no images/ folder and no metadata.jsonl/metadata.csv: put the images in "
            f"{images_dir} (and condition images of the same name in {cond_dir}) or write a manifest"
        )
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PeftkitError(
            f"no images found in {images_dir}: expected {', '.join(IMAGE_SUFFIXES)} files"
        )
    conditions = (
        {p.stem: p for p in cond_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        if cond_dir.is_dir()
        else {}
    )
    examples = []
    for image in images:
        if need_condition and image.stem not in conditions:
            raise PeftkitError(
                f"{image}: no condition image {cond_dir / image.stem}.* found: add it, or pass "
                "--condition-from canny|luminance|segment to compute conditions from the images"
            )
        caption = image.with_suffix(".txt")
        text = caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
        examples.append(PairExample(image, conditions.get(image.stem), text, str(image)))
    return examples


def load_pairs(source: str | Path, need_condition: bool = True) -> list[PairExample]:
    """Examples from a manifest file or a folder (see the module docstring); all paths checked."""
    source = Path(source)
    if not source.exists():
        raise PeftkitError(
            f"training data {source} does not exist: give a folder or a .jsonl/.csv manifest"
        )
    if source.is_dir():
        manifests = [
            source / n for n in ("metadata.jsonl", "metadata.csv") if (source / n).is_file()
        ]
        examples = (
            _from_manifest(manifests[0], need_condition)
            if manifests
            else _from_folder(source, need_condition)
        )
    else:
        examples = _from_manifest(source, need_condition)
    for ex in examples:
        for column, path in (("image", ex.image), ("condition", ex.condition)):
            if path is not None and not path.is_file():
                raise PeftkitError(
                    f"{ex.where}: {column} file {path} does not exist: fix the path (relative paths "
                    "start at the manifest's folder)"
                )
    return examples


def open_image(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise PeftkitError(
            f"{where}: cannot read image {path} ({err}): replace or remove the file"
        ) from None


def load_pixels(
    examples: list[PairExample],
    resolution: int,
    extractor: Callable[[Image.Image], Image.Image] | None = None,
    with_conditions: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images as (N, 3, R, R) in [0, 1] and, with `with_conditions`, their condition images likewise,
    cropped identically. A condition must have its image's size, or the crop would misalign them."""
    images, conditions = [], []
    for ex in examples:
        image = open_image(ex.image, ex.where)
        images.append(square_pixels(image, resolution))
        if not with_conditions:
            continue
        if ex.condition is not None:
            condition = open_image(ex.condition, ex.where)
            if condition.size != image.size:
                raise PeftkitError(
                    f"{ex.where}: condition {ex.condition} is {condition.size[0]}x{condition.size[1]} but image "
                    f"{ex.image} is {image.size[0]}x{image.size[1]}: make the condition the same size as its image"
                )
        elif extractor is not None:
            condition = extractor(image)
        else:
            raise PeftkitError(
                f"{ex.where}: no condition image: give one, or choose a condition extractor"
            )
        conditions.append(square_pixels(condition, resolution))
    return torch.stack(images), (torch.stack(conditions) if with_conditions else None)


# Pixels the VAE encodes at once: its activations grow with the pixel count (at 1024 px the SDXL
# encoder holds ~2 GB per image), and an encode of a whole few-shot folder at once set the peak
# GPU memory of an SDXL concept run (22 GiB vs 15 for diffusers' script, which encodes one batch
# per step). One megapixel per chunk: 4 images at 512 px, 1 at 1024 px.
ENCODE_PIXELS = 2**20


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled mean and std of the VAE posterior for pixels in [0, 1]; a fresh latent sample is drawn
    from them every step (cheaper than re-encoding, and unlike caching one sample it keeps the noise)."""
    means, stds = [], []
    device, dtype = vae.device, vae.dtype
    batch_size = max(1, ENCODE_PIXELS // (pixels.shape[-2] * pixels.shape[-1]))
    for chunk in pixels.split(batch_size):
        dist = vae.encode(chunk.to(device, dtype) * 2.0 - 1.0).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (torch.cat(means) - shift) * scale, torch.cat(stds) * scale


def fixed_loss(task, model: torch.nn.Module, seed: int = 1234) -> float:
    """The loss of a pair task (control branch, IP-Adapter) on its first 8 examples with every
    random number (noise, timesteps, dropout) drawn from a fresh stream seeded `seed`, and each
    process scoring the whole set itself: comparable across steps and processes. The task's
    training stream and the global RNG are left as they were."""
    stream, rank, world = task.stream, task.rank, task.world
    task.stream, task.rank, task.world = RandomStream(seed, stream.device), 0, 1
    try:
        with torch.no_grad():
            batch = torch.arange(min(8, len(task.examples)))
            return float(task.loss(model, batch))
    finally:
        task.stream, task.rank, task.world = stream, rank, world
