import copy

import pytest
import torch
from torch import nn


class TwoLayer(nn.Module):
    """A Linear and a Conv2d, the two layer types every core supports."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 24)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


@pytest.fixture
def base64():
    torch.manual_seed(0)
    return TwoLayer().double()


@pytest.fixture
def inputs64():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(5, 16, dtype=torch.float64, generator=g),
        torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=g),
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def peft_model(base, config):
    from peft import get_peft_model

    # autocast_adapter_dtype=False keeps peft's adapter weights in float64 like the base.
    return get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)


def peft_params(model, mapping: dict[str, str], init) -> dict[str, torch.Tensor]:
    """Randomize peft's adapter tensors and return them under peftkit's key names."""
    out = {}
    for name, p in model.named_parameters():
        for theirs, ours in mapping.items():
            if f".{theirs}." in name or name.endswith(f".{theirs}"):
                with torch.no_grad():
                    init(p)
                module = name.split("base_model.model.")[1].split(f".{theirs}")[0]
                out[f"{module}.{ours}"] = p.detach().clone()
    return out


def assert_grads_match_peft(handle, theirs, names: dict[str, str], tol: float = 1e-6) -> None:
    """After backward through both models, each of our adapter parameters' gradient equals peft's;
    `names` maps our parameter name to peft's (`A` -> `lora_A.default.weight`)."""
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    for name, p in handle.named_parameters():
        layer, param = name.rsplit(".", 1)
        ref = grads[f"base_model.model.{layer}.{names[param]}"]
        assert rel(p.grad, ref.reshape(p.grad.shape)) < tol, name
