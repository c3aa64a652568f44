"""K configurations of one vision method on one model, each row block of a batch through its own:
cores as K named adapters routed per row (`common_kernels.inject.routing`), SSF / AdaptFormer / VPT
/ BitFit biases / the head as K parameter sets that the methods' own hooks read per row block.
Used by batched sweeps (batched.py); each configuration's tensors keep their adapter-file keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.common_kernels import inject
from peftkit.common_kernels.inject import adapted_layers, routing

from .adaptformer import AdaptFormer
from .backbones import vit_layout
from .methods import ViTMethodConfig, core_targets
from .ssf import SSF
from .vpt import VPT


class Router:
    """The configurations the next forward serves: `which[j]` owns the j-th of len(which) equal
    blocks of its `rows` rows; `params[k]` holds configuration k's tensors (cores aside) by
    adapter-file key, '.' written '__'."""

    def __init__(self, params: nn.ModuleList) -> None:
        self.params, self.which, self.rows = params, [0], 0

    def tensors(self, key: str) -> list[torch.Tensor]:
        """Every configuration's tensor `key`. Routed modules hold these, not the key: code that
        looked tensors up by a per-site name would be compiled again for every site."""
        name = key.replace(".", "__")
        return [p[name] for p in self.params]

    def stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([tensors[k] for k in self.which])

    def per_row(self, stacked: torch.Tensor) -> torch.Tensor:
        # expand, not repeat_interleave: its sizes are known on the host, nothing to sync in a capture
        k = len(self.which)
        return stacked.unsqueeze(1).expand(k, self.rows // k, *stacked.shape[1:]).flatten(0, 1)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(0, (len(self.which), -1))


class _RoutedPair(nn.Module):
    """One SSF site's (gamma, beta), one pair per row."""

    def __init__(self, router: Router, key: str) -> None:
        super().__init__()
        self.router = router
        self.gammas, self.betas = router.tensors(f"{key}.gamma"), router.tensors(f"{key}.beta")

    @property
    def gamma(self) -> torch.Tensor:
        return self.router.per_row(self.router.stack(self.gammas))

    @property
    def beta(self) -> torch.Tensor:
        return self.router.per_row(self.router.stack(self.betas))


