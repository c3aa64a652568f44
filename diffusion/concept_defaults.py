"""One set of concept-training defaults, shared by `peftkit train-concept`, `peftkit demo` and the
app's Personalize tab, so the three train the same adapter from the same images. Tuned on the
starter model (assets/starter-sd, assets/recipes/README.md): an attention-only LoRA at 2e-4 learned
nothing visible there; attention + feed-forward + conv at 1e-3 with Min-SNR weighting draws the
concept and, with prior preservation, keeps the control prompt's look.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ConceptDefaults:
    """Defaults of a concept run; `lr_for(method)` gives the learning rate of a core."""

    method: str = "lora"
    steps: int = 400
    rank: int = 8
    block_size: int = 32
    # UNet module presets (dreambooth.UNET_PRESETS) the adapter wraps
    targets: tuple[str, ...] = ("attn", "ff", "conv")
    # Per core (canonical names); a core missing here takes LoRA's rate. Rotations (OFT, BOFT)
    # move less per step than additive updates, so they get a higher one.
    lr: dict[str, float] = field(
        default_factory=lambda: {"lora": 1e-3, "kron": 1e-3, "oft": 3e-3, "boft": 3e-3}
    )
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    # prior preservation with the class word keeps the class (and other prompts) from bleeding
    num_class_images: int = 12
    prior_weight: float = 1.0
    caption_dropout: float = 0.0
    flip: bool = False
    # Min-SNR loss weighting (DDPM bases; flow-matching SD3/Flux have their own weighting): on the
    # starter it took the demo from 6 to 11 of 12 images showing the concept
    min_snr_gamma: float = 5.0

    def min_snr_for(self, base) -> float:
        """The Min-SNR gamma for `base`: 0 (off) for a flow-matching transformer."""
        return 0.0 if getattr(base, "is_transformer", False) else self.min_snr_gamma

    def lr_for(self, method: str) -> float:
        from ..common_kernels.registry import core

        return self.lr.get(core(method).name, self.lr["lora"])  # core() resolves aliases


CONCEPT_DEFAULTS = ConceptDefaults()
