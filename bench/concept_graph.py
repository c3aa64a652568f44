"""The commands' default fast path against eager steps: train-concept (LoRA, LoKr, OFT), train-ti
and vit-train trained with CUDA graphs (what `cuda_graph="auto"` picks on one GPU) and with
`--eager`, on an SD1.5-shaped pipeline with random weights (bench/multitenant.py's) and ViT-B/16.

Parity first, in fp32 without TF32: the adapter trained on the graphed path equals the eager one
(max relative error over adapter tensors, and over per-step losses), and a graphed bf16 run makes
no host<->device sync between its steps (CUDA sync debug mode "error"). Then timing in bf16 (the
default precision on a GPU): steady ms/step, set-up (prepare + capture) and peak memory, graphed
vs eager, for train-concept at 512 px bs 1 and 4 and for vit-train bs 64.

    python bench/concept_graph.py --out bench/results/concept-graph      # ~3-4 min on an H200
    python bench/concept_graph.py --out /tmp/smoke --cpu-smoke            # the logic, tiny, CPU
    python bench/concept_graph.py --out DIR --parity-only                 # the parity rows alone
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multitenant as mt  # noqa: E402
from common import environment, rel_error, write_results  # noqa: E402

from peftkit.common_kernels.adapter_file import read_tensors  # noqa: E402
from peftkit.common_kernels.training.engine import TrainConfig, train  # noqa: E402
from peftkit.diffusion.data import ConceptDataset  # noqa: E402
from peftkit.diffusion.dreambooth import ConceptConfig, train_concept  # noqa: E402
from peftkit.diffusion.textual_inversion import TIConfig, TITask  # noqa: E402
from peftkit.vision.train import ViTTrainConfig, train_vit  # noqa: E402

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)


def quiet(fn, *args, **kwargs):
    """fn's result and the lines it printed (the fallback notice and the set-up line)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        value = fn(*args, **kwargs)
    return value, out.getvalue().splitlines()


def concept(base, folder, out, method, graph, precision, steps, bs, resolution, cpu, watch=None):
    checkpointing = method.endswith("+ckpt")  # "lora+ckpt": with --gradient-checkpointing
    config = ConceptConfig(
        "a photo of sks toy",
        method=method.removesuffix("+ckpt"),
        rank=4,
        block_size=8,
        resolution=resolution,
        gradient_checkpointing=checkpointing,
    )
    train_config = TrainConfig(
        steps=steps,
        batch_size=bs,
        lr=1e-4,
        warmup_steps=2,
        schedule="cosine",
        mixed_precision=precision,
        cuda_graph=graph,
        output_dir=str(out),
        cpu=cpu,
    )
    (task, result), lines = quiet(train_concept, base, folder, config, train_config, on_event=watch)
    state = {k: v.detach().float().cpu().clone() for k, v in task.unet_handle.state_dict().items()}
    task.unet_handle.unload()
    base.unet.disable_gradient_checkpointing()  # the next run shares this base
    return state, result, lines


def compare(name, eager, graphed, tolerance) -> dict:
    """eager, graphed: (adapter tensors, per-step losses, whether the step was captured)."""
    (a, a_losses, _), (b, b_losses, captured) = eager, graphed
    err = max(rel_error(b[k], a[k]) for k in a)
    losses = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a_losses, b_losses))
    return dict(
        check=name,
        adapter_rel_error=err,
        loss_rel_error=losses,
        graphed=captured,
        ok=err < tolerance and losses < tolerance,
    )


def no_host_sync(base, folder, out, steps, resolution) -> dict:
    """A graphed bf16 run with CUDA's sync debug mode set to "error" from its 3rd step event to
    its last: a step that made the host wait for the GPU (a loss or lr read, a copy from pageable
    memory, an index read on the host) fails the run. Step events come one step late, so the
    check covers the draw, launch and bookkeeping of every step in between."""

    def watch(event: dict) -> None:
        if event["kind"] == "step":
            torch.cuda.set_sync_debug_mode("error" if 3 <= event["step"] < steps else 0)

    row = dict(check="no host sync in graphed bf16 steps", adapter_rel_error=0.0)
    try:
        _, result, _ = concept(
            base, folder, out, "lora", True, "bf16", steps, 2, resolution, False, watch
        )
    except RuntimeError as err:
        return {**row, "loss_rel_error": 0.0, "graphed": True, "ok": False, "notice": str(err)}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {**row, "loss_rel_error": 0.0, "graphed": result.timing["capture"] > 0, "ok": True}


def vit(out, graph, precision, steps, cpu, smoke, sizes=None):
    config = ViTTrainConfig(
        data="builtin:counting",
        model="vit_tiny_patch16_224" if smoke else "vit_base_patch16_224",
        pretrained=False,
        method="lora",
        steps=steps,
        batch_size=8 if smoke else 64,
        mixed_precision=precision,
        cuda_graph=graph,
        eval_every_epochs=1000,
        checkpoint_every_epochs=1000,
        output_dir=str(out),
        progress=False,
        cpu=cpu,
        builtin_sizes=(64, 64) if smoke else sizes,
    )
    results, lines = quiet(train_vit, config)
    return read_tensors(out / "adapter.safetensors")[0], results, lines


