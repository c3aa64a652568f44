"""The denoising objectives concept trainers share (DreamBooth, Textual Inversion).

Ho et al. 2020, eq. 14: L = || target - eps_theta(x_t, t) ||^2 with
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; target = eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
for v-prediction schedules (Salimans & Ho 2022).

Options:
- min-SNR-gamma weighting (Hang et al. 2023, eq. 9): w_t = min(SNR_t, gamma) / SNR_t for epsilon
  targets, min(SNR_t, gamma) / (SNR_t + 1) for v targets; SNR_t = abar_t / (1 - abar_t).
- offset noise (Guttenberg 2023): eps + o * n with n ~ N(0, 1) of shape (B, C, 1, 1), so the model
  can learn to shift an image's mean brightness.

Rectified flow (SD3 and Flux; Esser et al. 2024, eq. 1-3 and sec. 3.1): x_t = (1 - s) x_0 + s eps,
target v = eps - x_0, with the noise level s drawn logit-normal, by the mode density, or uniformly
(`FlowMatching`), as diffusers' SD3/Flux DreamBooth scripts draw it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common_kernels.errors import PeftkitError


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    abar = alphas_cumprod.to(t.device)[t].float()
    return abar / (1.0 - abar)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1.0) if prediction_type == "v_prediction" else clipped / snr_t


def sample_latents(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A fresh draw from the cached VAE posterior, as encoding the image anew would give."""
    return mean + std * torch.randn_like(std)


def offset(noise: torch.Tensor, strength: float) -> torch.Tensor:
    """`noise` plus offset noise: one extra draw per (sample, channel), the same at every pixel."""
    if not strength:
        return noise
    shape = (*noise.shape[:2], *[1] * (noise.dim() - 2))
    return noise + strength * torch.randn(shape, device=noise.device, dtype=noise.dtype)


WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


@dataclass
class FlowMatching:
    """The rectified-flow training schedule of an SD3/Flux pipeline. `sigmas` (descending, one per
    training timestep) come from its FlowMatchEulerDiscreteScheduler: shifted for SD3 (shift 3),
    plain for Flux (its shift depends on the image size and applies at sampling only).
    `weighting_scheme` is diffusers' --weighting_scheme: "logit_normal" and "mode" draw the noise
    level from that density; "sigma_sqrt" and "cosmap" draw it uniformly and weight the loss; "none"
    draws uniformly, unweighted."""

    sigmas: torch.Tensor
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise PeftkitError(
                f"weighting_scheme must be one of {list(WEIGHTING_SCHEMES)}, "
                f"got {self.weighting_scheme!r}"
            )

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @staticmethod
    def of(scheduler_config, weighting_scheme: str = "none") -> FlowMatching:
        """The schedule of a pipeline's FlowMatchEulerDiscreteScheduler config."""
        n, shift = scheduler_config.num_train_timesteps, scheduler_config.shift
        sigmas = torch.arange(n, 0, -1, dtype=torch.float32) / n
        if not scheduler_config.use_dynamic_shifting:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        return FlowMatching(sigmas, weighting_scheme)


def flow_timestep_density(schedule: FlowMatching, n: int, device: torch.device) -> torch.Tensor:
    """u in [0, 1) per sample (SD3 paper sec. 3.1): sigmoid of a normal draw (logit-normal),
    1 - u - m (cos^2(pi u / 2) - 1 + u) of a uniform u (mode, eq. 20), or uniform."""
    if schedule.weighting_scheme == "logit_normal":
        draw = torch.randn(n, device=device) * schedule.logit_std + schedule.logit_mean
        return torch.sigmoid(draw)
    u = torch.rand(n, device=device)
    if schedule.weighting_scheme == "mode":
        return 1 - u - schedule.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def flow_loss_weights(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights of the uniformly drawn schemes: 1/s^2 (sigma_sqrt) or the cosine
    map's 2 / (pi (1 - 2s + 2s^2)) (cosmap); None for the others."""
    if weighting_scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if weighting_scheme == "cosmap":
        return (2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))).float()
    return None


