"""OFT: Orthogonal Finetuning (Qiu et al., 2023, arXiv:2306.07280), eq. (2) and sec. 3.3:

    W' = W R,   R = blockdiag(R_1 .. R_n),   R_i = (I + Q_i)(I - Q_i)^-1,   Q_i = -Q_i^T (Cayley).

Q = 0 gives R = I, so training starts at the base model. COFT (sec. 3.2) keeps each Q_i within a
Frobenius ball of radius eps / sqrt(n); we impose it by rescaling Q in the forward pass, which is
differentiable and needs no projection step in the optimizer. Block sharing uses one R_i for all
blocks. Parameters are the strict upper triangles of the Q_i, as in HF peft, so weights map 1:1.

On nn.Linear the rotation is applied to the input (y = W (R x)): it costs tokens x d_in x b
instead of a weight-sized product, and its backward never forms a weight gradient. On nn.Conv2d
R mixes input channels and kernel taps, so it rotates the kernel (W R) instead.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import AdapterConfig, check_positive
from .delta import Delta, Geometry
from .errors import PeftkitError
from .registry import register_core


@dataclass
class OFTConfig(AdapterConfig):
    """OFT settings: give `block_size` (default 32) or `n_blocks`, not both."""

    block_size: int = 32
    n_blocks: int = 0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.block_size > 0) == (self.n_blocks > 0):
            raise PeftkitError(
                f"OFTConfig needs exactly one of block_size and n_blocks > 0, got block_size={self.block_size}, "
                f"n_blocks={self.n_blocks}: set the other to 0"
            )
        if self.block_size < 0 or self.n_blocks < 0:
            raise PeftkitError("OFTConfig.block_size and n_blocks must be >= 0")
        check_positive("OFTConfig", "eps", self.eps)

    def blocks_for(self, fan_in: int, name: str = "") -> tuple[int, int]:
        """(n_blocks, block_size) for a layer with `fan_in` input columns."""
        if self.block_size:
            b, n = self.block_size, fan_in // self.block_size
        else:
            n, b = self.n_blocks, fan_in // self.n_blocks
        if n * b != fan_in or b < 2:
            raise PeftkitError(
                f"OFT cannot split module {name!r} (fan_in={fan_in}) into blocks "
                f"(block_size={self.block_size}, n_blocks={self.n_blocks}): choose a divisor of {fan_in} "
                "of at least 2, or exclude the module"
            )
        return n, b


_SKEW_BASES: dict[tuple, torch.Tensor] = {}


def skew_basis(block_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(b(b-1)/2, b*b) matrix of +1/-1 entries mapping upper-triangle entries to a skew matrix.

    One small matmul builds all blocks' Q at once: no scatter, nothing data-dependent for a
    compiler, and exact, since every output entry is a single input times +-1."""
    if torch.compiler.is_compiling():
        # Built inside the graph, on the device (no host copy, so CUDA graphs can capture it): a
        # cache lookup would guard on the dict, and the first call's insert would force a second
        # full compile.
        return _build_skew_basis(block_size, dtype, device)
    key = (block_size, str(device), dtype)
    if key not in _SKEW_BASES:
        _SKEW_BASES[key] = _build_skew_basis(block_size, dtype, device)
    return _SKEW_BASES[key]


