"""Whole-model training step (forward + backward + AdamW) of each adapter core vs HF peft and the
frozen floor, on an SD1.5-shaped UNet and ViT-B/16, eager and compiled, in one process.

Floor = the frozen model with no adapter: forward + input-gradient backward (the least work any
adapter step can do). "fp32+autocast" keeps fp32 base weights under bf16 autocast (the anchors'
setting, which casts every weight every step); "bf16" stores the frozen base in bf16 (peftkit's
default training path; adapter params stay fp32). Rows are written as they finish, so a run cut
short by its time limit still reports what it measured.

    python bench/train_step.py --model unet --bs 4 --compile none,regional --out results/
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, graphed, time_step  # noqa: E402
from models import UNET_TARGETS, VIT_TARGETS, build, compile_regions  # noqa: E402

from peftkit.common_kernels import (  # noqa: E402
    BOFTConfig,
    DiagOFTConfig,
    DoRAConfig,
    KronConfig,
    LoHaConfig,
    LoRAConfig,
    LycorisBOFTConfig,
    OFTConfig,
    inject,
)
from peftkit.common_kernels.oft import cusolver_linalg  # noqa: E402


def adapt(net, variant: str, targets: list[str]):
    """Apply `variant` ("floor", "peftkit-lora", "peft-oft", ...) and return (model, params)."""
    if variant.startswith("floor"):
        return net, []
    lib, method = variant.split("-", 1)
    if lib == "peftkit":
        # Default "auto" applies LoRA/LoKr in weight space on CUDA; "-f" forces the factored form.
        config = {
            "lora": LoRAConfig(targets=targets, r=16, alpha=16),
            "lora-f": LoRAConfig(targets=targets, r=16, alpha=16, apply="factored"),
            "lokr": KronConfig(targets=targets, r=16, alpha=16),
            "lokr-f": KronConfig(targets=targets, r=16, alpha=16, apply="factored"),
            "oft": OFTConfig(targets=targets, block_size=32),
            "dora": DoRAConfig(targets=targets, r=16, alpha=16),
            "loha": LoHaConfig(targets=targets, r=8, alpha=8),
            "loha-f": LoHaConfig(targets=targets, r=8, alpha=8, apply="factored"),
            "boft": BOFTConfig(targets=targets, block_size=32, n_butterfly_factor=2),
            "diag-oft": DiagOFTConfig(targets=targets, block_size=32),
            "lycoris-boft": LycorisBOFTConfig(targets=targets, block_size=32),
        }[method]
        handle = inject(net, config)
        return net, handle.trainable_parameters()
    from peft import BOFTConfig as PeftBOFT
    from peft import LoHaConfig as PeftLoHa
    from peft import LoKrConfig, LoraConfig, get_peft_model
    from peft import OFTConfig as PeftOFT

    # peft's BOFT builds a CUDA extension for butterfly factors > 1 and falls back to one factor
    # without it: its row's "trainable" count says which one ran (half of ours: the fallback).
    config = {
        "lora": LoraConfig(r=16, lora_alpha=16, target_modules=targets),
        "dora": LoraConfig(r=16, lora_alpha=16, target_modules=targets, use_dora=True),
        "loha": PeftLoHa(r=8, alpha=8, target_modules=targets),
        "boft": PeftBOFT(boft_block_size=32, boft_n_butterfly_factor=2, target_modules=targets),
        "lokr": LoKrConfig(r=16, alpha=16, target_modules=targets),
        "oft": PeftOFT(r=0, oft_block_size=32, target_modules=targets),
    }[method]
    model = get_peft_model(net, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def measure(model_kind: str, bs: int, variant: str, compile_mode: str, base: str) -> dict:
    net, loss_fn = build(model_kind, bs)
    if base == "bf16":
        net = net.to(torch.bfloat16)
    targets = UNET_TARGETS if model_kind == "unet" else VIT_TARGETS
    model, params = adapt(net, variant, targets)
    # Trainable adapter params in fp32 whatever the base dtype (peft does the same by default).
    for p in params:
        p.data = p.data.float()
    graph = compile_mode.endswith("graph")
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True, capturable=graph) if params else None
    if compile_mode.startswith("regional"):
        compile_regions(net, model_kind)
    elif compile_mode.startswith("full"):
        model = torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, not params)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=not graph)

    t0 = time.perf_counter()
    if graph:
        # The whole step as one graph; cuSOLVER while capturing keeps OFT's inverse capturable.
        with cusolver_linalg():
            step = graphed(step)
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    ms, peak = time_step(step, warmup=3, repeats=15)
    row = dict(
        model=model_kind,
        bs=bs,
        variant=variant,
        compile=compile_mode,
        base=base,
        ms=round(ms, 2),
        peak_gib=round(peak + torch.cuda.memory_allocated() / 2**30, 2),
        first_s=round(first_s, 1),
        trainable=sum(p.numel() for p in params),
    )
    del model, net, opt, params
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["unet", "vit"], required=True)
    parser.add_argument("--bs", type=int, required=True)
    parser.add_argument(
        "--compile",
        default="none",
        help="comma list of none,graph,regional,full,full+graph (compile, then capture the step)",
    )
    parser.add_argument("--base", default="bf16", help="comma list of bf16,fp32")
    parser.add_argument(
        "--variants",
        default="floor,peftkit-lora,peft-lora,peftkit-lokr,peft-lokr,peftkit-oft,peft-oft,"
        "peftkit-dora,peft-dora,peftkit-loha,peft-loha,peftkit-boft,peft-boft,peftkit-diag-oft,"
        "peftkit-lycoris-boft",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--deadline", type=float, default=1e9, help="skip what would start after this many seconds"
    )
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.automatic_dynamic_shapes = False
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"train_step-{args.model}-bs{args.bs}.jsonl"
    start = time.perf_counter()
    print(json.dumps(environment()), flush=True)
    for compile_mode in args.compile.split(","):
        for base in args.base.split(","):
            for variant in args.variants.split(","):
                if time.perf_counter() - start > args.deadline:
                    print(f"skip {variant} {compile_mode} {base}: deadline", flush=True)
                    continue
                try:
                    row = measure(args.model, args.bs, variant, compile_mode, base)
                except Exception as exc:  # one failure must not cost the whole GPU run
                    row = dict(
                        model=args.model,
                        bs=args.bs,
                        variant=variant,
                        compile=compile_mode,
                        base=base,
                        error=f"{type(exc).__name__}: {exc}"[:400],
                    )
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch._dynamo.reset()
                print(json.dumps(row), flush=True)
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
