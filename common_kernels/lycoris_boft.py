"""LyCORIS' butterfly OFT ("lycoris-boft", lycoris 4.1.3 `modules/boft.py`; BOFT: Liu et al., 2024,
arXiv:2311.06243), on a layer's output rows, where peftkit's BOFT (boft.py, peft's) acts on inputs:

    W' = diag(rescale) B_m .. B_1 W,   B_i = P_i^T blockdiag(M_i1 .. M_in) P_i,   M = I + t (R - I),

R the Cayley blocks of diag_oft.py (same constraint), P_i the row shuffle that pairs rows 2^i b / 2
apart, (b, n) LyCORIS' power-of-two factorization of d_out by `block_size` (n a power of two) and
m = log2(n) + 1 stages. t = 1 is LyCORIS' weight (it interpolates every stage), t = 0 the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .delta import Geometry
from .diag_oft import DiagOFTConfig, OutputRotationDelta, rotate_rows
from .errors import PeftkitError
from .registry import register_core


@dataclass
class LycorisBOFTConfig(DiagOFTConfig):
    """LyCORIS BOFT settings: as LyCORIS OFT's; `block_size` (even) bounds the block size."""


def power2_factorization(dimension: int, factor: int) -> tuple[int, int]:
    """LyCORIS' `power2factorization`: (block size b, block count n) with b even, b <= factor,
    n a power of two and the largest such b; (0, 0) when there is none."""
    n, m = 0, 0
    while m <= factor:
        m += 2
        while dimension % m and m < dimension:
            m += 2
        if m > factor:
            break
        if dimension % m == 0 and (dimension // m).bit_count() == 1:
            n = dimension // m
    return (dimension // n, n) if n else (0, 0)


def row_shuffle(rows: int, stage: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, P^-1) of stage `stage` as row indices: groups of 2 k rows (k = 2^stage b / 2) are
    interleaved, so a block of b rows pairs rows k apart."""
    k = 2**stage * block // 2
    perm = torch.arange(rows).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
    return perm, torch.argsort(perm)


class LycorisBOFTDelta(OutputRotationDelta):
    kohya_ndim: ClassVar[dict[str, int]] = {"oft_blocks": 4}

    def __init__(self, geometry: Geometry, config: LycorisBOFTConfig, name: str = "") -> None:
        b, n = power2_factorization(geometry.out_features, config.block_size)
        if n == 0:
            raise PeftkitError(
                f"LyCORIS BOFT cannot split module {name!r} (d_out={geometry.out_features}) into an "
                f"even block size <= {config.block_size} times a power of two: change block_size "
                "or exclude the module"
            )
        m = (n - 1).bit_count() + 1
        super().__init__(geometry, config, (m, n, b, b))
        for i in range(m):
            perm, inv = row_shuffle(geometry.out_features, i, b)
            self.register_buffer(f"perm{i}", perm, persistent=False)
            self.register_buffer(f"inv{i}", inv, persistent=False)

    def stages(self, weight: torch.Tensor, scale, inverse: bool) -> torch.Tensor:
        M = self.rotations(scale, inverse).to(weight.dtype)
        order = range(M.shape[0] - 1, -1, -1) if inverse else range(M.shape[0])
        for i in order:
            shuffled = weight.index_select(0, getattr(self, f"perm{i}"))
            weight = rotate_rows(shuffled, M[i]).index_select(0, getattr(self, f"inv{i}"))
        return weight


register_core(
    "lycoris-boft",
    LycorisBOFTConfig,
    LycorisBOFTDelta,
    aliases=(),
    summary="LyCORIS BOFT: output rows through m butterfly stages, diag(rescale) B_m .. B_1 W",
    label="LyCORIS BOFT",
)
