import numpy as np
import pytest
from PIL import Image

from peftkit.common_kernels.errors import PeftkitError
from peftkit.diffusion.conditions import EXTRACTORS, canny, extract, luminance, segment


def _square_image(size: int = 32) -> Image.Image:
    a = np.zeros((size, size, 3), np.uint8)
    a[8:24, 8:24] = 255
    return Image.fromarray(a)


def test_canny_marks_the_square_outline_and_nothing_far_from_it():
    edges = np.asarray(canny(_square_image()))[..., 0] > 0
    assert edges[8:24, 7:9].any() and edges[8:24, 23:25].any()  # left and right sides
    assert edges[7:9, 8:24].any() and edges[23:25, 8:24].any()  # top and bottom sides
    assert not edges[12:20, 12:20].any()  # flat inside
    assert not edges[:4].any() and not edges[:, :4].any()  # flat outside


def test_canny_of_a_flat_image_is_black():
    assert np.asarray(canny(Image.new("RGB", (16, 16), (90, 40, 10)))).max() == 0


def test_luminance_stretches_to_full_range_and_keeps_size():
    image = Image.fromarray(np.linspace(60, 120, 16 * 24).reshape(16, 24).astype(np.uint8)).convert(
        "RGB"
    )
    out = luminance(image)
    a = np.asarray(out)
    assert out.size == (24, 16) and out.mode == "RGB"
    assert a.min() == 0 and a.max() == 255
    assert np.asarray(luminance(Image.new("RGB", (8, 8), (5, 5, 5)))).max() == 0


def test_segment_quantizes_to_at_most_k_colors():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    colors = np.unique(np.asarray(segment(image, colors=4)).reshape(-1, 3), axis=0)
    assert len(colors) <= 4


def test_every_extractor_returns_rgb_of_the_input_size():
    for name in EXTRACTORS:
        out = extract(name, _square_image(24).convert("L"))
        assert out.size == (24, 24) and out.mode == "RGB", name


def test_unknown_extractor_names_the_choices():
    with pytest.raises(PeftkitError, match="canny"):
        extract("sobel", _square_image())
