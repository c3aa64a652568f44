"""The denoising objective concept trainers share (DreamBooth, Textual Inversion).

Ho et al. 2020, eq. 14: L = || target - eps_theta(x_t, t) ||^2 with
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; target = eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
for v-prediction schedules (Salimans & Ho 2022).

Options:
- min-SNR-gamma weighting (Hang et al. 2023, eq. 9): w_t = min(SNR_t, gamma) / SNR_t for epsilon
  targets, min(SNR_t, gamma) / (SNR_t + 1) for v targets; SNR_t = abar_t / (1 - abar_t).
- offset noise (Guttenberg 2023): eps + o * n with n ~ N(0, 1) of shape (B, C, 1, 1), so the model
  can learn to shift an image's mean brightness.
"""

from __future__ import annotations

from collections.abc import Callable

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


def denoising_targets(
    scheduler, latents: torch.Tensor, offset_noise: float = 0.0, min_snr_gamma: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The random half of a step: (x_t, t, target, per-sample weight or None). Drawing it apart
    from the prediction lets several trainers share one UNet call (multitenant.py) and a CUDA
    graph replay the deterministic half."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise PeftkitError(
            f"prediction type {prediction_type!r} is not supported for training: use a pipeline "
            "whose scheduler predicts 'epsilon' or 'v_prediction'"
        )
    b = latents.shape[0]
    noise = torch.randn_like(latents)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(
            b, latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype
        )
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
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
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
