"""The reference points of every VTAB-1k table: which backbone parameters train besides the head.

- linear probe ("head"): the backbone is frozen; only the classification head trains.
- BitFit (Zaken et al., ACL 2022): every bias term of the backbone trains (Linear, Conv2d and
  LayerNorm biases), weights stay frozen.
- full fine-tuning ("full"): everything trains.

The head always trains (a new label set needs a new head); adapters add their own parameters on
top of whichever baseline is chosen.
"""

from __future__ import annotations

from torch import nn

from peftkit.common_kernels.errors import PeftkitError

BASE_TUNING = ("head", "bitfit", "full")


def backbone_trainable(model: nn.Module, mode: str, head: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs of the backbone that `mode` trains; adapter modules excluded."""
    if mode not in BASE_TUNING:
        raise PeftkitError(f"base tuning {mode!r} unknown: use one of {list(BASE_TUNING)}")
    chosen = []
    for name, p in model.named_parameters():
        if name.startswith(head + ".") or name.startswith("peftkit_") or ".deltas." in name:
            continue
        if mode == "full" or (mode == "bitfit" and name.endswith(".bias")):
            chosen.append((name, p))
    return chosen


def head_parameters(model: nn.Module, head: str) -> list[tuple[str, nn.Parameter]]:
    return [(f"{head}.{n}", p) for n, p in model.get_submodule(head).named_parameters()]
