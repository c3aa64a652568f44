"""What VPT, AdaptFormer and SSF share: their parameters live in one submodule `model.<attr>` (so
accelerate, DDP and `model.to()` treat them like the model's own) and act through forward hooks, so
the timm / open_clip code is never edited and `remove()` gives the plain ViT back."""

from __future__ import annotations

import torch
from torch import nn

from peftkit.common_kernels.errors import PeftkitError


class HookedMethod:
    """Subclasses set `attr` (the submodule name), `label` (for messages) and `mismatch_hint` (why a
    saved state may not fit), call `_attach(model, module)` and append their hook handles to `hooks`."""

    attr: str
    label: str
    mismatch_hint: str

    def _attach(self, model: nn.Module, module: nn.Module) -> nn.Module:
        if hasattr(model, self.attr):
            raise PeftkitError(
                f"this model already has {self.label}: remove() it before adding another"
            )
        ref = next(model.parameters())
        module = module.to(ref.device).train(model.training)
        setattr(model, self.attr, module)
        self.model, self.hooks = model, []
        return module

    @property
    def module(self) -> nn.Module:
        return getattr(self.model, self.attr)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.module.state_dict()
        bad = sorted(
            k
            for k in set(own) | set(state)
            if k not in own or k not in state or own[k].shape != state[k].shape
        )
        if bad:
            k = bad[0]
            shapes = [tuple(d[k].shape) if k in d else "missing" for d in (state, own)]
            raise PeftkitError(
                f"{self.label} state does not fit this model: tensor {k!r} is {shapes[0]} in the "
                f"file but {shapes[1]} here ({self.mismatch_hint})"
            )
        self.module.load_state_dict(state)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        delattr(self.model, self.attr)
