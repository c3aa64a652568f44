"""Image classification data: VTAB-1k folders, ImageFolder trees and built-in offline tasks.

Data specs (CLI `--data`, API `load_task`):
- `vtab:<task dir>`: the VTAB-1k release layout: train800.txt, val200.txt, train800val200.txt and
  test.txt, each line `relative/image/path label`, paths relative to the task dir.
- `fgvc:<dir>`: a fine-grained dataset (CUB, NABirds, Flowers, Dogs, Cars) with VPT's FGVC
  augmentation (fgvc.py): VPT's split jsons, the CUB/NABirds release, the Flowers/Dogs/Cars .mat
  releases (fgvc_mat.py), or train/val/test folders.
- `folder:<root>`: `<root>/train/<class>/*.jpg` plus `<root>/val/...` and/or `<root>/test/...`.
- `builtin:<name>`: procedurally generated, deterministic tasks in the spirit of VTAB's structured
  group (see `BUILTIN_TASKS`); VTAB-1k sizes (800 / 200 / test 1000) unless told otherwise.

Protocol (VTAB-1k): "tune" trains on train800 and evaluates on val200; "final" trains on
train800val200 and reports top-1 on test. Preprocessing is VTAB's: resize to the model's input size
(bicubic), normalize with the backbone's mean/std, no augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from peftkit.common_kernels.errors import PeftkitError

SPLITS = ("train800", "val200", "train800val200", "test")
PROTOCOL_SPLITS = {"tune": ("train800", "val200"), "final": ("train800val200", "test")}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


@dataclass
class Example:
    path: Path
    label: int
    source: str  # "list.txt:12" (the line that named it) or the path itself


class Preprocess:
    """Resize to size x size (bicubic), scale to [0, 1], normalize; no augmentation (VTAB).
    In two steps: `decode` (the uint8 image a data cache keeps) and `normalize` (any batch of
    them, on any device)."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def decode(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        # The default dtype: float32, or float64 where a test trains in it for exact comparisons.
        x = pixels.to(torch.get_default_dtype()) / 255.0
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.decode(image))


class Cacheable:
    """What a data cache needs (common_kernels/training/data_cache.py): `raw(i)` -> (uint8 image,
    label) and `finish` turning a batch of them into what the items collate to."""

    transform: Preprocess

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pixels, label = self.raw(i)
        return self.transform.normalize(pixels), label

    def finish(
        self, fields: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = fields
        return self.transform.normalize(pixels), labels


class ImageListDataset(Cacheable, torch.utils.data.Dataset):
    """(image tensor, label) pairs from a list of examples; unreadable images fail naming their source."""

    def __init__(self, examples: list[Example], transform: Preprocess, name: str) -> None:
        if not examples:
            raise PeftkitError(
                f"split {name!r} is empty: it lists no images; check the file or folder"
            )
        self.examples, self.transform, self.name = examples, transform, name

    def __len__(self) -> int:
        return len(self.examples)

    def raw(self, i: int) -> tuple[torch.Tensor, int]:
        ex = self.examples[i]
        try:
            with Image.open(ex.path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as err:
            raise PeftkitError(
                f"cannot read image {str(ex.path)!r} (listed at {ex.source}): {err}; "
                "replace the file or remove its line"
            ) from None
        return self.transform.decode(image), ex.label

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.examples]


def read_list(list_file: Path, root: Path) -> list[Example]:
    """Parse `path label` lines; every problem names the file and line."""
    if not list_file.is_file():
        raise PeftkitError(
            f"split file {str(list_file)!r} does not exist: a VTAB-1k task folder holds "
            f"{', '.join(s + '.txt' for s in SPLITS)}"
        )
    examples = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        where = f"{list_file}:{number}"
        if len(parts) != 2:
            raise PeftkitError(f"{where}: expected 'relative/path label', got {line!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise PeftkitError(f"{where}: label {parts[1]!r} is not an integer") from None
        if label < 0:
            raise PeftkitError(f"{where}: label {label} is negative; labels are 0..num_classes-1")
        path = root / parts[0].strip()
        if not path.is_file():
            raise PeftkitError(
                f"{where}: image {str(path)!r} does not exist; fix the path or remove the line"
            )
        examples.append(Example(path, label, where))
    if not examples:
        raise PeftkitError(f"split file {str(list_file)!r} is empty: it lists no images")
    return examples


def read_image_folder(
    root: Path, classes: list[str] | None = None
) -> tuple[list[Example], list[str]]:
    """`root/<class>/<image>` examples; class indices follow sorted folder names (or `classes`)."""
    if not root.is_dir():
        raise PeftkitError(f"image folder {str(root)!r} does not exist")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    classes = classes or found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise PeftkitError(
            f"{str(root)!r} has class folders {extra} that the training split does not have"
        )
    examples = [
        Example(p, k, str(p))
        for k, c in enumerate(classes)
        if (root / c).is_dir()
        for p in sorted((root / c).iterdir())
        if p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not examples:
        raise PeftkitError(
            f"no images found in {str(root)!r}: expected <class>/<image> with one of {IMAGE_EXTENSIONS}"
        )
    return examples, classes


def check_labels(examples: list[Example], num_classes: int) -> None:
    for ex in examples:
        if ex.label >= num_classes:
            raise PeftkitError(
                f"{ex.source}: label {ex.label} is out of range for {num_classes} classes "
                "(labels are 0..num_classes-1); fix the label or pass --num-classes"
            )


# ---- built-in tasks: deterministic numpy drawings, no download ----

_COLORS = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 240], [240, 220, 40]], dtype=np.uint8)


