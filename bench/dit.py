"""DiT training step (forward + backward + AdamW) of LoRA / LoKr / OFT on the transformer's attention
projections (the `attn` preset) vs the frozen floor and vs HF peft's same method, in one run.

Shapes (random weights, built from configs, no download), 1024 px, batch 1, bf16 base, fp32 adapters:
- flux: FLUX.1-dev's width (3072, 24 heads x 128, T5 4096, pooled 768, guidance embedding) at
  reduced depth, `--flux-depth` double,single blocks (default 6,12 of 19,38); 4096 packed image
  tokens + 512 text tokens.
- sd3: SD3-medium's shape in full (24 joint blocks of 1536, 24 heads x 64, patch 2); 4096 image
  tokens + 333 text tokens (77 CLIP + 256 T5).
The step is peftkit's flow-matching step (diffusion/dit.py `predict`, velocity target, per-row
loss), captured as one CUDA graph ("graph"; "eager" also on request). The floor is the frozen
transformer with no adapter: forward + input-gradient backward. Peak memory over the timed steps.

    python bench/dit.py --out results/dit                 # on the GPU (needs diffusers, peft)
    python bench/dit.py --cpu-smoke --out /tmp/dit        # tiny shapes on the CPU, eager
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, graphed, time_step, write_results  # noqa: E402

from peftkit.common_kernels import KronConfig, LoRAConfig, OFTConfig, inject  # noqa: E402
from peftkit.common_kernels.oft import cusolver_linalg  # noqa: E402
from peftkit.diffusion import dit  # noqa: E402
from peftkit.diffusion.objective import prediction_loss  # noqa: E402

VARIANTS = "floor,peftkit-lora,peft-lora,peftkit-lokr,peft-lokr,peftkit-oft,peft-oft"
TARGETS = dit.DIT_PRESETS["attn"]


def shapes(flux_depth: tuple[int, int], smoke: bool) -> dict[str, dict]:
    """Per model: its diffusers class, config, latent (C, H, W) and text tokens."""
    if smoke:
        return {
            "flux": dict(
                cls="FluxTransformer2DModel",
                config=dict(
                    in_channels=16,
                    num_layers=1,
                    num_single_layers=1,
                    attention_head_dim=16,
                    num_attention_heads=2,
                    joint_attention_dim=32,
                    pooled_projection_dim=32,
                    guidance_embeds=True,
                    axes_dims_rope=(4, 6, 6),
                ),
                latents=(4, 8, 8),
                text=16,
            ),
            "sd3": dict(
                cls="SD3Transformer2DModel",
                config=dict(
                    sample_size=8,
                    in_channels=4,
                    out_channels=4,
                    num_layers=1,
                    attention_head_dim=8,
                    num_attention_heads=4,
                    joint_attention_dim=64,
                    caption_projection_dim=32,
                    pooled_projection_dim=64,
                    pos_embed_max_size=16,
                ),
                latents=(4, 8, 8),
                text=16,
            ),
        }
    double, single = flux_depth
    return {
        "flux": dict(
            cls="FluxTransformer2DModel",
            config=dict(
                patch_size=1,
                in_channels=64,
                num_layers=double,
                num_single_layers=single,
                attention_head_dim=128,
                num_attention_heads=24,
                joint_attention_dim=4096,
                pooled_projection_dim=768,
                guidance_embeds=True,
                axes_dims_rope=(16, 56, 56),
            ),
            latents=(16, 128, 128),
            text=512,
        ),
        "sd3": dict(
            cls="SD3Transformer2DModel",
            config=dict(
                sample_size=128,
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=24,
                attention_head_dim=64,
                num_attention_heads=24,
                joint_attention_dim=4096,
                caption_projection_dim=1536,
                pooled_projection_dim=2048,
                pos_embed_max_size=192,
            ),
            latents=(16, 128, 128),
            text=333,
        ),
    }


def build(kind: str, shape: dict, bs: int, device: torch.device, dtype: torch.dtype):
    """(transformer, inputs): the frozen model in `dtype` and one step's fixed rows."""
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):
        net = getattr(diffusers, shape["cls"])(**shape["config"]).to(dtype)
    net.requires_grad_(False)
    config = shape["config"]
    g = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(bs, *shape["latents"], device=device, generator=g)
    noise = torch.randn(bs, *shape["latents"], device=device, generator=g)
    sigma = torch.rand(bs, device=device, generator=g)
    s = sigma.view(-1, 1, 1, 1)
    pooled = torch.randn(bs, config["pooled_projection_dim"], device=device, generator=g)
    extra = {"pooled_projections": pooled}
    if config.get("guidance_embeds"):
        extra["guidance"] = torch.full((bs,), 3.5, device=device)
    rows = dict(
        noisy=(1 - s) * latents + s * noise,
        t=sigma * 1000,
        hidden=torch.randn(
            bs, shape["text"], config["joint_attention_dim"], device=device, generator=g
        ),
        extra=extra,
        target=noise - latents,
    )
    return net, rows


def adapt(net, variant: str):
    """(params) after applying `variant` ("floor", "peftkit-lora", "peft-oft", ...) to `net`."""
    if variant == "floor":
        return []
    lib, method = variant.split("-", 1)
    if lib == "peftkit":
        config = {
            "lora": LoRAConfig(targets=TARGETS, r=16, alpha=16),
            "lokr": KronConfig(targets=TARGETS, r=16, alpha=16),
            "oft": OFTConfig(targets=TARGETS, block_size=32),
        }[method]
        return inject(net, config).trainable_parameters()
    from peft import LoKrConfig, LoraConfig, get_peft_model
    from peft import OFTConfig as PeftOFT

    config = {
        "lora": LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS),
        "lokr": LoKrConfig(r=16, alpha=16, target_modules=TARGETS),
        "oft": PeftOFT(r=0, oft_block_size=32, target_modules=TARGETS),
    }[method]
    # peft swaps the layers in place: calling `net` runs its adapters.
    model = get_peft_model(net, config)
    return [p for p in model.parameters() if p.requires_grad]