def ti(folder, graph, steps, cpu, resolution):
    base = mt.bench_base()  # TI adds tokens to the tokenizer: a fresh pipeline per run
    task = TITask(
        base,
        ConceptDataset(folder, "a photo of <toy>", resolution),
        TIConfig(tokens=["<toy>"], init_word="toy", resolution=resolution),
    )
    config = TrainConfig(
        steps=steps, batch_size=2, lr=5e-3, mixed_precision="no", cuda_graph=graph, cpu=cpu
    )
    result, lines = quiet(train, task, task.dataset(), config)
    return {"rows": task.embedding.rows.detach().float().cpu()}, result, lines


def timings(base, root: Path, graph: bool, smoke: bool) -> list[dict]:
    """bf16 (the GPU default) ms/step, set-up and peak memory, graphed vs eager."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    timing = []
    px = 32 if smoke else 512
    big = mt.image_folders(root / "images-512", 1, px)[0]
    for bs in (1, 4):
        for mode in (False, graph):
            _, result, lines = concept(
                base,
                big,
                root / f"time-{bs}-{mode}",
                "lora",
                mode,
                "auto",
                4 if smoke else 100,
                bs,
                px,
                smoke,
            )
            done = len(result.losses)
            timing.append(
                dict(
                    command=f"train-concept lora r4 bs{bs} {px}px",
                    mode="graph" if mode else "eager",
                    ms_per_step=1000 * result.timing["train"] / done,
                    setup_s=result.timing["prepare"] + result.timing["capture"],
                    capture_s=result.timing["capture"],
                    peak_gib=result.peak_memory_gib,
                    line=next((l for l in lines if l.startswith("set-up")), ""),
                )
            )
    for mode in (False, graph):
        _, results, lines = vit(
            root / f"vit-time-{mode}", mode, "auto", 4 if smoke else 100, smoke, smoke
        )
        timing.append(
            dict(
                command="vit-train lora bs64",
                mode="graph" if mode else "eager",
                images_per_s=results["images_per_s"],
                peak_gib=results["peak_memory_gib"],
                line=next((l for l in lines if l.startswith("set-up")), ""),
            )
        )
    return timing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--parity-only", action="store_true", help="skip the timing rows")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if smoke:
        mt.DEVICE, mt.UNET = "cpu", TINY_UNET
    graph = False if smoke else True  # graphs need a GPU: the smoke run checks the plumbing only
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    root = Path(tempfile.mkdtemp())
    parity_px, steps = (32, 2) if smoke else (256, 6)
    folders = mt.image_folders(root / "images", 1, parity_px)
    base = mt.bench_base()
    rows, notes = [], []
    for method in ("lora", "kron", "oft", "lora+ckpt"):
        runs = []
        for mode in (False, graph):
            state, result, lines = concept(
                base,
                folders[0],
                root / f"{method}-{mode}",
                method,
                mode,
                "no",
                steps,
                2,
                parity_px,
                smoke,
            )
            runs.append((state, result.losses, result.timing["capture"] > 0))
            notes += lines
        # OFT inverts its rotations with cuSOLVER inside a graph and with PyTorch's default
        # library eagerly; AdamW's first steps divide by tiny second moments and magnify that.
        tolerance = 1e-3 if method == "oft" else 1e-4
        rows.append(compare(f"train-concept {method} fp32", *runs, tolerance=tolerance))
    runs = []
    for mode in (False, graph):
        state, result, lines = ti(folders[0], mode, steps, smoke, parity_px)
        runs.append((state, result.losses, result.timing["capture"] > 0))
        notes += lines
    rows.append(compare("train-ti fp32", *runs, tolerance=1e-4))
    runs = []
    for mode in (False, graph):
        state, results, lines = vit(
            root / f"vit-{mode}", mode, "no", 2 if smoke else 20, smoke, smoke, (256, 128)
        )
        runs.append((state, [results["final_loss"]], results["timing"]["capture"] > 0))
        notes += lines
    rows.append(compare("vit-train fp32", *runs, tolerance=1e-3))
    if not smoke:
        # its own pipeline: a failed run would leave its adapter in the shared one
        rows.append(no_host_sync(mt.bench_base(), folders[0], root / "no-sync", 12, parity_px))

    timing = [] if args.parity_only else timings(base, root, graph, smoke)
    table = [
        "| check | adapter rel. error | loss rel. error | graphed | ok |",
        "|---|---|---|---|---|",
    ]
    table += [
        f"| {r['check']} | {r['adapter_rel_error']:.2e} | {r['loss_rel_error']:.2e} | "
        f"{r['graphed']} | {r['ok']} |"
        for r in rows
    ]
    table += [
        "",
        "| command | mode | ms/step or images/s | set-up s | peak GiB |",
        "|---|---|---|---|---|",
    ]
    table += [
        f"| {t['command']} | {t['mode']} | "
        f"{t.get('ms_per_step', t.get('images_per_s', 0)):.1f} | {t.get('setup_s', 0):.1f} | "
        f"{t['peak_gib']:.2f} |"
        for t in timing
    ]
    notes += [f"{r['check']}: {r['notice']}" for r in rows if r.get("notice")]
    markdown = "\n".join(table) + "\n\nNotices printed:\n" + "\n".join(sorted(set(notes))) + "\n"
    print(markdown)
    meta = {"gpu": "cpu smoke"} if smoke else environment()
    write_results(args.out, "concept_graph", rows + timing, markdown, meta)
    assert all(r["ok"] for r in rows), rows


if __name__ == "__main__":
    main()
