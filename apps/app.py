"""`peftkit app`: the Gradio app. Two tabs share one background job runner: Personalize (train a
concept from a few images and generate with it) and ViT tuner (fine-tune a ViT with any method and
compare methods). Binds 127.0.0.1 unless told otherwise; a public link only with --share.

    peftkit app                                  # http://127.0.0.1:7860, starter models
    peftkit app --base ./sd15 --device cuda --port 8080
    peftkit app --host 0.0.0.0 --share           # reachable from other machines / a gradio.live link
    peftkit app --data-root /data/vtab-1k        # the ViT tab may read task folders there, only there

    blocks = build_app(base="tests/tiny-sd", vit=FALLBACK_VIT, device="cpu", output_dir="runs/app")
    blocks.launch(prevent_thread_lock=True)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..common_kernels.args import existing_dir, non_negative_int, positive_int

# Set before gradio is imported: the app works offline and phones nowhere.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MAX_FILE_SIZE = "10mb"


def build_app(
    base: str = "starter",
    vit: dict[str, Any] | None = None,
    device: str = "auto",
    output_dir: str | Path = "peftkit-app",
    workers: int = 1,
    max_pending: int = 8,
    data_roots: list[str | Path] = (),
):
    """The gr.Blocks of both tabs over one JobRunner (`workers` jobs at a time, `max_pending` more
    waiting); every job writes under `output_dir`. `vit` is a backbone spec (model, model_kwargs,
    pretrained, checkpoint), default: the starter ViT. Server folders typed into the page must lie
    inside `data_roots` (none by default). The runner is `blocks.peftkit_runner`."""
    import gradio as gr

    from .demo import pick_device
    from .jobs import JobRunner
    from .personalize_tab import Personalizer
    from .personalize_tab import build_tab as personalize_tab
    from .vit_tab import ViTTuner, default_vit
    from .vit_tab import build_tab as vit_tab

    device = pick_device(device)
    root = Path(output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    runner = JobRunner(root, workers=workers, max_pending=max_pending)
    personalizer = Personalizer(base, device, runner, root)
    tuner = ViTTuner(vit or default_vit(), device, runner, data_roots)
    with gr.Blocks(title="peftkit") as blocks:
        gr.Markdown(f"# peftkit\nBase model `{base}` on `{device}`; results are saved in `{root}`.")
        with gr.Tab("Personalize"):
            personalize_tab(personalizer)
        with gr.Tab("ViT tuner"):
            vit_tab(tuner)
    blocks.peftkit_runner, blocks.peftkit_root = runner, root
    return blocks


def launch(
    blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = True,
):
    """Start the server with the app's queue and upload limits; returns (app, local url, share url)."""
    blocks.queue(default_concurrency_limit=2, max_size=32)
    return blocks.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        max_file_size=MAX_FILE_SIZE,
        allowed_paths=[str(blocks.peftkit_root)],
        ssr_mode=False,
        quiet=not block,
    )


def app(argv: list[str]) -> int:
    """Open the Gradio app: Personalize (concept training + generation) and ViT tuner tabs."""
    from ..diffusion.cli import DefaultsHelp

    parser = argparse.ArgumentParser(
        prog="peftkit app", description=app.__doc__, formatter_class=DefaultsHelp
    )
    parser.add_argument(
        "--base", default="starter", help="'starter', a diffusers folder or a hub id"
    )
    parser.add_argument(
        "--vit",
        type=json.loads,
        help='ViT backbone as JSON, e.g. \'{"model": '
        '"vit_base_patch16_224", "pretrained": true}\' (default: the starter ViT)',
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--output", default="peftkit-app", help="folder for every job's results")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes the app"
    )
    parser.add_argument("--port", type=non_negative_int, default=7860, help="port to serve on")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument(
        "--workers", type=positive_int, default=1, help="training jobs run at the same time"
    )
    parser.add_argument(
        "--data-root",
        action="append",
        type=existing_dir,
        default=[],
        help="a server folder whose task folders the ViT tab may read (repeatable; default: none, "
        "only the built-in tasks)",
    )
    args = parser.parse_args(argv)
    blocks = build_app(
        args.base,
        args.vit,
        args.device,
        args.output,
        workers=args.workers,
        data_roots=args.data_root,
    )
    try:
        launch(blocks, args.host, args.port, args.share)
    finally:
        blocks.peftkit_runner.shutdown()
    return 0
