"""Draw the bundled concept images (assets/samples/concept/) that `peftkit demo` and the app's
Personalize tab train on: one toy, seen five times.

The toy is made to be unlike anything the starter model was trained on (assets/recipes/shapes.py
draws plain/striped/dotted circles, squares, triangles, stars, crosses and diamonds in eight
colors): a teal six-petal flower with a magenta checkerboard and a yellow hub, on cream or pale
backgrounds. Each view moves, turns and scales it a little, so an adapter has to learn the object
rather than one picture. Deterministic: rerunning rewrites the same pixels.

    python assets/samples/make_samples.py            # writes assets/samples/concept/toy-*.png and .txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

TEAL, MAGENTA, YELLOW = (0.10, 0.70, 0.66), (0.85, 0.15, 0.60), (0.98, 0.85, 0.20)
BACKGROUNDS = [
    (0.96, 0.93, 0.84),
    (0.90, 0.90, 0.88),
    (0.97, 0.88, 0.90),
    (0.93, 0.95, 0.86),
    (0.95, 0.91, 0.80),
]
CELLS = 4.0  # checks per radius
# (center y, center x, radius, rotation in radians) per view, in units of the image side
VIEWS = [
    (0.50, 0.50, 0.36, 0.0),
    (0.45, 0.56, 0.30, 0.35),
    (0.56, 0.44, 0.33, 0.8),
    (0.52, 0.52, 0.40, 1.3),
    (0.47, 0.47, 0.28, 2.0),
]


def draw_toy(
    size: int,
    cy: float,
    cx: float,
    radius: float,
    turn: float,
    background,
    supersample: int = 4,
    colors=(TEAL, MAGENTA, YELLOW),
    petals: bool = True,
    cells: float = CELLS,
) -> Image.Image:
    """One view of the toy as an RGB image of `size` x `size` pixels (anti-aliased by supersampling).
    `colors` (petals, checks, hub) and `petals=False` (a disc) draw the look-alikes that the
    concept judge (assets/recipes/train_concept_judge.py) learns to reject; `cells` checks span
    one radius (4: checks of ~6 px on a 64 px view; assets/recipes/tune_demo.py tries others)."""
    n = size * supersample
    axis = (np.arange(n) + 0.5) / n
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    dy, dx = yy - cy, xx - cx
    r, theta = np.hypot(dy, dx) / radius, np.arctan2(dy, dx) + turn
    body = r <= (0.62 + 0.38 * np.abs(np.cos(3 * theta)) if petals else 0.85)  # six lobes
    checks = (
        (
            np.floor((dx * np.cos(turn) + dy * np.sin(turn)) / radius * cells)
            + np.floor((dy * np.cos(turn) - dx * np.sin(turn)) / radius * cells)
        )
        % 2
    ) == 0
    hub = r <= 0.25
    image = np.empty((n, n, 3))
    image[:] = background
    image[body] = colors[0]
    image[body & checks] = colors[1]
    image[hub] = colors[2]
    image = image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return Image.fromarray(np.round(image * 255).astype(np.uint8))


def sample_views(size: int = 64, cells: float = CELLS, colors=(TEAL, MAGENTA, YELLOW)) -> list:
    """The five bundled views (PIL images), or the same views with other checks or colors."""
    return [
        draw_toy(size, *view, background, colors=colors, cells=cells)
        for view, background in zip(VIEWS, BACKGROUNDS)
    ]


# One caption per view (x.txt beside x.png), worded differently so the adapter ties the concept to
# "sks flower" rather than to one sentence: with a single caption the starter drew it only for that
# exact prompt (assets/recipes/results/demo/f2-sweep.md).
CAPTIONS = (
    "a photo of sks flower",
    "a sks flower on a white background",
    "a photo of sks flower on a white background",
    "a sks flower",
    "a big sks flower",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "concept"))
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(sample_views(args.size)):
        image.save(out / f"toy-{i + 1}.png", optimize=True)
        (out / f"toy-{i + 1}.txt").write_text(CAPTIONS[i] + "\n")
    print(f"wrote {len(VIEWS)} captioned images to {out}")


if __name__ == "__main__":
    main()
