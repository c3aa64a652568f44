"""Control-branch and IP-Adapter training steps on an SD1.5-shaped UNet (random weights), 512 px
(64x64 latents), frozen parts in bf16, trained weights in fp32 under bf16 autocast, AdamW.

    python bench/control.py --out bench/results/<run> [--bs 4] [--variants floor,peftkit-control-full,...]

Variants, each measured in its own try/except so one failure costs one row:
- floor: the frozen UNet alone, forward + input-gradient backward (what any adapter must pay).
- peftkit-control-full / peftkit-control-lora: ControlTask.loss (the trainer's step) with the
  copied encoder trained fully / through LoRA r=64 on the copy.
- diffusers-controlnet: the same step written directly with diffusers' ControlNetModel.
- peftkit-ip-adapter / peftkit-ip-adapter-plus: IPAdapterTask.loss with peftkit's processors.
- diffusers-ip-adapter: the same step through diffusers' IPAdapterAttnProcessor2_0 and image
  projection, loaded from peftkit's weights with `_load_ip_adapter_weights`.
Before timing, peftkit's outputs are checked against diffusers' (fp32, rel. error < 1e-4).
Median of 20 steps after 5 warm-up steps, CUDA events; peak memory over the timed steps.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, rel_error, time_step, write_results  # noqa: E402
from models import SD15_UNET  # noqa: E402

IMAGE_EMBED = 1024  # OpenCLIP ViT-H/14 pooled embedding, the SD1.5 IP-Adapter's encoder
PLUS_TOKENS = (257, 1280)  # its penultimate-layer tokens
VARIANTS = [
    "floor",
    "peftkit-control-full",
    "peftkit-control-lora",
    "diffusers-controlnet",
    "peftkit-ip-adapter",
    "peftkit-ip-adapter-plus",
    "diffusers-ip-adapter",
]


def make_unet(dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SD15_UNET)
    return unet.to(dtype).requires_grad_(False)


def fake_base(unet) -> SimpleNamespace:
    """What the tasks read from a DiffusionBase, without a VAE or text encoder (the caches are random)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return SimpleNamespace(
        unet=unet,
        kind="sd",
        pipe=SimpleNamespace(vae_scale_factor=8),
        noise_scheduler=lambda: scheduler,
    )


def cache(bs: int) -> dict[str, torch.Tensor]:
    g = torch.Generator("cuda").manual_seed(0)
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    return dict(
        mean=r(bs, 4, 64, 64),
        std=r(bs, 4, 64, 64).abs() * 0.05,
        text=r(bs, 77, 768),
        empty_text=r(1, 77, 768),
        conditions=torch.rand(bs, 3, 512, 512, device="cuda", generator=g),
        embeds=r(bs, IMAGE_EMBED),
        tokens=r(bs, *PLUS_TOKENS),
    )


def control_task(unet, mode: str, data: dict, half: bool = True):
    from peftkit.diffusion.control import DEFAULT_TARGETS, ControlConfig, ControlTask

    adapter = (
        {"method": "lora", "targets": list(DEFAULT_TARGETS), "r": 64} if mode == "lora" else {}
    )
    with torch.device(
        "cuda"
    ):  # build the copy on the GPU: initializing it on the CPU takes seconds
        task = ControlTask(fake_base(unet), [], ControlConfig(mode=mode, adapter=adapter))
    if half:
        task.cast_frozen(torch.bfloat16)
    task.mean, task.std, task.text, task.conditions = (
        data["mean"],
        data["std"],
        data["text"],
        data["conditions"],
    )
    return task


