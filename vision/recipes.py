"""Default AdamW learning rate and weight decay per vision method, as the methods' VTAB-1k recipes
use them at batch 64 with 10 warm-up epochs and a cosine schedule. A composition ("vpt-deep+lora",
"full+ssf") takes the smallest rate of its parts with that part's weight decay: the most fragile
part (the whole backbone under full fine-tuning) sets the step size.
"""

from __future__ import annotations

# NOAH (Zhang et al., 2022, "Neural Prompt Search") trains its VPT, Adapter and LoRA baselines on
# VTAB-1k (configs/{VPT,Adapter,LoRA}/VTAB/*.sh) at batch 64 for 100 epochs, weight decay 1e-4,
# lr searched in {5e-3, 1e-3}: the lower one is the default here. The linear probe and BitFit
# train as few parameters and take the same rate.
_NOAH = (1e-3, 1e-4)
METHOD_DEFAULTS: dict[str, tuple[float, float]] = {
    "linear": _NOAH,
    "bitfit": _NOAH,
    "vpt-shallow": _NOAH,
    "vpt-deep": _NOAH,
    "adaptformer": _NOAH,
    "lora": _NOAH,
    # SSF's released VTAB-1k scripts (train_scripts/vit/vtab/*/train_ssf.sh): AdamW, lr 5e-3
    # (1e-2 on a few tasks), weight decay 5e-5.
    "ssf": (5e-3, 5e-5),
    # Full fine-tuning moves all 86M weights: at 1e-3 a ViT-B/16 swung from 97.5 to 83.8 top-1
    # mid-run. MAE's end-to-end fine-tuning recipe for ViT-B (He et al., 2022, FINETUNE.md):
    # AdamW, base lr 5e-4 scaled by batch/256 (1.25e-4 at batch 64), weight decay 0.05 (its
    # layer-wise lr decay of 0.65 is not applied here).
    "full": (1.25e-4, 0.05),
}


def method_defaults(method: str) -> tuple[float, float]:
    """(lr, weight decay) for a '+'-joined method name; cores without a recipe (OFT, LoKr, ...)
    take LoRA's, as the concept trainers do."""
    parts = [METHOD_DEFAULTS.get(n.strip(), METHOD_DEFAULTS["lora"]) for n in method.split("+")]
    return min(parts)
