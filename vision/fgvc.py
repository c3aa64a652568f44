"""Fine-grained classification (FGVC) data: CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs
and Stanford Cars as the VPT benchmark uses them (`fgvc:<dir>`; the .mat releases in fgvc_mat.py),
with VPT's FGVC augmentation: resize to 256 x 256, a random 224 crop and a horizontal flip for
training, a center 224 crop for evaluation (scaled to other input sizes by 256/224), the crops drawn
from the run's own seeded generator, which checkpoints keep. Protocols as VTAB's: "tune" trains on
train and evaluates on val; "final" trains on train + val and reports test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from peftkit.common_kernels.errors import PeftkitError

from .data import Example, ImageListDataset, Preprocess, TaskData, check_labels, read_image_folder

LAYOUTS = (
    "train.json, val.json and test.json ({image path: class id}: VPT's FGVC splits, for any of the "
    "five datasets), images.txt + image_class_labels.txt + train_test_split.txt (the CUB-200-2011 "
    "and NABirds releases), jpg/ + imagelabels.mat + setid.mat (Oxford Flowers 102), Images/ + "
    "train_list.mat + test_list.mat, at the root or in lists/ (Stanford Dogs), cars_train/ + "
    "cars_test/ + devkit/cars_train_annos.mat + cars_test_annos_withlabels.mat or car_ims/ + "
    "cars_annos.mat (Stanford Cars), or train/ and test/ (and val/) class folders"
)
HELD_OUT = 10  # without a val split, tune holds out every 10th training image of each class


class FGVCTransform(Preprocess):
    """`decode`: resize to r x r (r = size * 256 / 224, bilinear as torchvision's Resize) as uint8;
    `normalize`: a random crop + flip (train) or the center crop (eval) of one image or a batch,
    then mean/std. The crop runs where the pixels are, so a cached split is augmented per batch;
    its offsets and flips come from `generator` (seeded by `seed`), never from the global RNG."""

    def __init__(
        self, size: int, mean: tuple[float, ...], std: tuple[float, ...], train: bool, seed: int = 0
    ) -> None:
        super().__init__(size, mean, std)
        self.resize, self.train = round(size * 256 / 224), train
        self.generator = torch.Generator().manual_seed(seed) if train else None

    def decode(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((self.resize, self.resize), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        batch = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
        if self.train:
            batch = random_crop_flip(batch, self.size, self.generator)
        else:
            batch = center_crop(batch, self.size)
        out = super().normalize(batch)
        return out if pixels.dim() == 4 else out[0]


def center_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The size x size center of (B, C, H, W), offsets rounded as torchvision's CenterCrop."""
    top = int(round((pixels.shape[-2] - size) / 2.0))
    left = int(round((pixels.shape[-1] - size) / 2.0))
    return pixels[..., top : top + size, left : left + size]


def random_crop_flip(
    pixels: torch.Tensor, size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per image: a uniformly placed size x size window, mirrored left-right with probability 1/2;
    drawn on the CPU from `generator`, so a CPU and a GPU run of one seed crop alike."""
    b, c, h, w = pixels.shape
    dev = pixels.device
    draws = (
        torch.randint(0, h - size + 1, (b, 1), generator=generator),
        torch.randint(0, w - size + 1, (b, 1), generator=generator),
        torch.rand(b, 1, generator=generator, dtype=torch.float32) < 0.5,
    )
    top, left, flip = (t.to(dev, non_blocking=True) for t in draws)
    top, left = top + torch.arange(size, device=dev), left + torch.arange(size, device=dev)
    left = torch.where(flip, left.flip(-1), left)
    rows = torch.arange(b, device=dev).view(b, 1, 1, 1)
    chans = torch.arange(c, device=dev).view(1, c, 1, 1)
    return pixels[rows, chans, top.view(b, 1, size, 1), left.view(b, 1, 1, size)]


def crop_generator(dataset) -> torch.Generator | None:
    """The generator a training set's random crops draw from (None: it draws none): the state a
    run's checkpoint keeps, and each configuration of a batched sweep has its own."""
    return getattr(getattr(dataset, "transform", None), "generator", None)


def load_fgvc(
    root: Path,
    protocol: str,
    transform: Preprocess,
    num_classes: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Train and eval splits of the FGVC dataset in `root` under `protocol` ("tune" or "final");
    the training crops drawn from a generator seeded by `seed` (the run's)."""
    splits = read_splits(root)
    if protocol == "tune":
        train, evals, names = splits["train"], splits["val"], ("train", "val")
    else:
        train, evals, names = splits["train"] + splits["val"], splits["test"], ("train+val", "test")
    n = num_classes or splits["num_classes"]
    check_labels(train + evals, n)
    stats = (transform.size, transform.mean.flatten().tolist(), transform.std.flatten().tolist())
    return TaskData(
        ImageListDataset(train, FGVCTransform(*stats, True, seed), f"{root}/{names[0]}"),
        ImageListDataset(evals, FGVCTransform(*stats, train=False), f"{root}/{names[1]}"),
        n,
        root.name,
        names,
        tuple(splits["class_names"])
        if splits["class_names"] and n == splits["num_classes"]
        else None,
    )


def read_splits(root: Path) -> dict:
    """The FGVC dataset in `root` as {"train", "val", "test": examples, "num_classes": K,
    "class_names": one per class index, or None where the layout names none}."""
    from .fgvc_mat import read_mat_layout  # it builds on this module's split helpers

    if not root.is_dir():
        raise PeftkitError(f"FGVC dataset folder {str(root)!r} does not exist")
    if all((root / f"{s}.json").is_file() for s in ("train", "val", "test")):
        raw = {s: _read_json_split(root, s) for s in ("train", "val", "test")}
        return split_examples(root, raw, {s: f"{root / s}.json" for s in raw})
    if (root / "images.txt").is_file():
        return _read_cub_style(root)
    splits = read_mat_layout(root)
    if splits is not None:
        return splits
    if (root / "train").is_dir() and (root / "test").is_dir():
        return _read_folders(root)
    raise PeftkitError(f"no FGVC layout found in {str(root)!r}: expected {LAYOUTS}")


def _class_index(labels) -> dict:
    """Class ids (sparse as NABirds', or 1-based as CUB's) -> 0..K-1 in sorted order."""
    return {v: i for i, v in enumerate(sorted(set(labels), key=lambda v: (isinstance(v, str), v)))}


def _read_json_split(root: Path, split: str) -> list[tuple[str, object]]:
    path = root / f"{split}.json"
    try:
        listing = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PeftkitError(
            f"cannot read {str(path)!r} ({err}): expected {{image path: class id}}"
        ) from None
    if not isinstance(listing, dict) or not listing:
        raise PeftkitError(f"{str(path)!r} must be a non-empty {{image path: class id}} object")
    return list(listing.items())


def _image_root(root: Path, first: str, where: str) -> Path:
    # VPT's splits name images relative to images/ (CUB, NABirds), Images/ (Dogs) or the folder
    for base in (root, root / "images", root / "Images"):
        if (base / first).is_file():
            return base
    raise PeftkitError(
        f"{where} lists {first!r}, found neither in {str(root)!r} nor in its images/ or Images/ "
        "folder: put the images there"
    )


def _examples(root: Path, rows: list[tuple[str, object]], index: dict, where: str) -> list:
    if not rows:
        return []
    base = _image_root(root, rows[0][0], where)
    out = []
    for path, label in rows:
        if label not in index:
            raise PeftkitError(
                f"{where}: {path!r} has class {label!r}, which no training image has"
            )
        if not (base / path).is_file():
            raise PeftkitError(f"{where}: image {str(base / path)!r} does not exist")
        out.append(Example(base / path, index[label], f"{where}: {path}"))
    return out


def split_examples(
    root: Path, raw: dict[str, list], sources: dict[str, str], names: dict | None = None
) -> dict:
    """Examples of every split from its (path, class id) rows, classes indexed over the training
    images (train and val); `names` maps class ids to class names where the layout has them."""
    index = _class_index(label for s in ("train", "val") for _, label in raw[s])
    splits = {s: _examples(root, rows, index, sources[s]) for s, rows in raw.items()}
    class_names = [names[v] for v in index] if names else None
    return {**splits, "num_classes": len(index), "class_names": class_names}


def held_out(rows: list, label_of) -> tuple[list, list]:
    """(train, val): every HELD_OUT-th training image of each class, in listed order, is val."""
    seen: dict = {}
    train, val = [], []
    for row in rows:
        k = seen[label_of(row)] = seen.get(label_of(row), 0) + 1
        (val if k % HELD_OUT == 0 else train).append(row)
    return train, val


def _read_cub_style(root: Path) -> dict:
    tables = {}
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt"):
        path = root / name
        if not path.is_file():
            raise PeftkitError(
                f"{str(root)!r} has images.txt but no {name}: the CUB-200-2011 / NABirds layout "
                "needs images.txt, image_class_labels.txt and train_test_split.txt"
            )
        rows = [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]
        bad = next((i for i, r in enumerate(rows, 1) if len(r) != 2), None)
        if bad:
            raise PeftkitError(f"{path}:{bad}: expected '<image id> <value>'")
        tables[name] = {k: v.strip() for k, v in rows}
    paths, labels = tables["images.txt"], tables["image_class_labels.txt"]
    is_train = tables["train_test_split.txt"]
    missing = [i for i in paths if i not in labels or i not in is_train][:3]
    if missing:
        raise PeftkitError(
            f"image ids {missing} of {root / 'images.txt'} have no line in image_class_labels.txt "
            "or train_test_split.txt: fix the files"
        )
    try:
        rows = [(paths[i], int(labels[i]), is_train[i] == "1") for i in paths]
    except ValueError as err:
        raise PeftkitError(
            f"{root / 'image_class_labels.txt'}: class ids must be integers ({err})"
        ) from None
    train, val = held_out([r[:2] for r in rows if r[2]], lambda r: r[1])
    test = [r[:2] for r in rows if not r[2]]
    where = f"{root / 'images.txt'}"
    return split_examples(
        root,
        {"train": train, "val": val, "test": test},
        dict.fromkeys(("train", "val", "test"), where),
    )


def _read_folders(root: Path) -> dict:
    train, classes = read_image_folder(root / "train")
    if (root / "val").is_dir():
        val = read_image_folder(root / "val", classes)[0]
    else:
        train, val = held_out(train, lambda e: e.label)
    test = read_image_folder(root / "test", classes)[0]
    return {
        "train": train,
        "val": val,
        "test": test,
        "num_classes": len(classes),
        "class_names": classes,
    }
