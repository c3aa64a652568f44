"""peftkit.vision: parameter-efficient fine-tuning of ViTs (timm ViTs, DINOv2, Swin, open_clip towers).

Methods (one file each): VPT (vpt.py), AdaptFormer (adaptformer.py), SSF (ssf.py), the
baselines linear probe / BitFit / full fine-tuning (baselines.py), and the common_kernels cores
LoRA / OFT / LoKr on qkv, proj, fc1, fc2; methods.py composes them through one config.

    >>> from peftkit.vision import ViTMethodConfig, VisionAdapter, create_backbone
    >>> model = create_backbone("vit_tiny_patch16_224", num_classes=4, img_size=32)
    >>> adapter = VisionAdapter(model, ViTMethodConfig.parse("vpt-deep+lora", vpt_length=4, r=4))
    >>> adapter.parameter_counts()["trainable"] > 0
    True
"""

from .adaptformer import AdaptFormerConfig
from .backbones import create_backbone, vit_layout
from .data import Preprocess, load_task
from .methods import VisionAdapter, ViTMethodConfig, load_vision_adapter
from .ssf import SSFConfig
from .train import ViTTrainConfig, evaluate_vit, train_vit
from .vpt import VPTConfig

__all__ = [
    "AdaptFormerConfig",
    "Preprocess",
    "SSFConfig",
    "VPTConfig",
    "ViTMethodConfig",
    "ViTTrainConfig",
    "VisionAdapter",
    "create_backbone",
    "evaluate_vit",
    "load_task",
    "load_vision_adapter",
    "train_vit",
    "vit_layout",
]
