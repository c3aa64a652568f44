"""Training an IP-Adapter with the shared engine: cached latents, text and image embeddings, and
the paper's conditioning dropout (image, text or both dropped per sample). A step's random numbers
come from the task's own stream, drawn outside the part the engine can capture as a CUDA graph."""

from __future__ import annotations

import torch
from torch import nn

from ..common_kernels.training.random_stream import RandomStream
from .image_encoder import ImageEncoder
from .ip_adapter import IPAdapter, IPAdapterConfig, IPAdapterUNet
from .objective import prediction_loss, process_denoising_targets, rows_of_process
from .pairs import encode_latents, fixed_loss, load_pixels, open_image


class IPAdapterTask:
    """Engine task: noise-prediction MSE with decoupled cross-attention on cached latents, text and
    image embeddings; image, text or both dropped per sample (the paper's 0.05 each)."""

    def __init__(
        self,
        base,
        examples,
        config: IPAdapterConfig,
        encoder: ImageEncoder,
        resolution: int = 512,
        seed: int = 0,
    ) -> None:
        """`base`: a DiffusionBase (diffusion.base.load_base), SD 1.x/2.x or SDXL. `seed` draws the
        adapter's initial weights and seeds the task's random stream (noise, timesteps, dropout)."""
        self.base, self.examples, self.config, self.encoder, self.resolution = (
            base,
            examples,
            config,
            encoder,
            resolution,
        )
        self.seed, self.stream = seed, RandomStream(seed)
        base.unet.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.adapter = IPAdapter(base.unet, config, encoder.embed_dim)
        self.model = IPAdapterUNet(base.unet, self.adapter)
        self.scheduler = base.noise_scheduler()
        self.rank, self.world = 0, 1  # set by prepare() under DDP

    def dataset(self) -> list[int]:
        return list(range(len(self.examples)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.parameters())

    def prepare(self, accelerator) -> None:
        device = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.stream = RandomStream(self.seed, device)
        pixels, _ = load_pixels(self.examples, self.resolution, with_conditions=False)
        frozen = [self.base.vae, *self.base.text_encoders]
        for module in frozen:
            module.to(device)
        self.encoder.to(device)
        with torch.no_grad():
            self.mean, self.std = (t.to(device) for t in encode_latents(self.base.vae, pixels))
            self.text, self.extra = self.base.encode_prompt(
                [e.text for e in self.examples], self.resolution
            )
            self.empty_text, self.empty_extra = self.base.encode_prompt([""], self.resolution)
            images = [open_image(e.image, e.where) for e in self.examples]
            self.embeds = torch.cat(
                [self.encoder.encode(images[i : i + 16]) for i in range(0, len(images), 16)]
            )
            self.negative = self.encoder.negative()
        if device.type != "cpu":
            for module in (*frozen, self.encoder):
                module.to("cpu")
        if accelerator.mixed_precision in ("bf16", "fp16"):
            self.base.unet.to(
                torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
            )
            self.adapter.float()  # trained weights stay fp32; autocast runs them in half precision

    def draw(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(rows, drop image, drop text, x_t, t, target) of `batch`, drawn from the task's stream;
        like the noise, the dropout is drawn for the whole global batch and this process's slice
        kept (objective.process_denoising_targets)."""
        idx = batch.to(self.mean.device)
        c = self.config
        with self.stream.drawing():
            r = torch.rand(idx.shape[0] * self.world, device=idx.device)[
                rows_of_process(idx.shape[0], self.rank, self.world)
            ]
            noisy, t, target, _ = process_denoising_targets(
                self.scheduler, self.mean, self.std, idx, self.rank, self.world
            )
        drop_image = (r < c.drop_image) | (
            (r >= c.drop_image + c.drop_text) & (r < c.drop_image + c.drop_text + c.drop_both)
        )
        drop_text = (r >= c.drop_image) & (r < c.drop_image + c.drop_text + c.drop_both)
        return idx, drop_image, drop_text, noisy, t, target

    def drawn_loss(self, model, drawn: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The loss of drawn inputs: a pure function of tensors, which the engine can capture."""
        idx, drop_image, drop_text, noisy, t, target = drawn

        def pick(drop: torch.Tensor, empty: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
            return torch.where(drop.view(-1, *([1] * (full.dim() - 1))), empty, full)

        embeds = pick(drop_image, self.negative, self.embeds[idx])
        text = pick(drop_text, self.empty_text, self.text[idx])
        extra = {k: pick(drop_text, self.empty_extra[k], v[idx]) for k, v in self.extra.items()}
        return prediction_loss(model(noisy, t, text, embeds, extra), target, None).mean()

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        return self.drawn_loss(model, self.draw(batch))

    def evaluate(self, model) -> dict[str, float]:
        return {"loss": fixed_loss(self, model)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach() for k, v in self.adapter.state_dict().items()}
        return {**state, "rng.stream": self.stream.state}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "rng.stream" in state:
            self.stream.state = state["rng.stream"].to(torch.uint8)
        self.adapter.load_state_dict({k: v for k, v in state.items() if k != "rng.stream"})
