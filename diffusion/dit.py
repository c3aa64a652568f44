"""The transformer (DiT) families' side of the denoiser interface `DiffusionBase` delegates to:
what conditions the transformer (`encode`), how it is called (`predict`), which Linear layers the
target presets name. SD3 (Esser et al. 2024, sec. 4): CLIP-L/G penultimate states beside T5's
along the sequence, pooled CLIP outputs; Flux: T5 states, pooled CLIP-L, latents packed 2x2 into
tokens with (0, row, col) position ids, and a guidance embedding on guidance-distilled models.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..common_kernels.errors import PeftkitError

# cuDNN's fused attention is left out of the transformer's steps: on an H200 (torch 2.11) its
# backward over Flux's 4096 + 512 tokens (head dim 128, bf16) fails inside cuDNN and leaves an
# illegal memory access (bench/results/2026-12-02-h200-dit/flux-blocking.log); flash and
# memory-efficient attention run the same step (flux-flash.log).
_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Named groups of transformer Linear layers (diffusers' module names; both families). attn: the
# image stream's q/k/v/out and the context stream's; ff: the MLPs of both streams and of Flux's
# single blocks; all-linear: every Linear inside a block (AdaLN modulations too). conv is empty: the
# concept default attn,ff,conv (a UNet's) trains attn and ff here.
DIT_PRESETS = {
    "conv": [],
    "attn": [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    ],
    "ff": [
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        r"re:single_transformer_blocks\.\d+\.proj_(mlp|out)",
    ],
    "all-linear": [r"re:(single_)?transformer_blocks\.\d+\..*"],
}
# T5 tokens per prompt: the pipelines' default max_sequence_length, so training sees what
# inference feeds the transformer.
T5_LENGTH = {"sd3": 256, "flux": 512}
# diffusers' scripts' --weighting_scheme defaults.
WEIGHTING = {"sd3": "logit_normal", "flux": "none"}


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 latent patch one Flux token."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width`."""
    b, _, d = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Flux's rotary position ids of packed latents: (0, row, col) per token."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)


def encode(
    kind: str, clips: list[nn.Module], ids: list[torch.Tensor], guidance: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Transformer conditioning from CLIP token ids (`ids[:-1]`) and T5's cached states
    (`ids[-1]`): (per-token states, {"pooled_projections"[, "guidance"]})."""
    t5 = ids[-1]
    if kind == "flux":
        clip = clips[0]
        pooled = clip(ids[0].to(clip.device), output_hidden_states=False).pooler_output
        extra = {"pooled_projections": pooled}
        if guidance is not None:
            extra["guidance"] = torch.full((t5.shape[0],), guidance, device=pooled.device)
        return t5.to(pooled.device, pooled.dtype), extra
    states, pooled = [], []
    for clip, token_ids in zip(clips, ids[:-1]):
        out = clip(token_ids.to(clip.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])  # the penultimate layer, as the pipeline reads it
        pooled.append(out[0])  # the projected pooled output
    clip_states = torch.cat(states, dim=-1)
    t5 = t5.to(clip_states.device, clip_states.dtype)
    # CLIP's states are zero-padded to T5's width, then both streams share the sequence.
    clip_states = nn.functional.pad(clip_states, (0, t5.shape[-1] - clip_states.shape[-1]))
    return torch.cat([clip_states, t5], dim=-2), {"pooled_projections": torch.cat(pooled, dim=-1)}


def predict(
    kind: str,
    transformer: nn.Module,
    noisy: torch.Tensor,
    t: torch.Tensor,
    hidden: torch.Tensor,
    extra: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The velocity the transformer predicts for latents `noisy` (B, C, H, W) at timesteps `t`
    (noise level x 1000), in the latents' layout."""
    with sdpa_kernel(_ATTENTION):
        return _predict(kind, transformer, noisy, t, hidden, extra)


def _predict(kind, transformer, noisy, t, hidden, extra) -> torch.Tensor:
    pooled = extra["pooled_projections"].to(noisy.dtype)
    if kind == "sd3":
        return transformer(
            hidden_states=noisy,
            timestep=t,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    h, w = noisy.shape[-2:]
    guidance = extra.get("guidance")
    out = transformer(
        hidden_states=pack_latents(noisy),
        timestep=t / 1000,  # Flux embeds the noise level and scales it by 1000 itself
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=hidden,
        txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
        img_ids=image_ids(h, w, noisy.device, noisy.dtype),
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w)


def fsdp_blocks(base, method: str) -> list[nn.Module]:
    """The FSDP units of a concept run on `base`: the transformer's blocks, each with its LoRA.
    Only LoRA is tested sharded: LoKr and OFT can build all layers' deltas in one batched pass
    outside the blocks (bench/NOTES.md), where their parameters are still shards."""
    if not base.is_transformer:
        raise PeftkitError(
            "FSDP shards SD3/Flux transformers; a UNet's adapter trains with DDP: launch "
            "without --fsdp / --use_fsdp"
        )
    if method != "lora":
        raise PeftkitError(
            f"FSDP trains LoRA on SD3/Flux, not {method!r}: use --method lora, or launch without "
            "--fsdp / --use_fsdp (DDP)"
        )
    transformer = base.unet
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]


def gather_whole(model: nn.Module) -> None:
    """Every FSDP unit in `model` gathered whole and left so (a collective: every process calls
    it), so its adapters save as plain tensors; nothing happens to a model FSDP did not shard."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
