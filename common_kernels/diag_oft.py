"""LyCORIS' diagonal OFT ("diag-oft", lycoris 4.1.3 `modules/diag_oft.py`), which rotates a layer's
output rows where OFT (oft.py, Qiu et al., 2023, eq. 2) rotates its inputs:

    W' = diag(rescale) blockdiag(R_1 .. R_n)^T W,   R_k = (I + Q_k)(I - Q_k)^-1,   Q = P - P^T,

P (n, b, b) the stored `oft_blocks`, (b, n) LyCORIS' factorization of d_out by `block_size`. With
`constraint` c > 0, Q (all blocks together) is scaled down to Frobenius norm c * d_out when larger.
Adapter scale t gives blocks I + t (R - I) and rows 1 + t (rescale - 1): t = 1 is LyCORIS' weight,
t = 0 the base. Both Linear and Conv2d rotate the kernel, as the file layout is LyCORIS' own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .config import AdapterConfig
from .delta import Delta, Geometry
from .errors import PeftkitError
from .kron import factorize
from .oft import cayley
from .registry import register_core


@dataclass
class DiagOFTConfig(AdapterConfig):
    """LyCORIS OFT settings: `block_size` is LyCORIS' lora_dim, `constraint` its alpha (0: none),
    `rescaled` adds LyCORIS' trainable per-row scale."""

    block_size: int = 4
    constraint: float = 0.0
    rescaled: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise PeftkitError(f"{cls}.block_size must be an integer >= 1, got {self.block_size!r}")
        if self.constraint < 0:
            raise PeftkitError(f"{cls}.constraint must be >= 0 (0: none), got {self.constraint}")


