"""FGVC data: the three layouts, both protocols, class ids remapped, and VPT's crop/flip."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training.data_cache import cache_dataset
from peftkit.vision.data import Preprocess, load_task
from peftkit.vision.fgvc import FGVCTransform, center_crop, random_crop_flip

PRE = Preprocess(16, (0.5,) * 3, (0.5,) * 3)


def _image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), value, dtype=np.uint8)).save(path)


def test_vpt_json_splits_give_train_val_for_tune_and_train_plus_val_for_final(tmp_path):
    names = {"train": 6, "val": 2, "test": 3}
    for split, n in names.items():
        listing = {f"{split}/{i}.png": 11 + 2 * (i % 2) for i in range(n)}  # sparse ids 11, 13
        for path in listing:
            _image(tmp_path / "images" / path, 40)
        (tmp_path / f"{split}.json").write_text(json.dumps(listing))
    tune = load_task(f"fgvc:{tmp_path}", "tune", PRE)
    final = load_task(f"fgvc:{tmp_path}", "final", PRE)
    assert (len(tune.train), len(tune.eval), tune.num_classes) == (6, 2, 2)
    assert (len(final.train), len(final.eval), final.splits) == (8, 3, ("train+val", "test"))
    assert sorted(set(final.train.labels)) == [0, 1]  # ids 11, 13 -> 0, 1
    assert final.train[0][0].shape == (3, 16, 16)


def test_cub_release_layout_holds_out_every_tenth_training_image_per_class(tmp_path):
    lines, labels, split = [], [], []
    for i in range(1, 51):  # 2 classes x 20 training images, + 10 test images
        cls = 1 + i % 2
        path = f"{cls:03d}.Bird/{i}.jpg"
        _image(tmp_path / "images" / path, i)
        lines.append(f"{i} {path}")
        labels.append(f"{i} {cls}")
        split.append(f"{i} {int(i <= 40)}")
    for name, rows in (
        ("images.txt", lines),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
    ):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    tune = load_task(f"fgvc:{tmp_path}", "tune", PRE)
    final = load_task(f"fgvc:{tmp_path}", "final", PRE)
    assert (len(tune.train), len(tune.eval)) == (36, 4)  # 2 of each class's 20 held out
    held = {e.path for e in tune.eval.examples}
    assert not held & {e.path for e in tune.train.examples}
    assert (len(final.train), len(final.eval), final.num_classes) == (40, 10, 2)
    assert {e.path.name for e in final.eval.examples} == {f"{i}.jpg" for i in range(41, 51)}


def test_class_folders_take_the_fgvc_transforms(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _image(tmp_path / split / c / f"{i}.png", 100)
    data = load_task(f"fgvc:{tmp_path}", "final", PRE)
    assert isinstance(data.train.transform, FGVCTransform) and data.train.transform.train
    assert not data.eval.transform.train and data.eval.transform.resize == round(16 * 256 / 224)
    assert (len(data.train), len(data.eval), data.num_classes) == (6, 4, 2)
    cache = cache_dataset(data.train, torch.device("cpu"))  # what the engine trains from
    assert cache.fields[0].shape == (6, 3, 18, 18)  # kept at the resize, cropped per batch
    images, labels = cache.batch(torch.arange(4))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1]


def test_an_unknown_layout_names_the_expected_ones(tmp_path):
    (tmp_path / "imagelabels.mat").write_bytes(b"")
    with pytest.raises(PeftkitError, match="train.json, val.json and test.json.*images.txt"):
        load_task(f"fgvc:{tmp_path}", "final", PRE)


def test_random_crops_are_windows_of_the_image_some_mirrored_at_varied_offsets():
    torch.manual_seed(0)
    image = torch.arange(3 * 18 * 18).view(1, 3, 18, 18)
    crops = random_crop_flip(image.expand(200, -1, -1, -1), 16)
    windows = {
        (top, left, flip): (w.flip(-1) if flip else w)
        for top in range(3)
        for left in range(3)
        for flip in (False, True)
        for w in [image[0, :, top : top + 16, left : left + 16]]
    }
    found = [next(k for k, w in windows.items() if torch.equal(c, w)) for c in crops]
    assert {f[2] for f in found} == {False, True}
    assert len({f[:2] for f in found}) == 9  # every offset of the 3 x 3 occurs


def test_evaluation_takes_the_center_crop_of_the_resized_image():
    pixels = torch.arange(3 * 18 * 18, dtype=torch.uint8).view(3, 18, 18)
    transform = FGVCTransform(16, (0.0,) * 3, (1.0,) * 3, train=False)
    expected = pixels[:, 1:17, 1:17].float() / 255.0
    torch.testing.assert_close(transform.normalize(pixels), expected)
    torch.testing.assert_close(
        transform.normalize(pixels.expand(2, -1, -1, -1)), expected.expand(2, -1, -1, -1)
    )
    assert torch.equal(center_crop(pixels, 16), pixels[:, 1:17, 1:17])


def test_crops_come_from_the_runs_own_seeded_generator_and_resume_from_its_state():
    pixels = torch.arange(8 * 3 * 20 * 20).view(8, 3, 20, 20) % 251

    def transform(seed):
        return FGVCTransform(16, (0.0,) * 3, (1.0,) * 3, train=True, seed=seed)

    a, b = transform(0), transform(0)
    first = a.normalize(pixels)
    torch.manual_seed(123)  # draws from the global RNG in between change nothing
    torch.rand(5)
    assert torch.equal(b.normalize(pixels), first)
    saved = a.generator.get_state()
    second = a.normalize(pixels)
    assert not torch.equal(second, first)  # the generator moves on between batches
    assert not torch.equal(transform(1).normalize(pixels), first)
    resumed = transform(7)
    resumed.generator.set_state(saved)
    assert torch.equal(resumed.normalize(pixels), second)
