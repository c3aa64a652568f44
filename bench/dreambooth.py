"""DreamBooth training step on an SD1.5-shaped UNet (random weights, 512 px = 64x64 latents, bf16):
peftkit LoRA / LoKr / OFT against the same step written the way diffusers' train_dreambooth_lora
example writes it (unet.add_adapter(peft config), trainable params cast to fp32), and the frozen
floor (no adapter: forward + input-gradient backward), eager and compiled, batch 1 and 4, in one run.

One step = what ConceptTask.loss does with cached latents and text embeddings (a fresh latent draw
from the cached posterior, noise, timesteps, add_noise, UNet, MSE to eps) + backward + grad-norm
clip + AdamW, identical for every variant. Medians of >= 15 steps after warm-up, CUDA events;
peak memory over the timed steps. Before timing, peftkit LoRA and diffusers+peft LoRA loaded with
the same weights must give the same UNet output (bf16 tolerance).

    python bench/dreambooth.py --out bench/results/dreambooth
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, rel_error, time_step, write_results  # noqa: E402
from models import REGIONS, SD15_UNET, UNET_TARGETS  # noqa: E402

from peftkit.common_kernels import KronConfig, LoRAConfig, OFTConfig, inject  # noqa: E402
from peftkit.diffusion.objective import denoising_loss, sample_latents  # noqa: E402

RANK = 16
VARIANTS = [
    "floor",
    "peftkit-lora",
    "diffusers-lora",
    "peftkit-lokr",
    "diffusers-lokr",
    "peftkit-oft",
    "diffusers-oft",
]


def ddpm():
    from diffusers import DDPMScheduler

    # SD1.5's training schedule, written out so nothing is downloaded.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


_TEMPLATE: list = []


def build_unet():
    """A fresh copy of one randomly initialized bf16 UNet (initializing SD1.5's 860M parameters
    costs seconds per variant; copying the template costs milliseconds)."""
    from diffusers import UNet2DConditionModel

    if not _TEMPLATE:
        torch.manual_seed(0)
        with torch.device("cuda"):
            unet = UNet2DConditionModel(**SD15_UNET)
        _TEMPLATE.append(unet.requires_grad_(False).to(torch.bfloat16))
    return copy.deepcopy(_TEMPLATE[0])


def adapt(unet, variant: str) -> list[torch.nn.Parameter]:
    """Add the variant's adapter; returns its trainable parameters (fp32)."""
    if variant == "floor":
        return []
    lib, method = variant.split("-")
    if lib == "peftkit":
        config = {
            "lora": LoRAConfig(targets=UNET_TARGETS, r=RANK, alpha=RANK),
            "lokr": KronConfig(targets=UNET_TARGETS, r=RANK, alpha=RANK),
            "oft": OFTConfig(targets=UNET_TARGETS, block_size=32),
        }[method]
        return inject(unet, config).trainable_parameters()
    from peft import LoKrConfig, LoraConfig
    from peft import OFTConfig as PeftOFT

    # As in diffusers' examples/dreambooth/train_dreambooth_lora.py: add_adapter, then fp32 trainable params.
    config = {
        "lora": LoraConfig(
            r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=UNET_TARGETS
        ),
        "lokr": LoKrConfig(r=RANK, alpha=RANK, target_modules=UNET_TARGETS),
        "oft": PeftOFT(r=0, oft_block_size=32, target_modules=UNET_TARGETS),
    }[method]
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def inputs(bs: int) -> dict[str, torch.Tensor]:
    g = torch.Generator("cuda").manual_seed(1)
    return {
        "mean": torch.randn(bs, 4, 64, 64, device="cuda", generator=g),
        "std": torch.rand(bs, 4, 64, 64, device="cuda", generator=g) * 0.1,
        "hidden": torch.randn(bs, 77, 768, device="cuda", generator=g),
    }


def make_step(model, params, scheduler, data):
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(data["mean"].device)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    floor = not params

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            latents = sample_latents(data["mean"], data["std"]).requires_grad_(floor)
            loss = denoising_loss(
                lambda x, t: model(x, t, encoder_hidden_states=data["hidden"]).sample,
                scheduler,
                latents,
            ).mean()
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def compile_unet(unet, mode: str):
    if mode == "regional":
        for module in unet.modules():
            if type(module).__name__ in REGIONS["unet"]:
                module.compile()
        return unet
    if mode == "full":
        return torch.compile(unet)
    return unet


