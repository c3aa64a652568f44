"""FGVC .mat releases (Oxford Flowers 102, Stanford Dogs, Stanford Cars): tiny copies whose files
are shaped as scipy.io.loadmat reads the originals (1-based ids, (1, N) and (N, 1) arrays, cell
arrays of strings, struct arrays), read under both protocols, through detection, and trained on."""

import json
import sys

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from peftkit.apps.cli import main
from peftkit.common_kernels.errors import PeftkitError
from peftkit.vision.data import Preprocess, load_task
from peftkit.vision.fgvc import HELD_OUT, read_splits

PRE = Preprocess(16, (0.5,) * 3, (0.5,) * 3)
BREEDS = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog")
CARS = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012")


def _image(path, value=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), value, dtype=np.uint8)).save(path)


def _cells(strings, shape):
    """A MATLAB cell array of strings (loadmat: an object array of 1-element str arrays)."""
    out = np.empty(len(strings), dtype=object)
    out[:] = list(strings)
    return out.reshape(shape)


def _structs(rows):
    """A 1 x N MATLAB struct array with the rows' fields (each value its own small array)."""
    fields = list(rows[0])
    out = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        out[0, i] = tuple(
            np.array([[v]], dtype=np.uint8) if isinstance(v, int) else v for v in row.values()
        )
    return out


def _pairs(dataset):
    return [(e.path.relative_to(e.path.parents[1]).as_posix(), e.label) for e in dataset.examples]


def _both(root):
    return load_task(f"fgvc:{root}", "tune", PRE), load_task(f"fgvc:{root}", "final", PRE)


