"""Each core under torch.compile(fullgraph=True): no graph breaks, same numbers as eager, and a
scale change reuses the compiled graph."""

import pytest
import torch
from torch import nn

from peftkit.common_kernels import (
    BOFTConfig,
    DoRAConfig,
    KronConfig,
    LoHaConfig,
    LoRAConfig,
    OFTConfig,
    core,
    inject,
)

CONFIGS = {
    "lora": LoRAConfig(targets=["0", "2"], r=4),
    "oft": OFTConfig(targets=["0", "2"], block_size=8),
    "kron": KronConfig(targets=["0", "2"], r=2),
    "lora-weight": LoRAConfig(targets=["0", "2"], r=4, apply="weight"),
    "dora": DoRAConfig(targets=["0", "2"], r=4),
    "loha": LoHaConfig(targets=["0", "2"], r=2, apply="factored"),
    "loha-weight": LoHaConfig(targets=["0", "2"], r=2, apply="weight"),
    "boft": BOFTConfig(targets=["0", "2"], block_size=4, n_butterfly_factor=2),
    "diag-oft": core("diag-oft").make_config(["0", "2"], block_size=4, constraint=0.01),
    "lycoris-boft": core("lycoris-boft").make_config(["0", "2"], block_size=4, rescaled=True),
}


@pytest.mark.parametrize("method", CONFIGS)
def test_core_compiles_fullgraph_and_matches_eager(method):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16))
    handle = inject(model, CONFIGS[method])
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.normal_(std=0.1)
    x = torch.randn(4, 32)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert torch.allclose(out, eager, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in handle.trainable_parameters())

    from torch._dynamo.utils import counters

    frames = counters["stats"]["unique_graphs"]
    handle.set_scale(0.5)
    compiled(x)
    assert counters["stats"]["unique_graphs"] == frames, "a scale change recompiled the model"
