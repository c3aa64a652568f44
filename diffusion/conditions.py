"""Condition images a control branch learns from, computed from the training image itself, with no
model download: Canny edges, luminance (a grayscale, depth-like cue) and segmentation by color
quantization. Each extractor maps an RGB PIL image to an RGB PIL image of the same size, the form
diffusers' ControlNet pipelines feed the branch (values in [0, 1] after their preprocessing).

    >>> from PIL import Image
    >>> from peftkit.diffusion.conditions import extract
    >>> extract("canny", Image.new("RGB", (32, 32))).size
    (32, 32)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..common_kernels.errors import PeftkitError


def _gray(image: Image.Image) -> torch.Tensor:
    """(1, 1, H, W) luminance in [0, 1] with ITU-R BT.601 weights (what PIL's "L" mode uses)."""
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[None, None]


def _to_rgb(plane: torch.Tensor) -> Image.Image:
    array = (plane.squeeze().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array, mode="L").convert("RGB")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


def canny_edges(
    gray: torch.Tensor, low: float = 0.1, high: float = 0.2, sigma: float = 1.0
) -> torch.Tensor:
    """Canny (1986): Gaussian smoothing, Sobel gradients, non-maximum suppression along the gradient
    direction, then hysteresis (weak edges survive only when connected to strong ones).
    `gray`: (1, 1, H, W) in [0, 1]; `low`/`high`: thresholds on the gradient magnitude, whose
    maximum for a 0-to-1 step is about 1 after Sobel's 1/4 normalisation. Returns 0/1 edges."""
    if not 0 <= low <= high:
        raise PeftkitError(f"canny thresholds need 0 <= low <= high, got low={low}, high={high}")
    x = _gaussian_blur(gray, sigma) if sigma > 0 else gray
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4.0
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel.t().reshape(1, 1, 3, 3))
    magnitude = torch.hypot(gx, gy)
    # Quantize the gradient angle to 4 directions; keep a pixel only if it beats both neighbours
    # along its direction (thin edges, one pixel wide).
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    direction = ((angle + 22.5) // 45.0).long() % 4
    m = F.pad(magnitude, (1, 1, 1, 1))
    h, w = magnitude.shape[-2:]
    offsets = [(0, 1), (1, 1), (1, 0), (1, -1)]
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for d, (dy, dx) in enumerate(offsets):
        ahead = m[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        behind = m[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        keep |= (direction == d) & (magnitude >= ahead) & (magnitude >= behind)
    thin = magnitude * keep
    strong = thin >= high
    weak = thin >= low
    edges = strong
    # Hysteresis as repeated 3x3 dilation restricted to weak pixels, until nothing changes.
    while True:
        grown = (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0) & weak
        if torch.equal(grown, edges):
            return edges.float()
        edges = grown


def canny(image: Image.Image, low: float = 0.1, high: float = 0.2) -> Image.Image:
    """White one-pixel edges on black."""
    return _to_rgb(canny_edges(_gray(image), low, high))


def luminance(image: Image.Image) -> Image.Image:
    """Grayscale stretched to the full [0, 1] range: a depth-like cue (near/bright, far/dark in many
    photos) that needs no depth model."""
    g = _gray(image)
    lo, hi = g.min(), g.max()
    return _to_rgb((g - lo) / (hi - lo) if hi > lo else torch.zeros_like(g))


def segment(image: Image.Image, colors: int = 8) -> Image.Image:
    """Flat color regions: the image quantized to `colors` colors by median cut, the cheap stand-in
    for a semantic segmentation map."""
    if not 2 <= colors <= 256:
        raise PeftkitError(f"segment needs 2 <= colors <= 256, got {colors}")
    return (
        image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT).convert("RGB")
    )


EXTRACTORS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "canny": canny,
    "luminance": luminance,
    "depth": luminance,
    "segment": segment,
}


def extract(name: str, image: Image.Image) -> Image.Image:
    """The condition image `name` (one of EXTRACTORS) computed from `image`."""
    if name not in EXTRACTORS:
        raise PeftkitError(f"unknown condition extractor {name!r}: use one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](image.convert("RGB"))
