"""Pretrain the starter ViT (assets/starter-vit) from scratch on procedural scenes.

A timm VisionTransformer (32x32 input, 4x4 patches, width 192, depth 6, 3 heads) learns every
attribute of a scene at once, one linear head per attribute: shape (7, with a bar), object
color (8), background color (8), texture (3), size (3), count (1-6), position (single objects:
anywhere, four quadrants, center) and direction (bars: four 45-degree bins). Those are what
peftkit's built-in tasks ask (counting, location, orientation, shape, color), so features
transfer, while the fine-tuning data (other shapes, palettes and backgrounds) still differs.

    python -m peftkit.assets.recipes.train_starter_vit --minutes 1.5 --out assets/starter-vit

The folder holds config.json (timm architecture, kwargs, normalization), model.safetensors (the
backbone without a classifier), heads.safetensors (the pretraining heads), train_log.txt and
recipe.json. `peftkit.vision.backbones.create_backbone("starter", num_classes=...)` loads it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .recipe_run import (
    Budget,
    RunLog,
    autocast,
    folder_megabytes,
    lr_factor,
    pick_device,
    save_folder,
)
from .shapes import COLOR_NAMES, IGNORE, POSITIONS, SIZES, TEXTURES, VIT_SHAPES, ShapeScenes, take

ASSETS = Path(__file__).resolve().parent.parent
HEADS = {
    "shape": len(VIT_SHAPES),
    "color": len(COLOR_NAMES),
    "bg": len(COLOR_NAMES),
    "texture": len(TEXTURES),
    "size": len(SIZES),
    "count": 6,
    "position": len(POSITIONS),
    "angle": 4,
}
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass
class ViTRecipe:
    """Every setting of a run; written to recipe.json next to the weights."""

    minutes: float = 1.5
    steps: int | None = None
    batch: int = 512
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup: int = 300
    pool: int = 500_000
    noise: float = 0.08
    seed: int = 0
    log_every: int = 100
    eval_scenes: int = 4096
    architecture: str = "vit_tiny_patch16_224"
    model_kwargs: dict = field(
        default_factory=lambda: dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3)
    )

    @classmethod
    def tiny(cls, **overrides) -> ViTRecipe:
        base = dict(
            batch=8,
            pool=256,
            warmup=2,
            log_every=1,
            eval_scenes=16,
            model_kwargs=dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
        )
        return cls(**{**base, **overrides})


class MultiHead(nn.Module):
    """The ViT's pooled features -> one linear classifier per scene attribute."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(
            {k: nn.Linear(backbone.num_features, n) for k, n in HEADS.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {k: head(features) for k, head in self.heads.items()}


def build_backbone(recipe: ViTRecipe) -> nn.Module:
    import timm

    return timm.create_model(
        recipe.architecture, pretrained=False, num_classes=0, **recipe.model_kwargs
    )


def _inputs(scenes: ShapeScenes, p: dict, device) -> torch.Tensor:
    mean, std = (
        torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
        torch.tensor(STD, device=device).view(1, 3, 1, 1),
    )
    return (scenes.render(p, device) - mean) / std


@torch.no_grad()
def evaluate_heads(
    model: MultiHead, scenes: ShapeScenes, params: dict, device, batch: int = 512
) -> dict[str, float]:
    """Top-1 (%) of every head on held-out scenes (positions/directions only where they apply)."""
    model.eval()
    labels = scenes.labels(params)
    correct = {k: 0 for k in HEADS}
    total = {k: 0 for k in HEADS}
    for start in range(0, len(params["shape"]), batch):
        idx = torch.arange(start, min(start + batch, len(params["shape"])))
        with autocast(device):
            logits = model(_inputs(scenes, take(params, idx), device))
        for k in HEADS:
            y = labels[k][idx].to(device)
            keep = y != IGNORE
            correct[k] += int((logits[k].argmax(-1)[keep] == y[keep]).sum())
            total[k] += int(keep.sum())
    model.train()
    return {k: 100.0 * correct[k] / max(total[k], 1) for k in HEADS}


def train_starter_vit(
    recipe: ViTRecipe, out: Path, device: torch.device, log_path: Path | None = None
) -> dict:
    """Pretrain and write the backbone folder `out`; returns the results (also in recipe.json)."""
    torch.manual_seed(recipe.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    work = Path(tempfile.mkdtemp(prefix="starter-vit-"))
    log_path = log_path or work / "train_log.txt"
    log = RunLog(log_path)
    start = time.perf_counter()
    log(f"starter-vit recipe on {device}: {json.dumps(asdict(recipe))}")
    size = recipe.model_kwargs["img_size"]
    scenes = ShapeScenes(size=size, shapes=VIT_SHAPES, max_count=6, rotate=True, noise=recipe.noise)
    pool = {k: v.to(device) for k, v in scenes.params(recipe.pool, recipe.seed).items()}
    labels = {k: v.to(device) for k, v in scenes.labels(pool).items()}
    held_out = scenes.params(recipe.eval_scenes, recipe.seed + 10_000)
    model = MultiHead(build_backbone(recipe)).to(device)
    n_params = sum(p.numel() for p in model.backbone.parameters())
    log(f"backbone parameters: {n_params}; heads {HEADS}")
    decay = [
        p
        for n, p in model.named_parameters()
        if p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n
    ]
    rest = [
        p
        for n, p in model.named_parameters()
        if not (p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n)
    ]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )
    budget = Budget(recipe.minutes, recipe.steps)
    gen = torch.Generator(device=device).manual_seed(recipe.seed)
    step, avg = 0, None
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * lr_factor(step, budget.progress(step), recipe.warmup)
        idx = torch.randint(0, recipe.pool, (recipe.batch,), device=device, generator=gen)
        x = _inputs(scenes, take(pool, idx), device)
        with autocast(device):
            logits = model(x)
        loss = sum(
            F.cross_entropy(logits[k].float(), labels[k][idx], ignore_index=IGNORE) for k in HEADS
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % recipe.log_every == 0 or budget.done(step):
            value = float(loss.detach())
            avg = value if avg is None else 0.9 * avg + 0.1 * value
            log(
                f"vit step {step} loss {value:.4f} (avg {avg:.4f}) lr {opt.param_groups[0]['lr']:.2e} "
                f"{budget.elapsed():.0f}s {step * recipe.batch / max(budget.elapsed(), 1e-9):.0f} img/s"
            )
    accuracy = evaluate_heads(model, scenes, held_out, device)
    log("held-out top-1 per head: " + ", ".join(f"{k} {v:.1f}" for k, v in accuracy.items()))
    results = {
        "steps": step,
        "final_loss": avg,
        "train_seconds": budget.elapsed(),
        "images_seen": step * recipe.batch,
        "held_out_top1": accuracy,
        "parameters": n_params,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "total_seconds": time.perf_counter() - start,
    }
    log(f"done in {results['total_seconds']:.0f}s; saving to {out}")
    log.close()
    save_backbone(out, model, recipe, results, log_path)
    shutil.rmtree(work, ignore_errors=True)
    results["folder_mb"] = folder_megabytes(out)
    print(f"saved {out} ({results['folder_mb']:.1f} MB)", flush=True)
    return results


def save_backbone(
    dest: Path, model: MultiHead, recipe: ViTRecipe, results: dict, log_path: Path
) -> Path:
    from safetensors.torch import save_file

    config = {
        "format": "peftkit-starter-vit",
        "architecture": recipe.architecture,
        "model_kwargs": recipe.model_kwargs,
        "mean": list(MEAN),
        "std": list(STD),
        "num_features": model.backbone.num_features,
        "pretraining_heads": HEADS,
    }

    def write(tmp: Path) -> None:
        def cpu(module: nn.Module) -> dict[str, torch.Tensor]:
            return {
                k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()
            }

        save_file(cpu(model.backbone), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(cpu(model.heads), str(tmp / "heads.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "recipe.json").write_text(
            json.dumps({"recipe": asdict(recipe), "results": results}, indent=2)
        )
        if log_path.is_file():
            (tmp / "train_log.txt").write_text(log_path.read_text())

    return save_folder(dest, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(ASSETS / "starter-vit"), help="backbone folder to write"
    )
    parser.add_argument(
        "--minutes", type=float, default=ViTRecipe.minutes, help="wall-clock budget"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="fixed step count instead of the clock"
    )
    parser.add_argument("--batch", type=int, default=ViTRecipe.batch)
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT at 16x16 (smoke test)")
    parser.add_argument("--log", default=None, help="also keep the training log here")
    args = parser.parse_args(argv)
    settings = dict(minutes=args.minutes, steps=args.steps, seed=args.seed)
    recipe = ViTRecipe.tiny(**settings) if args.tiny else ViTRecipe(batch=args.batch, **settings)
    train_starter_vit(
        recipe, Path(args.out), pick_device(args.device), Path(args.log) if args.log else None
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
