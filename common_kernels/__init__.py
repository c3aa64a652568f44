"""peftkit.common_kernels: adapter cores (see `core_names()`), injection and adapter
files; the training machinery lives in `peftkit.common_kernels.training`. Knows nothing of
diffusers, timm or open_clip."""

from .adapter_file import load_adapter, read_adapter_config, save_adapter
from .boft import BOFTConfig
from .config import AdapterConfig
from .diag_oft import DiagOFTConfig
from .dora import DoRAConfig, dora_weight
from .errors import PeftkitError
from .inject import AdapterHandle, adapted_layers, find_targets, inject, remove_adapters, routing
from .kron import KronConfig, factorize, kron_delta_weight, kron_linear_delta
from .layer import AdaptedLayer
from .loha import LoHaConfig, loha_delta_weight
from .lora import LoRAConfig, lora_conv_delta, lora_delta_weight, lora_linear_delta
from .lycoris_boft import LycorisBOFTConfig
from .oft import OFTConfig, cayley, oft_rotation, rotate_input, rotate_weight, skew
from .registry import Core, core, core_names, register_core

__all__ = [
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterHandle",
    "BOFTConfig",
    "DiagOFTConfig",
    "DoRAConfig",
    "KronConfig",
    "LoHaConfig",
    "LoRAConfig",
    "LycorisBOFTConfig",
    "OFTConfig",
    "PeftkitError",
    "adapted_layers",
    "cayley",
    "dora_weight",
    "factorize",
    "find_targets",
    "inject",
    "kron_delta_weight",
    "kron_linear_delta",
    "load_adapter",
    "loha_delta_weight",
    "lora_conv_delta",
    "lora_delta_weight",
    "lora_linear_delta",
    "core",
    "core_names",
    "Core",
    "register_core",
    "oft_rotation",
    "read_adapter_config",
    "remove_adapters",
    "rotate_input",
    "rotate_weight",
    "routing",
    "save_adapter",
    "skew",
]
