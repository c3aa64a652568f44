"""Concept images: a folder of a few photos, optional per-image captions, and class images for
prior preservation (given, or generated once by the base model and reused).

    concept = ConceptDataset("photos/", prompt="a photo of sks dog", resolution=512)
    concept.pixels()    # (N, 3, R, R) in [0, 1], center-cropped squares
    concept.captions    # "photos/x.txt" when present, else the prompt
    concept.crops((768, 512), rows)   # those rows cropped to an aspect bucket, + SDXL size ids

Every image is opened and decoded when the dataset is built, so a broken file fails before
training with its name in the message, not at step 3000.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..common_kernels.errors import PeftkitError
from .buckets import crop_to

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"
CLASS_MANIFEST = "peftkit_class_images.json"


def open_image(path: Path) -> Image.Image:
    if not Path(path).is_file():
        raise PeftkitError(f"image {path} does not exist: check the path")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Exception as err:  # PIL raises many types for damaged files
        raise PeftkitError(
            f"cannot read image {path} ({type(err).__name__}: {err}): the file is damaged or not "
            "an image; replace it or remove it from the folder"
        ) from None


def square_crop(image: Image.Image) -> tuple[int, int, int]:
    """(left, top, side) of the centered square."""
    w, h = image.size
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, side


def square_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """Center crop to a square and resize: (3, R, R) float in [0, 1]."""
    left, top, side = square_crop(image)
    image = image.crop((left, top, left + side, top + side)).resize(
        (resolution, resolution), Image.Resampling.BICUBIC
    )
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


class ConceptDataset:
    """Images of one concept in `folder`; image `x.png` takes its caption from `x.txt` when present,
    otherwise `prompt`. Any other file in the folder is an error (hidden files excepted), so a stray
    PDF or a typo'd extension is reported instead of silently ignored."""

    def __init__(self, folder: str | Path, prompt: str, resolution: int = 512) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise PeftkitError(f"image folder {self.folder} does not exist or is not a folder")
        if resolution < 8 or resolution % 8:
            raise PeftkitError(f"resolution must be a positive multiple of 8, got {resolution}")
        self.prompt, self.resolution = prompt, resolution
        files = sorted(
            p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")
        )
        others = [
            p.name
            for p in files
            if p.suffix.lower() not in IMAGE_SUFFIXES + (CAPTION_SUFFIX,)
            and p.name != CLASS_MANIFEST
        ]
        if others:
            raise PeftkitError(
                f"{self.folder} holds files that are not images: {others[:5]}; expected "
                f"{', '.join(IMAGE_SUFFIXES)} images and optional .txt captions: move them out"
            )
        self.paths = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.paths:
            raise PeftkitError(
                f"no images found in {self.folder}: expected {', '.join(IMAGE_SUFFIXES)} files"
            )
        self.images = [open_image(p) for p in self.paths]
        self.captions = [self._caption(p) for p in self.paths]

    def subset(self, rows: list[int]) -> ConceptDataset:
        """The images `rows` (e.g. a held-out share) as a dataset of their own."""
        part = copy.copy(self)
        part.paths, part.images, part.captions = (
            [getattr(self, k)[i] for i in rows] for k in ("paths", "images", "captions")
        )
        return part

    def split(self, fraction: float, seed: int) -> tuple[ConceptDataset, ConceptDataset]:
        """(train, held out): a seeded `fraction` of the images (at least one) held out, at least
        one left to train on."""
        held = max(1, round(fraction * len(self)))
        if held >= len(self):
            raise PeftkitError(
                f"holding out {fraction:.0%} of the {len(self)} images in {self.folder} leaves none "
                "to train on: lower the validation fraction or pass a validation folder"
            )
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        return self.subset(sorted(order[held:])), self.subset(sorted(order[:held]))

    def crops(
        self, size: tuple[int, int] | None = None, rows: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `rows` (default all) as (n, 3, H, W) pixels cropped to `size` (width, height; default
        the center square at the resolution), and each one's SDXL size conditioning (n, 6):
        original height and width, crop top and left, target height and width."""
        images = [self.images[i] for i in (range(len(self)) if rows is None else rows)]
        if size is not None:
            pairs = [crop_to(im, *size) for im in images]
            return torch.stack([p for p, _ in pairs]), torch.tensor([c for _, c in pairs])
        r = self.resolution
        ids = []
        for im in images:
            left, top, side = square_crop(im)
            # Crop offsets in the resized image's pixels, as diffusers' SDXL scripts give them.
            ids.append([im.height, im.width, round(top * r / side), round(left * r / side), r, r])
        return torch.stack([square_pixels(im, r) for im in images]), torch.tensor(ids)

    def _caption(self, path: Path) -> str:
        caption = path.with_suffix(CAPTION_SUFFIX)
        text = caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
        return text or self.prompt

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self) -> torch.Tensor:
        return torch.stack([square_pixels(im, self.resolution) for im in self.images])


def class_images(
    base,
    folder: str | Path,
    prompt: str,
    count: int,
    resolution: int,
    seed: int = 0,
    steps: int = 25,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> ConceptDataset:
    """Class images for prior preservation: the `count` images in `folder`, generating the missing
    ones with `base` and `prompt`. Generated images are recorded in a manifest with their prompt, so
    a rerun reuses them and a different prompt is refused instead of mixing two classes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / CLASS_MANIFEST
    record = (
        json.loads(manifest.read_text())
        if manifest.is_file()
        else {"prompt": prompt, "generated": []}
    )
    if record["prompt"] != prompt:
        raise PeftkitError(
            f"{folder} holds class images generated for {record['prompt']!r}, not {prompt!r}: "
            "use another --class-dir or delete that folder"
        )
    have = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = count - len(have)
    index = len(have)
    if missing > 0:
        base.pipe.to(device)
    while missing > 0:
        n = min(batch_size, missing)
        generator = torch.Generator("cpu").manual_seed(seed * 100_003 + index)
        with torch.random.fork_rng(devices=[]):
            images = base.pipe(
                [prompt] * n,
                num_inference_steps=steps,
                height=resolution,
                width=resolution,
                generator=generator,
            ).images
        for image in images:
            name = f"class-{index:05d}.png"
            image.save(folder / name)
            record["generated"].append(name)
            index += 1
        missing -= n
        manifest.write_text(json.dumps(record, indent=1))
    return ConceptDataset(folder, prompt, resolution)


def held_out(
    instances: ConceptDataset, folder: str | Path | None, fraction: float, seed: int
) -> tuple[ConceptDataset, ConceptDataset | None]:
    """(training images, validation images): the images of `folder` (captioned like instances),
    or a seeded `fraction` of the instance images, or none."""
    if folder:
        return instances, ConceptDataset(folder, instances.prompt, instances.resolution)
    if fraction:
        return instances.split(fraction, seed)
    return instances, None