def ip_task(unet, variant: str, data: dict):
    from peftkit.diffusion.ip_adapter import IPAdapterConfig
    from peftkit.diffusion.ip_adapter_task import IPAdapterTask

    dim = IMAGE_EMBED if variant == "basic" else PLUS_TOKENS[1]
    config = IPAdapterConfig(variant=variant, num_tokens=4 if variant == "basic" else 16)
    task = IPAdapterTask(fake_base(unet), [], config, SimpleNamespace(embed_dim=dim))
    task.adapter.cuda()
    task.mean, task.std, task.text, task.empty_text = (
        data["mean"],
        data["std"],
        data["text"],
        data["empty_text"],
    )
    task.extra, task.empty_extra = {}, {}
    task.embeds = data["embeds"] if variant == "basic" else data["tokens"]
    task.negative = torch.zeros_like(task.embeds[:1])
    return task


def diffusers_ip_unet(unet, adapter):
    """`unet` with diffusers' IP-Adapter processors and projection holding `adapter`'s weights."""
    tensors = adapter.file_tensors()
    state = {
        "image_proj": {k[11:]: v for k, v in tensors.items() if k.startswith("image_proj.")},
        "ip_adapter": {k[11:]: v for k, v in tensors.items() if k.startswith("ip_adapter.")},
    }
    unet._load_ip_adapter_weights([state])
    params = [p for n, p in unet.named_parameters() if "encoder_hid_proj" in n or "_ip" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return unet, params


def noisy(data: dict, scheduler):
    idx = torch.arange(data["mean"].shape[0], device="cuda")
    latents = data["mean"][idx] + data["std"][idx] * torch.randn_like(data["mean"])
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (latents.shape[0],), device="cuda")
    return scheduler.add_noise(latents, noise, t), t, noise