def _canvas(rng: np.random.Generator, size: int) -> np.ndarray:
    return (rng.integers(0, 40, size=(1, 1, 3)) + rng.integers(0, 25, size=(size, size, 3))).astype(
        np.uint8
    )


def _disc(img: np.ndarray, cy: float, cx: float, r: float, color: np.ndarray) -> None:
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = color


def _draw(task: str, label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    img = _canvas(rng, size)
    yy, xx = np.mgrid[:size, :size]
    color = _COLORS[rng.integers(len(_COLORS))]
    if task == "counting":  # label + 1 non-overlapping discs
        r, placed = size / 12, []
        while len(placed) < label + 1:
            c = rng.uniform(r + 1, size - r - 1, 2)
            if all(np.hypot(*(c - q)) > 2.4 * r for q in placed):
                placed.append(c)
                _disc(img, c[0], c[1], r, color)
    elif task == "location":  # quadrant of one disc
        half = size / 2
        cy = rng.uniform(size / 8, half - size / 8) + half * (label // 2)
        cx = rng.uniform(size / 8, half - size / 8) + half * (label % 2)
        _disc(img, cy, cx, size / 10, color)
    elif task == "orientation":  # bar angle: 0, 45, 90, 135 degrees (+-10)
        theta = np.deg2rad(45 * label + rng.uniform(-10, 10))
        c = size / 2 + rng.uniform(-size / 10, size / 10, 2)
        along = (xx - c[1]) * np.cos(theta) - (yy - c[0]) * np.sin(theta)
        across = (xx - c[1]) * np.sin(theta) + (yy - c[0]) * np.cos(theta)
        img[(np.abs(along) <= size * 0.35) & (np.abs(across) <= size * 0.07)] = color
    elif task == "shape":  # disc, square, triangle, cross
        c, h = rng.uniform(size * 0.35, size * 0.65, 2), size * rng.uniform(0.2, 0.28)
        dy, dx = yy - c[0], xx - c[1]
        masks = [
            dy**2 + dx**2 <= h * h,
            (np.abs(dy) <= h * 0.85) & (np.abs(dx) <= h * 0.85),
            (dy <= h * 0.8) & (dy >= -h) & (np.abs(dx) <= (dy + h) * 0.6),
            ((np.abs(dy) <= h) & (np.abs(dx) <= h * 0.3))
            | ((np.abs(dx) <= h) & (np.abs(dy) <= h * 0.3)),
        ]
        img[masks[label]] = color
    elif task == "color":  # colour of a disc at a random place
        _disc(
            img,
            *rng.uniform(size * 0.25, size * 0.75, 2),
            size * rng.uniform(0.12, 0.2),
            _COLORS[label],
        )
    return img


BUILTIN_TASKS = {"counting": 6, "location": 4, "orientation": 4, "shape": 4, "color": 4}
_SPLIT_OFFSET = {"train800": 0, "val200": 800, "train800val200": 0, "test": 10_000_000}


class BuiltinTask(Cacheable, torch.utils.data.Dataset):
    """Built-in task `name`, split `split`: image i is drawn from a generator seeded by
    (task, seed, offset + i), so train800val200 = train800 + val200 and test never overlaps."""

    def __init__(
        self,
        name: str,
        split: str,
        transform: Preprocess,
        size: int | None = None,
        canvas: int = 32,
        seed: int = 0,
    ) -> None:
        if name not in BUILTIN_TASKS:
            raise PeftkitError(f"no built-in task {name!r}: choose from {sorted(BUILTIN_TASKS)}")
        if split not in SPLITS:
            raise PeftkitError(f"split {split!r} unknown: use one of {list(SPLITS)}")
        default = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 1000}[split]
        self.name, self.split, self.transform, self.canvas = name, split, transform, canvas
        self.n = default if size is None else size
        if self.n < 1:
            raise PeftkitError(
                f"built-in task {name!r} split {split!r} is empty: size must be >= 1"
            )
        self.num_classes = BUILTIN_TASKS[name]
        self.seed = seed * 7919 + sorted(BUILTIN_TASKS).index(name)

    def __len__(self) -> int:
        return self.n

    def label(self, i: int) -> int:
        return int(
            np.random.default_rng([self.seed, _SPLIT_OFFSET[self.split] + i, 1]).integers(
                self.num_classes
            )
        )

    def raw(self, i: int) -> tuple[torch.Tensor, int]:
        label = self.label(i)
        rng = np.random.default_rng([self.seed, _SPLIT_OFFSET[self.split] + i, 2])
        return self.transform.decode(
            Image.fromarray(_draw(self.name, label, rng, self.canvas))
        ), label


@dataclass
class TaskData:
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    num_classes: int
    name: str
    splits: tuple[str, str]
    # one per class index where the data names them (class folders, the FGVC releases)
    class_names: tuple[str, ...] | None = None


def load_task(
    spec: str,
    protocol: str,
    transform: Preprocess,
    num_classes: int | None = None,
    builtin_sizes: tuple[int, int] | None = None,
    seed: int = 0,
) -> TaskData:
    """Train and eval datasets of `spec` under `protocol` ("tune" or "final").

    >>> data = load_task("builtin:counting", "final", Preprocess(224, (0.5,) * 3, (0.5,) * 3))
    >>> len(data.train), len(data.eval), data.num_classes
    (1000, 1000, 6)
    """
    if protocol not in PROTOCOL_SPLITS:
        raise PeftkitError(
            f"protocol {protocol!r} unknown: 'tune' (train800 -> val200) or 'final' (train800val200 -> test)"
        )
    kind, _, where = spec.partition(":")
    train_split, eval_split = PROTOCOL_SPLITS[protocol]
    if kind == "builtin":
        sizes = builtin_sizes or (None, None)
        train = BuiltinTask(where, train_split, transform, sizes[0], seed=seed)
        evals = BuiltinTask(where, eval_split, transform, sizes[1], seed=seed)
        return TaskData(train, evals, train.num_classes, where, (train_split, eval_split))
    if kind == "vtab":
        root = Path(where)
        if not root.is_dir():
            raise PeftkitError(f"VTAB-1k task folder {where!r} does not exist")
        train_ex, eval_ex = (
            read_list(root / f"{train_split}.txt", root),
            read_list(root / f"{eval_split}.txt", root),
        )
        n = num_classes or max(e.label for e in train_ex) + 1
        check_labels(train_ex + eval_ex, n)
        return TaskData(
            ImageListDataset(train_ex, transform, f"{where}/{train_split}"),
            ImageListDataset(eval_ex, transform, f"{where}/{eval_split}"),
            n,
            root.name,
            (train_split, eval_split),
        )
    if kind == "fgvc":
        from .fgvc import load_fgvc

        return load_fgvc(Path(where), protocol, transform, num_classes, seed)
    if kind == "folder":
        root = Path(where)
        train_ex, classes = read_image_folder(root / "train")
        if protocol == "tune" or not (root / "test").is_dir():
            eval_dir = root / ("val" if (root / "val").is_dir() else "test")
        else:
            eval_dir = root / "test"
            if (root / "val").is_dir():
                train_ex += read_image_folder(root / "val", classes)[0]
        eval_ex = read_image_folder(eval_dir, classes)[0]
        n = num_classes or len(classes)
        check_labels(train_ex + eval_ex, n)
        return TaskData(
            ImageListDataset(train_ex, transform, str(root / "train")),
            ImageListDataset(eval_ex, transform, str(eval_dir)),
            n,
            root.name,
            ("train", eval_dir.name),
            tuple(classes) if n == len(classes) else None,
        )
    raise PeftkitError(
        f"data spec {spec!r} not understood: use vtab:<task dir>, fgvc:<dataset dir>, folder:<root> "
        "or builtin:<name> "
        f"with name in {sorted(BUILTIN_TASKS)}"
    )
