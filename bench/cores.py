"""Forward + backward time of each adapter core on single layers of SD1.5 and ViT-B/16 shapes.

For every layer: the frozen layer (floor: forward + input-gradient backward), peftkit's core, and
HF peft's same method on the same weights, in one process. bf16 autocast over fp32 base weights
(the anchors' setting) and a bf16 base ("bf16-base": frozen weights stored in bf16, adapter params
fp32). GPU parity of peftkit vs peft is asserted before timing.

    python bench/cores.py --out bench/results/cores-<date>
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, rel_error, time_step, write_results  # noqa: E402

from peftkit.common_kernels import KronConfig, LoRAConfig, OFTConfig, inject  # noqa: E402

DEVICE = "cuda"

# (workload, layer, module factory, input shape)
LAYERS = [
    ("sd15", "attn1.to_q 320 @64x64 bs4", lambda: nn.Linear(320, 320, bias=False), (4, 4096, 320)),
    (
        "sd15",
        "attn2.to_k 768->320 ctx77 bs4",
        lambda: nn.Linear(768, 320, bias=False),
        (4, 77, 768),
    ),
    ("sd15", "ff.proj 320->2560 @64x64 bs4", lambda: nn.Linear(320, 2560), (4, 4096, 320)),
    (
        "sd15",
        "attn1.to_q 1280 @16x16 bs4",
        lambda: nn.Linear(1280, 1280, bias=False),
        (4, 256, 1280),
    ),
    (
        "sd15",
        "resnet conv3x3 320 @64x64 bs4",
        lambda: nn.Conv2d(320, 320, 3, padding=1),
        (4, 320, 64, 64),
    ),
    (
        "sd15",
        "resnet conv3x3 1280 @16x16 bs4",
        lambda: nn.Conv2d(1280, 1280, 3, padding=1),
        (4, 1280, 16, 16),
    ),
    ("vit-b16", "qkv 768->2304 bs64", lambda: nn.Linear(768, 2304), (64, 197, 768)),
    ("vit-b16", "proj 768 bs64", lambda: nn.Linear(768, 768), (64, 197, 768)),
    ("vit-b16", "fc1 768->3072 bs64", lambda: nn.Linear(768, 3072), (64, 197, 768)),
    ("vit-b16", "fc2 3072->768 bs64", lambda: nn.Linear(3072, 768), (64, 197, 3072)),
]


def methods():
    from peft import LoKrConfig, LoraConfig
    from peft import OFTConfig as PeftOFT

    return {
        "lora r16": (
            LoRAConfig(targets=["layer"], r=16, alpha=16),
            LoraConfig(r=16, lora_alpha=16, target_modules=["layer"]),
            {"lora_A.default.weight": "A", "lora_B.default.weight": "B"},
        ),
        "lokr r16": (
            KronConfig(targets=["layer"], r=16, alpha=16),
            LoKrConfig(r=16, alpha=16, target_modules=["layer"]),
            {
                f"lokr_{k}.default": v
                for k, v in {"w1": "W1", "w2": "W2", "w2_a": "W2a", "w2_b": "W2b"}.items()
            },
        ),
        "oft b32": (
            OFTConfig(targets=["layer"], block_size=32),
            PeftOFT(r=0, oft_block_size=32, target_modules=["layer"]),
            {"oft_R.default.weight": "Q"},
        ),
    }


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def randomize_and_copy(peft_model, handle, mapping) -> None:
    """Give peft's adapter small random values and load the same values into peftkit's."""
    state = {}
    g = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            for theirs, ours in mapping.items():
                if name.endswith("." + theirs):
                    p.copy_(
                        torch.randn(p.shape, device=p.device, generator=g, dtype=p.dtype) * 0.02
                    )
                    state[f"layer.{ours}"] = p.detach().clone()
    handle.load_state_dict(state)


def make_step(model, x, params):
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        grad = torch.randn_like(model(x))

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = model(x)
        y.backward(grad)
        for p in params:
            p.grad = None
        x.grad = None

    return step


def run_layer(workload, label, factory, shape, mode, rows):
    from peft import get_peft_model

    torch.manual_seed(0)
    base = Holder(factory()).to(DEVICE)
    if mode == "bf16-base":
        base = base.to(torch.bfloat16)
    base.requires_grad_(False)
    x = torch.randn(
        shape, device=DEVICE, dtype=torch.bfloat16 if mode == "bf16-base" else torch.float32
    )
    x.requires_grad_(True)
    ms, peak = time_step(make_step(base, x, []), inner=10)
    floor = ms
    rows.append(
        dict(
            workload=workload,
            layer=label,
            mode=mode,
            impl="frozen",
            method="-",
            ms=ms,
            peak_gib=peak,
        )
    )
    for mname, (ours_cfg, peft_cfg, mapping) in methods().items():
        entry = dict(workload=workload, layer=label, mode=mode, method=mname)
        try:
            theirs = get_peft_model(copy.deepcopy(base), copy.deepcopy(peft_cfg))
            ours = copy.deepcopy(base)
            handle = inject(ours, ours_cfg)
            randomize_and_copy(theirs, handle, mapping)
            with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
                err = rel_error(ours(x), theirs(x))
            # peft's OFT on a kxk conv rotates unfolded patches and folds them back (a different
            # operator from W R), and its default Cayley is a 5-term Neumann series: no parity there.
            exact_peer = not (mname.startswith("oft") and (isinstance(base.layer, nn.Conv2d)))
            if exact_peer and not mname.startswith("oft"):
                assert err < 2e-2, f"{label} {mname}: peftkit vs peft rel. error {err:.2e}"
            t_ours, m_ours = time_step(make_step(ours, x, handle.trainable_parameters()), inner=10)
            t_peft, m_peft = time_step(
                make_step(theirs, x, [p for p in theirs.parameters() if p.requires_grad]), inner=10
            )
            rows.append(
                {
                    **entry,
                    "impl": "peftkit",
                    "ms": t_ours,
                    "peak_gib": m_ours,
                    "vs_floor": t_ours / floor,
                    "vs_peft": t_peft / t_ours,
                    "rel_err_vs_peft": err,
                }
            )
            rows.append(
                {
                    **entry,
                    "impl": "peft",
                    "ms": t_peft,
                    "peak_gib": m_peft,
                    "vs_floor": t_peft / floor,
                }
            )
        except Exception as exc:  # one broken configuration must not cost the whole GPU run
            rows.append({**entry, "impl": "error", "error": f"{type(exc).__name__}: {exc}"[:300]})
        finally:
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


def markdown(rows, meta) -> str:
    lines = [
        f"# Adapter cores, single layers, forward + backward ({meta['gpu']})",
        "",
        f"versions: {meta['versions']}",
        "",
        "Times are medians in ms per fwd+bwd (CUDA events, 10 calls x 15 repeats after warm-up). "
        "`x floor` = time / frozen layer; `peft/ours` > 1 means peftkit is faster.",
        "",
        "| workload | layer | mode | method | frozen ms | peftkit ms | peft ms | peftkit x floor | peft x floor | peft/ours | rel err vs peft |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floors = {(r["layer"], r["mode"]): r["ms"] for r in rows if r["impl"] == "frozen"}
    for r in rows:
        if r["impl"] == "error":
            lines.append(
                f"| {r['workload']} | {r['layer']} | {r['mode']} | {r['method']} | | error: {r['error'][:80]} | | | | | |"
            )
        if r["impl"] != "peftkit":
            continue
        peft = next(
            p
            for p in rows
            if p["impl"] == "peft"
            and p["layer"] == r["layer"]
            and p["mode"] == r["mode"]
            and p["method"] == r["method"]
        )
        f = floors[(r["layer"], r["mode"])]
        lines.append(
            f"| {r['workload']} | {r['layer']} | {r['mode']} | {r['method']} | {f:.3f} | {r['ms']:.3f} | "
            f"{peft['ms']:.3f} | {r['vs_floor']:.2f} | {peft['vs_floor']:.2f} | {r['vs_peft']:.2f} | "
            f"{r['rel_err_vs_peft']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", default="autocast,bf16-base")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    meta = environment()
    rows: list[dict] = []
    for mode in args.modes.split(","):
        for workload, label, factory, shape in LAYERS:
            run_layer(workload, label, factory, shape, mode, rows)
            print(f"done {mode} {label}", flush=True)
    md = markdown(rows, meta)
    write_results(args.out, "cores", rows, md, meta)
    print(md)


if __name__ == "__main__":
    main()
