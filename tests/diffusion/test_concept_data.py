"""Concept image folders: captions, clear errors for bad files, class images generated once and reused."""

import pytest

from peftkit.common_kernels.errors import PeftkitError
from peftkit.diffusion.data import ConceptDataset, class_images

from .conftest import write_concept_images


def test_captions_come_from_txt_files_else_the_prompt(concept_dir):
    data = ConceptDataset(concept_dir, "a photo of sks toy", resolution=16)
    assert len(data) == 4
    assert (
        data.captions[0] == "a photo of sks toy on a table"
        and data.captions[1] == "a photo of sks toy"
    )
    pixels = data.pixels()
    assert (
        pixels.shape == (4, 3, 16, 16) and 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    )


def test_empty_folder_is_reported(tmp_path):
    with pytest.raises(PeftkitError, match="no images found"):
        ConceptDataset(tmp_path, "x", 16)


def test_non_image_file_is_reported_by_name(tmp_path):
    write_concept_images(tmp_path, count=1)
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(PeftkitError, match="notes.pdf"):
        ConceptDataset(tmp_path, "x", 16)


def test_corrupt_png_is_reported_by_name(tmp_path):
    write_concept_images(tmp_path, count=1)
    good = (tmp_path / "img0.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(PeftkitError, match="broken.png"):
        ConceptDataset(tmp_path, "x", 16)


class _FakePipe:
    """Stands in for the base pipeline: counts generated images."""

    def __init__(self):
        self.calls = 0

    def to(self, device):
        return self

    def __call__(self, prompts, **kwargs):
        from PIL import Image

        self.calls += len(prompts)
        return type(
            "Out", (), {"images": [Image.new("RGB", (16, 16), (9, 9, 9)) for _ in prompts]}
        )()


def test_class_images_are_generated_once_then_reused(tmp_path):
    base = type("Base", (), {"pipe": _FakePipe()})()
    first = class_images(base, tmp_path, "a photo of toy", count=3, resolution=16, batch_size=2)
    assert len(first) == 3 and base.pipe.calls == 3
    again = class_images(base, tmp_path, "a photo of toy", count=3, resolution=16)
    assert len(again) == 3 and base.pipe.calls == 3
    more = class_images(base, tmp_path, "a photo of toy", count=4, resolution=16)
    assert len(more) == 4 and base.pipe.calls == 4
    with pytest.raises(PeftkitError, match="generated for 'a photo of toy'"):
        class_images(base, tmp_path, "a photo of cat", count=4, resolution=16)