def flow_matching_targets(
    schedule: FlowMatching, latents: torch.Tensor, offset_noise: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x_s, t, v, weight): t = s x num_train_timesteps, the timestep SD3/Flux transformers take
    (Flux reads t / 1000), v = eps - x_0 the velocity the transformer predicts."""
    b = latents.shape[0]
    noise = offset(torch.randn_like(latents), offset_noise)
    u = flow_timestep_density(schedule, b, latents.device)
    index = (u * schedule.num_train_timesteps).long().clamp(0, schedule.num_train_timesteps - 1)
    sigmas = schedule.sigmas.to(latents.device)[index]
    s = sigmas.view(b, *[1] * (latents.dim() - 1)).to(latents.dtype)
    noisy = (1.0 - s) * latents + s * noise
    t = sigmas * schedule.num_train_timesteps
    return noisy, t, noise - latents, flow_loss_weights(schedule.weighting_scheme, sigmas)


def denoising_targets(
    scheduler, latents: torch.Tensor, offset_noise: float = 0.0, min_snr_gamma: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The random half of a step: (x_t, t, target, per-sample weight or None). Drawing it apart
    from the prediction lets several trainers share one UNet call (multitenant.py) and a CUDA
    graph replay the deterministic half. `scheduler`: a DDPM scheduler, or `FlowMatching`."""
    if isinstance(scheduler, FlowMatching):
        if min_snr_gamma:
            raise PeftkitError(
                "min_snr_gamma weights DDPM timesteps; SD3/Flux train by flow matching: set it "
                "to 0 and pick a weighting_scheme instead"
            )
        return flow_matching_targets(scheduler, latents, offset_noise)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise PeftkitError(
            f"prediction type {prediction_type!r} is not supported for training: use a pipeline "
            "whose scheduler predicts 'epsilon' or 'v_prediction'"
        )
    b = latents.shape[0]
    noise = offset(torch.randn_like(latents), offset_noise)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    target = (
        scheduler.get_velocity(latents, noise, t) if prediction_type == "v_prediction" else noise
    )
    weight = None
    if min_snr_gamma:
        weight = min_snr_weights(snr(scheduler.alphas_cumprod, t), min_snr_gamma, prediction_type)
    return noisy, t, target, weight


def rows_of_process(n: int, rank: int, world: int) -> slice:
    """Where this process's n rows sit in a global batch of world x n (the engine's split)."""
    return slice(rank * n, (rank + 1) * n)


def process_denoising_targets(
    scheduler,
    mean: torch.Tensor,
    std: torch.Tensor,
    idx: torch.Tensor,
    rank: int = 0,
    world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`denoising_targets` of fresh latent draws for this process's rows `idx` of a global batch
    over `world` processes. Every process draws the numbers of all world x n rows from the same
    random state and keeps its slice, so N processes draw what one process with the global batch
    does; the draws depend only on shapes, so this process's rows stand in for the others'."""
    rows = idx.repeat(world)
    noisy, t, target, weight = denoising_targets(scheduler, sample_latents(mean[rows], std[rows]))
    keep = rows_of_process(idx.shape[0], rank, world)
    return noisy[keep], t[keep], target[keep], None if weight is None else weight[keep]


def prediction_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample loss (B,) of a prediction against `denoising_targets`' target."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    return loss if weight is None else loss * weight


def denoising_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    offset_noise: float = 0.0,
    min_snr_gamma: float = 0.0,
) -> torch.Tensor:
    """Per-sample loss (B,); `predict(x_t, t)` runs the UNet."""
    noisy, t, target, weight = denoising_targets(scheduler, latents, offset_noise, min_snr_gamma)
    return prediction_loss(predict(noisy, t), target, weight)