def _build_skew_basis(block_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Comparisons only (no indexed writes of host scalars): row k is +1 at (rows[k], cols[k])
    # and -1 at the mirrored entry.
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
    index = torch.arange(block_size, device=device)
    upper = (index[None, :, None] == rows[:, None, None]) & (
        index[None, None, :] == cols[:, None, None]
    )
    basis = upper.to(dtype) - upper.transpose(1, 2).to(dtype)
    return basis.reshape(rows.shape[0], -1)


def skew(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """(n, b(b-1)/2) strict-upper-triangle entries -> (n, b, b) skew-symmetric matrices."""
    basis = skew_basis(block_size, vec.device, vec.dtype)
    return (vec @ basis).reshape(vec.shape[0], block_size, block_size)


def cayley(Q: torch.Tensor) -> torch.Tensor:
    """(I + Q)(I - Q)^-1 = 2 (I - Q)^-1 - I for a batch of skew matrices; exact, no series.

    I - Q is always invertible for skew Q (its eigenvalues are 1 - i*lambda), so the unchecked
    inverse is safe, and skipping the check avoids a device-to-host sync on every call."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    with _cusolver(Q):
        inv, _ = torch.linalg.inv_ex(eye - Q)
    return 2.0 * inv - eye


@contextlib.contextmanager
def _cusolver(Q: torch.Tensor):
    """Run the batched inverse through cuSOLVER on CUDA (see `cusolver_linalg`). Left alone under
    torch.compile, which cannot trace the switch: there the caller sets it (GraphedStep does)."""
    if not Q.is_cuda or torch.compiler.is_compiling():
        yield
        return
    with cusolver_linalg():
        yield


@contextlib.contextmanager
def cusolver_linalg():
    """Prefer cuSOLVER for CUDA linear algebra within the block. For large batches PyTorch's
    default picks MAGMA, which syncs with the host and cannot be captured in a CUDA graph;
    cuSOLVER is also faster at OFT's block sizes (bench/results/*oft-inverse*)."""
    previous = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library("cusolver")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_linalg_library(previous)


def coft_limit(Q: torch.Tensor, radius: torch.Tensor | float) -> torch.Tensor:
    """Rescale each Q_i into the Frobenius ball of its radius (COFT); radius may vary per block."""
    norm = torch.linalg.matrix_norm(Q).clamp_min(1e-30)
    return Q * (radius / norm).clamp(max=1.0)[:, None, None]


def _blocks(vec: torch.Tensor, block_size: int, scale, radius) -> torch.Tensor:
    # Parameters' precision even under autocast: R must stay orthogonal, and a bf16 Q would
    # round away small updates.
    with torch.autocast(vec.device.type, enabled=False):
        Q = skew(vec, block_size) * scale
        if radius is not None:
            Q = coft_limit(Q, radius)
        return cayley(Q)


def oft_rotation(
    vec: torch.Tensor,
    block_size: int,
    n_blocks: int,
    scale: torch.Tensor | float = 1.0,
    coft_eps: float | None = None,
) -> torch.Tensor:
    """The (n_blocks, b, b) blocks of R. A shared block (vec has one row) is repeated."""
    radius = None if coft_eps is None else coft_eps / math.sqrt(vec.shape[0])
    R = _blocks(vec, block_size, scale, radius)
    return R.expand(n_blocks, block_size, block_size) if R.shape[0] == 1 else R


def rotate_input(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """R x for x of shape (..., n*b): blockwise, without forming the full matrix."""
    n, b, _ = R.shape
    xb = x.reshape(*x.shape[:-1], n, b)
    return torch.einsum("...nj,nij->...ni", xb, R).reshape(x.shape)


def rotate_weight(weight: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """W R for a weight of shape (d_out, ...) whose trailing dims flatten to n*b."""
    n, b, _ = R.shape
    wb = weight.reshape(weight.shape[0], n, b)
    return torch.einsum("onj,nji->oni", wb, R).reshape(weight.shape)


class OFTDelta(Delta):
    def __init__(self, geometry: Geometry, config: OFTConfig, name: str = "") -> None:
        super().__init__(geometry)
        self.n_blocks, self.block_size = config.blocks_for(geometry.fan_in, name)
        rows = 1 if config.block_share else self.n_blocks
        self.Q = nn.Parameter(torch.zeros(rows, self.block_size * (self.block_size - 1) // 2))
        self.coft_eps = config.eps if config.coft else None
        self.additive = False
        self.side = "input" if geometry.kind == "linear" else "weight"
        self._batched: torch.Tensor | None = None

    def rotation(self, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        if self._batched is not None:
            return self._batched
        return oft_rotation(self.Q, self.block_size, self.n_blocks, scale, self.coft_eps)

    @staticmethod
    def prepare_all(deltas: list[OFTDelta]) -> None:
        """Build every layer's R in one batched solve before a model's forward.

        A rotation depends on parameters only, so all layers' blocks of one size go through one
        skew matmul and one batched inverse: about ten launches per forward instead of ten per
        layer (bench/NOTES.md). Layers read their slice; gradients flow back through it."""
        groups: dict[tuple, list[OFTDelta]] = {}
        for d in deltas:
            groups.setdefault((d.block_size, d.Q.dtype, d.Q.device), []).append(d)
        for (b, dtype, device), group in groups.items():
            rows = [d.Q.shape[0] for d in group]
            vec = torch.cat([d.Q for d in group])
            scale = torch.cat([d.scale.to(dtype).expand(n) for d, n in zip(group, rows)])[
                :, None, None
            ]
            radius = None
            if any(d.coft_eps is not None for d in group):
                radius = torch.cat(
                    [
                        torch.full(
                            (n,),
                            math.inf if d.coft_eps is None else d.coft_eps / math.sqrt(n),
                            dtype=dtype,
                            device=device,
                        )
                        for d, n in zip(group, rows)
                    ]
                )
            for d, R in zip(group, _blocks(vec, b, scale, radius).split(rows)):
                d._batched = R.expand(d.n_blocks, b, b) if R.shape[0] == 1 else R

    @staticmethod
    def release_all(deltas: list[OFTDelta]) -> None:
        for d in deltas:
            d._batched = None

    def transform_input(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return rotate_input(x, self.rotation(scale).to(x.dtype))

    def transform_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return rotate_weight(weight, self.rotation(scale).to(weight.dtype))

    def merge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return rotate_weight(weight, self.rotation(scale).to(weight.dtype))

    def unmerge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        # R is orthogonal, so W R R^T = W up to rounding.
        return rotate_weight(weight, self.rotation(scale).transpose(1, 2).to(weight.dtype))


register_core(
    "oft",
    OFTConfig,
    OFTDelta,
    aliases=(),
    summary="orthogonal fine-tuning: W R, R block-diagonal Cayley",
    label="OFT",
)
