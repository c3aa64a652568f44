"""Base models for concept training: Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux pipelines from a
hub id, a local diffusers folder, or the starter model in assets/, plus the choice of attention backend.

    base = load_base("./sd15")                  # or "runwayml/stable-diffusion-v1-5", or "starter"
    hidden, extra = base.encode_prompt(["a photo of sks dog"])
    pred = base.predict(base.unet, noisy_latents, t, hidden, extra)

`tokenize`, `encode_ids`, `predict` and `noise_scheduler` are the denoiser interface trainers use:
SDXL adds pooled and size conditions ("added_cond_kwargs"); SD3 and Flux run a transformer
(dit.py) trained by flow matching, with T5's output cached in place of its token ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..common_kernels.errors import PeftkitError
from . import dit
from .objective import FlowMatching

STARTER = Path(__file__).resolve().parent.parent / "assets" / "starter-sd"
SUPPORTED = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
TRANSFORMER_KINDS = ("sd3", "flux")


@dataclass
class DiffusionBase:
    """A loaded pipeline and what kind it is ("sd", "sdxl", "sd3" or "flux"); `source` is the id or
    folder given. `guidance`: the guidance embedding value Flux guidance-distilled transformers
    (FLUX.1-dev) train with, diffusers' default."""

    pipe: object
    kind: str
    source: str
    guidance: float = 3.5

    @property
    def unet(self) -> nn.Module:
        """The denoiser adapters train on: the UNet, or the SD3/Flux transformer."""
        return self.pipe.transformer if self.is_transformer else self.pipe.unet

    @property
    def is_transformer(self) -> bool:
        return self.kind in TRANSFORMER_KINDS

    @property
    def component(self) -> str:
        """The denoiser's pipeline attribute, which names it in LoRA files."""
        return "transformer" if self.is_transformer else "unet"

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The CLIP text encoders, which a LoRA may train (SD3/Flux's T5 is `frozen_text_encoders`)."""
        names = ["text_encoder", "text_encoder_2"][: 1 if self.kind == "flux" else 2]
        encoders = [getattr(self.pipe, n, None) for n in names]
        return [e for e in encoders if e is not None]

    @property
    def frozen_text_encoders(self) -> list[nn.Module]:
        """Encoders that never train and whose output `tokenize` caches: SD3/Flux's T5."""
        if not self.is_transformer:
            return []
        return [self.pipe.text_encoder_2 if self.kind == "flux" else self.pipe.text_encoder_3]

    @property
    def native_resolution(self) -> int:
        """The pixel size the model was trained at: the denoiser's sample size x VAE downscale (512
        for SD 1.x, 1024 for SDXL, SD3 and Flux, 64 for the starter)."""
        size = getattr(self.unet.config, "sample_size", None) or self.pipe.default_sample_size
        return int(size) * int(self.pipe.vae_scale_factor)

    @property
    def tokenizers(self) -> list:
        names = ["tokenizer", "tokenizer_2", "tokenizer_3"]
        tokenizers = [getattr(self.pipe, n, None) for n in names]
        return [t for t in tokenizers if t is not None]

    def noise_scheduler(self, weighting_scheme: str = "auto"):
        """The training schedule: DDPM with the sampler's betas and prediction type, or for SD3/Flux
        `FlowMatching` with the given weighting scheme ("auto": the family's diffusers default)."""
        if self.is_transformer:
            scheme = dit.WEIGHTING[self.kind] if weighting_scheme == "auto" else weighting_scheme
            return FlowMatching.of(self.pipe.scheduler.config, scheme)
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    def tokenize(self, texts: list[str]) -> list[torch.Tensor]:
        """Token ids for each tokenizer, padded to its max length. For SD3/Flux the last entry is
        T5's output instead: T5 never trains, so its states are computed here once."""
        ids = [
            tok(
                texts,
                padding="max_length",
                max_length=min(tok.model_max_length, dit.T5_LENGTH.get(self.kind, 10**9)),
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tok in self.tokenizers
        ]
        if self.is_transformer:
            t5 = self.frozen_text_encoders[0]
            with torch.no_grad():
                ids[-1] = t5(ids[-1].to(t5.device))[0].cpu()
        return ids

    def encode_ids(
        self,
        ids: list[torch.Tensor],
        encoders: list[nn.Module] | None = None,
        resolution: int = 512,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Denoiser conditioning from `tokenize`'s output: per-token states and the added
        conditions (SDXL: pooled embedding and size; SD3/Flux: pooled embedding, Flux guidance)."""
        encoders = encoders or self.text_encoders
        if self.is_transformer:
            guidance = (
                self.guidance if getattr(self.unet.config, "guidance_embeds", False) else None
            )
            return dit.encode(self.kind, encoders, ids, guidance)
        if self.kind == "sd":
            return encoders[0](ids[0].to(encoders[0].device))[0], {}
        states, pooled = [], None
        for encoder, token_ids in zip(encoders, ids):
            out = encoder(token_ids.to(encoder.device), output_hidden_states=True)
            # SDXL reads the penultimate layer of both encoders and the projected pooled output of the second.
            states.append(out.hidden_states[-2])
            pooled = out[0]
        # Filled on the device: a copy from the host could not be captured in a training step.
        size = states[0].new_full((6,), resolution)
        size[2:4] = 0
        time_ids = size.expand(states[0].shape[0], -1)
        return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}

    def encode_prompt(
        self, texts: list[str], resolution: int = 512
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.encode_ids(self.tokenize(texts), resolution=resolution)

    def predict(
        self,
        unet: nn.Module,
        noisy: torch.Tensor,
        t: torch.Tensor,
        hidden: torch.Tensor,
        extra: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The denoiser's prediction (noise, v, or SD3/Flux velocity) in the latents' layout."""
        if self.is_transformer:
            return dit.predict(self.kind, unet, noisy, t, hidden, extra)
        kwargs = {"added_cond_kwargs": extra} if extra else {}
        return unet(noisy, t, encoder_hidden_states=hidden, **kwargs).sample


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _local_class(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise PeftkitError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json): save one with "
            "pipe.save_pretrained(folder) or pass a hub id like 'runwayml/stable-diffusion-v1-5'"
        )
    return json.loads(index.read_text())["_class_name"]


def load_base(
    model: str, dtype: torch.dtype = torch.float32, attention: str = "auto"
) -> DiffusionBase:
    """Load an SD 1.x/2.x, SDXL, SD3 or Flux pipeline from a local folder, a hub id, or "starter" (assets/).

    With HF_HUB_OFFLINE=1, or when the hub takes no connection within ~1.5 s, only the local cache
    is used; a hub id missing from it raises a PeftkitError naming the repository and the fixes.

    Example:
        >>> base = load_base("tests/fixtures/tiny-sd")   # doctest: +SKIP
        >>> base.kind
        'sd'
    """
    if model == "starter":
        if not STARTER.is_dir():
            raise PeftkitError(
                f"the starter model is not installed ({STARTER} is missing): pass --model with a "
                "diffusers folder or hub id"
            )
        model = str(STARTER)
    local = Path(model).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    kwargs = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    if local.exists():
        name = _local_class(local)
        _check_supported(name, model)
        pipe = _pipeline_class(name).from_pretrained(str(local), **_drop_unused(name, kwargs))
    else:
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise PeftkitError(
                f"base model {model!r} is neither an existing folder nor a hub id like 'org/name': "
                "check the path"
            )
        from diffusers import DiffusionPipeline

        from ..common_kernels.hub import hub_reachable, unreachable_message

        # offline, only the cache is tried: diffusers would retry the hub for a minute first
        cache_only = offline or not hub_reachable()
        try:
            config = DiffusionPipeline.load_config(model, local_files_only=cache_only)
            name = config["_class_name"]
            _check_supported(name, model)
            pipe = _pipeline_class(name).from_pretrained(
                model, local_files_only=cache_only, **_drop_unused(name, kwargs)
            )
        except (OSError, ValueError) as err:
            if cache_only:
                raise PeftkitError(
                    unreachable_message(
                        model,
                        "model_index.json",
                        f"pass it with --model {'./' + model.split('/')[-1]}, or try "
                        "--model starter (the bundled 64 px model, no download)",
                    )
                ) from None
            raise PeftkitError(
                f"cannot load {model!r} from the Hugging Face hub ({type(err).__name__}: "
                f"{str(err)[:200]}): check the id, or download it with `hf download {model} "
                f"--local-dir ./{model.split('/')[-1]}` and pass that folder"
            ) from None
    pipe.set_progress_bar_config(disable=True)
    base = DiffusionBase(pipe=pipe, kind=SUPPORTED[name], source=model)
    if not base.is_transformer:
        set_attention_backend(pipe.unet, attention)
    elif attention == "xformers":
        # diffusers' SD3/Flux attention processors call PyTorch SDPA already.
        raise PeftkitError(
            "attention backend 'xformers' is for UNets: SD3/Flux transformers run PyTorch SDPA; "
            "use --attention sdpa (or auto)"
        )
    return base


def _check_supported(name: str, model: str) -> None:
    if name not in SUPPORTED:
        raise PeftkitError(
            f"{model!r} is a {name}; concept training supports {sorted(SUPPORTED)}: pass a "
            "Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux pipeline"
        )


def _drop_unused(name: str, kwargs: dict) -> dict:
    # SDXL pipelines have no safety checker arguments.
    return kwargs if name == "StableDiffusionPipeline" else {"dtype": kwargs["dtype"]}


def xformers_available() -> bool:
    try:
        import xformers  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def set_attention_backend(unet: nn.Module, backend: str = "auto") -> str:
    """ "sdpa" (PyTorch scaled_dot_product_attention), "xformers" (needs xformers and CUDA), or "auto"
    (xformers when usable, else SDPA). Returns the backend set."""
    if backend not in ("auto", "sdpa", "xformers"):
        raise PeftkitError(
            f"attention backend must be 'auto', 'sdpa' or 'xformers', got {backend!r}"
        )
    if backend == "auto":
        backend = "xformers" if xformers_available() else "sdpa"
    if backend == "xformers":
        if not xformers_available():
            raise PeftkitError(
                "attention backend 'xformers' needs the xformers package and a CUDA GPU: "
                "pip install xformers, or use --attention sdpa"
            )
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    return backend
