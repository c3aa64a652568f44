"""Trainable parameters on ViT-B/16 with a 100-class head, against closed-form counts (built on the
'meta' device: shapes only, no weights, no download). Printed with -s for the README table."""

import pytest
import timm
import torch

from peftkit.vision.methods import VisionAdapter, ViTMethodConfig

D, L, MLP, P, CLASSES = 768, 12, 3072, 16, 100
HEAD = D * CLASSES + CLASSES
PER_BLOCK_BIASES = D + 3 * D + D + D + MLP + D  # norm1, qkv, proj, norm2, fc1, fc2
LINEARS = [(D, 3 * D), (D, D), (D, MLP), (MLP, D)]  # (in, out) of qkv, proj, fc1, fc2

FORMULAS = {
    "linear": 0,
    "full": None,  # the backbone itself
    "bitfit": L * PER_BLOCK_BIASES + D + D,  # + patch-embedding bias and final-norm bias
    "vpt-shallow": 10 * D,
    "vpt-deep": L * 10 * D,
    "adaptformer": L * (D * 8 + 8 + 8 * D + D),
    "adaptformer-64": L * (D * 64 + 64 + 64 * D + D),
    "ssf": 2 * (L * (3 * D + D + MLP + D + D + D) + D + D),
    "lora": L * sum(8 * (i + o) for i, o in LINEARS),
    "oft": L * sum((i // 32) * 32 * 31 // 2 for i, _ in LINEARS),
    "dora": L * sum(8 * (i + o) + o for i, o in LINEARS),  # LoRA + one magnitude per row
    "loha": L * sum(2 * 8 * (i + o) for i, o in LINEARS),
    "boft": L * sum(2 * (i // 32) * 32 * 32 + o for i, o in LINEARS),  # 2 factors of full blocks
}


def _lokr_count() -> int:
    from peftkit.common_kernels import factorize

    total = 0
    for i, o in LINEARS:
        a, b = factorize(o, -1)
        c, d = factorize(i, -1)
        total += a * c + (8 * (b + d) if 8 < max(b, d) / 2 else b * d)
    return L * total


OPTIONS = {
    "adaptformer": {"bottleneck": 8},
    "adaptformer-64": {"bottleneck": 64},
    "lora": {"r": 8},
    "oft": {"block_size": 32},
    "kron": {"r": 8},
    "dora": {"r": 8},
    "loha": {"r": 8},
    "boft": {"block_size": 32, "n_butterfly_factor": 2},
}


@pytest.mark.parametrize("method", [*FORMULAS, "kron"])
def test_vit_b16_trainable_parameters_equal_the_formula(method):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=CLASSES)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    assert backbone == 85_798_656
    spec = method.split("-64")[0]
    adapter = VisionAdapter(model, ViTMethodConfig.parse(spec, **OPTIONS.get(method, {})))
    counts = adapter.parameter_counts()
    want = backbone if method == "full" else _lokr_count() if method == "kron" else FORMULAS[method]
    print(
        f"\n{method:15s} trainable {counts['trainable']:>11,d} (without head {counts['trainable_without_head']:>11,d}) "
        f"= {counts['trainable_pct_of_backbone']:.3f}% of ViT-B/16"
    )
    assert counts["trainable_without_head"] == want
    assert counts["trainable"] == want + HEAD
    assert sum(p.numel() for p in adapter.trainable_parameters() if p.requires_grad) == want + HEAD
