"""Kronecker adapter (LoKr; KronA, Edalati et al., 2022, arXiv:2212.10650; LyCORIS LoKr):

    h = W0 x + s * (W1 ⊗ W2) x,   W1: a x c,  W2: b x d (optionally W2 = W2a W2b, rank r),
    d_out = a b,  d_in = c d,  s = alpha / r.

Applied without forming the d_out x d_in product (KronA eq. 4): with X = x reshaped to c x d,
(W1 ⊗ W2) vec(X) = vec(W1 X W2^T), which costs tokens x (c d b + a c b) instead of
tokens x d_out x d_in. Conv2d kernels make W2 a (b, d, kh, kw) kernel; there the delta kernel is
formed (it is small next to the activations) and applied as one conv. In weight space
(`apply="weight"`, or "auto" on CUDA) it is formed for Linear too and the base op runs once with
W + s W1 ⊗ W2 (fewer kernels; see lora.py).

Factor sizes follow the LyCORIS/peft rule: each dimension splits into the most nearly square pair
m <= n, or (factor, dim / factor) when `factor` divides it. W2 becomes low rank when
r < max(b, d) / 2, and W1 too with `decompose_both` when r < max(a, c) / 2. One factor starts at
zero so the delta does: W1 by default (peft), W2 with init="w2_zero" (LyCORIS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, check_positive
from .delta import Delta, Geometry
from .errors import PeftkitError
from .lora import stacked_scales
from .registry import register_core


@dataclass
class KronConfig(AdapterConfig):
    """LoKr settings. `alpha=None` means alpha = r (scaling 1)."""

    r: int = 8
    alpha: float | None = None
    factor: int = -1
    decompose_both: bool = False
    init: str = "w1_zero"
    apply: str = "auto"
    # LyCORIS 4.1.3's factor sizes: the smaller of a pair first even when `factor` is the larger
    # (peft keeps (factor, dim / factor)), and `unbalanced_factorization` (W1 takes the output's
    # larger factor). Set by the file readers to rebuild such files exactly.
    lycoris_order: bool = False
    unbalanced: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise PeftkitError(f"KronConfig.r must be an integer >= 1, got {self.r!r}")
        if self.alpha is not None:
            check_positive("KronConfig", "alpha", self.alpha)
        if self.factor == 0 or self.factor < -1:
            raise PeftkitError(
                f"KronConfig.factor must be -1 (most square) or a positive integer, got {self.factor}"
            )
        if self.init not in ("w1_zero", "w2_zero"):
            raise PeftkitError(f"KronConfig.init must be 'w1_zero' or 'w2_zero', got {self.init!r}")
        if self.apply not in ("auto", "factored", "weight"):
            raise PeftkitError(
                f"KronConfig.apply must be 'auto', 'factored' or 'weight', got {self.apply!r}"
            )

    @property
    def scaling(self) -> float:
        return (float(self.r) if self.alpha is None else self.alpha) / self.r


def factorize(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into m * n: (factor, dimension / factor) when factor divides it (kept in
    that order even when factor is the larger one, as LyCORIS and peft do, so files stay
    compatible), else the pair m <= n with the smallest m + n whose m does not exceed `factor`."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        cand = m + 1
        while dimension % cand:
            cand += 1
        if cand + dimension // cand > m + n or cand > limit:
            break
        m, n = cand, dimension // cand
    return (m, n) if m <= n else (n, m)


def kron_linear_delta(
    x: torch.Tensor,
    W1: torch.Tensor,
    W2: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """scale * (W1 ⊗ W2) x for x of shape (..., c*d), as vec(W1 X W2^T). W2 may be a (W2a, W2b) pair."""
    a, c = W1.shape
    X = x.reshape(*x.shape[:-1], c, -1)
    if isinstance(W2, tuple):
        T = F.linear(F.linear(X, W2[1]), W2[0])
    else:
        T = F.linear(X, W2)
    Y = torch.matmul(W1 * scale, T)
    return Y.reshape(*x.shape[:-1], -1)


def kron_delta_weight(
    W1: torch.Tensor, W2: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """scale * W1 ⊗ W2 with W2 a matrix (b, d) or a kernel (b, d, kh, kw)."""
    if W2.dim() == 4:
        a, c = W1.shape
        b, d, kh, kw = W2.shape
        return (scale * torch.einsum("ac,bdhw->abcdhw", W1, W2)).reshape(a * b, c * d, kh, kw)
    return scale * torch.kron(W1, W2)


class KronDelta(Delta):
    kohya_names: ClassVar[dict[str, str]] = {
        "W1": "lokr_w1",
        "W1a": "lokr_w1_a",
        "W1b": "lokr_w1_b",
        "W2": "lokr_w2",
        "W2a": "lokr_w2_a",
        "W2b": "lokr_w2_b",
    }

    def __init__(self, geometry: Geometry, config: KronConfig, name: str = "") -> None:
        super().__init__(geometry)
        r = config.r
        a, b = factorize(geometry.out_features, config.factor)
        c, d = factorize(geometry.in_features, config.factor)
        if config.lycoris_order:
            (a, b), (c, d) = sorted((a, b)), sorted((c, d))
        if config.unbalanced:
            a, b = b, a
        kh, kw = geometry.kernel_size
        self.scaling = config.scaling
        self.shape = (a, b, c, d)
        if config.decompose_both and r < max(a, c) / 2:
            self.W1a, self.W1b = nn.Parameter(torch.empty(a, r)), nn.Parameter(torch.empty(r, c))
            w1_parts = [self.W1a, self.W1b]
        else:
            self.W1 = nn.Parameter(torch.empty(a, c))
            w1_parts = [self.W1]
        # A rank above min(b, d kh kw) (a very unbalanced split) is wasteful but exact, and LyCORIS
        # files hold such pairs: kept, not refused.
        if r < max(b, d) / 2:
            self.W2a, self.W2b = (
                nn.Parameter(torch.empty(b, r)),
                nn.Parameter(torch.empty(r, d * kh * kw)),
            )
            w2_parts = [self.W2a, self.W2b]
        else:
            self.W2 = nn.Parameter(
                torch.empty(b, d, kh, kw) if geometry.kind == "conv2d" else torch.empty(b, d)
            )
            w2_parts = [self.W2]
        for p in w1_parts + w2_parts:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        # Zero the first factor of the chosen side: the product, and so the delta, starts at 0.
        zero = w1_parts[0] if config.init == "w1_zero" else w2_parts[-1]
        nn.init.zeros_(zero)
        self.apply_mode = config.apply

        self._batched: torch.Tensor | None = None

    def add_to_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self._batched is not None:
            return weight + self._batched.to(weight.dtype)
        s = (scale * self.scaling).to(weight.dtype)
        return weight + kron_delta_weight(self.w1(weight.dtype), self.w2(weight.dtype), s).reshape(
            weight.shape
        )

    def _factors(self) -> tuple:
        return tuple(
            name for name in ("W1", "W1a", "W1b", "W2", "W2a", "W2b") if hasattr(self, name)
        )

    @staticmethod
    def prepare_all(deltas: list[KronDelta]) -> None:
        """Form the weight-space deltas of all equal-shaped layers in one batched product before a
        model's forward: a handful of launches per shape instead of ~6 per layer (bench/NOTES.md).
        Layers that will run factored (apply="factored", or "auto" off CUDA) are skipped."""
        groups: dict[tuple, list[KronDelta]] = {}
        for d in deltas:
            if d.apply_mode == "factored" or (d.apply_mode == "auto" and not d.scale.is_cuda):
                continue
            key = (
                d.geometry.weight_shape,
                d.weight_dtype,
                *((n, tuple(getattr(d, n).shape), getattr(d, n).dtype) for n in d._factors()),
            )
            groups.setdefault(key, []).append(d)
        for group in groups.values():
            first = group[0]

            def stacked(name: str, group: list = group) -> torch.Tensor:
                return torch.stack([getattr(d, name) for d in group])

            W1 = (
                stacked("W1") if hasattr(first, "W1") else torch.bmm(stacked("W1a"), stacked("W1b"))
            )
            W2 = (
                stacked("W2") if hasattr(first, "W2") else torch.bmm(stacked("W2a"), stacked("W2b"))
            )
            a, b, c, d_ = first.shape
            W2 = W2.reshape(len(group), b, d_, -1)
            scale = stacked_scales(group)
            # Factors cast, not the product: each element of the Kronecker product is a single
            # multiply, so the weight-sized tensor is written once, in the weight's dtype, at one
            # extra rounding of the (small) factors; per layer the add is the one kernel left.
            dtype = first.weight_dtype or W1.dtype
            W1 = (W1 * scale[:, None, None]).to(dtype)
            delta = torch.einsum("gac,gbdk->gabcdk", W1, W2.to(dtype))
            for d, one in zip(group, delta.reshape(len(group), *first.geometry.weight_shape)):
                d._batched = one

    def group_key(self) -> tuple | None:
        return ("kron", self.geometry.weight_shape)

    @staticmethod
    def routed_weights(deltas: list[KronDelta], weight: torch.Tensor) -> torch.Tensor:
        """(K, *weight.shape): W + s_k W1_k (x) W2_k for routed runs; with the deltas formed
        before the forward, one stack and one broadcast add instead of K adds and a stack."""
        prepared = [d._batched for d in deltas]
        if all(p is not None and p.dtype == weight.dtype for p in prepared):
            return torch.stack(prepared).add_(weight)
        return torch.stack([d.add_to_weight(weight, d.scale) for d in deltas])

    @staticmethod
    def release_all(deltas: list[KronDelta]) -> None:
        for d in deltas:
            d._batched = None

    def w1(self, dtype: torch.dtype) -> torch.Tensor:
        if hasattr(self, "W1"):
            return self.W1.to(dtype)
        return self.W1a.to(dtype) @ self.W1b.to(dtype)

    def w2(self, dtype: torch.dtype) -> torch.Tensor:
        if hasattr(self, "W2"):
            return self.W2.to(dtype)
        a, b, c, d = self.shape
        kh, kw = self.geometry.kernel_size
        full = self.W2a.to(dtype) @ self.W2b.to(dtype)
        return full.reshape(b, d, kh, kw) if self.geometry.kind == "conv2d" else full

    def delta(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        s = (scale * self.scaling).to(x.dtype)
        if self.geometry.kind == "linear":
            W2 = (
                self.W2.to(x.dtype)
                if hasattr(self, "W2")
                else (self.W2a.to(x.dtype), self.W2b.to(x.dtype))
            )
            return kron_linear_delta(x, self.w1(x.dtype), W2, s)
        return self.geometry.conv(x, kron_delta_weight(self.w1(x.dtype), self.w2(x.dtype), s))

    def delta_weight(self, scale: float, dtype: torch.dtype) -> torch.Tensor:
        W = kron_delta_weight(self.w1(dtype), self.w2(dtype), scale * self.scaling)
        return W.reshape(self.geometry.weight_shape)

    def merge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return weight + self.delta_weight(scale, weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return weight - self.delta_weight(scale, weight.dtype)


register_core(
    "kron",
    KronConfig,
    KronDelta,
    aliases=("lokr",),
    summary="Kronecker update W + s W1 (x) W2 (LoKr)",
    label="LoKr",
)
