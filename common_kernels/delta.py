"""What every adapter core provides to `AdaptedLayer`, and the base-layer geometry it is built for.

Two kinds of core. Additive cores (LoRA, Kronecker) contribute s * Delta x; the layer applies them
either factored (y = base(x) + s Delta x, fewest FLOPs) or in weight space (y = base_op(x, W + s Delta),
fewest kernels), by the core's `apply_mode` (its config's `apply`). Rotation cores (OFT) act on the input
(side "input": y = base(R x), for Linear) or on the kernel (side "weight": y = conv(x, W R), for
Conv2d). Every core can merge into the base weight and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PeftkitError


@dataclass(frozen=True)
class Geometry:
    """Shape facts of a base `nn.Linear` or `nn.Conv2d`, enough to build and apply a delta."""

    kind: str  # "linear" or "conv2d"
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def fan_in(self) -> int:
        """Columns of the weight viewed as a matrix: d_in (Linear) or d_in * kh * kw (Conv2d)."""
        return self.in_features * self.kernel_size[0] * self.kernel_size[1]

    def conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Apply `weight` with the base layer's stride, padding and dilation."""
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)


def geometry_of(module: nn.Module, name: str = "") -> Geometry:
    if isinstance(module, nn.Linear):
        return Geometry("linear", module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise PeftkitError(
                f"module {name!r} is a grouped Conv2d (groups={module.groups}); adapters support groups=1 only: "
                "exclude it from the targets"
            )
        if module.padding_mode != "zeros":
            raise PeftkitError(
                f"module {name!r} uses padding_mode={module.padding_mode!r}; only 'zeros' is supported"
            )
        return Geometry(
            "conv2d",
            module.in_channels,
            module.out_channels,
            tuple(module.kernel_size),
            tuple(module.stride),
            module.padding if isinstance(module.padding, str) else tuple(module.padding),
            tuple(module.dilation),
        )
    raise PeftkitError(
        f"module {name!r} is a {type(module).__name__}; adapters wrap nn.Linear and nn.Conv2d only"
    )


class Delta(nn.Module):
    """Base class of a core's trainable part for one layer.

    `scale` arrives as a 0-dim tensor so that changing it never recompiles a compiled model.
    Additive cores override `delta` and `add_to_weight`; rotation cores override the hook of their
    `side` (`transform_input` or `transform_weight`). All override `merge_weight`/`unmerge_weight`.
    """

    additive: bool = True
    side: str = "output"
    apply_mode: str = "factored"
    # Whether `effective_weight` gives this delta's whole effect (LoRA with input dropout: no).
    weight_form: bool = True

    def uses_weight_space(self, x: torch.Tensor) -> bool:
        """Weight space on CUDA under "auto": there kernel launches, not FLOPs, bound adapter cost
        (bench/NOTES.md); on CPUs arithmetic does, so factored wins."""
        return self.apply_mode == "weight" or (self.apply_mode == "auto" and x.is_cuda)

    def __init__(self, geometry: Geometry) -> None:
        super().__init__()
        self.geometry = geometry
        # The base weight's dtype, kept by the layer: what batched preparations cast to.
        self.weight_dtype: torch.dtype | None = None

    def init_from_base(self, weight: torch.Tensor) -> None:
        """Set parameters whose starting value depends on the base weight (DoRA's magnitude);
        called once when the delta joins its layer."""

    def transform_input(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x

    def transform_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return weight

    def delta(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_to_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def effective_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The base weight with this delta folded in (y = base_op(x, result) equals the layer with
        this delta alone live): what routed rows taking this adapter run through."""
        if self.additive:
            return self.add_to_weight(weight, scale)
        return self.transform_weight(weight, scale)

    def group_key(self) -> tuple | None:
        """Deltas with equal keys can run as one gathered batch under per-sample routing
        (`routed_delta`); None: this delta runs alone."""
        return None

    def merge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def unmerge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError
