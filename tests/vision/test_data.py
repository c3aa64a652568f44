import numpy as np
import pytest
import torch
from PIL import Image

from peftkit.common_kernels.errors import PeftkitError
from peftkit.vision.data import BuiltinTask, Preprocess, load_task

PRE = Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _vtab(root, n_classes=3, lists=None):
    (root / "images").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(
            root / "images" / f"{i}.png"
        )
    lines = [f"images/{i}.png {i % n_classes}" for i in range(6)]
    lists = lists or {}
    for split in ("train800", "val200", "train800val200", "test"):
        (root / f"{split}.txt").write_text(lists.get(split, "\n".join(lines)) + "\n")
    return root


def test_vtab_folder_loads_by_protocol(tmp_path):
    root = _vtab(tmp_path / "dtd")
    data = load_task(f"vtab:{root}", "final", PRE)
    assert (len(data.train), len(data.eval), data.num_classes, data.name) == (6, 6, 3, "dtd")
    assert data.splits == ("train800val200", "test")
    x, y = data.train[4]
    assert x.shape == (3, 16, 16) and y == 1
    assert load_task(f"vtab:{root}", "tune", PRE).splits == ("train800", "val200")


def test_missing_image_names_the_list_file_and_line(tmp_path):
    root = _vtab(tmp_path / "t", lists={"test": "images/0.png 0\nimages/nope.png 1"})
    with pytest.raises(PeftkitError, match=r"test\.txt:2: image .*nope\.png.* does not exist"):
        load_task(f"vtab:{root}", "final", PRE)


def test_missing_split_file_is_named(tmp_path):
    root = _vtab(tmp_path / "t")
    (root / "train800val200.txt").unlink()
    with pytest.raises(PeftkitError, match=r"train800val200\.txt.* does not exist"):
        load_task(f"vtab:{root}", "final", PRE)


def test_label_out_of_range_names_file_and_line(tmp_path):
    root = _vtab(tmp_path / "t", lists={"test": "images/0.png 0\nimages/1.png 1\nimages/2.png 7"})
    with pytest.raises(PeftkitError, match=r"test\.txt:3: label 7 is out of range for 3 classes"):
        load_task(f"vtab:{root}", "final", PRE)


@pytest.mark.parametrize(
    "line,message",
    [
        ("images/0.png cat", "not an integer"),
        ("images/0.png -1", "negative"),
        ("images/0.png", "expected 'relative/path label'"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    root = _vtab(tmp_path / "t", lists={"train800val200": f"images/1.png 1\n{line}"})
    with pytest.raises(PeftkitError, match=rf"train800val200\.txt:2: .*{message}"):
        load_task(f"vtab:{root}", "final", PRE)


def test_empty_split_is_refused_with_its_name(tmp_path):
    root = _vtab(tmp_path / "t", lists={"test": ""})
    with pytest.raises(PeftkitError, match=r"test\.txt.* is empty"):
        load_task(f"vtab:{root}", "final", PRE)


def test_unreadable_image_names_the_image_and_line(tmp_path):
    root = _vtab(tmp_path / "t")
    (root / "images" / "3.png").write_bytes(b"not a png")
    data = load_task(f"vtab:{root}", "final", PRE)
    data.train[2]
    with pytest.raises(PeftkitError, match=r"cannot read image .*3\.png.*train800val200\.txt:4"):
        data.train[3]


def test_image_folder_uses_sorted_class_folders_and_train_plus_val_for_final(tmp_path):
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / split / c / f"{i}.jpg"
                )
    data = load_task(f"folder:{tmp_path}", "final", PRE)
    assert (len(data.train), len(data.eval), data.num_classes) == (6, 2, 2)
    assert [data.eval[i][1] for i in range(2)] == [0, 1]
    assert data.class_names == ("cat", "dog")
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(PeftkitError, match="bird"):
        load_task(f"folder:{tmp_path}", "final", PRE)


def test_empty_image_folder_is_refused(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(PeftkitError, match="no images found"):
        load_task(f"folder:{tmp_path}", "final", PRE)


def test_builtin_tasks_are_deterministic_and_splits_nest():
    a = BuiltinTask("counting", "train800", PRE, size=20)
    b = BuiltinTask("counting", "train800val200", PRE)
    for i in (0, 7, 19):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    val = BuiltinTask("counting", "val200", PRE, size=5)
    assert torch.equal(val[2][0], b[802][0]) and val[2][1] == b[802][1]
    test = BuiltinTask("counting", "test", PRE, size=20)
    assert not torch.equal(test[0][0], a[0][0])
    labels = [
        BuiltinTask(n, "test", PRE, size=200).label(i) for n in ("location",) for i in range(200)
    ]
    assert set(labels) == {0, 1, 2, 3}


def test_builtin_task_errors():
    with pytest.raises(PeftkitError, match="no built-in task"):
        BuiltinTask("mnist", "test", PRE)
    with pytest.raises(PeftkitError, match="empty"):
        BuiltinTask("shape", "test", PRE, size=0)
    with pytest.raises(PeftkitError, match="data spec"):
        load_task("imagenet", "final", PRE)
