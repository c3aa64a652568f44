"""One config for any composition of vision methods, and the object that applies it to a ViT.

    config = ViTMethodConfig.parse("vpt-deep+lora", vpt_length=10, r=8)
    adapter = VisionAdapter(model, config)          # freezes the backbone, adds prompts + LoRA
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    ...
    adapter.save("adapter.safetensors"); adapter.unload()

Cores (LoRA/OFT/LoKr) come from common_kernels `inject`, targeted at the layout's sites (qkv,
proj, fc1, fc2); VPT, AdaptFormer and SSF come from their files here. Apply order is cores, then
SSF (so SSF scales the adapted output), then AdaptFormer and VPT (hooks that do not interact).
`reparameterize()` merges cores and folds SSF, giving the plain ViT back with new weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.common_kernels import AdapterConfig, inject
from peftkit.common_kernels.adapter_file import read_tensors, save_tensors
from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.registry import core, core_names

from .adaptformer import AdaptFormer, AdaptFormerConfig
from .backbones import ViTLayout, backbone_parameters, vit_layout
from .baselines import BASE_TUNING, backbone_trainable, head_parameters
from .ssf import SSF, SSFConfig
from .vpt import VPT, VPTConfig

TARGET_FIELDS = ("targets", "target_types", "exclude")  # set per backbone by `core_config`
OWN_METHODS = ("linear", "bitfit", "full", "vpt-shallow", "vpt-deep", "adaptformer", "ssf")


def method_names() -> tuple[str, ...]:
    """Every name `parse` accepts: the vision methods, then each adapter core and its aliases."""
    return (*OWN_METHODS, *core_names(aliases=True))


@dataclass
class ViTMethodConfig:
    """Which methods, with which options. `core` is a common_kernels config dict without targets
    (e.g. {"method": "lora", "r": 8}); `core_sites` picks the layers it wraps in every block."""

    vpt: VPTConfig | None = None
    adaptformer: AdaptFormerConfig | None = None
    ssf: SSFConfig | None = None
    core: dict[str, Any] | None = None
    core_sites: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    base_tuning: str = "head"

    def __post_init__(self) -> None:
        for name, cls in (
            ("vpt", VPTConfig),
            ("adaptformer", AdaptFormerConfig),
            ("ssf", SSFConfig),
        ):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        if self.base_tuning not in BASE_TUNING:
            raise PeftkitError(
                f"ViTMethodConfig.base_tuning must be one of {list(BASE_TUNING)}, got {self.base_tuning!r}"
            )
        if self.core is not None:
            if self.core.get("method") not in core_names(aliases=True):
                raise PeftkitError(
                    f"ViTMethodConfig.core['method'] must be one of {core_names(aliases=True)}, "
                    f"got {self.core.get('method')!r}"
                )
            self.core_config(["validate"])
        if not self.core_sites:
            raise PeftkitError(
                "ViTMethodConfig.core_sites is empty: choose from qkv, proj, fc1, fc2"
            )

    def core_config(self, targets: list[str]) -> AdapterConfig:
        return AdapterConfig.from_dict(
            {**self.core, "targets": targets, "target_types": ["Linear", "Conv2d"]}
        )

    @property
    def name(self) -> str:
        parts = (
            ([f"vpt-{'deep' if self.vpt.deep else 'shallow'}"] if self.vpt else [])
            + (["adaptformer"] if self.adaptformer else [])
            + (["ssf"] if self.ssf else [])
            + ([self.core["method"]] if self.core else [])
        )
        if self.base_tuning != "head" or not parts:
            parts.insert(
                0, {"head": "linear", "bitfit": "bitfit", "full": "full"}[self.base_tuning]
            )
        return "+".join(parts)

    @staticmethod
    def parse(spec: str, **options: Any) -> ViTMethodConfig:
        """Build from 'vpt-deep+lora'-style names; `options` fill method fields (vpt_length,
        vpt_dropout, bottleneck, adapter_scale, ssf_sites, r, alpha, block_size, factor, core_sites...)."""
        names = [n.strip() for n in spec.split("+") if n.strip()]
        unknown = [n for n in names if n not in method_names()]
        if unknown or not names:
            raise PeftkitError(
                f"unknown method(s) {unknown or spec!r}: combine any of {list(method_names())} with '+'"
            )
        o = {k: v for k, v in options.items() if v is not None}
        kw: dict[str, Any] = {}
        for n in names:
            if n.startswith("vpt"):
                kw["vpt"] = VPTConfig(
                    length=o.get("vpt_length", 10),
                    deep=n == "vpt-deep",
                    dropout=o.get("vpt_dropout", 0.0),
                )
            elif n == "adaptformer":
                kw["adaptformer"] = AdaptFormerConfig(
                    o.get("bottleneck", 64), o.get("adapter_scale", 0.1)
                )
            elif n == "ssf":
                kw["ssf"] = SSFConfig(**({"sites": o["ssf_sites"]} if "ssf_sites" in o else {}))
            elif n in core_names(aliases=True):
                options = {"rank": 8, "block_size": 32, **o}
                made = core(n).make_config([], **options).to_dict()
                kw["core"] = {k: made[k] for k in sorted(made) if k not in TARGET_FIELDS}
            elif n in ("bitfit", "full"):
                kw["base_tuning"] = n
        if "core_sites" in o:
            kw["core_sites"] = o["core_sites"]
        return ViTMethodConfig(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vpt": self.vpt and self.vpt.to_dict(),
            "adaptformer": self.adaptformer and self.adaptformer.to_dict(),
            "ssf": self.ssf and self.ssf.to_dict(),
            "core": self.core,
            "core_sites": list(self.core_sites),
            "base_tuning": self.base_tuning,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ViTMethodConfig:
        allowed = {"vpt", "adaptformer", "ssf", "core", "core_sites", "base_tuning"}
        if set(data) - allowed:
            raise PeftkitError(
                f"ViTMethodConfig has no field(s) {sorted(set(data) - allowed)}: allowed are {sorted(allowed)}"
            )
        return ViTMethodConfig(**data)

    @staticmethod
    def from_json(text: str) -> ViTMethodConfig:
        return ViTMethodConfig.from_dict(json.loads(text))


def core_targets(layout: ViTLayout, sites: list[str]) -> list[str]:
    """`inject` patterns matching exactly the modules at `sites` in every block."""
    return ["re:" + n.replace(".", r"\.") for s in sites for n in layout.site_names(s)]


def _plain_name(name: str) -> str:
    """A backbone parameter's name as in the plain ViT (without a core wrapper's '.base')."""
    return name.replace(".base.", ".")


class VisionAdapter:
    """`config` applied to a ViT classifier (timm or open_clip tower + head)."""

    def __init__(
        self, model: nn.Module, config: ViTMethodConfig, base_model: str | None = None
    ) -> None:
        self.model, self.config, self.base_model = model, config, base_model
        self.layout = vit_layout(model)
        self.layout.check_methods(config.name.split("+"))
        self.backbone_size = backbone_parameters(model)
        self.saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.core = None
        if config.core is not None:
            targets = core_targets(self.layout, config.core_sites)
            self.core = inject(
                model, config.core_config(targets), name="vision", base_model=base_model
            )
        self.parts: dict[str, Any] = {}
        if config.ssf:
            self.parts["ssf"] = SSF(model, self.layout, config.ssf)
        if config.adaptformer:
            self.parts["adaptformer"] = AdaptFormer(model, self.layout, config.adaptformer)
        if config.vpt:
            self.parts["vpt"] = VPT(model, self.layout, config.vpt)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    def _backbone(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (_plain_name(n), p)
            for n, p in backbone_trainable(self.model, self.config.base_tuning, self.layout.head)
        ]

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Every trained tensor, keyed as in the adapter file."""
        named = [
            (f"head.{n.split('.', 1)[1]}", p)
            for n, p in head_parameters(self.model, self.layout.head)
        ]
        named += [(f"backbone.{n}", p) for n, p in self._backbone()]
        if self.core is not None:
            named += [
                (f"{self.config.core['method']}.{n}", p) for n, p in self.core.named_parameters()
            ]
        for part, obj in self.parts.items():
            module = getattr(self.model, obj.attr)
            named += [(f"{part}.{n}", p) for n, p in module.named_parameters()]
        return named

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable()]

    def parameter_counts(self) -> dict[str, float]:
        """Trainable parameters with and without the head, and (without it) as % of the backbone."""
        total = sum(p.numel() for p in self.trainable_parameters())
        head = sum(p.numel() for _, p in head_parameters(self.model, self.layout.head))
        return {
            "trainable": total,
            "trainable_without_head": total - head,
            "backbone": self.backbone_size,
            # the head is new for every task: full fine-tuning is 100% of the backbone, not more
            "trainable_pct_of_backbone": 100.0 * (total - head) / self.backbone_size,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named_trainable()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_trainable())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise PeftkitError(
                f"adapter state does not fit the '{self.config.name}' adapter on this model: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}; it was made with other methods or sites"
            )
        for k in sorted(own):
            if own[k].shape != state[k].shape:
                raise PeftkitError(
                    f"adapter tensor {k!r} has shape {tuple(state[k].shape)} but this model needs "
                    f"{tuple(own[k].shape)}: it was made for another backbone or number of classes"
                )
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k].to(p.dtype))

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """Write the trained tensors + method config to one safetensors file, atomically."""
        from peftkit import __version__

        meta = {
            "peftkit_version": __version__,
            "method": "vision",
            "config": self.config.to_json(),
            "base_model": self.base_model or "",
            "num_classes": str(self._num_classes()),
            **(extra or {}),
        }
        if self.core is not None:
            meta["core_fingerprint"] = self.core.fingerprint()
        return save_tensors(path, self.state_dict(), meta)

    def _num_classes(self) -> int:
        return self.model.get_submodule(self.layout.head).out_features

    def unload(self) -> None:
        """Remove every method and restore the requires_grad flags: the plain (trained-head) ViT."""
        for part in list(self.parts.values()):
            part.remove()
        self.parts = {}
        if self.core is not None:
            self.core.unload()
            self.core = None
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.saved_flags.get(n, p.requires_grad))

    def reparameterize(self) -> nn.Module:
        """Merge cores and fold SSF into the weights: a plain ViT with no extra modules or cost.
        VPT and AdaptFormer add tokens / branches and cannot be folded."""
        kept = [p for p in ("vpt", "adaptformer") if p in self.parts]
        if kept:
            raise PeftkitError(
                f"{' and '.join(kept)} cannot be folded into the ViT's weights: export the adapter "
                "with save() and load it with load_vision_adapter() for inference instead"
            )
        if self.core is not None:
            self.core.merge()
            merged = {
                n: layer.base.weight.detach().clone() for n, layer in self.core.layers.items()
            }
            self.core.unload()
            self.core = None
            with torch.no_grad():
                for n, w in merged.items():
                    self.model.get_submodule(n).weight.copy_(w)
        if "ssf" in self.parts:
            self.parts.pop("ssf").reparameterize()
        self.unload()
        return self.model


def read_vision_adapter(
    path: str | Path,
) -> tuple[ViTMethodConfig, dict[str, torch.Tensor], dict[str, str]]:
    tensors, meta = read_tensors(path)
    if meta.get("method") != "vision":
        raise PeftkitError(
            f"{str(path)!r} is not a peftkit vision adapter (method={meta.get('method')!r}); core-only "
            "files load with peftkit.common_kernels.load_adapter"
        )
    return ViTMethodConfig.from_json(meta["config"]), tensors, meta


def load_vision_adapter(model: nn.Module, path: str | Path) -> VisionAdapter:
    """Apply the adapter stored at `path` to `model` (same backbone and number of classes)."""
    config, tensors, meta = read_vision_adapter(path)
    adapter = VisionAdapter(model, config, base_model=meta.get("base_model") or None)
    try:
        if adapter.core is not None and meta.get("core_fingerprint") not in (
            None,
            adapter.core.fingerprint(),
        ):
            raise PeftkitError(
                f"adapter {str(path)!r} was made for another backbone ({meta.get('base_model') or 'unknown'}): "
                "its core targets have other shapes"
            )
        adapter.load_state_dict(tensors)
    except PeftkitError:
        adapter.unload()
        raise
    return adapter
