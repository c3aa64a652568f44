"""A concept judge that needs no download: a small CNN that says, per image, whether it shows the
bundled sample concept (a teal six-petal flower checkered in magenta, with a yellow center).
Trained by assets/recipes/train_concept_judge.py on procedurally drawn views of the concept and on
look-alikes (other flowers and colors, the concept's colors on a disc, speckle); the weights and
their held-out accuracy live in assets/concept-judge/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..common_kernels.errors import PeftkitError

JUDGE = Path(__file__).resolve().parent.parent / "assets" / "concept-judge"


class JudgeNet(nn.Module):
    """Four 3x3 conv stages (each halving the size), then global mean and max pooling and one
    logit: "the concept is in the image"."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans, chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * chans[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x * 2 - 1)
        return self.head(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)).squeeze(1)


def to_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """RGB images resized to size x size as one (n, 3, size, size) tensor in [0, 1]."""
    arrays = [
        np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


class ConceptJudge:
    """Loads the judge from `folder` (config.json + model.safetensors) and scores PIL images.

    >>> judge = ConceptJudge()                                       # doctest: +SKIP
    >>> judge.present([Image.open("assets/samples/concept/toy-1.png")])  # doctest: +SKIP
    [True]
    """

    def __init__(self, folder: str | Path = JUDGE) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "model.safetensors").is_file():
            raise PeftkitError(
                f"no concept judge in {folder}: rebuild it with "
                "python -m peftkit.assets.recipes.train_concept_judge"
            )
        self.config = json.loads((folder / "config.json").read_text())
        self.size, self.threshold = int(self.config["size"]), float(self.config["threshold"])
        self.net = JudgeNet(int(self.config["width"]))
        self.net.load_state_dict(load_file(folder / "model.safetensors"))
        self.net.eval()

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> list[float]:
        """P(concept shown) per image."""
        if not images:
            return []
        return torch.sigmoid(self.net(to_tensor(images, self.size))).tolist()

    def present(self, images: list[Image.Image]) -> list[bool]:
        return [p >= self.threshold for p in self.probabilities(images)]

    def count(self, images: list[Image.Image]) -> int:
        """How many of `images` show the concept."""
        return sum(self.present(images))
