"""IP-Adapter (Ye et al., 2023, arXiv:2308.06721), eq. (5): decoupled cross-attention

    Z = Attention(Q, K_text, V_text) + lambda * Attention(Q, K_ip, V_ip),   K_ip = c_i W'_k, V_ip = c_i W'_v

in every cross-attention layer of a frozen UNet: the query is shared, only W'_k / W'_v (`to_k_ip`,
`to_v_ip`) and the image projection that turns an image embedding into the tokens c_i train.
Projections: "basic" maps the pooled CLIP image embedding to N tokens (linear + LayerNorm); "plus"
reads the penultimate layer's patch tokens through a small Perceiver resampler (4 blocks of
latents cross-attending to [tokens; latents], then a feed-forward).

With lambda = 0 the image branch is skipped, so the UNet computes exactly what its default
processor computes. Files use the layout of diffusers' `load_ip_adapter` (keys "image_proj.*"
and "ip_adapter.<2j+1>.to_{k,v}_ip.weight" for the j-th cross-attention layer in
`unet.attn_processors` order), so generation can run on diffusers' own processors.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..common_kernels.adapter_file import read_tensors, save_tensors
from ..common_kernels.errors import PeftkitError
from .image_encoder import ImageEncoder

DIM_HEAD = 64  # diffusers infers the resampler's heads as to_q.out_features // 64
PLUS_DEPTH = 4  # ... and builds it with 4 blocks and a 4x feed-forward, whatever the file holds


@dataclass
class IPAdapterConfig:
    """`variant`: "basic" (N = `num_tokens` tokens from the pooled embedding; diffusers reads N = 4)
    or "plus" (`num_tokens` resampler queries of width `resampler_dim` with `resampler_heads` heads
    of 64). Dropout probabilities follow the paper: the image alone, the text alone, or both are
    replaced by their empty version, which trains classifier-free guidance on either prompt."""

    variant: str = "basic"
    num_tokens: int = 4
    resampler_dim: int = 768
    resampler_heads: int = 12
    drop_image: float = 0.05
    drop_text: float = 0.05
    drop_both: float = 0.05
    image_encoder: str = ""

    def __post_init__(self) -> None:
        if self.variant not in ("basic", "plus"):
            raise PeftkitError(
                f"IPAdapterConfig.variant must be 'basic' or 'plus', got {self.variant!r}"
            )
        for name in ("num_tokens", "resampler_dim", "resampler_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise PeftkitError(
                    f"IPAdapterConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}"
                )
        probs = (self.drop_image, self.drop_text, self.drop_both)
        if any(not 0 <= p < 1 for p in probs) or sum(probs) >= 1:
            raise PeftkitError(
                f"IPAdapterConfig drop_image/drop_text/drop_both must be in [0, 1) with a sum < 1, "
                f"got {probs}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> IPAdapterConfig:
        return IPAdapterConfig(**json.loads(text))


class ImageTokens(nn.Module):
    """basic projection: (B, D_img) -> (B, N, D_cross)."""

    def __init__(self, embed_dim: int, cross_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(embed_dim, num_tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.num_tokens, -1))


class PerceiverAttention(nn.Module):
    """Latents attend to [image tokens; latents] (Flamingo's Perceiver resampler, Alayrac et al. 2022)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * DIM_HEAD, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * DIM_HEAD, bias=False)
        self.to_out = nn.Linear(heads * DIM_HEAD, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        split = lambda t: t.unflatten(-1, (self.heads, DIM_HEAD)).transpose(1, 2)  # noqa: E731
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(split(self.to_q(latents)), split(k), split(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class Resampler(nn.Module):
    """plus projection: (B, L, D_img) patch tokens -> (B, Q, D_cross)."""

    def __init__(
        self, embed_dim: int, cross_dim: int, dim: int, heads: int, num_queries: int
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embed_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim, heads),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, 4 * dim, bias=False),
                        nn.GELU(),
                        nn.Linear(4 * dim, dim, bias=False),
                    ),
                ]
            )
            for _ in range(PLUS_DEPTH)
        )
        self.proj_out = nn.Linear(dim, cross_dim)
        self.norm_out = nn.LayerNorm(cross_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(tokens)
        latents = self.latents.expand(tokens.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class DecoupledAttnProcessor(nn.Module):
    """A diffusers attention processor computing eq. (5); reads the image tokens set on it by
    `IPAdapterUNet` for the duration of one UNet call."""

    def __init__(self, hidden_size: int, cross_dim: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, hidden_size, bias=False)
        self.scale = 1.0
        self.tokens: torch.Tensor | None = None

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kwargs,
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        heads = lambda t: t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # noqa: E731
        query = heads(query)
        out = F.scaled_dot_product_attention(
            query, heads(key), heads(value), attn_mask=attention_mask
        )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if self.tokens is not None and self.scale != 0:
            tokens = self.tokens.to(query.dtype)
            image = F.scaled_dot_product_attention(
                query, heads(self.to_k_ip(tokens)), heads(self.to_v_ip(tokens))
            )
            out = out + self.scale * image.transpose(1, 2).reshape(
                batch, -1, attn.heads * head_dim
            ).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(unet) -> list[tuple[str, int]]:
    """(processor name, hidden size) of every cross-attention layer, in `attn_processors` order."""
    channels = list(unet.config.block_out_channels)
    layers = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = channels[::-1][int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        layers.append((name, hidden))
    return layers


class IPAdapter(nn.Module):
    """The trainable part: image projection + one (to_k_ip, to_v_ip) pair per cross-attention layer."""

    def __init__(self, unet, config: IPAdapterConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        cross = unet.config.cross_attention_dim
        if config.variant == "basic":
            self.image_proj = ImageTokens(embed_dim, cross, config.num_tokens)
        else:
            self.image_proj = Resampler(
                embed_dim, cross, config.resampler_dim, config.resampler_heads, config.num_tokens
            )
        self.names = [name for name, _ in cross_attention_layers(unet)]
        self.processors = nn.ModuleList(
            DecoupledAttnProcessor(h, cross) for _, h in cross_attention_layers(unet)
        )

    def install(self, unet) -> None:
        """Route the UNet's cross-attention layers through the decoupled processors."""
        procs = dict(unet.attn_processors)
        procs.update(zip(self.names, self.processors))
        unet.set_attn_processor(procs)

    def set_scale(self, scale: float) -> None:
        for p in self.processors:
            p.scale = float(scale)

    def set_tokens(self, tokens: torch.Tensor | None) -> None:
        for p in self.processors:
            p.tokens = tokens

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Weights keyed as diffusers' `load_ip_adapter` reads them."""
        out = {f"image_proj.{k}": v for k, v in self.image_proj.state_dict().items()}
        for j, proc in enumerate(self.processors):
            out[f"ip_adapter.{2 * j + 1}.to_k_ip.weight"] = proc.to_k_ip.weight
            out[f"ip_adapter.{2 * j + 1}.to_v_ip.weight"] = proc.to_v_ip.weight
        return out

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], path) -> None:
        own = self.file_tensors()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        bad = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
        if missing or unexpected or bad:
            raise PeftkitError(
                f"IP-Adapter file {path} does not fit this UNet/image encoder (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, wrong shape {bad[:3]}): use the base model and image "
                "encoder it was trained with"
            )
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(tensors[key])


class IPAdapterUNet(nn.Module):
    """Frozen UNet with the adapter installed: noise prediction given image embeddings."""

    def __init__(self, unet, adapter: IPAdapter) -> None:
        super().__init__()
        self.unet, self.adapter = unet, adapter
        adapter.install(unet)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        image_embeds: torch.Tensor,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`extra`: SDXL's added conditions (pooled text embedding, size ids); empty for SD 1.x/2.x."""
        self.adapter.set_tokens(self.adapter.image_proj(image_embeds))
        try:
            dtype = self.unet.dtype
            kwargs = {"added_cond_kwargs": extra} if extra else {}
            return self.unet(sample.to(dtype), timestep, text.to(dtype), **kwargs).sample
        finally:
            self.adapter.set_tokens(None)


def save_ip_adapter(
    adapter: IPAdapter, path: str | os.PathLike, base_model: str | None = None
) -> Path:
    """One safetensors file, atomically; metadata holds the peftkit config."""
    from .. import __version__

    metadata = {
        "peftkit_version": __version__,
        "method": "ip_adapter",
        "config": adapter.config.to_json(),
        "base_model": base_model or "",
    }
    return save_tensors(path, adapter.file_tensors(), metadata)


def load_ip_adapter(unet, path: str | os.PathLike) -> IPAdapter:
    """peftkit's processors from a saved file (not installed; wrap in IPAdapterUNet to use)."""
    tensors, metadata = read_tensors(path)
    if "config" not in metadata or metadata.get("method") != "ip_adapter":
        raise PeftkitError(
            f"{path} is not a peftkit IP-Adapter file: load third-party files with attach_ip_adapter"
        )
    config = IPAdapterConfig.from_json(metadata["config"])
    key = "image_proj.proj.weight" if config.variant == "basic" else "image_proj.proj_in.weight"
    adapter = IPAdapter(unet, config, embed_dim=tensors[key].shape[1])
    adapter.load_file_tensors(tensors, path)
    return adapter.to(device=unet.device)


@dataclass
class IPAdapterAttachment:
    """A pipeline running an IP-Adapter through diffusers' processors; `kwargs(image)` are its call args."""

    pipe: object
    encoder: ImageEncoder

    def kwargs(self, image, guidance: bool = True) -> dict:
        """`ip_adapter_image_embeds` for one reference image; `guidance` must match the pipeline's
        classifier-free guidance (guidance_scale > 1), which puts the "no image" row first."""
        embeds = self.encoder.encode([image])
        if guidance:
            embeds = torch.cat([self.encoder.negative().expand_as(embeds), embeds])
        unet = self.pipe.unet
        return {"ip_adapter_image_embeds": [embeds[:, None].to(unet.device, unet.dtype)]}


def attach_ip_adapter(
    pipe,
    path: str | os.PathLike,
    scale: float = 1.0,
    image_encoder: ImageEncoder | str | None = None,
) -> IPAdapterAttachment:
    """Load an IP-Adapter file into `pipe` (any Stable Diffusion pipeline with IPAdapterMixin, other
    adapters and a control branch may already be attached) at image-prompt scale `scale`.

    Example:
        >>> att = attach_ip_adapter(pipe, "out/ip-adapter.safetensors", scale=0.6)       # doctest: +SKIP
        >>> image = att.pipe("a dog", **att.kwargs(reference)).images[0]                 # doctest: +SKIP
    """
    path = Path(path)
    tensors, metadata = read_tensors(path)
    config = (
        IPAdapterConfig.from_json(metadata["config"])
        if metadata.get("method") == "ip_adapter"
        else None
    )
    variant = "basic" if "image_proj.proj.weight" in tensors else "plus"
    if (
        variant == "basic"
        and tensors["image_proj.proj.weight"].shape[0] != 4 * pipe.unet.config.cross_attention_dim
    ):
        raise PeftkitError(
            f"{path} projects to {tensors['image_proj.proj.weight'].shape[0] // pipe.unet.config.cross_attention_dim}"
            " tokens but diffusers' load_ip_adapter reads 4: train the basic variant with num_tokens=4"
        )
    if not isinstance(image_encoder, ImageEncoder):
        source = image_encoder or (config.image_encoder if config else "")
        image_encoder = ImageEncoder(source, variant, device=pipe.unet.device)
    pipe.load_ip_adapter(
        str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None
    )
    pipe.set_ip_adapter_scale(scale)
    return IPAdapterAttachment(pipe, image_encoder)