def train_step(kind, net, rows, params, device, graph: bool = False):
    """One training step of `net` on the fixed `rows`: the floor's input-gradient backward when
    `params` is empty, else backward and a fused AdamW step of `params`."""
    cuda = device.type == "cuda"
    opt = (
        torch.optim.AdamW(params, lr=1e-4, fused=cuda, capturable=graph, foreach=not cuda)
        if params
        else None
    )
    noisy = rows["noisy"].detach().requires_grad_(not params)  # the floor's input gradient

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = dit.predict(
                kind, net, noisy, rows["t"], rows["hidden"].to(net.dtype), rows["extra"]
            )
            loss = prediction_loss(pred, rows["target"], None).mean()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=not graph)

    return step


def measure(kind, shape, variant, mode, bs, device, smoke) -> dict:
    cuda = device.type == "cuda"
    net, rows = build(kind, shape, bs, device, torch.bfloat16 if cuda else torch.float32)
    params = adapt(net, variant)
    for p in params:  # adapters train in fp32 whatever the base dtype (peft's default too)
        p.data = p.data.float()
    graph = mode == "graph"
    step = train_step(kind, net, rows, params, device, graph)

    t0 = time.perf_counter()
    if graph:
        with cusolver_linalg():  # OFT's inverse captured through cuSOLVER (NOTES.md)
            step = graphed(step)
    step()
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    if cuda:
        ms, peak = time_step(step, warmup=3, repeats=15)
        peak_gib = round(peak + torch.cuda.memory_allocated() / 2**30, 2)
    else:
        t1 = time.perf_counter()
        for _ in range(2):
            step()
        ms, peak_gib = (time.perf_counter() - t1) / 2 * 1000, None
    row = dict(
        model=kind,
        variant=variant,
        mode=mode,
        bs=bs,
        ms=round(ms, 2),
        peak_gib=peak_gib,
        first_s=round(first_s, 1),
        trainable=sum(p.numel() for p in params),
        frozen=sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in params),
    )
    del net, params, rows, step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    """Markdown: each row's ms, x of its floor, peft's ms / peftkit's (>1: peftkit faster), peak."""
    floors = {
        (r["model"], r["mode"]): r["ms"] for r in rows if r["variant"] == "floor" and "ms" in r
    }
    by = {(r["model"], r["mode"], r["variant"]): r for r in rows if "ms" in r}
    lines = [
        "| model | mode | variant | ms | x floor | peft / peftkit | peak GiB | trainable |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['variant']} | {r['error']} |||||")
            continue
        floor = floors.get((r["model"], r["mode"]))
        ratio = f"{r['ms'] / floor:.2f}" if floor else ""
        other = by.get((r["model"], r["mode"], r["variant"].replace("peftkit-", "peft-")))
        speed = (
            f"{other['ms'] / r['ms']:.2f}"
            if r["variant"].startswith("peftkit-") and other is not None
            else ""
        )
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['variant']} | {r['ms']} | {ratio} | {speed} | "
            f"{r['peak_gib']} | {r['trainable']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="flux,sd3", help="comma list of flux,sd3")
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--modes", default="graph", help="comma list of graph,eager")
    parser.add_argument("--bs", type=int, default=1)
    parser.add_argument(
        "--flux-depth", default="6,12", help="double,single blocks of the Flux shape (19,38 full)"
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, CPU, eager")
    parser.add_argument(
        "--sdpa",
        default="default",
        help="attention kernels allowed: default (torch's choice) or a comma list of "
        "flash,efficient,cudnn,math",
    )
    parser.add_argument(
        "--deadline", type=float, default=540, help="skip what would start after this many seconds"
    )
    args = parser.parse_args()
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    modes = ["eager"] if smoke else args.modes.split(",")
    depth = tuple(int(v) for v in args.flux_depth.split(","))
    table_of = shapes(depth, smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "dit.jsonl"
    meta = {
        "environment": environment() if not smoke else {"device": "cpu"},
        "shapes": {k: {**v, "config": dict(v["config"])} for k, v in table_of.items()},
        "targets": TARGETS,
        "bs": args.bs,
    }
    print(json.dumps(meta), flush=True)
    start, rows = time.perf_counter(), []
    attention = contextlib.nullcontext  # a fresh context per row: sdpa_kernel's is single-use
    if args.sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }
        allowed = [names[n] for n in args.sdpa.split(",")]
        attention = lambda: sdpa_kernel(allowed)  # noqa: E731
        meta["sdpa"] = args.sdpa
    for kind in args.models.split(","):
        for mode in modes:
            for variant in args.variants.split(","):
                if time.perf_counter() - start > args.deadline:
                    print(f"skip {kind} {mode} {variant}: deadline", flush=True)
                    continue
                try:
                    with attention():
                        row = measure(kind, table_of[kind], variant, mode, args.bs, device, smoke)
                except Exception as exc:  # one failure must not cost the whole GPU run
                    row = dict(
                        model=kind,
                        variant=variant,
                        mode=mode,
                        error=f"{type(exc).__name__}: {exc}"[:400],
                    )
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    write_results(args.out, "dit", rows, table(rows), meta)
    print(table(rows))


if __name__ == "__main__":
    main()