def check_parity(bs: int) -> dict[str, float]:
    """peftkit vs diffusers on one fp32 forward (batch 1): the control residuals through the UNet and
    the IP-Adapter UNet output."""
    from diffusers import ControlNetModel

    data = {k: v[:1] for k, v in cache(bs).items()}
    unet = make_unet(torch.float32)
    x, t = data["mean"], torch.tensor([500], device="cuda")
    task = control_task(unet, "full", data, half=False)
    with torch.no_grad():
        for p in task.controlnet.controlnet_down_blocks.parameters():
            p.normal_(0, 0.02)
        ours = task.model(x, t, data["text"], data["conditions"])
        with torch.device("cuda"):
            reference = ControlNetModel.from_unet(unet)
        reference.load_state_dict(task.controlnet.state_dict())
        down, mid = reference(x, t, data["text"], data["conditions"], return_dict=False)
        theirs = unet(
            x,
            t,
            data["text"],
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
    control = rel_error(ours, theirs)
    del task, reference
    unet = make_unet(torch.float32)
    task = ip_task(unet, "basic", data)
    with torch.no_grad():
        ours = task.model(x, t, data["text"], data["embeds"])
        ref_unet, _ = diffusers_ip_unet(make_unet(torch.float32), task.adapter)
        theirs = ref_unet(
            x, t, data["text"], added_cond_kwargs={"image_embeds": [data["embeds"][:, None]]}
        ).sample
    ip = rel_error(ours, theirs)
    assert control < 1e-4 and ip < 1e-4, (
        f"parity failed: control {control:.2e}, ip-adapter {ip:.2e}"
    )
    return {"control_rel_error": control, "ip_adapter_rel_error": ip}


def build_step(variant: str, bs: int):
    """(step function, trainable parameters) for one variant."""
    from diffusers import ControlNetModel

    data = cache(bs)
    unet = make_unet(torch.bfloat16)
    scheduler = fake_base(unet).noise_scheduler()
    idx = torch.arange(bs, device="cuda")
    if variant == "floor":

        def loss():
            x, t, noise = noisy(data, scheduler)
            x.requires_grad_(True)
            return F.mse_loss(unet(x.bfloat16(), t, data["text"].bfloat16()).sample.float(), noise)

        return loss, []
    if variant.startswith("peftkit-control"):
        task = control_task(unet, variant.rsplit("-", 1)[1], data)
        return (lambda: task.loss(task.model, idx)), task.trainable_parameters()
    if variant == "diffusers-controlnet":
        with torch.device("cuda"):
            controlnet = ControlNetModel.from_unet(unet).float()

        def loss():
            x, t, noise = noisy(data, scheduler)
            down, mid = controlnet(x, t, data["text"], data["conditions"], return_dict=False)
            out = unet(
                x.bfloat16(),
                t,
                data["text"].bfloat16(),
                down_block_additional_residuals=[d.bfloat16() for d in down],
                mid_block_additional_residual=mid.bfloat16(),
            ).sample
            return F.mse_loss(out.float(), noise)

        return loss, list(controlnet.parameters())
    if variant.startswith("peftkit-ip-adapter"):
        task = ip_task(unet, "plus" if variant.endswith("plus") else "basic", data)
        return (lambda: task.loss(task.model, idx)), task.trainable_parameters()
    if variant == "diffusers-ip-adapter":
        from peftkit.diffusion.ip_adapter import IPAdapter, IPAdapterConfig

        adapter = IPAdapter(
            unet, IPAdapterConfig(), IMAGE_EMBED
        ).cuda()  # weights only; not installed
        ref_unet, params = diffusers_ip_unet(unet, adapter)

        def loss():
            x, t, noise = noisy(data, scheduler)
            out = ref_unet(
                x.bfloat16(),
                t,
                data["text"].bfloat16(),
                added_cond_kwargs={"image_embeds": [data["embeds"][:, None]]},
            ).sample
            return F.mse_loss(out.float(), noise)

        return loss, params
    raise ValueError(f"unknown variant {variant!r}: choose from {VARIANTS}")


def measure(variant: str, bs: int) -> dict:
    loss_fn, params = build_step(variant, bs)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    ms, peak = time_step(step, warmup=5, repeats=20)
    row = dict(
        variant=variant,
        bs=bs,
        ms=round(ms, 2),
        peak_gib=round(peak + torch.cuda.memory_allocated() / 2**30, 2),
        trainable_m=round(sum(p.numel() for p in params) / 1e6, 2),
    )
    del loss_fn, params, opt
    return row


def table(rows: list[dict]) -> str:
    by = {r["variant"]: r for r in rows if "ms" in r}
    floor = by.get("floor", {}).get("ms")
    refs = {
        "peftkit-control-full": "diffusers-controlnet",
        "peftkit-control-lora": "diffusers-controlnet",
        "peftkit-ip-adapter": "diffusers-ip-adapter",
        "peftkit-ip-adapter-plus": "diffusers-ip-adapter",
    }
    lines = [
        "| variant | batch | step ms | vs floor | vs diffusers | peak GiB | trainable M |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['variant']} | {r['bs']} | error: {r['error'][:80]} | | | | |")
            continue
        ref = by.get(refs.get(r["variant"], ""), {}).get("ms")
        vs_floor = f"{r['ms'] / floor:.2f}x" if floor else "-"
        vs_ref = f"{r['ms'] / ref:.2f}x" if ref else "-"
        lines.append(
            f"| {r['variant']} | {r['bs']} | {r['ms']:.1f} | {vs_floor} | {vs_ref} | {r['peak_gib']:.2f} | "
            f"{r['trainable_m']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = (
        False  # parity in true fp32; bf16 timings are unaffected
    )
    torch.backends.cudnn.allow_tf32 = False
    meta = {**environment(), "unet": "SD1.5-shaped, random weights", "resolution": 512}
    print(meta, flush=True)
    try:
        meta["parity"] = check_parity(args.bs)
    except Exception as exc:  # noqa: BLE001 - reported, and the timings still run
        meta["parity"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    print("parity:", meta["parity"], flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    rows = []
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        try:
            row = measure(variant, args.bs)
        except Exception as exc:  # noqa: BLE001 - one failure must not cost the whole GPU run
            row = dict(variant=variant, bs=args.bs, error=f"{type(exc).__name__}: {exc}"[:400])
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(row, flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    markdown = table(rows)
    print(markdown)
    write_results(
        args.out,
        "control",
        rows,
        "# Control branch and IP-Adapter training steps\n\n" + markdown,
        meta,
    )


if __name__ == "__main__":
    main()