@pytest.fixture
def flowers(tmp_path):
    """12 images of classes 1..3 (image n: class 1 + (n - 1) % 3); train 1..6, val 7..9."""
    for n in range(1, 13):
        _image(tmp_path / "jpg" / f"image_{n:05d}.jpg", 20 * n)
    labels = np.array([[1 + (n - 1) % 3 for n in range(1, 13)]], dtype=np.float64)
    sio.savemat(tmp_path / "imagelabels.mat", {"labels": labels})
    ids = {"trnid": [6, 1, 2, 3, 4, 5], "valid": [7, 8, 9], "tstid": [10, 11, 12]}
    sio.savemat(tmp_path / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    return tmp_path


def _flower(n):
    return (f"jpg/image_{n:05d}.jpg", (n - 1) % 3)


def test_flowers_tune_trains_on_trnid_and_evaluates_on_valid_final_adds_valid_and_tests(flowers):
    tune, final = _both(flowers)
    assert _pairs(tune.train) == [_flower(n) for n in (6, 1, 2, 3, 4, 5)]
    assert _pairs(tune.eval) == [_flower(n) for n in (7, 8, 9)]
    assert _pairs(final.train) == [_flower(n) for n in (6, 1, 2, 3, 4, 5, 7, 8, 9)]
    assert _pairs(final.eval) == [_flower(n) for n in (10, 11, 12)]
    assert (final.num_classes, final.splits) == (3, ("train+val", "test"))
    assert read_splits(flowers)["class_names"] == ["class 1", "class 2", "class 3"]
    pixels, label = final.eval.raw(2)  # image 12, its own grey level
    assert label == 2 and abs(pixels.float().mean().item() - 240) < 2


def test_a_mat_file_without_its_key_names_the_key_and_the_file(flowers):
    ids = sio.loadmat(flowers / "setid.mat")
    sio.savemat(flowers / "setid.mat", {"trnid": ids["trnid"], "valid": ids["valid"]})
    with pytest.raises(PeftkitError, match=r"setid.mat' has no key 'tstid' \(it has"):
        load_task(f"fgvc:{flowers}", "final", PRE)


def test_flowers_image_numbers_outside_the_labels_are_refused(flowers):
    sio.savemat(flowers / "setid.mat", {"trnid": [[1, 13]], "valid": [[7]], "tstid": [[10]]})
    with pytest.raises(PeftkitError, match=r"'trnid' lists image numbers \[13\].*images 1..12"):
        load_task(f"fgvc:{flowers}", "final", PRE)


def test_without_scipy_reading_a_mat_file_says_what_to_install(flowers, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # the import fails as when not installed
    with pytest.raises(PeftkitError, match=r"imagelabels.mat' needs scipy: pip install scipy"):
        load_task(f"fgvc:{flowers}", "final", PRE)


def test_a_file_that_is_no_mat_file_is_named(flowers):
    (flowers / "imagelabels.mat").write_bytes(b"not a MATLAB file" * 10)
    with pytest.raises(PeftkitError, match=r"cannot read .*imagelabels.mat' as a MATLAB v5 file"):
        load_task(f"fgvc:{flowers}", "final", PRE)


# Stanford Dogs: 10, 20 and 11 training images per breed, 2 test images each.
DOG_TRAIN = (10, 20, 11)


@pytest.fixture(params=["lists", "."])
def dogs(tmp_path, request):
    """The release with its lists in lists/ (lists.tar unpacked there) or at the root."""
    rows = {"train": [], "test": []}
    for label, (breed, n) in enumerate(zip(BREEDS, DOG_TRAIN), start=1):
        for split, count in (("train", n), ("test", 2)):
            for i in range(1, count + 1):
                file = f"{breed}/{breed[:9]}_{split}{i}.jpg"
                _image(tmp_path / "Images" / file)
                rows[split].append((file, label))
    for split, listed in rows.items():
        files = [f for f, _ in listed]
        (tmp_path / request.param).mkdir(exist_ok=True)
        sio.savemat(
            tmp_path / request.param / f"{split}_list.mat",
            {
                "file_list": _cells(files, (-1, 1)),
                "annotation_list": _cells([f[:-4] for f in files], (-1, 1)),
                "labels": np.array([[c] for _, c in listed], dtype=np.float64),
            },
        )
    return tmp_path


def test_dogs_tune_holds_out_every_tenth_training_image_of_each_breed(dogs):
    tune, final = _both(dogs)
    assert len(tune.eval) == sum(n // HELD_OUT for n in DOG_TRAIN) == 4
    assert len(tune.train) == sum(DOG_TRAIN) - 4
    assert [(p.split("/")[1], c) for p, c in _pairs(tune.eval)] == [
        ("n02085620_train10.jpg", 0),
        ("n02085782_train10.jpg", 1),
        ("n02085782_train20.jpg", 1),
        ("n02085936_train10.jpg", 2),
    ]
    assert sorted(_pairs(final.train)) == sorted(_pairs(tune.train) + _pairs(tune.eval))
    assert [(p.split("/")[1], c) for p, c in _pairs(final.eval)] == [
        (f"{b[:9]}_test{i}.jpg", k) for k, b in enumerate(BREEDS) for i in (1, 2)
    ]
    assert read_splits(dogs)["class_names"] == list(BREEDS)


def _car_rows(files, labels, file_field="fname"):
    return [
        {"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 4, "bbox_y2": 5, "class": c, file_field: f}
        for f, c in zip(files, labels)
    ]


# Stanford Cars: 10, 11 and 12 training images of classes 1..3, 2 test images each.
CAR_TRAIN = [c for c, n in ((1, 10), (2, 11), (3, 12)) for _ in range(n)]
CAR_TEST = [3, 1, 2, 3, 1, 2]


def _half_white(path):
    # The box (x 1..4, y 1..5) covers black only: a crop to it would lose the white half.
    pixels = np.zeros((12, 10, 3), dtype=np.uint8)
    pixels[:, 5:] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(params=[".", "devkit"])
def cars(tmp_path, request):
    """The release: cars_train/, cars_test/, devkit/ and the test labels at the root or in devkit/."""
    (tmp_path / "devkit").mkdir()
    for split, labels, annos in (
        ("train", CAR_TRAIN, "devkit/cars_train_annos.mat"),
        ("test", CAR_TEST, f"{request.param}/cars_test_annos_withlabels.mat"),
    ):
        fnames = [f"{i:05d}.jpg" for i in range(1, len(labels) + 1)]
        for f in fnames:
            _half_white(tmp_path / f"cars_{split}" / f)
        sio.savemat(tmp_path / annos, {"annotations": _structs(_car_rows(fnames, labels))})
    sio.savemat(tmp_path / "devkit" / "cars_meta.mat", {"class_names": _cells(CARS, (1, -1))})
    return tmp_path


def test_cars_devkit_reads_train_and_test_annotations_holds_out_and_keeps_whole_images(cars):
    tune, final = _both(cars)
    assert _pairs(tune.eval) == [("cars_train/00010.jpg", 0), ("cars_train/00020.jpg", 1)] + [
        ("cars_train/00031.jpg", 2)
    ]
    assert len(tune.train) == len(CAR_TRAIN) - 3
    assert _pairs(final.train) == [
        (f"cars_train/{i:05d}.jpg", c - 1)
        for i, c in enumerate(CAR_TRAIN, 1)
        if i not in (10, 20, 31)
    ] + _pairs(tune.eval)
    assert _pairs(final.eval) == [
        (f"cars_test/{i:05d}.jpg", c - 1) for i, c in enumerate(CAR_TEST, 1)
    ]
    assert read_splits(cars)["class_names"] == list(CARS)
    pixels, _ = final.eval.raw(0)
    assert (int(pixels.min()), int(pixels.max())) == (0, 255)  # the image, not its box


def test_cars_without_the_test_labels_names_the_file_to_add(cars):
    for where in (cars, cars / "devkit"):
        (where / "cars_test_annos_withlabels.mat").unlink(missing_ok=True)
    with pytest.raises(PeftkitError, match="no cars_test_annos_withlabels.mat"):
        load_task(f"fgvc:{cars}", "final", PRE)


@pytest.fixture
def cars_annos(tmp_path):
    """The re-packaging: car_ims/ and one cars_annos.mat with a test flag per image."""
    labels = CAR_TRAIN + CAR_TEST
    test = [0] * len(CAR_TRAIN) + [1] * len(CAR_TEST)
    order = np.random.default_rng(0).permutation(len(labels))  # train and test interleaved
    files = [f"car_ims/{i:06d}.jpg" for i in range(1, len(labels) + 1)]
    rows = _car_rows(files, [labels[k] for k in order], "relative_im_path")
    for row, k in zip(rows, order):
        row["test"] = test[k]
        _image(tmp_path / row["relative_im_path"])
    names = _cells(CARS, (1, -1))
    sio.savemat(tmp_path / "cars_annos.mat", {"annotations": _structs(rows), "class_names": names})
    return tmp_path, [(f, labels[k] - 1, test[k]) for f, k in zip(files, order)]


def test_cars_annos_splits_by_the_test_flag_and_names_the_classes(cars_annos):
    root, rows = cars_annos
    tune, final = _both(root)
    assert _pairs(final.eval) == [(f, c) for f, c, t in rows if t]
    assert sorted(_pairs(final.train)) == sorted((f, c) for f, c, t in rows if not t)
    assert len(tune.eval) == 3 and len(tune.train) == len(CAR_TRAIN) - 3
    assert read_splits(root)["class_names"] == list(CARS)
    assert tune.class_names == final.class_names == tuple(CARS)


def test_a_struct_array_without_its_field_names_the_field_and_the_file(cars_annos):
    root, _ = cars_annos
    mat = sio.loadmat(root / "cars_annos.mat")
    rows = [
        {"relative_im_path": r["relative_im_path"], "test": r["test"]}
        for r in mat["annotations"][0]
    ]
    sio.savemat(root / "cars_annos.mat", {"annotations": _structs(rows)})
    with pytest.raises(PeftkitError, match=r"cars_annos.mat': 'annotations' has no field 'class'"):
        load_task(f"fgvc:{root}", "final", PRE)


def test_the_unknown_layout_message_names_the_mat_releases(tmp_path):
    (tmp_path / "imagelabels.mat").write_bytes(b"")  # without setid.mat: no Flowers release
    with pytest.raises(PeftkitError, match="no FGVC layout.*setid.mat.*train_list.mat.*cars_annos"):
        load_task(f"fgvc:{tmp_path}", "final", PRE)


def test_vit_train_runs_an_epoch_of_the_starter_model_on_the_flowers_release(flowers, tmp_path):
    out = tmp_path / "run"
    args = ["vit-train", "--data", f"fgvc:{flowers}", "--model", "starter", "--method", "lora"]
    args += ["--epochs", "1", "--batch-size", "4", "--cpu", "--no-progress", "--output", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["num_classes"], results["splits"]) == (3, ["train+val", "test"])
    assert results["steps"] == 3  # the 9 train + val images in batches of 4
    assert results["history"][-1]["eval_examples"] == 3  # tstid's images
    from safetensors import safe_open

    with safe_open(out / "adapter.safetensors", "pt") as f:
        names = json.loads(f.metadata()["class_names"])
    assert names == read_splits(flowers)["class_names"] and len(names) == 3
