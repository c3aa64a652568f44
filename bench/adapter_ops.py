"""What an adapter adds to a step, counted without a GPU: aten ops (each a kernel on the GPU) and
bytes they write, for the SD1.5-shaped UNet's attention layers at their shapes and token counts
(64x64 latents, 77 text tokens, bs 1 training, one row per adapter routed), bf16 base as in
bench/train_step.py. Tensors live on the meta device: shapes, no arithmetic. A proxy for GPU time
where launches and memory traffic, not FLOPs, bound the adapter's share (bench/NOTES.md).

    python bench/adapter_ops.py --out /tmp/ops    # floor-train,boft-train,floor,lora-routed4,lokr-routed4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SD15_UNET, UNET_TARGETS  # noqa: E402

from peftkit.common_kernels import BOFTConfig, KronConfig, LoRAConfig, inject, routing  # noqa: E402

ALL = ["re:layers\\..*"]
_autocast = torch.autocast


def autocast(device_type: str, *args, **kwargs):
    """torch.autocast, which knows no meta device: the cores' "autocast off" regions are no-ops."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return _autocast(device_type, *args, **kwargs)


torch.autocast = autocast


class Count(TorchDispatchMode):
    """Non-view aten ops and the bytes of the tensors they return."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket.__name__ in ("empty", "new_empty", "_unsafe_view"):
            return out  # no kernel, no bytes
        self.ops[func.overloadpacket.__name__] += 1
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def attention_layers() -> tuple[nn.ModuleDict, dict[str, int]]:
    """Linear layers of the SD1.5 UNet's attention targets, frozen bf16 on the meta device, and
    the tokens each sees: the latent's pixels at its level, or the text's 77 (cross k/v)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        layers, tokens = nn.ModuleDict(), {}
        for name, m in unet.named_modules():
            if isinstance(m, nn.Linear) and any(name.endswith(t) for t in UNET_TARGETS):
                key = name.replace(".", "_")
                layers[key] = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                side = {"down_blocks": [64, 32, 16], "up_blocks": [0, 16, 32, 64]}
                part, index = name.split(".")[:2]
                pixels = 8 if part == "mid_block" else side[part][int(index)]
                text = "attn2.to_k" in name or "attn2.to_v" in name
                tokens[key] = 77 if text else pixels**2
    return layers.to(torch.bfloat16).requires_grad_(False), tokens  # frozen, as under an adapter


class Stack(nn.Module):
    """Every layer on its own input: the adapter's cost without the rest of the UNet's."""

    def __init__(self, layers: nn.ModuleDict, tokens: dict, rows: int, grad: bool = False) -> None:
        super().__init__()
        self.layers = layers
        self.inputs = {
            n: torch.empty(
                rows, tokens[n], m.in_features, dtype=torch.bfloat16, device="meta"
            ).requires_grad_(grad)
            for n, m in layers.items()
        }

    def forward(self) -> torch.Tensor:
        return sum(m(self.inputs[n]).float().sum() for n, m in self.layers.items())


def run(variant: str) -> dict:
    torch.manual_seed(0)
    layers, tokens = attention_layers()
    if variant == "boft-train":
        model = Stack(layers, tokens, 1, grad=True)
        handle = inject(model, BOFTConfig(targets=ALL, block_size=32, n_butterfly_factor=2))
        for p in handle.trainable_parameters():
            p.data.normal_(std=0.01)

        def step():
            model().backward()
    elif "-routed" in variant:  # "<lora|lokr>-routed<K>": row i takes adapter i, inference
        kind, _, k = variant.partition("-routed")
        k = int(k)
        model = Stack(layers, tokens, k)
        config = {
            "lora": LoRAConfig(targets=ALL, r=16, apply="weight"),
            "lokr": KronConfig(targets=ALL, r=16, apply="weight"),
        }[kind]
        names = [inject(model, config, name=f"a{i}").name for i in range(k)]

        def step():
            with torch.no_grad(), routing(model, list(range(k)), names):
                model()
    elif variant == "floor-train":  # forward + input-gradient backward, no adapter
        model = Stack(layers, tokens, 1, grad=True)

        def step():
            model().backward()
    elif variant == "floor":
        model = Stack(layers, tokens, 4)

        def step():
            with torch.no_grad():
                model()
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    step()  # first call: lazy state
    counter = Count()
    with counter:
        step()
    return dict(
        variant=variant,
        layers=len(layers),
        ops=sum(counter.ops.values()),
        mbytes_written=round(counter.bytes / 2**20, 1),
        top=dict(counter.ops.most_common(12)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--variants", default="floor-train,boft-train,floor,lora-routed4,lokr-routed4"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run(v) for v in args.variants.split(",")]
    for r in rows:
        print(json.dumps(r), flush=True)
    (args.out / "adapter_ops.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
