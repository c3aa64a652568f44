"""What bench/e2e.py runs against: random-weight SD1.5- and SDXL-shaped pipelines saved as diffusers
folders, an instance-image folder, a VTAB-1k-layout folder of procedural JPEGs, and the plain
timm + peft training loop the `vit-train` command is compared with. Each entry point runs as its
own process (`python bench/e2e_workloads.py <what> ...`), so the benchmark process never holds a
CUDA context that nvidia-smi would count against the commands it measures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import SD15_UNET  # noqa: E402

TOKENIZER = HERE.parent / "assets" / "starter-sd" / "tokenizer"
CONCEPT_IMAGES = HERE.parent / "assets" / "samples" / "concept"
PEFT_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"  # vit-train's default sites

SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# CLIP ViT-L/14's text tower (SD1.5, SDXL's first encoder) and OpenCLIP bigG's (SDXL's second).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
# CPU smoke sizes (tests/conftest.py's tiny pipeline, 2x downsampling VAE).
TINY_UNET = dict(
    sample_size=32,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
)
TINY_VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    sample_size=64,
)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)


def _tokenizer():
    from transformers import CLIPTokenizer

    # assets/starter-sd's byte-level BPE: every word encodes offline; SD's 77-token context.
    return CLIPTokenizer.from_pretrained(str(TOKENIZER), model_max_length=77)


def _text_encoder(tokenizer, shape: dict, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{"hidden_act": "quick_gelu", "projection_dim": 768, **shape},
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_pipeline(out: Path, kind: str, tiny: bool) -> None:
    """A `kind` ('sd15' | 'sdxl') pipeline with random weights, saved with save_pretrained."""
    import diffusers

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    unet = TINY_UNET if tiny else SD15_UNET
    if kind == "sdxl":
        unet = SDXL_UNET
        if tiny:  # the same block types at tiny widths; the added embedding sizes follow them
            unet = {**SDXL_UNET, "sample_size": 32, "block_out_channels": (32, 64, 64)}
            unet.update(transformer_layers_per_block=1, attention_head_dim=(2, 4, 4))
            unet.update(cross_attention_dim=64, addition_time_embed_dim=8)
            unet.update(projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = TINY_VAE if tiny else SD15_VAE
    if kind == "sdxl" and not tiny:
        vae = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
    # random init on the GPU takes seconds where the CPU takes minutes (SDXL: 3.5B parameters)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        parts = dict(
            unet=diffusers.UNet2DConditionModel(**unet),
            vae=diffusers.AutoencoderKL(**vae),
            text_encoder=_text_encoder(tokenizer, TINY_CLIP if tiny else CLIP_L),
        )
        if kind == "sdxl":
            second = {**TINY_CLIP, "projection_dim": 32} if tiny else CLIP_G
            parts["text_encoder_2"] = _text_encoder(tokenizer, second, with_projection=True)
    if kind == "sd15":
        scheduler = diffusers.DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        pipe = diffusers.StableDiffusionPipeline(
            **parts,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        scheduler = diffusers.EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        )
        pipe = diffusers.StableDiffusionXLPipeline(
            **parts, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler
        )
    pipe.save_pretrained(out)


def instance_images(out: Path, size: int) -> None:
    """The sample concept photos, resized to the training resolution."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(CONCEPT_IMAGES.glob("*.png")):
        with Image.open(path) as im:
            im.convert("RGB").resize((size, size), Image.BICUBIC).save(out / path.name)