class _RoutedBottleneck(nn.Module):
    """One block's AdaptFormer branch, s * up(relu(down(x))), with each row block's own weights."""

    def __init__(self, router: Router, key: str, scale: float) -> None:
        super().__init__()
        self.router, self.scale = router, scale
        names = ("down.weight", "down.bias", "up.weight", "up.bias")
        self.weights = {n: router.tensors(f"{key}.{n}") for n in names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.router
        w = {n: r.stack(tensors) for n, tensors in self.weights.items()}
        h = r.blocks(x.to(w["down.weight"].dtype)).flatten(1, -2)
        h = F.relu(torch.baddbmm(w["down.bias"].unsqueeze(1), h, w["down.weight"].transpose(1, 2)))
        y = torch.baddbmm(w["up.bias"].unsqueeze(1), h, w["up.weight"].transpose(1, 2))
        return (self.scale * y).reshape(*x.shape[:-1], -1)


class _RoutedPrompts(nn.Module):
    """VPT's prompts of a layer, one set per row."""

    def __init__(self, router: Router) -> None:
        super().__init__()
        self.router, self.prompts = router, router.tensors("vpt.prompts")

    def forward(self, layer: int) -> torch.Tensor:
        return self.router.per_row(self.router.stack(self.prompts)[:, layer])


# The methods' own hooks, fed routed parameters: only what they read is swapped.
class _RoutedSSF(SSF):
    def __init__(self, model, layout, config, router: Router) -> None:
        self.router = router
        super().__init__(model, layout, config)

    def _attach(self, model: nn.Module, module: nn.Module) -> nn.Module:
        pairs = {n: _RoutedPair(self.router, f"ssf.{n}") for n in module}
        return super()._attach(model, nn.ModuleDict(pairs))


class _RoutedAdaptFormer(AdaptFormer):
    def __init__(self, model, layout, config, router: Router) -> None:
        self.router = router
        super().__init__(model, layout, config)

    def _attach(self, model: nn.Module, module: nn.Module) -> nn.Module:
        scale = self.config.scale
        routed = [
            _RoutedBottleneck(self.router, f"adaptformer.{i}", scale) for i in range(len(module))
        ]
        return super()._attach(model, nn.ModuleList(routed))


class _RoutedVPT(VPT):
    def __init__(self, model, layout, config, router: Router) -> None:
        self.router = router
        super().__init__(model, layout, config)

    def _attach(self, model: nn.Module, module: nn.Module) -> nn.Module:
        return super()._attach(model, _RoutedPrompts(self.router))


class SweepAdapters:
    """K configurations of one method on one model, each from its initial `states[k]` (keyed as
    in the adapter file): cores as K named adapters, everything else as K parameter sets in
    `model.peftkit_sweep`, read through `router` by the methods' own hooks."""

    def __init__(
        self, model: nn.Module, method: ViTMethodConfig, states: list[dict[str, torch.Tensor]]
    ) -> None:
        self.model, self.method, self.keys = model, method, list(states[0])
        layout = vit_layout(model)
        self.prefix = f"{method.core['method']}." if method.core else None
        for p in model.parameters():
            p.requires_grad_(False)
        own = nn.ModuleList(
            nn.ParameterDict(
                {
                    k.replace(".", "__"): nn.Parameter(v.detach().clone())
                    for k, v in s.items()
                    if not self._is_core(k)
                }
            )
            for s in states
        )
        model.peftkit_sweep = own
        self.router = Router(own)
        self.handles = []
        if method.core:
            spec = method.core_config(core_targets(layout, method.core_sites))
            for k, state in enumerate(states):
                handle = inject(model, spec, name=f"sweep{k}")
                n = len(self.prefix)
                handle.load_state_dict(
                    {key[n:]: v for key, v in state.items() if self._is_core(key)}
                )
                self.handles.append(handle)
        # BitFit's biases act inside their layer, before SSF scales its output: hooked first.
        self.hooks = [
            self._bias_hook(k[len("backbone.") :]) for k in self.keys if k.startswith("backbone.")
        ]
        self.parts = []
        for cls, config in (
            (_RoutedSSF, method.ssf),
            (_RoutedAdaptFormer, method.adaptformer),
            (_RoutedVPT, method.vpt),
        ):
            if config:
                self.parts.append(cls(model, layout, config, self.router))
        head = [k for k in self.keys if k.startswith("head.")]
        weight, bias = (self.router.tensors(k) for k in sorted(head, key=lambda k: "bias" in k))
        r = self.router

        def routed_head(mod, args, out):
            w, b = r.stack(weight), r.stack(bias)
            return torch.baddbmm(b.unsqueeze(1), r.blocks(args[0]), w.transpose(1, 2)).flatten(0, 1)

        self.hooks.append(model.get_submodule(layout.head).register_forward_hook(routed_head))
        for k in range(len(states)):  # injecting the cores froze every earlier parameter
            for _, p in self.named(k):
                p.requires_grad_(True)

    def _is_core(self, key: str) -> bool:
        return self.prefix is not None and key.startswith(self.prefix)

    def _bias_hook(self, name: str):
        """BitFit: the layer ran with the shared frozen bias b0; each row block gets its own b_k."""
        module = self.model.get_submodule(name.removesuffix(".bias"))
        base = getattr(module, "base", module)  # a core's wrapper keeps the layer as .base
        frozen, channel = base.bias, 1 if isinstance(base, nn.Conv2d) else -1
        r, biases = self.router, self.router.tensors(f"backbone.{name}")

        def hook(mod, args, out):
            rows = r.per_row(r.stack(biases) - frozen)
            shape = [rows.shape[0]] + [1] * (out.dim() - 1)
            shape[channel] = -1
            return out + rows.view(shape).to(out.dtype)

        return module.register_forward_hook(hook)

    def named(self, k: int) -> list[tuple[str, nn.Parameter]]:
        """Configuration k's trained tensors in adapter-file order (the order alone clips them in)."""
        own = self.model.peftkit_sweep[k]
        core = dict(self.handles[k].named_parameters()) if self.handles else {}
        n = len(self.prefix or "")
        return [
            (key, core[key[n:]] if self._is_core(key) else own[key.replace(".", "__")])
            for key in self.keys
        ]

    @contextlib.contextmanager
    def routed(self, which: list[int], rows: int) -> Iterator[torch.Tensor | None]:
        """Within the block a batch of `rows` rows goes through configurations `which`, one equal
        row block each; yields the device row ids that a captured step reads (None: no cores)."""
        self.router.which, self.router.rows = which, rows
        if not self.handles:
            yield None
            return
        ids = [j for j in range(len(which)) for _ in range(rows // len(which))]
        with routing(self.model, ids, [f"sweep{k}" for k in which]):
            layers = adapted_layers(self.model)
            yield next((l.adapter_ids for l in layers if l.adapter_ids is not None), None)

    def forward(self, model: nn.Module, images: torch.Tensor, which: list[int]) -> torch.Tensor:
        """Logits of `images`, whose len(which) row blocks go through configurations `which`."""
        with self.routed(which, images.shape[0]):
            return model(images)

    def remove(self) -> None:
        """The plain frozen model back: hooks, routed methods and adapters gone."""
        for h in self.hooks:
            h.remove()
        for part in self.parts:
            part.remove()
        for handle in self.handles:
            handle.unload()
        del self.model.peftkit_sweep