def lycoris_rotations(
    blocks: torch.Tensor, constraint: float, scale: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """I + t (R - I) for the stored blocks P (L, ..., b, b) of L layers: R the Cayley map of
    P - P^T after LyCORIS' norm constraint (each layer's blocks together; 0: none), t (L,) or a
    number; in the blocks' precision even under autocast."""
    with torch.autocast(blocks.device.type, enabled=False):
        Q = blocks - blocks.transpose(-1, -2)
        expand = (-1,) + (1,) * (Q.dim() - 1)
        if constraint > 0:
            # LyCORIS' epsilon kept for equal outputs; where, not `if`: no host sync, compilable.
            norm = torch.linalg.vector_norm(Q.flatten(1), dim=1) + 1e-8
            Q = Q * torch.where(norm > constraint, constraint / norm, 1.0).view(expand)
        R = cayley(Q.reshape(-1, *Q.shape[-2:])).reshape(Q.shape)
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        t = scale.reshape(expand) if isinstance(scale, torch.Tensor) and scale.dim() else scale
        return eye + t * (R - eye)


def rotate_rows(weight: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """blockdiag(M_1 .. M_n) W for W of shape (d_out, ...) with d_out = n * b."""
    n, b, _ = M.shape
    rows = weight.reshape(n, b, -1)
    return torch.einsum("nij,njc->nic", M, rows).reshape(weight.shape)


class OutputRotationDelta(Delta):
    """Shared by LyCORIS' output-side rotations (this file, lycoris_boft.py): `oft_blocks`, an
    optional `rescale`, the constraint; subclasses give the row operator as stages."""

    kohya_names: ClassVar[dict[str, str]] = {"oft_blocks": "oft_blocks", "rescale": "rescale"}
    kohya_alpha: ClassVar[str] = "constraint"  # what the file's `.alpha` holds
    kohya_ndim: ClassVar[dict[str, int]] = {"oft_blocks": 3}  # tells LyCORIS' OFT from its BOFT
    additive = False
    side = "weight"

    def __init__(self, geometry: Geometry, config: DiagOFTConfig, shape: tuple[int, ...]) -> None:
        super().__init__(geometry)
        self.oft_blocks = nn.Parameter(torch.zeros(shape))
        if config.rescaled:  # (d_out, 1[, 1, 1]): LyCORIS' shape, so files map 1:1
            ones = (1,) * (len(geometry.weight_shape) - 1)
            self.rescale = nn.Parameter(torch.ones(geometry.out_features, *ones))
        self.constraint = config.constraint * geometry.out_features
        self._batched: torch.Tensor | None = None

    @staticmethod
    def file_options(tensors: dict[str, torch.Tensor]) -> dict:
        """Config fields a file's tensors say: LyCORIS rebuilds the blocks from their size."""
        return {
            "block_size": int(tensors["oft_blocks"].shape[-1]),
            "rescaled": "rescale" in tensors,
        }

    @staticmethod
    def prepare_all(deltas: list[OutputRotationDelta]) -> None:
        """Every layer's blocks I + t (R - I) from one batched solve per block shape before a
        model's forward, as OFT does (oft.py): per layer only the row rotation is left."""
        groups: dict[tuple, list[OutputRotationDelta]] = {}
        for d in deltas:
            key = (d.oft_blocks.shape, d.oft_blocks.dtype, d.oft_blocks.device, d.constraint)
            groups.setdefault(key, []).append(d)
        for (_, dtype, _, constraint), group in groups.items():
            scale = torch.stack([d.scale.to(dtype) for d in group])
            blocks = torch.stack([d.oft_blocks for d in group])
            for d, M in zip(group, lycoris_rotations(blocks, constraint, scale)):
                d._batched = M

    @staticmethod
    def release_all(deltas: list[OutputRotationDelta]) -> None:
        for d in deltas:
            d._batched = None

    def rotations(self, scale, inverse: bool) -> torch.Tensor:
        """This layer's blocks I + t (R - I) (their inverses with `inverse`)."""
        if self._batched is not None and not inverse:
            return self._batched
        M = lycoris_rotations(self.oft_blocks[None], self.constraint, scale)[0]
        return torch.linalg.inv(M) if inverse else M

    def stages(self, weight: torch.Tensor, scale, inverse: bool) -> torch.Tensor:
        raise NotImplementedError

    def _rows(self, scale, dtype: torch.dtype) -> torch.Tensor | None:
        if not hasattr(self, "rescale"):
            return None
        return (1 + scale * (self.rescale.reshape(-1, 1) - 1)).to(dtype)

    def _operate(self, weight: torch.Tensor, scale, inverse: bool = False) -> torch.Tensor:
        flat = weight.reshape(weight.shape[0], -1)
        rows = self._rows(scale, weight.dtype)
        if inverse and rows is not None:
            flat = flat / rows
        out = self.stages(flat, scale, inverse)
        if not inverse and rows is not None:
            out = out * rows
        return out.reshape(weight.shape)

    def transform_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self._operate(weight, scale)

    def merge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return self._operate(weight, scale)

    def unmerge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return self._operate(weight, scale, inverse=True)


class DiagOFTDelta(OutputRotationDelta):
    def __init__(self, geometry: Geometry, config: DiagOFTConfig, name: str = "") -> None:
        b, n = factorize_lycoris(geometry.out_features, config.block_size)
        super().__init__(geometry, config, (n, b, b))

    def stages(self, weight: torch.Tensor, scale, inverse: bool) -> torch.Tensor:
        # LyCORIS contracts the block's first index with the rows: M^T W; its inverse M^-T.
        M = self.rotations(scale, inverse)
        return rotate_rows(weight, M.transpose(1, 2).to(weight.dtype))


def factorize_lycoris(dimension: int, factor: int) -> tuple[int, int]:
    """LyCORIS 4.1.3's `factorization`: the smaller factor first, whichever rule found the pair."""
    m, n = factorize(dimension, factor)
    return (m, n) if m <= n else (n, m)


register_core(
    "diag-oft",
    DiagOFTConfig,
    DiagOFTDelta,
    aliases=("lycoris-oft",),
    summary="LyCORIS OFT: output rows rotated, diag(rescale) R^T W",
    label="LyCORIS OFT",
)
