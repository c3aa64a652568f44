"""Zero-conv control branch (ControlNet; Zhang, Rao & Agrawala, 2023, arXiv:2302.05543), eq. (4):

    y_c = F(x; Θ) + Z(F(x + Z(c; Θ_z1); Θ_c); Θ_z2)

F is the frozen UNet, F(.; Θ_c) a trainable copy of its encoder (down blocks + mid block), c the
condition image through a small conditioning encoder, Z zero-initialized convolutions. The branch
outputs one residual per skip connection plus one for the mid block, each multiplied by the
conditioning scale and added to the frozen UNet's. Because every Z starts at zero, each residual
is exactly 0 at initialization and the UNet output is unchanged bit for bit, for any condition.

The branch is a diffusers `ControlNetModel` built with `from_unet` (the copy and the zero init
are checked here), so saving is `save_pretrained` and the folder loads in diffusers as is. The
light variant ("lora" mode) freezes the copied encoder and trains an adapter of any core on it
(plus the conditioning encoder and the zero convs); saving folds the adapter into the copy, so
that folder too is a plain ControlNetModel.

    >>> task = ControlTask(load_base("./sd15"), load_pairs("pairs.jsonl"), ControlConfig(mode="lora"))  # doctest: +SKIP
    >>> train(task, task.dataset(), TrainConfig(steps=1000))            # doctest: +SKIP
    >>> save_control(task.controlnet, "out/control", task.handle)       # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..common_kernels.config import AdapterConfig
from ..common_kernels.errors import PeftkitError
from ..common_kernels.inject import AdapterHandle, inject
from ..common_kernels.training.fsdp import copy_whole_, full_tensors, is_sharded
from ..common_kernels.training.random_stream import RandomStream
from .objective import prediction_loss, process_denoising_targets
from .pairs import PairExample, encode_latents, fixed_loss, load_pixels

ADAPTER_NAME = "control"
# The copied encoder; the conditioning encoder and the zero convs always train fully.
DEFAULT_TARGETS = [r"re:down_blocks\..*", r"re:mid_block\..*"]
SIDECAR = "peftkit_control.json"


@dataclass
class ControlConfig:
    """`mode`: "full" trains the copied encoder, "lora" trains `adapter` (an AdapterConfig dict, any
    core; default LoRA r=8 on the copy) instead. `conditioning_scale` multiplies the residuals."""

    mode: str = "full"
    adapter: dict = field(default_factory=dict)
    conditioning_scale: float = 1.0
    condition_from: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("full", "lora"):
            raise PeftkitError(f"ControlConfig.mode must be 'full' or 'lora', got {self.mode!r}")
        if self.mode == "lora" and not self.adapter:
            self.adapter = {"method": "lora", "targets": list(DEFAULT_TARGETS), "r": 8}
        if self.adapter:
            self.adapter_config()  # validates early, with the adapter config's own messages
        if not math.isfinite(self.conditioning_scale) or self.conditioning_scale < 0:
            raise PeftkitError(
                f"ControlConfig.conditioning_scale must be >= 0, got {self.conditioning_scale}"
            )

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig.from_dict(self.adapter)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> ControlConfig:
        return ControlConfig(**json.loads(text))


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Channels of the conditioning encoder: one stride-2 stage per factor of 2 between pixels and
    latents, widths as in the paper's SD1.5 branch (16, 32, 96, 256)."""
    stages = int(round(math.log2(vae_scale_factor)))
    if 2**stages != vae_scale_factor or stages < 0:
        raise PeftkitError(f"the VAE scale factor must be a power of 2, got {vae_scale_factor}")
    widths = [16, 32, 96, 256]
    while len(widths) < stages + 1:
        widths.append(256)
    return tuple(widths[: stages + 1])


def build_control_branch(unet, vae_scale_factor: int = 8):
    """A ControlNetModel whose encoder copies `unet`'s and whose output convs are zero."""
    from diffusers import ControlNetModel

    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise PeftkitError(
            "control-branch training supports UNets without added embeddings (SD 1.x/2.x); "
            "this UNet (SDXL-like) needs text/time embeddings the trainer does not build"
        )
    from ..common_kernels.inject import adapted_layers

    if adapted_layers(unet):
        raise PeftkitError(
            "the UNet carries peftkit adapters: build the control branch from the plain base UNet "
            "(attach adapters after, or merge them into a saved base first)"
        )
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=conditioning_channels(vae_scale_factor)
    )
    zero = [
        controlnet.controlnet_mid_block,
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    if any(p.abs().max() != 0 for m in zero for p in m.parameters()):
        raise PeftkitError(
            "diffusers built a ControlNet whose output convs are not zero; the branch would change "
            "the base at step 0: install a diffusers version whose from_unet zero-initializes them"
        )
    return controlnet


def add_control_adapter(controlnet, adapter: AdapterConfig) -> AdapterHandle:
    """Freeze the copied encoder behind an adapter; keep the conditioning encoder and zero convs trainable."""
    handle = inject(controlnet, adapter, name=ADAPTER_NAME)
    for module in (
        controlnet.controlnet_cond_embedding,
        controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
    ):
        for p in module.parameters():
            p.requires_grad_(True)
    return handle


class ControlledUNet(nn.Module):
    """Frozen UNet + control branch: noise prediction given the condition image (pixels in [0, 1])."""

    def __init__(self, unet, controlnet) -> None:
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        condition: torch.Tensor,
        scale: float = 1.0,
    ) -> torch.Tensor:
        down, mid = self.controlnet(
            sample, timestep, text, condition, conditioning_scale=scale, return_dict=False
        )
        dtype = self.unet.dtype
        return self.unet(
            sample.to(dtype),
            timestep,
            text.to(dtype),
            down_block_additional_residuals=[d.to(dtype) for d in down],
            mid_block_additional_residual=mid.to(dtype),
        ).sample


