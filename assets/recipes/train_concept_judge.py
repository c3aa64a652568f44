"""Train the concept judge (assets/concept-judge/): a small CNN that tells whether an image shows the
bundled sample concept. Positives are views of the concept drawn like assets/samples/ (any place,
turn and size, pastel or palette backgrounds); negatives are its look-alikes: the starter's scenes
(flowers and checkerboards in other colors), the flower in other colors, the concept's colors on a
disc, speckle and empty backgrounds. Every image is blurred and noised a random amount, like decoded
samples of a small diffusion model. CPU, about a minute:

    python -m peftkit.assets.recipes.train_concept_judge --out assets/concept-judge
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...diffusion.concept_judge import JUDGE, JudgeNet
from ..samples.make_samples import MAGENTA, TEAL, YELLOW, draw_toy
from .recipe_run import save_folder
from .shapes import COLORS, SD_SHAPES, SD_TEXTURES, ShapeScenes, take

PALETTE = [*COLORS.values(), TEAL, MAGENTA]


def _background(rng: np.random.Generator) -> tuple:
    if rng.random() < 0.5:
        return tuple(rng.uniform(0.8, 1.0, 3))
    return tuple(
        np.clip(np.array(PALETTE[rng.integers(len(COLORS))]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    )


def _view(rng: np.random.Generator, size: int, colors, petals: bool = True) -> np.ndarray:
    radius = rng.uniform(0.18, 0.42)
    cy, cx = rng.uniform(radius * 0.85, 1 - radius * 0.85, 2)
    image = draw_toy(
        size, cy, cx, radius, rng.uniform(0, np.pi), _background(rng), 2, colors, petals
    )
    return np.asarray(image, dtype=np.float32) / 255


def _jitter(rng: np.random.Generator, color) -> tuple:
    return tuple(np.clip(np.array(color) + rng.uniform(-0.08, 0.08, 3), 0, 1))


def _look_alike_colors(rng: np.random.Generator) -> tuple:
    while True:
        petals, checks, hub = (PALETTE[i] for i in rng.integers(len(PALETTE), size=3))
        if {petals, checks} != {TEAL, MAGENTA} and petals != checks:
            return petals, checks, hub


def _speckle(rng: np.random.Generator, size: int) -> np.ndarray:
    cells = int(rng.choice([4, 8, 16, 32]))
    colors = np.array(PALETTE)[rng.integers(len(PALETTE), size=(cells, cells))]
    if rng.random() < 0.3:
        colors[:] = _background(rng)
    grid = torch.from_numpy(colors).permute(2, 0, 1)[None].float()
    return F.interpolate(grid, size=size, mode="bilinear")[0].permute(1, 2, 0).numpy()


def judge_data(n: int, seed: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images (n, 3, size, size) in [0, 1] and labels (1 = the concept), half of each, from `seed`."""
    rng = np.random.default_rng(seed)
    scenes = ShapeScenes(size=size, shapes=SD_SHAPES, textures=SD_TEXTURES, plain=0.55)
    params = scenes.params(n, seed)
    # in chunks: one scene's masks take 6 x (2 size)^2 floats per object slot
    scene_images = (
        torch.cat(
            [
                scenes.render(take(params, torch.arange(i, min(n, i + 256))))
                for i in range(0, n, 256)
            ]
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    images, labels = [], []
    for i in range(n):
        positive = i % 2 == 0
        kind = rng.random()
        if positive:
            colors = (TEAL, MAGENTA) if rng.random() < 0.5 else (MAGENTA, TEAL)
            image = _view(rng, size, tuple(_jitter(rng, c) for c in (*colors, YELLOW)))
        elif kind < 0.4:
            image = scene_images[i]
        elif kind < 0.7:
            image = _view(rng, size, _look_alike_colors(rng))
        elif kind < 0.85:
            image = _view(rng, size, (TEAL, MAGENTA, YELLOW), petals=False)
        else:
            image = _speckle(rng, size)
        images.append(image)
        labels.append(float(positive))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return _degrade(x, torch.Generator().manual_seed(seed)), torch.tensor(labels)


def _degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random blur (down- and up-sampling) and noise per image, as decoded samples have."""
    n, _, size, _ = x.shape
    out = []
    for i in range(n):
        img = x[i : i + 1]
        factor = float(torch.empty(1).uniform_(1.0, 2.5, generator=g))
        if factor > 1.2:
            small = F.interpolate(img, size=int(size / factor), mode="bilinear", antialias=True)
            img = F.interpolate(small, size=size, mode="bilinear")
        amp = float(torch.empty(1).uniform_(0.0, 0.08, generator=g))
        out.append(img + amp * (torch.rand(img.shape, generator=g) * 2 - 1))
    return torch.cat(out).clamp(0, 1)


def train_judge(out: Path, n: int = 6000, epochs: int = 8, width: int = 16, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x, y = judge_data(n, seed)
    test_x, test_y = judge_data(1000, seed + 1)
    net = JudgeNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * (n // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, n, (64,), generator=g)
        batch = x[idx]
        flip = torch.rand(64, generator=g) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(3), batch)
        loss = F.binary_cross_entropy_with_logits(net(batch), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step}/{steps} loss {float(loss):.4f}", flush=True)
    net.eval()
    with torch.no_grad():
        pred = torch.sigmoid(net(test_x)) >= 0.5
    positives, negatives = test_y == 1, test_y == 0
    results = {
        "held_out_images": len(test_y),
        "true_positive_rate": float(pred[positives].float().mean()),
        "true_negative_rate": float((~pred[negatives]).float().mean()),
    }
    config = {"size": 64, "width": width, "threshold": 0.5, "samples": n, "epochs": epochs}
    config["results"] = results

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in net.state_dict().items()}, tmp / "model.safetensors"
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    save_folder(out, write)
    print(f"held-out: {results}; saved {out}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", default=str(JUDGE), help="folder to write")
    parser.add_argument("--samples", type=int, default=6000, help="training images")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_judge(Path(args.out), args.samples, args.epochs, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
