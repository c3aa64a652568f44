"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022, Sec. 3.2, Eq. 2-5).

After each chosen operation (qkv, proj, fc1, fc2, the norms, the patch embedding) the output is
scaled and shifted per channel,

    y = gamma ⊙ x + beta,   gamma ~ N(1, 0.02), beta ~ N(0, 0.02)

and, since the preceding op is linear in its output channels, `reparameterize()` folds both into it
(Eq. 5): W' = diag(gamma) W, b' = gamma ⊙ b + beta (Linear, Conv2d per output channel; for a
LayerNorm the affine weight and bias). The exported model is the plain ViT with new weights.

Attached as forward hooks on the modules at the sites, so it also scales whatever a core adapter
(LoRA, OFT, LoKr) added to the same layer; fold cores first, then SSF (`VisionAdapter` does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from peftkit.common_kernels.errors import PeftkitError

from .backbones import ViTLayout
from .hooked import HookedMethod

SSF_SITES = ("qkv", "proj", "fc1", "fc2", "norm1", "norm2", "norm", "patch", "pre_norm")


@dataclass
class SSFConfig:
    sites: list[str] = field(
        default_factory=lambda: ["qkv", "proj", "fc1", "fc2", "norm1", "norm2", "norm", "patch"]
    )
    init_std: float = 0.02

    def __post_init__(self) -> None:
        bad = [s for s in self.sites if s not in SSF_SITES]
        if bad or not self.sites:
            raise PeftkitError(
                f"SSFConfig.sites {bad or '[]'} invalid: choose a non-empty subset of {list(SSF_SITES)}"
            )
        if self.init_std < 0:
            raise PeftkitError(f"SSFConfig.init_std must be >= 0, got {self.init_std}")

    def to_dict(self) -> dict:
        return asdict(self)


def scale_shift(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, channel_dim: int = -1
) -> torch.Tensor:
    """gamma ⊙ x + beta along `channel_dim` (-1 for tokens, 1 for conv feature maps); gamma and
    beta (C,) for every row, or (rows, C) one pair per row (a batched sweep's configurations)."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    if gamma.dim() == 2:
        shape[0] = gamma.shape[0]
    return x * gamma.view(shape).to(x.dtype) + beta.view(shape).to(x.dtype)


@torch.no_grad()
def fold_scale_shift(module: nn.Module, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """Fold y = gamma ⊙ module(x) + beta into `module` (Linear, Conv2d or LayerNorm) in place."""
    if not isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
        raise PeftkitError(
            f"SSF cannot fold into a {type(module).__name__}: only Linear, Conv2d and LayerNorm"
        )
    weight = module.weight
    g = gamma.to(torch.float64)
    view = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_((weight.to(torch.float64) * g.view(view)).to(weight.dtype))
    if module.bias is None:
        module.bias = nn.Parameter(
            torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
            requires_grad=weight.requires_grad,
        )
    bias = module.bias
    bias.copy_((bias.to(torch.float64) * g + beta.to(torch.float64)).to(bias.dtype))


class ScaleShift(nn.Module):
    def __init__(self, channels: int, std: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(1.0 + std * torch.randn(channels))
        self.beta = nn.Parameter(std * torch.randn(channels))


def _channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d) or type(module).__name__ == "Conv2d":
        return module.out_channels, 1
    if hasattr(module, "base"):  # a core's AdaptedLayer around a Linear/Conv2d
        return _channels(module.base)
    if hasattr(module, "normalized_shape"):
        return module.normalized_shape[-1], -1
    if hasattr(module, "out_features"):
        return module.out_features, -1
    raise PeftkitError(
        f"SSF cannot follow a {type(module).__name__}: expected Linear, Conv2d or LayerNorm"
    )


class SSF(HookedMethod):
    """Scale/shift pairs in `model.peftkit_ssf` (keys: site names with '.' -> '__'), one hook each."""

    attr, label = "peftkit_ssf", "SSF parameters"
    mismatch_hint = "the adapter was made with other sites or another base model"

    def __init__(self, model: nn.Module, layout: ViTLayout, config: SSFConfig) -> None:
        self.config = config
        # pre_norm exists only where the ViT has one (open_clip ln_pre; timm pre_norm=True models).
        self.names = [
            n
            for site in config.sites
            if site != "pre_norm" or site in layout.model_sites
            for n in layout.site_names(site)
        ]
        params = self._attach(
            model,
            nn.ModuleDict(
                {
                    name.replace(".", "__"): ScaleShift(
                        _channels(model.get_submodule(name))[0], config.init_std
                    )
                    for name in self.names
                }
            ),
        )
        for name in self.names:
            dim, pair = _channels(model.get_submodule(name))[1], params[name.replace(".", "__")]
            self.hooks.append(
                model.get_submodule(name).register_forward_hook(
                    lambda mod, args, out, pair=pair, dim=dim: scale_shift(
                        out, pair.gamma, pair.beta, dim
                    )
                )
            )

    def reparameterize(self) -> None:
        """Fold every gamma/beta into the module it follows, then remove the hooks: a plain ViT.
        Core adapters on the same modules must be merged and unloaded first."""
        for name in self.names:
            pair = self.module[name.replace(".", "__")]
            fold_scale_shift(
                self.model.get_submodule(name), pair.gamma.detach(), pair.beta.detach()
            )
        self.remove()