class ControlTask:
    """Engine task: noise-prediction MSE of the controlled UNet on cached (latents, text, condition).
    A step is `draw` (latent draws, noise and timesteps from the task's own random stream, made
    eagerly) then `drawn_loss`, so a CUDA-graphed step trains what an eager one does."""

    def __init__(
        self,
        base,
        examples: list[PairExample],
        config: ControlConfig,
        resolution: int = 512,
        extractor=None,
        seed: int = 0,
    ) -> None:
        """`base`: a DiffusionBase (diffusion.base.load_base) of kind "sd". `seed` draws the branch's
        freshly initialized layers (the condition encoder, the adapter) and seeds the task's random
        stream: the same seed, the same branch and draws, in every process of a launch (FSDP shards
        each process's own copy, so they must agree)."""
        self.base, self.examples, self.config, self.resolution = base, examples, config, resolution
        self.extractor, self.seed = extractor, seed
        self.stream = RandomStream(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.controlnet = build_control_branch(base.unet, base.pipe.vae_scale_factor)
            self.handle = (
                add_control_adapter(self.controlnet, config.adapter_config())
                if config.mode == "lora"
                else None
            )
        base.unet.requires_grad_(False)
        self.model = ControlledUNet(base.unet, self.controlnet)
        self.scheduler = base.noise_scheduler()
        self.rank, self.world = 0, 1  # set by prepare() under DDP/FSDP

    def dataset(self) -> list[int]:
        return list(range(len(self.examples)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.controlnet.parameters() if p.requires_grad]

    def prepare(self, accelerator) -> None:
        device = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.stream = RandomStream(self.seed, device)
        pixels, conditions = load_pixels(self.examples, self.resolution, self.extractor)
        frozen = [self.base.vae, *self.base.text_encoders]
        for module in frozen:
            module.to(device)
        with torch.no_grad():
            self.mean, self.std = (t.to(device) for t in encode_latents(self.base.vae, pixels))
            self.text = self.base.encode_prompt([e.text for e in self.examples], self.resolution)[
                0
            ].float()
        self.conditions = conditions.to(device)
        if device.type != "cpu":
            for module in frozen:  # only the cache is needed from here on
                module.to("cpu")
        if accelerator.mixed_precision in ("bf16", "fp16"):
            self.cast_frozen(
                torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
            )

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Frozen weights (the UNet; the copy under an adapter) in half precision: autocast computes in
        it anyway, and it halves their memory. Trained weights stay fp32 so small updates survive."""
        self.base.unet.to(dtype)
        for p in self.controlnet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)

    def draw(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(rows, x_t, t, target) of `batch`, drawn from the task's stream (under DDP each process
        keeps its slice of the global batch's draws)."""
        idx = batch.to(self.mean.device)
        with self.stream.drawing():
            noisy, t, target, _ = process_denoising_targets(
                self.scheduler, self.mean, self.std, idx, self.rank, self.world
            )
        return idx, noisy, t, target

    def drawn_loss(self, model, drawn: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The loss of drawn inputs: a pure function of tensors, which the engine can capture."""
        idx, noisy, t, target = drawn
        pred = model(noisy, t, self.text[idx], self.conditions[idx], self.config.conditioning_scale)
        return prediction_loss(pred, target, None).mean()

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        return self.drawn_loss(model, self.draw(batch))

    def evaluate(self, model) -> dict[str, float]:
        return {"loss": fixed_loss(self, model)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {n: p.detach() for n, p in self.controlnet.named_parameters() if p.requires_grad}
        return {**state, "rng.stream": self.stream.state}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.controlnet.named_parameters())
        for name, value in state.items():
            if name == "rng.stream":
                self.stream.state = value.to(torch.uint8)
            else:
                copy_whole_(own[name], value)

    def fsdp_blocks(self) -> list[nn.Module]:
        """FSDP units (common_kernels/training/fsdp.py): the UNet's and the branch's down, mid and up blocks;
        the stems, embeddings and zero convs shard together as the root unit."""
        if self.handle is not None:
            raise PeftkitError(
                "FSDP trains the full-copy branch (--mode full); an adapter on the copy is small "
                "enough for DDP: launch without --fsdp"
            )
        unet, branch = self.base.unet, self.controlnet
        blocks = [
            *unet.down_blocks,
            unet.mid_block,
            *unet.up_blocks,
            *branch.down_blocks,
            branch.mid_block,
        ]
        return [b for b in blocks if b is not None]

    def fsdp_frozen(self) -> list[nn.Module]:
        """The frozen UNet: whole on every process under FSDP unless --fsdp-shard-frozen."""
        return [self.base.unet]


def merged_state_dict(controlnet, handle: AdapterHandle | None) -> dict[str, torch.Tensor]:
    """The branch's weights as a plain ControlNetModel state dict, the adapter folded into the copy."""
    state = controlnet.state_dict()
    if handle is None:
        return state
    out = {k: v for k, v in state.items() if ".deltas." not in k}
    for lname, layer in handle.layers.items():
        for pname, value in list(out.items()):
            if pname.startswith(f"{lname}.base."):
                del out[pname]
                out[f"{lname}.{pname[len(lname) + 6 :]}"] = value
        delta = layer.deltas[ADAPTER_NAME]
        weight = layer.base.weight.detach()
        work = weight.to(torch.promote_types(weight.dtype, torch.float32))
        # Kept in fp32 even over a half-precision frozen copy: the saved model is fp32.
        out[f"{lname}.weight"] = delta.merge_weight(work, float(delta.scale))
    return out


def save_control(
    controlnet,
    folder: str | os.PathLike,
    handle: AdapterHandle | None = None,
    config: ControlConfig | None = None,
    base_model: str | None = None,
    write: bool = True,
) -> Path:
    """Write a folder `ControlNetModel.from_pretrained` reads (config.json + safetensors), atomically:
    into a temporary sibling, then renamed over `folder`. A branch sharded by FSDP is gathered whole
    first, which every process must join; only `write` ones write."""
    from diffusers import ControlNetModel

    folder = Path(folder)
    rebuild = handle is not None or any(is_sharded(p) for p in controlnet.parameters())
    if rebuild:  # gathered on every process (a collective under FSDP), before the writer check
        state = full_tensors(
            controlnet.state_dict() if handle is None else merged_state_dict(controlnet, handle)
        )
    if not write:
        return folder
    plain = controlnet
    if rebuild:
        plain = ControlNetModel.from_config(controlnet.config)
        plain.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    sidecar = {
        "config": json.loads(config.to_json()) if config else None,
        "base_model": base_model or "",
    }
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_control(folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """A saved branch (local folder or hub id) as a diffusers ControlNetModel."""
    from diffusers import ControlNetModel

    path = Path(folder)
    if path.exists() and not (path / "config.json").is_file():
        raise PeftkitError(
            f"{path} is not a ControlNet folder (no config.json): pass the folder written by "
            "'peftkit train-control'"
        )
    try:
        return ControlNetModel.from_pretrained(str(folder), torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise PeftkitError(
            f"cannot load a ControlNet from {str(folder)!r} ({type(err).__name__}: {str(err)[:200]}): "
            "pass a folder written by 'peftkit train-control' or a reachable hub id"
        ) from None


@dataclass
class ControlAttachment:
    """A ControlNet pipeline sharing the base pipeline's modules; `kwargs(image)` are its call args."""

    pipe: object
    scale: float = 1.0

    def kwargs(self, image) -> dict:
        return {"image": image, "controlnet_conditioning_scale": self.scale}


def attach_control(pipe, control, scale: float = 1.0) -> ControlAttachment:
    """Wrap `pipe` (StableDiffusion[XL]Pipeline, adapters already applied) with the control branch
    `control` (a folder, a hub id or a ControlNetModel) at conditioning scale `scale`.

    Example:
        >>> att = attach_control(pipe, "out/control", scale=0.8)                  # doctest: +SKIP
        >>> image = att.pipe("a house", **att.kwargs(edges), num_inference_steps=30).images[0]   # doctest: +SKIP
    """
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    controlnet = (
        control if isinstance(control, nn.Module) else load_control(control, dtype=pipe.unet.dtype)
    )
    controlnet.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    cls = (
        StableDiffusionXLControlNetPipeline
        if "XL" in type(pipe).__name__
        else StableDiffusionControlNetPipeline
    )
    return ControlAttachment(cls.from_pipe(pipe, controlnet=controlnet), scale)
