"""Procedural captioned scenes: colored shapes on plain backgrounds, rasterized in batches with torch.

Every scene is drawn from a seed, so a batch is the same on every run (parameters are sampled on
the CPU; pixels are computed on any device). One scene holds 1-4 copies of one shape in one color
and texture; its caption says what is drawn and its labels say it as class indices:

    >>> scenes = ShapeScenes(size=64).sample(4, seed=0)            # doctest: +SKIP
    >>> scenes.images.shape, scenes.captions[0]                      # doctest: +SKIP
    (torch.Size([4, 3, 64, 64]), 'two small striped yellow squares on a white background')

The text-to-image starter learns from the captions; the ViT starter from the labels
(`ShapeScenes(size=32, shapes=VIT_SHAPES, max_count=6, rotate=True, noise=0.08)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COLORS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.72, 0.20),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.96, 0.88, 0.10),
    "orange": (1.00, 0.52, 0.05),
    "purple": (0.55, 0.15, 0.75),
    "white": (0.97, 0.97, 0.97),
    "black": (0.05, 0.05, 0.05),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
VIT_SHAPES = SHAPES + ("bar",)
# the text-to-image starter also draws six-petal flowers (with a center of another color) and
# two-color checkerboards, so a concept such as the bundled sample flower is a short step away
SD_SHAPES = SHAPES + ("flower",)
FLOWER_SCALE = 1.25  # petal tips reach past the placement radius: a flower's area is mostly air
PLURALS = {"cross": "crosses"}
# the second tone covers at most a third of an object, so its color stays the dominant one
TEXTURES = ("plain", "striped", "dotted")
SD_TEXTURES = TEXTURES + ("checkered",)
SIZES = ("small", "medium", "big")
POSITIONS = (
    "anywhere",
    "in the top left",
    "in the top right",
    "in the bottom left",
    "in the bottom right",
    "in the center",
)
COUNT_WORDS = ("a", "two", "three", "four", "five", "six")
PREFIXES = ("a photo of ", "a picture of ", "an image of ")
IGNORE = -100  # label of a head that does not apply to a scene (cross-entropy's ignore_index)


@dataclass
class Scenes:
    """A batch: images (n, 3, size, size) in [0, 1], captions, and integer labels per attribute."""

    images: torch.Tensor
    captions: list[str]
    labels: dict[str, torch.Tensor]


class ShapeScenes:
    """Scene sampler and rasterizer. `shapes`/`max_count` set the vocabulary, `rotate` turns
    objects by a random angle (the `angle` label is then the bar's direction in 45-degree bins),
    `noise` adds per-pixel noise up to that amplitude, `supersample` anti-aliases edges."""

    def __init__(
        self,
        size: int = 64,
        shapes: tuple[str, ...] = SHAPES,
        max_count: int = 4,
        rotate: bool = False,
        noise: float = 0.0,
        supersample: int = 2,
        textures: tuple[str, ...] = TEXTURES,
        plain: float = 0.7,
    ) -> None:
        unknown = set(shapes) - set(VIT_SHAPES + SD_SHAPES)
        if unknown or not 1 <= max_count <= 6 or size < 16 or tuple(textures[:3]) != TEXTURES:
            raise ValueError(
                f"shapes must come from {VIT_SHAPES + SD_SHAPES} (got {sorted(unknown)}), "
                f"max_count 1..6, size >= 16, textures {TEXTURES} or {SD_TEXTURES}"
            )
        self.size, self.shapes, self.max_count = size, tuple(shapes), max_count
        self.textures, self.plain = tuple(textures), plain
        self.rotate, self.noise, self.supersample = rotate, noise, supersample
        self.palette = torch.tensor(list(COLORS.values()))

    # ---- parameters (CPU, seeded) ----

    def _params(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        def ints(high: int) -> torch.Tensor:
            return torch.randint(0, high, (n,), generator=g)

        def uniform(lo, hi, *shape) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

        count = (
            torch.where(torch.rand(n, generator=g) < 0.55, 1, 2 + ints(self.max_count - 1))
            if self.max_count > 1
            else torch.ones(n, dtype=torch.long)
        )
        color = ints(len(COLORS))
        bg = (color + 1 + ints(len(COLORS) - 1)) % len(COLORS)  # any color but the object's
        texture = torch.where(
            torch.rand(n, generator=g) < self.plain, 0, 1 + ints(len(self.textures) - 1)
        )
        single = count == 1
        position = torch.where(
            single & (torch.rand(n, generator=g) < 0.5), 1 + ints(len(POSITIONS) - 1), 0
        )
        # big objects do not fit a quadrant or a 3x3 grid cell
        size = torch.where(single & (position == 0), ints(3), ints(2))
        s = float(self.size)
        lo, hi = torch.tensor([0.08, 0.14, 0.24]), torch.tensor([0.11, 0.19, 0.30])
        radius_single = (lo[size] + (hi[size] - lo[size]) * torch.rand(n, generator=g)) * s
        radius_multi = torch.where(size == 0, uniform(0.065, 0.085), uniform(0.10, 0.125)) * s
        radius = torch.where(single, radius_single, radius_multi)

        # multi-object scenes: distinct cells of a 3x3 grid, jittered inside the cell
        cells = torch.rand(n, 9, generator=g).argsort(dim=1)[:, :6]
        cell = s / 3
        slack = (cell / 2 - radius - 1).clamp(min=0)[:, None]
        cy = (cells // 3 + 0.5) * cell + (torch.rand(n, 6, generator=g) * 2 - 1) * slack
        cx = (cells % 3 + 0.5) * cell + (torch.rand(n, 6, generator=g) * 2 - 1) * slack
        # single objects: anywhere, in a quadrant, or in the center
        free = (s - 2 * radius - 2).clamp(min=0)
        anywhere = torch.stack(
            [
                radius + 1 + free * torch.rand(n, generator=g),
                radius + 1 + free * torch.rand(n, generator=g),
            ],
            1,
        )
        quadrant = (
            torch.tensor(
                [[0.5, 0.5], [0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75], [0.5, 0.5]]
            )
            * s
        )
        placed = quadrant[position] + (torch.rand(n, 2, generator=g) * 2 - 1) * s / 16
        one = torch.where((position == 0)[:, None], anywhere, placed)
        cy[:, 0] = torch.where(single, one[:, 0], cy[:, 0])
        cx[:, 0] = torch.where(single, one[:, 1], cx[:, 0])
        angle = uniform(0.0, math.pi) if self.rotate else torch.zeros(n)
        p = {
            "shape": ints(len(self.shapes)),
            "color": color,
            "bg": bg,
            "texture": texture,
            "count": count,
            "size": size,
            "position": position,
            "radius": radius,
            "cy": cy,
            "cx": cx,
            "angle": angle,
            "jitter": uniform(-0.05, 0.05, 2, 3),
            "noise": uniform(0.0, self.noise),
            "say_bg": torch.rand(n, generator=g) >= 0.15,
            "prefix": torch.where(torch.rand(n, generator=g) < 0.2, ints(len(PREFIXES)), -1),
        }
        # drawn last, so scenes without flowers or checkers keep the draws they had before
        flower = p["shape"] == (self.shapes.index("flower") if "flower" in self.shapes else -1)
        p["angle"] = torch.where(flower, uniform(0.0, math.pi / 3), angle)
        color2 = (color + 1 + ints(len(COLORS) - 1)) % len(COLORS)
        color2 = torch.where(color2 == bg, (color2 + 1) % len(COLORS), color2)
        p["color2"] = torch.where(color2 == color, (color2 + 1) % len(COLORS), color2)
        hub = (color + 1 + ints(len(COLORS) - 1)) % len(COLORS)
        p["hub"] = torch.where(flower & (torch.rand(n, generator=g) < 0.75), hub, -1)
        return p

    # ---- pixels (any device) ----

    def _masks(
        self, p: dict[str, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inside an object, on its checkerboard's second tone, inside its hub) per pixel; the
        checks turn with the object, like the sample flower's."""
        n, res = len(p["shape"]), self.size * self.supersample
        axis = (torch.arange(res, device=device, dtype=torch.float32) + 0.5) / self.supersample
        yy, xx = axis.view(1, 1, res, 1), axis.view(1, 1, 1, res)
        r = p["radius"].view(n, 1, 1, 1)
        dy = (yy - p["cy"].view(n, 6, 1, 1)) / r
        dx = (xx - p["cx"].view(n, 6, 1, 1)) / r
        cos, sin = torch.cos(p["angle"]).view(n, 1, 1, 1), torch.sin(p["angle"]).view(n, 1, 1, 1)
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # object frame; v points down
        inside = torch.zeros(n, 6, res, res, dtype=torch.bool, device=device)
        shape = p["shape"]
        for k, name in enumerate(self.shapes):
            inside |= (shape == k).view(n, 1, 1, 1) & _SHAPE_TESTS[name](u, v)
        active = torch.arange(6, device=device).view(1, 6) < p["count"].view(n, 1)
        inside &= active.view(n, 6, 1, 1)
        cells = (r / 3).clamp(max=4)  # a quarter radius, but never under 3 pixels
        checks = (torch.floor(u * cells) + torch.floor(v * cells)) % 2 == 0
        hub = u * u + v * v <= (0.25 * FLOWER_SCALE) ** 2
        return inside.any(dim=1), (inside & checks).any(dim=1), (inside & hub).any(dim=1)

    def _texture(self, p: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        res = self.size * self.supersample
        axis = torch.arange(res, device=device) // self.supersample
        yy, xx = axis.view(1, res, 1), axis.view(1, 1, res)
        patterns = torch.cat(
            [
                torch.zeros(1, res, res, dtype=torch.bool, device=device),
                (xx + yy) % 3 == 0,
                (xx % 5 - 2) ** 2 + (yy % 5 - 2) ** 2 <= 1,
                torch.zeros(1, res, res, dtype=torch.bool, device=device),  # checkered: per object
            ]
        )
        return patterns[p["texture"]]

    def render(
        self,
        p: dict[str, torch.Tensor],
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Pixels of the scenes `p` (params on any device); `generator` (on `device`) draws the noise."""
        device = torch.device(device)
        p = {k: v.to(device) for k, v in p.items()}
        n = len(p["shape"])
        palette = self.palette.to(device)
        fg = (palette[p["color"]] + p["jitter"][:, 0]).clamp(0, 1)
        bg = (palette[p["bg"]] + p["jitter"][:, 1]).clamp(0, 1)
        # a texture's second tone keeps the object's hue; a darker gray would be nearer purple than white
        dark, light = fg.mean(dim=1, keepdim=True) < 0.3, fg.min(dim=1, keepdim=True).values > 0.8
        shade = torch.where(dark, fg + 0.3, torch.where(light, fg * 0.8, fg * 0.65))
        inside, checks, hub = self._masks(p, device)
        checkered = (p["texture"] == 3).view(n, 1, 1)
        tone = torch.where(checkered, checks, self._texture(p, device))
        second = torch.where(checkered.view(n, 1), palette[p["color2"]], shade)
        obj = torch.where(tone[:, None], second.view(n, 3, 1, 1), fg.view(n, 3, 1, 1))
        hub_color = palette[p["hub"].clamp(min=0)].view(n, 3, 1, 1)
        obj = torch.where((hub & (p["hub"] >= 0).view(n, 1, 1))[:, None], hub_color, obj)
        image = torch.where(inside[:, None], obj, bg.view(n, 3, 1, 1))
        if self.supersample > 1:
            image = F.avg_pool2d(image, self.supersample)
        if self.noise > 0:
            noise = torch.rand(image.shape, generator=generator, device=device) * 2 - 1
            image = image + noise * p["noise"].view(n, 1, 1, 1)
        return image.clamp(0, 1)

    def params(self, n: int, seed: int) -> dict[str, torch.Tensor]:
        """Parameters of `n` scenes drawn from `seed` (CPU tensors, one row per scene)."""
        return self._params(n, torch.Generator().manual_seed(seed))

    def labels(self, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Class indices per attribute; IGNORE where an attribute does not apply (the position of
        several objects, the direction of anything but a bar)."""
        labels = {k: p[k] for k in ("shape", "color", "bg", "texture", "size")}
        labels["count"] = p["count"] - 1
        labels["position"] = torch.where(p["count"] == 1, p["position"], IGNORE)
        angle_bin = torch.round(p["angle"] / (math.pi / 4)).long() % 4
        is_bar = p["shape"] == (self.shapes.index("bar") if "bar" in self.shapes else -1)
        labels["angle"] = torch.where(is_bar & self.rotate, angle_bin, IGNORE)
        return labels

    def captions(self, p: dict[str, torch.Tensor]) -> list[str]:
        rows = {k: v.tolist() for k, v in p.items() if v.dim() == 1}
        return [
            caption({k: v[i] for k, v in rows.items()}, self.shapes) for i in range(len(p["shape"]))
        ]

    def sample(self, n: int, seed: int, device: str | torch.device = "cpu") -> Scenes:
        """`n` scenes from `seed`: images on `device`, captions, labels (on the CPU)."""
        p = self.params(n, seed)
        generator = torch.Generator(device=device).manual_seed(seed)
        return Scenes(self.render(p, device, generator), self.captions(p), self.labels(p))


def rotate_hue(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """`images` (n, 3, h, w) in [0, 1] with each one's colors turned by its angle (radians) about
    the gray axis of RGB space (Rodrigues' rotation): grays stay, red turns towards green, then
    blue. The VAE sees scenes turned this way, so it also encodes hues that no caption names (the
    sample flower's teal and magenta) instead of pulling them to the nearest palette color.

        >>> gray = torch.full((1, 3, 1, 1), 0.5)
        >>> torch.allclose(rotate_hue(gray, torch.tensor([1.0])), gray)
        True
    """
    like = dict(device=images.device, dtype=images.dtype)
    k = torch.full((3,), 3**-0.5, **like)
    cross = torch.zeros(3, 3, **like)
    cross[0, 1], cross[0, 2], cross[1, 2] = -k[2], k[1], -k[0]
    cross = cross - cross.T
    angles = angles.to(images.dtype).view(-1, 1, 1)
    sin, cos = torch.sin(angles), torch.cos(angles)
    turn = torch.eye(3, **like) + sin * cross + (1 - cos) * (cross @ cross)
    return torch.einsum("nij,njhw->nihw", turn, images).clamp(0, 1)


def take(p: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The scenes `index` of a parameter pool (on the pool's device)."""
    return {k: v[index] for k, v in p.items()}


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # five points, one straight up: the radius limit swings between 1 and 0.45 with the angle
    theta = torch.atan2(u, -v)
    phase = torch.remainder(theta / (2 * math.pi / 5), 1.0)
    limit = 0.45 + 0.55 * (2 * (phase - 0.5).abs()) ** 1.5
    return u * u + v * v <= limit * limit


_SHAPE_TESTS = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.85,
    "triangle": lambda u, v: (v <= 0.75) & (v >= -1) & (u.abs() <= (v + 1) * 0.62),
    "star": _star,
    "cross": lambda u, v: (
        ((u.abs() <= 1) & (v.abs() <= 0.33)) | ((v.abs() <= 1) & (u.abs() <= 0.33))
    ),
    "diamond": lambda u, v: u.abs() + v.abs() <= 1.05,
    # six petals: the radius swings between 0.62 and 1 (assets/samples/make_samples.py's toy)
    "flower": lambda u, v: (
        torch.hypot(u, v) / FLOWER_SCALE <= 0.62 + 0.38 * torch.cos(3 * torch.atan2(v, u)).abs()
    ),
    "bar": lambda u, v: (u.abs() <= 1.15) & (v.abs() <= 0.22),
}


def caption(scene: dict[str, float], shapes: tuple[str, ...]) -> str:
    """The caption of one scene: count, size, texture, color, shape, position and background, with
    the background left out 15% of the time and a "a photo of" style prefix 20% of the time."""
    count, shape = int(scene["count"]), shapes[int(scene["shape"])]
    texture = SD_TEXTURES[int(scene["texture"])]
    words = [
        SIZES[int(scene["size"])] if int(scene["size"]) != 1 else "",
        texture if texture != "plain" else "",
        COLOR_NAMES[int(scene["color"])],
        f"and {COLOR_NAMES[int(scene['color2'])]}" if texture == "checkered" else "",
        shape if count == 1 else PLURALS.get(shape, shape + "s"),
    ]
    words = [w for w in words if w]
    text = " ".join([_article(words[0]) if count == 1 else COUNT_WORDS[count - 1], *words])
    if scene.get("hub", -1) >= 0:
        hub = COLOR_NAMES[int(scene["hub"])]
        text += f" with {_article(hub)} {hub} center" if count == 1 else f" with {hub} centers"
    if count == 1 and int(scene["position"]):
        text += " " + POSITIONS[int(scene["position"])]
    if scene["say_bg"]:
        bg = COLOR_NAMES[int(scene["bg"])]
        text += f" on {_article(bg)} {bg} background"
    if scene["prefix"] >= 0:
        text = PREFIXES[int(scene["prefix"])] + text
    return text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_words() -> list[str]:
    """Every word a caption can use (for the tokenizer's vocabulary)."""
    words = {
        "a",
        "an",
        "on",
        "background",
        "of",
        *COUNT_WORDS,
        *SIZES,
        "and",
        "with",
        "center",
        "centers",
        *SD_TEXTURES,
        *COLOR_NAMES,
        *VIT_SHAPES,
        *SD_SHAPES,
    }
    words |= {PLURALS.get(s, s + "s") for s in VIT_SHAPES + SD_SHAPES}
    for phrase in (*POSITIONS, *PREFIXES):
        words |= set(phrase.split())
    return sorted(words)


def dominant_colors(images: torch.Tensor, border: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(object color, background color) palette indices of each image: every pixel takes its
    nearest palette color; the background is the most common color on the border, the object
    the most common other color. Used by the tests and to score generated images."""
    palette = torch.tensor(list(COLORS.values()), device=images.device)
    n = images.shape[0]
    dist = ((images.permute(0, 2, 3, 1)[..., None, :] - palette) ** 2).sum(-1)  # n, h, w, colors
    nearest = dist.argmin(-1)
    edge = torch.ones_like(nearest, dtype=torch.bool)
    edge[:, border:-border, border:-border] = False
    k = len(COLORS)
    bg = torch.stack([torch.bincount(nearest[i][edge[i]], minlength=k) for i in range(n)]).argmax(1)
    counts = torch.stack([torch.bincount(nearest[i].flatten(), minlength=k) for i in range(n)])
    counts[torch.arange(n), bg] = -1
    return counts.argmax(1), bg
