"""Base models for concept training: Stable Diffusion 1.x/2.x and SDXL pipelines from a hub id, a
local diffusers folder, or the starter model in assets/, plus the choice of attention backend.

    base = load_base("./sd15")                  # or "runwayml/stable-diffusion-v1-5", or "starter"
    hidden, extra = base.encode_prompt(["a photo of sks dog"])
    pred = base.predict(base.unet, noisy_latents, t, hidden, extra)

`encode_prompt` and `predict` hide the one difference trainers care about: SDXL conditions the UNet
on two text encoders plus a pooled embedding and the image size ("added_cond_kwargs").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..common_kernels.errors import PeftkitError

STARTER = Path(__file__).resolve().parent.parent / "assets" / "starter-sd"
SUPPORTED = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}


@dataclass
class DiffusionBase:
    """A loaded pipeline and what kind it is ("sd" or "sdxl"); `source` is the id or folder given."""

    pipe: object
    kind: str
    source: str

    @property
    def unet(self) -> nn.Module:
        return self.pipe.unet

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    @property
    def text_encoders(self) -> list[nn.Module]:
        encoders = [self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)]
        return [e for e in encoders if e is not None]

    @property
    def native_resolution(self) -> int:
        """The pixel size the model was trained at: UNet sample size x VAE downscale (512 for SD
        1.x, 1024 for SDXL, 64 for the starter)."""
        return int(self.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    @property
    def tokenizers(self) -> list:
        tokenizers = [self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None)]
        return [t for t in tokenizers if t is not None]

    def noise_scheduler(self):
        """The DDPM training schedule with the sampler's betas and prediction type."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    def tokenize(self, texts: list[str]) -> list[torch.Tensor]:
        """Token ids for each tokenizer, padded to its max length."""
        return [
            tok(
                texts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tok in self.tokenizers
        ]

    def encode_ids(
        self,
        ids: list[torch.Tensor],
        encoders: list[nn.Module] | None = None,
        resolution: int = 512,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """UNet conditioning from token ids: per-token states and, for SDXL, the added conditions."""
        encoders = encoders or self.text_encoders
        if self.kind == "sd":
            return encoders[0](ids[0].to(encoders[0].device))[0], {}
        states, pooled = [], None
        for encoder, token_ids in zip(encoders, ids):
            out = encoder(token_ids.to(encoder.device), output_hidden_states=True)
            # SDXL reads the penultimate layer of both encoders and the projected pooled output of the second.
            states.append(out.hidden_states[-2])
            pooled = out[0]
        size = torch.tensor(
            [resolution, resolution, 0, 0, resolution, resolution], dtype=states[0].dtype
        )
        time_ids = size.to(states[0].device).expand(states[0].shape[0], -1)
        return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}

    def encode_prompt(
        self, texts: list[str], resolution: int = 512
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.encode_ids(self.tokenize(texts), resolution=resolution)

    @staticmethod
    def predict(
        unet: nn.Module,
        noisy: torch.Tensor,
        t: torch.Tensor,
        hidden: torch.Tensor,
        extra: dict[str, torch.Tensor],
    ) -> torch.Tensor:
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
    """Load an SD 1.x/2.x or SDXL pipeline from a local folder, a hub id, or "starter" (assets/).

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
    set_attention_backend(pipe.unet, attention)
    return DiffusionBase(pipe=pipe, kind=SUPPORTED[name], source=model)


def _check_supported(name: str, model: str) -> None:
    if name not in SUPPORTED:
        raise PeftkitError(f"{model!r} is a {name}; concept training supports {sorted(SUPPORTED)}")


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