def vtab_folder(out: Path, train: int, test: int, size: int, classes: int = 10) -> None:
    """VTAB-1k layout: train800/val200/train800val200/test lists over procedural JPEGs: the class
    sets the hue under pixel noise, a white square at a random place is a distractor."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(train + test):
        label = int(rng.integers(classes))
        hue = np.array([math.sin(label + k * 2.1) * 0.4 + 0.5 for k in range(3)])
        img = rng.normal(hue, 0.15, (size, size, 3))
        y, x = rng.integers(size - size // 4, size=2)
        img[y : y + size // 4, x : x + size // 4] = 1.0
        name = f"images/{i:05d}.jpg"
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(out / name, quality=90)
        lines.append(f"{name} {label}")
    n_train = train * 4 // 5
    splits = {
        "train800": lines[:n_train],
        "val200": lines[n_train:train],
        "train800val200": lines[:train],
        "test": lines[train:],
    }
    for split, rows in splits.items():
        (out / f"{split}.txt").write_text("\n".join(rows) + "\n")


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path, split: str, transform) -> None:
        rows = [line.rsplit(maxsplit=1) for line in (root / f"{split}.txt").read_text().split("\n")]
        self.items = [(root / p, int(y)) for p, y in (r for r in rows if len(r) == 2)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


def vit_loop(args: argparse.Namespace) -> None:
    """The loop a practitioner writes with timm + peft: LoRA on the same sites, a fresh head,
    torchvision transforms, DataLoader workers with pinned memory, bf16 autocast, AdamW with
    warm-up + cosine, top-1 on the test split after every epoch; results.json like vit-train's."""
    import peft
    import timm
    from torchvision import transforms

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    root = Path(args.data)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.classes, **args.kw)
    size, cfg = model.patch_embed.img_size[0], model.pretrained_cfg
    transform = transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    config = peft.LoraConfig(
        r=8, lora_alpha=8, target_modules=PEFT_TARGETS, modules_to_save=["head"]
    )
    model = peft.get_peft_model(model, config).to(device)
    loader_args = dict(
        num_workers=args.workers, pin_memory=cuda, persistent_workers=args.workers > 0
    )
    train = torch.utils.data.DataLoader(
        _ListDataset(root, "train800val200", transform),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        **loader_args,
    )
    test = torch.utils.data.DataLoader(
        _ListDataset(root, "test", transform), batch_size=args.batch_size, **loader_args
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, fused=cuda)
    total = args.epochs * len(train)
    warmup = max(1, min(total - 1, 10 * len(train)))  # vit-train: 10 epochs, capped by the run
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cuda)
    epochs, start = [], time.perf_counter()
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        for images, labels in train:
            images, labels = (
                images.to(device, non_blocking=True),
                labels.to(device, non_blocking=True),
            )
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        model.eval()
        correct = seen = 0
        with torch.no_grad(), autocast:
            for images, labels in test:
                logits = model(images.to(device, non_blocking=True))
                correct += int((logits.argmax(-1).cpu() == labels).sum())
                seen += labels.numel()
        epochs.append(
            {"train_s": t1 - t0, "eval_s": time.perf_counter() - t1, "top1": 100 * correct / seen}
        )
    steady = epochs[1:] or epochs  # the first epoch starts the workers and warms the kernels
    train_images = len(train) * args.batch_size
    results = {
        "top1": epochs[-1]["top1"],
        "images_per_s": train_images * len(steady) / sum(e["train_s"] for e in steady),
        "seconds": time.perf_counter() - start,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "epochs": epochs,
    }
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "epochs"}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("pipeline")
    b.add_argument("--kind", choices=["sd15", "sdxl"], required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--tiny", action="store_true")
    v = sub.add_parser("vit-loop")
    v.add_argument("--data", required=True)
    v.add_argument("--output", required=True)
    v.add_argument("--model", default="vit_base_patch16_224")
    v.add_argument("--kw", type=json.loads, default={}, help="JSON of timm create_model kwargs")
    v.add_argument("--classes", type=int, default=10)
    v.add_argument("--epochs", type=int, required=True)
    v.add_argument("--batch-size", type=int, default=64)
    v.add_argument("--workers", type=int, default=8)
    args = p.parse_args()
    if args.what == "pipeline":
        build_pipeline(Path(args.out), args.kind, args.tiny)
    else:
        vit_loop(args)


if __name__ == "__main__":
    main()
