"""BOFT: butterfly-factorized orthogonal finetuning (Liu et al., 2024, arXiv:2311.06243), as peft:

    W' = diag(s) W M^T,   M = B_m .. B_1,   B_i = P_i blockdiag(R_i1 .. R_in) P_i^T,   R = Cayley.

Each B_i is OFT's block-diagonal rotation (oft.py) conjugated by a butterfly permutation P_i, so m
sparse factors reach every input column. Layout as HF peft, so weights map 1:1: `boft_R` (m, n, b, b)
holds full matrices whose skew part (R - R^T) / 2 enters the Cayley map, `boft_s` (d_out,) scales
output rows (peft's (d_out, 1) / (1, d_out) flattened). Adapter scale t multiplies the skew part and
gives rows 1 + t (s - 1), so t = 0 is the base model. Linear and Conv2d both rotate the kernel.
Before a model's forward all layers' M^T of one shape are formed together (the butterfly applied
to identities, one batched pass), so each layer costs one GEMM and one row scale; alone (merge,
compiled code, fan_in past `DENSE_LIMIT`) W M^T is formed factor by factor, never forming M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import AdapterConfig
from .delta import Delta, Geometry
from .errors import PeftkitError
from .oft import cayley, rotate_weight
from .registry import register_core


@dataclass
class BOFTConfig(AdapterConfig):
    """BOFT settings: give `block_size` or `n_blocks` (not both); `n_butterfly_factor` = m factors
    (1 is plain block-diagonal OFT)."""

    block_size: int = 8
    n_blocks: int = 0
    n_butterfly_factor: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 0 or self.n_blocks < 0 or (self.block_size > 0) == (self.n_blocks > 0):
            raise PeftkitError(
                f"BOFTConfig needs exactly one of block_size and n_blocks > 0, got "
                f"block_size={self.block_size}, n_blocks={self.n_blocks}: set the other to 0"
            )
        if not isinstance(self.n_butterfly_factor, int) or self.n_butterfly_factor < 1:
            raise PeftkitError(
                f"BOFTConfig.n_butterfly_factor must be an integer >= 1, got {self.n_butterfly_factor!r}"
            )

    def blocks_for(self, fan_in: int, name: str = "") -> tuple[int, int]:
        """(n_blocks, block_size) for a layer with `fan_in` input columns."""
        b = self.block_size or fan_in // self.n_blocks
        n = fan_in // b if b else 0
        shuffles = 2 ** (self.n_butterfly_factor - 1)
        if b < 2 or n * b != fan_in or n % shuffles or (shuffles > 1 and (n % 2 or b % 2)):
            raise PeftkitError(
                f"BOFT cannot split module {name!r} (fan_in={fan_in}) into blocks "
                f"(block_size={self.block_size}, n_blocks={self.n_blocks}, n_butterfly_factor="
                f"{self.n_butterfly_factor}): fan_in must be n_blocks * block_size with block_size >= 2, "
                f"n_blocks a multiple of {shuffles} and, with butterflies, both even; "
                "change them or exclude the module"
            )
        return n, b


def butterfly_permutation(n: int, groups: int, half: int) -> torch.Tensor:
    """Indices of P (P[k, perm[k]] = 1): each of `groups` equal groups of n columns is cut into
    chunks of `half` columns and reordered even chunks first, then odd ones (the paper's fig. 3)."""
    chunks = n // (groups * half)
    order = torch.cat([torch.arange(0, chunks, 2), torch.arange(1, chunks, 2)])
    return torch.arange(n).reshape(groups, chunks, half)[:, order].reshape(n)


def boft_blocks(R: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """(..., b, b) orthogonal blocks (I - S)(I + S)^-1 with S = scale (R - R^T) / 2, as peft."""
    # In the parameters' precision even under autocast: the blocks must stay orthogonal.
    with torch.autocast(R.device.type, enabled=False):
        S = (R - R.transpose(-1, -2)) * (0.5 * scale)
        return cayley(-S.reshape(-1, *R.shape[-2:])).reshape(R.shape)


def butterfly_weight(
    weight: torch.Tensor,
    blocks: torch.Tensor,
    perms: list[tuple[torch.Tensor, torch.Tensor] | None],
    inverse: bool,
) -> torch.Tensor:
    """W M^T (or W M with `inverse`) for W of shape (d_out, fan_in): W B^T = W P blockdiag(R^T) P^T
    per factor; perms[i] is (perm, its inverse), None for the identity."""
    order = range(len(perms) - 1, -1, -1) if inverse else range(len(perms))
    for i in order:
        R = blocks[i] if inverse else blocks[i].transpose(1, 2)
        if perms[i] is None:
            weight = rotate_weight(weight, R)
        else:
            perm, inv = perms[i]
            weight = rotate_weight(weight.index_select(1, inv), R).index_select(1, perm)
    return weight


# Largest fan_in whose fan_in x fan_in M^T is formed before the forward (6.5 MB in fp32 at 1280,
# the SD1.5 attention width); wider layers (3x3 convs of wide channels) rotate factor by factor.
DENSE_LIMIT = 2048


def butterfly_matrices(
    blocks: torch.Tensor, perms: list[tuple[torch.Tensor, torch.Tensor] | None]
) -> torch.Tensor:
    """(L, f, f): M^T of L layers at once from their (L, m, n, b, b) orthogonal blocks, the
    butterfly applied to identities (W M^T = W (I M^T)); the layers share `perms`."""
    L, m, n, b, _ = blocks.shape
    f = n * b
    X = torch.eye(f, dtype=blocks.dtype, device=blocks.device).expand(L, f, f)
    for i in range(m):
        if perms[i] is not None:
            X = X.index_select(2, perms[i][1])
        X = torch.einsum("lonj,lnij->loni", X.reshape(L, f, n, b), blocks[:, i]).reshape(L, f, f)
        if perms[i] is not None:
            X = X.index_select(2, perms[i][0])
    return X


class BOFTDelta(Delta):
    additive = False
    side = "weight"

    def __init__(self, geometry: Geometry, config: BOFTConfig, name: str = "") -> None:
        super().__init__(geometry)
        n, b = config.blocks_for(geometry.fan_in, name)
        m = config.n_butterfly_factor
        self.boft_R = nn.Parameter(torch.zeros(m, n, b, b))
        self.boft_s = nn.Parameter(torch.ones(geometry.out_features))
        # Factor 0's permutation is the identity; the others' are fixed buffers, so compiled
        # graphs and CUDA graphs see constant indices.
        for i in range(1, m):
            perm = butterfly_permutation(geometry.fan_in, n // 2**i, b // 2)
            self.register_buffer(f"perm{i}", perm, persistent=False)
            self.register_buffer(f"inv{i}", torch.argsort(perm), persistent=False)
        self._batched: torch.Tensor | None = None
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def prepare_all(deltas: list[BOFTDelta]) -> None:
        """Every layer's blocks of one size from one batched Cayley solve before a model's
        forward, as OFT does (oft.py), then each shape's M^T and row scales in one batched pass
        each, cast once: per layer the forward is one GEMM and one multiply instead of a dozen
        gathers, block products and casts (bench/NOTES.md)."""
        groups: dict[tuple, list[BOFTDelta]] = {}
        for d in deltas:
            groups.setdefault((d.boft_R.shape[-1], d.boft_R.dtype, d.boft_R.device), []).append(d)
        for group in groups.values():
            sizes = [d.boft_R.shape[0] * d.boft_R.shape[1] for d in group]
            R = torch.cat([d.boft_R.flatten(0, 1) for d in group])
            scale = torch.cat([d.scale.to(R.dtype).expand(n) for d, n in zip(group, sizes)])
            for d, blocks in zip(group, boft_blocks(R, scale[:, None, None]).split(sizes)):
                d._batched = blocks.reshape(d.boft_R.shape)
        dense: dict[tuple, list[BOFTDelta]] = {}
        for d in deltas:
            if d.geometry.fan_in <= DENSE_LIMIT:
                key = (d.geometry.weight_shape, d.boft_R.shape, d.boft_R.dtype, d.weight_dtype)
                dense.setdefault(key, []).append(d)
        for group in dense.values():
            first = group[0]
            with torch.autocast(first.boft_R.device.type, enabled=False):
                Mt = butterfly_matrices(torch.stack([d._batched for d in group]), first.perms())
                s = torch.stack([d.boft_s for d in group])
                scale = torch.stack([d.scale.to(s.dtype) for d in group])[:, None]
                rows = 1 + scale * (s - 1)
            dtype = first.weight_dtype or Mt.dtype
            for d, one, row in zip(group, Mt.to(dtype).unbind(0), rows.to(dtype).unbind(0)):
                d._dense = (one, row[:, None])

    @staticmethod
    def release_all(deltas: list[BOFTDelta]) -> None:
        for d in deltas:
            d._batched = d._dense = None

    def perms(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        m = self.boft_R.shape[0]
        return [None] + [(getattr(self, f"perm{i}"), getattr(self, f"inv{i}")) for i in range(1, m)]

    def _rotate(self, weight: torch.Tensor, scale, inverse: bool = False) -> torch.Tensor:
        blocks = self._batched if self._batched is not None else boft_blocks(self.boft_R, scale)
        blocks = blocks.to(weight.dtype)
        rows = (1 + scale * (self.boft_s - 1)).to(weight.dtype)[:, None]
        flat = weight.reshape(weight.shape[0], -1)
        if inverse:
            return butterfly_weight(flat / rows, blocks, self.perms(), True).reshape(weight.shape)
        return (butterfly_weight(flat, blocks, self.perms(), False) * rows).reshape(weight.shape)

    def transform_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self._dense is not None and self._dense[0].dtype == weight.dtype:
            Mt, rows = self._dense
            return (weight.reshape(weight.shape[0], -1) @ Mt * rows).reshape(weight.shape)
        return self._rotate(weight, scale)

    def merge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return self._rotate(weight, scale)

    def unmerge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        # M is orthogonal, so (W M^T) M = W up to rounding.
        return self._rotate(weight, scale, inverse=True)


register_core(
    "boft",
    BOFTConfig,
    BOFTDelta,
    aliases=(),
    summary="butterfly orthogonal fine-tuning: diag(s) W (B_m .. B_1)^T",
    label="BOFT",
)