def measure(bs: int, variant: str, mode: str) -> dict:
    unet = build_unet()
    params = adapt(unet, variant)
    model = compile_unet(unet, mode)
    step = make_step(model, params, ddpm(), inputs(bs))
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    ms, peak = time_step(step, warmup=3, repeats=15)
    row = dict(
        bs=bs,
        variant=variant,
        compile=mode,
        ms=round(ms, 2),
        first_s=round(first_s, 1),
        peak_gib=round(peak + torch.cuda.memory_allocated() / 2**30, 2),
        trainable=sum(p.numel() for p in params),
    )
    del unet, model, params, step
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


@torch.no_grad()
def parity() -> float:
    """peftkit LoRA and diffusers+peft LoRA holding the same A, B give the same UNet output."""
    data = inputs(1)
    t = torch.tensor([500], device="cuda")
    ours, theirs = build_unet(), build_unet()
    handle = inject(ours, LoRAConfig(targets=UNET_TARGETS, r=RANK, alpha=RANK))
    adapt(theirs, "diffusers-lora")
    g = torch.Generator("cuda").manual_seed(2)
    modules = dict(theirs.named_modules())
    for name, layer in handle.layers.items():
        delta = layer.deltas["default"]
        delta.B.normal_(0, 0.02, generator=g)
        modules[name].lora_A["default"].weight.copy_(delta.A)
        modules[name].lora_B["default"].weight.copy_(delta.B)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = ours(data["mean"], t, encoder_hidden_states=data["hidden"]).sample
        b = theirs(data["mean"], t, encoder_hidden_states=data["hidden"]).sample
    err = rel_error(a, b)
    assert err < 2e-2, f"peftkit LoRA and diffusers+peft LoRA disagree: rel. error {err:.3g}"
    del ours, theirs
    gc.collect()
    torch.cuda.empty_cache()
    return err


def table(rows: list[dict]) -> str:
    """Markdown: each row's time, its ratio to the frozen floor and (peftkit rows) to diffusers+peft
    with the same core, batch and compile mode."""
    ms = {(r["bs"], r["compile"], r["variant"]): r["ms"] for r in rows if "ms" in r}
    lines = [
        "| bs | compile | variant | ms/step | x floor | x diffusers+peft | peak GiB | trainable | first step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['bs']} | {r['compile']} | {r['variant']} |"
        if "ms" not in r:
            lines.append(f"{head} error: {r['error'][:80]} | | | | | |")
            continue
        floor = ms.get((r["bs"], r["compile"], "floor"))
        ref = (
            ms.get((r["bs"], r["compile"], "diffusers-" + r["variant"].split("-")[-1]))
            if r["variant"].startswith("peftkit")
            else None
        )
        ratio = lambda other: f"{r['ms'] / other:.2f}" if other else "-"  # noqa: E731
        lines.append(
            f"{head} {r['ms']:.1f} | {ratio(floor)} | {ratio(ref)} | {r['peak_gib']:.2f} | "
            f"{r['trainable']:,} | {r['first_s']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bs", default="1,4")
    parser.add_argument(
        "--compile", default="none,regional", help="comma list of none, regional, full"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--deadline",
        type=float,
        default=330.0,
        help="skip configs starting after this many seconds",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/dreambooth.py needs a CUDA GPU")
    torch._dynamo.config.cache_size_limit = 64
    start = time.perf_counter()
    meta = {
        **environment(),
        "rank": RANK,
        "latents": "4x64x64",
        "dtype": "bf16 base, fp32 adapters, bf16 autocast",
    }
    meta["parity_rel_error"] = parity()
    print(json.dumps(meta), flush=True)
    rows = []
    for mode in args.compile.split(","):
        for bs in (int(b) for b in args.bs.split(",")):
            for variant in args.variants.split(","):
                if time.perf_counter() - start > args.deadline:
                    rows.append(
                        dict(bs=bs, variant=variant, compile=mode, error="skipped: deadline")
                    )
                    continue
                try:
                    row = measure(bs, variant, mode)
                except Exception as exc:  # one failing config must not cost the whole GPU run
                    row = dict(
                        bs=bs,
                        variant=variant,
                        compile=mode,
                        error=f"{type(exc).__name__}: {exc}"[:300],
                    )
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch._dynamo.reset()
                rows.append(row)
                print(json.dumps(row), flush=True)
    markdown = table(rows)
    write_results(args.out, "dreambooth", rows, markdown, meta)
    print(markdown)


if __name__ == "__main__":
    main()
