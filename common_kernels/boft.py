"""BOFT: butterfly-factorized orthogonal finetuning (Liu et al., 2024, arXiv:2311.06243), as peft:

    W' = diag(s) W M^T,   M = B_m .. B_1,   B_i = P_i blockdiag(R_i1 .. R_in) P_i^T,   R = Cayley.

Each B_i is OFT's block-diagonal rotation (oft.py) conjugated by a butterfly permutation P_i, so m
sparse factors reach every input column. Layout as HF peft, so weights map 1:1: `boft_R` (m, n, b, b)
holds full matrices whose skew part (R - R^T) / 2 enters the Cayley map, `boft_s` (d_out,) scales
output rows (peft's (d_out, 1) / (1, d_out) flattened). Adapter scale t multiplies the skew part and
gives rows 1 + t (s - 1), so t = 0 is the base model. Linear and Conv2d both rotate the kernel.
M^T is block-diagonal with blocks of 2^(m-1) b, formed at that size. Before a model's forward the
rotated weights of all layers of one shape are formed together (one batched GEMM with M^T written
dense), so a layer adds no kernel of its own; alone (merge, compiled code, fan_in past
`DENSE_LIMIT`) W is rotated by M^T's blocks.
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
        # cayley(Q) = (I + Q)(I - Q)^-1 with Q = -S, the sign taken in the subtraction.
        Q = (R.transpose(-1, -2) - R) * (0.5 * scale)
        return cayley(Q.reshape(-1, *R.shape[-2:])).reshape(R.shape)


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """(L, k, b, c) -> (L, k b, k c): each of L block-diagonal matrices, in one batched write."""
    L, k, b, c = blocks.shape
    return torch.diag_embed(blocks.permute(0, 2, 3, 1), dim1=1, dim2=3).reshape(L, k * b, k * c)


def butterfly_blocks(blocks: torch.Tensor, perms: list[torch.Tensor | None]) -> torch.Tensor:
    """M^T of L layers as its diagonal blocks, (L, G, g, g), from their (L, m, n, b, b) orthogonal
    blocks. Factor i's permutation keeps columns within aligned groups of 2^i b, so M^T is
    block-diagonal with blocks of g = 2^(m-1) b: (B_m .. B_1)^T = B_1^T .. B_m^T is formed at that
    size, B_i^T = P_i blockdiag(R_i^T) P_i^T; `perms[i]` is P_i on g columns (None: identity)."""
    L, m, n, b, _ = blocks.shape
    g = b * 2 ** (m - 1)
    G, per = n * b // g, g // b
    local = blocks.reshape(L, m, G, per, b, b).transpose(1, 2).reshape(L * G, m, per, b, b)
    out = None
    for i in range(m):
        factor = block_diagonal(local[:, i].transpose(-1, -2))
        if perms[i] is not None:
            factor = factor.index_select(1, perms[i]).index_select(2, perms[i])
        out = factor if out is None else torch.bmm(out, factor)
    return out.reshape(L, G, g, g)


# Largest fan_in whose fan_in x fan_in M^T is formed before the forward (3.3 MB in bf16 at 1280,
# the SD1.5 attention width); wider layers (3x3 convs of wide channels) rotate by M^T's blocks
# in their own forward.
DENSE_LIMIT = 2048


class BOFTDelta(Delta):
    additive = False
    side = "weight"

    def __init__(self, geometry: Geometry, config: BOFTConfig, name: str = "") -> None:
        super().__init__(geometry)
        n, b = config.blocks_for(geometry.fan_in, name)
        m = config.n_butterfly_factor
        self.boft_R = nn.Parameter(torch.zeros(m, n, b, b))
        self.boft_s = nn.Parameter(torch.ones(geometry.out_features))
        # Factor 0's permutation is the identity; the others' are fixed buffers on one block of
        # M^T (g = 2^(m-1) b columns), so compiled graphs and CUDA graphs see constant indices.
        g = b * 2 ** (m - 1)
        for i in range(1, m):
            self.register_buffer(
                f"perm{i}", butterfly_permutation(g, 2 ** (m - 1 - i), b // 2), persistent=False
            )
        self._batched: torch.Tensor | None = None
        # (base weight, its rotation diag(s) W M^T) formed before the forward with its shape's.
        self._rotated: tuple[torch.Tensor, torch.Tensor] | None = None
        self._base: tuple[torch.Tensor, ...] = ()

    def init_from_base(self, weight: torch.Tensor) -> None:
        # Held in a tuple: a reference for `prepare_all`, not a parameter of this module.
        self._base = (weight,)

    def dense_key(self) -> tuple | None:
        """Layers with equal keys are rotated together before the forward; None: alone."""
        if self.geometry.fan_in > DENSE_LIMIT or not self._base:
            return None
        return (self.geometry.weight_shape, self.boft_R.shape, self.weight_dtype)

    @staticmethod
    def prepare_all(deltas: list[BOFTDelta]) -> None:
        """Every layer's blocks of one size from one batched Cayley solve before a model's
        forward, as OFT does (oft.py), then for each shape all layers' diag(s) W M^T in one
        batched GEMM and one multiply, M^T written dense once in the weight's dtype: per layer the
        step then has no kernel of its own but the base op's, forward and backward. Layers of one
        shape sit side by side in the solve, so their blocks are a slice, not a copy."""
        groups: dict[tuple, dict[tuple | None, list[BOFTDelta]]] = {}
        for d in deltas:
            solve = (d.boft_R.shape[-1], d.boft_R.dtype, d.boft_R.device)
            groups.setdefault(solve, {}).setdefault(d.dense_key(), []).append(d)
        for shapes in groups.values():
            ordered = [d for group in shapes.values() for d in group]
            R = torch.cat([d.boft_R.flatten(0, 1) for d in ordered])
            scale = torch.cat(
                [d.scale.to(R.dtype).expand(len(d.boft_R.flatten(0, 1))) for d in ordered]
            )
            blocks = boft_blocks(R, scale[:, None, None])
            # split, not slices: its backward is one concatenation, a slice's a zero-filled
            # tensor of the whole batch per group.
            counts = [[d.boft_R.shape[:2].numel() for d in group] for group in shapes.values()]
            mine = blocks.split([sum(c) for c in counts])
            for (key, group), ours, count in zip(shapes.items(), mine, counts):
                for d, one in zip(group, ours.split(count)):
                    d._batched = one.reshape(d.boft_R.shape)
                if key is not None:
                    BOFTDelta._rotate_all(group, ours.reshape(len(group), *key[1]))

    @staticmethod
    def _rotate_all(group: list[BOFTDelta], blocks: torch.Tensor) -> None:
        bases = [d._base[0] for d in group]
        dtype = bases[0].dtype
        with torch.autocast(blocks.device.type, enabled=False):
            Mt = block_diagonal(butterfly_blocks(blocks, group[0].perms()).to(dtype))
            s = torch.stack([d.boft_s for d in group])
            scale = torch.stack([d.scale.to(s.dtype) for d in group])[:, None]
            rows = torch.addcmul(1 - scale, scale, s).to(dtype)  # 1 + t (s - 1)
        # Stacked anew each forward, so in-place changes to the base weights (merges) are seen;
        # the GEMM under the caller's autocast, as the base op's own would be.
        W = torch.stack([w.reshape(w.shape[0], -1) for w in bases])
        rotated = torch.bmm(W, Mt) * rows[:, :, None]
        for d, base, one in zip(group, bases, rotated.unbind(0)):
            d._rotated = (base, one.reshape(base.shape))

    @staticmethod
    def release_all(deltas: list[BOFTDelta]) -> None:
        for d in deltas:
            d._batched = d._rotated = None

    def perms(self) -> list[torch.Tensor | None]:
        return [None] + [getattr(self, f"perm{i}") for i in range(1, self.boft_R.shape[0])]

    def _rotate(self, weight: torch.Tensor, scale, inverse: bool = False) -> torch.Tensor:
        blocks = self._batched if self._batched is not None else boft_blocks(self.boft_R, scale)
        Mt = butterfly_blocks(blocks[None], self.perms())[0].to(weight.dtype)
        rows = (1 + scale * (self.boft_s - 1)).to(weight.dtype)[:, None]
        flat = weight.reshape(weight.shape[0], -1)
        if inverse:  # M is orthogonal: W M^T M = W up to rounding
            return rotate_weight(flat / rows, Mt.transpose(1, 2)).reshape(weight.shape)
        return (rotate_weight(flat, Mt) * rows).reshape(weight.shape)

    def transform_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self._rotated is not None:
            if self._rotated[0] is weight:
                return self._rotated[1]
            # Another rotation ran first, or the model replaced its weight (FSDP shards): this
            # layer rotates alone from now on, and the old weight is not held.
            self._base = ()
        return self._rotate(weight, scale)

    def merge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return self._rotate(weight, scale)

    def unmerge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return self._rotate(weight, scale, inverse=True)


register_core(
    "boft",
    BOFTConfig,
    BOFTDelta,
    aliases=(),
    summary="butterfly orthogonal fine-tuning: diag(s) W (B_m .. B_1)^T",
    label="BOFT",
)
