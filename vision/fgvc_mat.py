"""The FGVC releases whose splits are MATLAB v5 files (`fgvc:<dir>`): Oxford Flowers 102, Stanford
Dogs and Stanford Cars, read with scipy.io.loadmat (the `fgvc` extra). Images are used whole, as
VPT uses them (Cars' boxes are not cropped to); Flowers has a val split, Dogs and Cars hold out
every HELD_OUT-th training image of each class for tune, as the CUB release does (fgvc.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from peftkit.common_kernels.errors import PeftkitError

from .fgvc import held_out, split_examples


def read_mat_layout(root: Path) -> dict | None:
    """The splits of the Flowers, Dogs or Cars release in `root` (as fgvc.read_splits returns
    them), or None when `root` holds none of the three."""
    if (root / "imagelabels.mat").is_file() and (root / "setid.mat").is_file():
        return _read_flowers(root)
    for lists in (root / "lists", root):
        if (lists / "train_list.mat").is_file() and (lists / "test_list.mat").is_file():
            return _read_dogs(root, lists)
    if (root / "cars_annos.mat").is_file():
        return _read_cars_annos(root)
    if (root / "devkit" / "cars_train_annos.mat").is_file():
        return _read_cars_devkit(root)
    return None


def _load_mat(path: Path) -> dict:
    """The variables of a MATLAB v5 file, as scipy.io.loadmat returns them (not squeezed)."""
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise PeftkitError(
            f"reading {str(path)!r} needs scipy: pip install scipy (or pip install peftkit[fgvc])"
        ) from None
    try:
        return loadmat(path)
    except (OSError, ValueError, NotImplementedError, MatReadError) as err:
        raise PeftkitError(
            f"cannot read {str(path)!r} as a MATLAB v5 file ({err}): use the dataset's original"
        ) from None


def _take(mat: dict, path: Path, key: str, field: str | None = None) -> list:
    """The values of variable `key` (of its struct field `field`) as a flat list of Python ints,
    floats and strs: cells and struct fields hold one small array per element."""
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise PeftkitError(
            f"{str(path)!r} has no key {key!r} (it has {found}): use the dataset's original file"
        )
    values = mat[key]
    if field is not None:
        if field not in (values.dtype.names or ()):
            raise PeftkitError(
                f"{str(path)!r}: {key!r} has no field {field!r} (it has "
                f"{list(values.dtype.names or ())}): use the dataset's original file"
            )
        values = values[field]
    return [_scalar(v) for v in np.asarray(values).ravel()]


def _scalar(value):
    while isinstance(value, np.ndarray):
        value = value.ravel()[0] if value.size else None
    return value.item() if isinstance(value, np.generic) else value


def _ints(values: list, path: Path, key: str) -> list[int]:
    bad = [v for v in values if not isinstance(v, (int, float)) or v != int(v)][:3]
    if bad:
        raise PeftkitError(f"{str(path)!r}: {key!r} must hold integers, found {bad}")
    return [int(v) for v in values]


def _names(labels: list[int], names: list | tuple = (), path: Path | None = None) -> dict:
    """Class id (1-based) -> its name in `names`, or "class <id>" without any."""
    if not names:
        return {c: f"class {c}" for c in labels}
    bad = sorted(c for c in set(labels) if not 1 <= c <= len(names))[:3]
    if bad:
        raise PeftkitError(
            f"class ids {bad} have no name in {str(path)!r} ({len(names)} names): "
            "use the release's files together"
        )
    return {c: str(names[c - 1]) for c in labels}


def _read_flowers(root: Path) -> dict:
    labels_path, setid = root / "imagelabels.mat", root / "setid.mat"
    labels = _ints(_take(_load_mat(labels_path), labels_path, "labels"), labels_path, "labels")
    ids = _load_mat(setid)
    raw, sources = {}, {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        numbers = _ints(_take(ids, setid, key), setid, key)
        bad = [n for n in numbers if not 1 <= n <= len(labels)][:3]
        if bad:
            raise PeftkitError(
                f"{str(setid)!r}: {key!r} lists image numbers {bad}, but imagelabels.mat labels "
                f"images 1..{len(labels)}: use the release's files together"
            )
        raw[split] = [(f"jpg/image_{n:05d}.jpg", labels[n - 1]) for n in numbers]
        sources[split] = f"{setid} ({key})"
    return split_examples(root, raw, sources, _names(labels))


def _read_dogs(root: Path, lists: Path) -> dict:
    rows = {}
    for split in ("train", "test"):
        path = lists / f"{split}_list.mat"
        mat = _load_mat(path)
        files, labels = _take(mat, path, "file_list"), _take(mat, path, "labels")
        if len(files) != len(labels):
            raise PeftkitError(
                f"{str(path)!r} has {len(files)} files but {len(labels)} labels: use the "
                "dataset's original file"
            )
        rows[split] = list(zip(map(str, files), _ints(labels, path, "labels")))
    names = {label: file.split("/")[0] for file, label in rows["train"]}  # the synset folder
    sources = {s: str(lists / f"{s}_list.mat") for s in ("train", "test")}
    return _with_held_out_val(root, rows["train"], rows["test"], sources, names)


def _read_cars_annos(root: Path) -> dict:
    # The re-packaging of the release: every image in car_ims/, one list with a test flag.
    path = root / "cars_annos.mat"
    mat = _load_mat(path)
    files = _take(mat, path, "annotations", "relative_im_path")
    labels = _ints(_take(mat, path, "annotations", "class"), path, "class")
    test = _ints(_take(mat, path, "annotations", "test"), path, "test")
    rows = {False: [], True: []}
    for file, label, is_test in zip(files, labels, test):
        rows[bool(is_test)].append((str(file), label))
    names = _names(labels, _take(mat, path, "class_names") if "class_names" in mat else (), path)
    sources = dict.fromkeys(("train", "test"), str(path))
    return _with_held_out_val(root, rows[False], rows[True], sources, names)


def _read_cars_devkit(root: Path) -> dict:
    devkit = root / "devkit"
    test_path = next(
        (p for p in (root, devkit) if (p / "cars_test_annos_withlabels.mat").is_file()), None
    )
    if test_path is None:
        raise PeftkitError(
            f"{str(root)!r} has devkit/cars_train_annos.mat but no cars_test_annos_withlabels.mat "
            "(the test labels; devkit/cars_test_annos.mat has none): put it in the folder or devkit/"
        )
    rows, sources = {}, {}
    for split, path in (
        ("train", devkit / "cars_train_annos.mat"),
        ("test", test_path / "cars_test_annos_withlabels.mat"),
    ):
        mat = _load_mat(path)
        files = _take(mat, path, "annotations", "fname")
        labels = _ints(_take(mat, path, "annotations", "class"), path, "class")
        rows[split] = [(f"cars_{split}/{f}", c) for f, c in zip(files, labels)]
        sources[split] = str(path)
    meta = devkit / "cars_meta.mat"
    names = _take(_load_mat(meta), meta, "class_names") if meta.is_file() else []
    labels = [c for split in rows.values() for _, c in split]
    return _with_held_out_val(
        root, rows["train"], rows["test"], sources, _names(labels, names, meta)
    )


def _with_held_out_val(root: Path, train: list, test: list, sources: dict, names: dict) -> dict:
    train, val = held_out(train, lambda r: r[1])
    sources = {**sources, "val": sources["train"]}
    return split_examples(root, {"train": train, "val": val, "test": test}, sources, names)
