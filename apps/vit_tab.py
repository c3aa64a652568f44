"""The app's ViT tuner tab: pick a built-in task or a VTAB-1k folder and a method, train on the
shared job runner with live loss and accuracy curves, then read the confusion matrix and a table
comparing every run's trainable parameters with its accuracy.

`ViTTuner` holds the logic (jobs, confusion matrix, comparison rows); `build_tab` the components.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import torch

from ..common_kernels.errors import PeftkitError
from .jobs import (
    FINISHED,
    Job,
    JobRunner,
    in_range,
    progress_markdown,
    refused_markdown,
    whole_number,
)

BUILTIN = ("counting", "location", "orientation", "shape", "color")
# Bounds of the page's inputs, enforced again on the server for API clients.
MAX_STEPS, MAX_RANK, MAX_BATCH, MAX_BUILTIN, MAX_LR = 5000, 64, 256, 2000, 1.0
STARTER = {"model": "starter", "pretrained": True}
# Without the starter ViT: a small random-init ViT, so the tab still runs offline (accuracies are then low).
FALLBACK_VIT = {
    "model": "vit_tiny_patch16_224",
    "model_kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3},
    "pretrained": False,
}


def default_vit() -> dict[str, Any]:
    """The starter ViT (assets/starter-vit) when installed, else FALLBACK_VIT."""
    from ..vision.backbones import STARTER_VIT

    installed = (STARTER_VIT / "config.json").is_file() and (
        STARTER_VIT / "model.safetensors"
    ).is_file()
    return dict(STARTER if installed else FALLBACK_VIT)


class ViTTuner:
    """ViT fine-tuning runs of one backbone on the shared `runner`; `results` keeps every finished run."""

    def __init__(
        self,
        backbone: dict[str, Any],
        device: str,
        runner: JobRunner,
        data_roots: list[str | Path] = (),
    ) -> None:
        self.backbone, self.device, self.runner = backbone, device, runner
        self.data_roots = [Path(r).resolve() for r in data_roots]
        self.results: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def config(
        self,
        data: str,
        method: str,
        steps: int,
        rank: int,
        lr: float,
        batch_size: int,
        sizes: tuple[int, int] | None,
        output_dir: str,
    ):
        from ..vision.train import ViTTrainConfig

        options = {"r": rank}  # cores without a rank ignore it
        return ViTTrainConfig(
            data=data,
            model=self.backbone["model"],
            pretrained=self.backbone.get("pretrained", False),
            checkpoint=self.backbone.get("checkpoint"),
            open_clip=self.backbone.get("open_clip"),
            model_kwargs=self.backbone.get("model_kwargs", {}),
            img_size=self.backbone.get("img_size"),
            method=method,
            method_options=options,
            protocol="tune",
            builtin_sizes=sizes,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_epochs=1,
            eval_every_epochs=1,
            checkpoint_every_epochs=0,
            output_dir=output_dir,
            progress=False,
            cpu=self.device == "cpu",
        )

    def submit(
        self,
        task: str,
        folder: str,
        method: str,
        steps: int,
        rank: int,
        lr: float,
        batch_size: int,
        train_size: int,
        eval_size: int,
    ) -> Job:
        """Queue a run on `folder` (a VTAB-1k task folder inside a data root) when given, else
        built-in `task`."""
        in_range("steps", steps, 1, MAX_STEPS)
        in_range("rank", rank, 1, MAX_RANK)
        in_range("batch size", batch_size, 1, MAX_BATCH)
        if not (0 < lr <= MAX_LR):
            raise PeftkitError(f"learning rate must be above 0 and at most {MAX_LR:g}, got {lr:g}")
        if folder.strip():
            data, sizes = f"vtab:{self.data_folder(folder.strip())}", None
        elif task in BUILTIN:
            in_range("built-in train images", train_size, 1, MAX_BUILTIN)
            in_range("built-in eval images", eval_size, 1, MAX_BUILTIN)
            data, sizes = f"builtin:{task}", (int(train_size), int(eval_size))
        else:
            raise PeftkitError(
                f"choose a built-in task ({', '.join(BUILTIN)}) or give a VTAB-1k folder"
            )
        from ..vision.methods import method_names

        if method not in method_names():
            raise PeftkitError(f"method must be one of {', '.join(method_names())}")

        def run(job: Job) -> dict[str, Any]:
            from ..vision.train import train_vit

            config = self.config(
                data, method, steps, rank, lr, batch_size, sizes, str(job.output_dir)
            )
            results = train_vit(config, on_event=job.emit, should_stop=job.should_stop)
            results["confusion"] = self.confusion(
                job.output_dir / "adapter.safetensors", config, job.should_stop
            )
            with self._lock:
                self.results.append(results)
            return results

        return self.runner.submit("vit", run)

    def data_folder(self, text: str) -> Path:
        """`text` (absolute, or relative to a root) resolved inside one of the `--data-root`
        folders. Outside them the answer is the same whether or not the path exists."""
        candidates = (
            [Path(text)] if Path(text).is_absolute() else [r / text for r in self.data_roots]
        )
        for candidate in candidates:
            resolved = candidate.resolve()  # symlinks out of a root are outside it
            if any(resolved.is_relative_to(root) for root in self.data_roots):
                if not resolved.is_dir():
                    raise PeftkitError(
                        f"{text!r} is not a folder in the data root: give a task folder holding "
                        "train800.txt, val200.txt and the images"
                    )
                return resolved
        raise PeftkitError(
            "server folders are limited to the app's data roots"
            + (" (none given: start the app with --data-root)" if not self.data_roots else "")
            + ": give a task folder inside one, or pick a built-in task"
        )

    @torch.no_grad()
    def confusion(self, adapter: Path, config, should_stop=lambda: False) -> list[list[int]]:
        """counts[true][predicted] of the saved adapter on the run's eval split."""
        from ..vision.backbones import normalization
        from ..vision.data import Preprocess, load_task
        from ..vision.methods import load_vision_adapter, read_vision_adapter
        from ..vision.train import build_model

        num_classes = int(read_vision_adapter(adapter)[2]["num_classes"])
        torch.manual_seed(
            config.seed
        )  # a random-init backbone is rebuilt exactly as train_vit built it
        model, size = build_model(
            config.backbone_spec(), num_classes, config.pretrained, config.checkpoint
        )
        data = load_task(
            config.data,
            config.protocol,
            Preprocess(size, *normalization(model)),
            num_classes,
            config.builtin_sizes,
            config.seed,
        )
        load_vision_adapter(model, adapter)
        model.eval()
        counts = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for images, labels in torch.utils.data.DataLoader(data.eval, batch_size=256):
            if should_stop():
                raise PeftkitError("cancelled while computing the confusion matrix")
            predicted = model(images).argmax(-1)
            counts.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
        return counts.tolist()

    def table(self) -> pd.DataFrame:
        """One row per finished run: method, task, trainable parameters, top-1."""
        rows = [
            {
                "method": r["method"],
                "task": r["task"],
                "trainable params": r["trainable"],
                "% of backbone": round(r["trainable_pct_of_backbone"], 3),
                "top-1 %": round(r["top1"], 1) if r["top1"] is not None else None,
                "images/s": round(r["images_per_s"], 1),
            }
            for r in self.results
        ]
        return pd.DataFrame(
            rows,
            columns=["method", "task", "trainable params", "% of backbone", "top-1 %", "images/s"],
        )


def confusion_frame(counts: list[list[int]]) -> pd.DataFrame:
    frame = pd.DataFrame(counts, columns=[f"pred {j}" for j in range(len(counts))])
    frame.insert(0, "true", [str(i) for i in range(len(counts))])
    return frame


def curves(snap: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    loss = pd.DataFrame(snap["losses"] or [(0, float("nan"))], columns=["step", "loss"])
    acc = pd.DataFrame(
        [(s, m["top1"]) for s, m in snap["evals"]] or [(0, float("nan"))],
        columns=["step", "top-1 %"],
    )
    return loss, acc


def build_tab(t: ViTTuner) -> None:
    """The ViT tuner tab's components and events (call inside a gr.Blocks)."""
    from ..vision.methods import method_names

    weights = t.backbone.get("checkpoint") or (
        "pretrained" if t.backbone.get("pretrained") else "random init"
    )
    backbone = f"{t.backbone.get('open_clip') or t.backbone['model']} ({weights})"
    gr.Markdown(
        f"Backbone: `{backbone}`. Live accuracy is measured on the validation split (VTAB-1k val200)."
    )
    with gr.Row():
        with gr.Column():
            task = gr.Dropdown(list(BUILTIN), value="color", label="built-in task")
            folder = gr.Textbox(
                "",
                label="or a VTAB-1k task folder in the server's data root (overrides the built-in "
                "task)",
                interactive=bool(t.data_roots),
            )
            method = gr.Dropdown(list(method_names()), value="lora", label="method")
            with gr.Row():
                steps = gr.Slider(1, MAX_STEPS, 200, step=1, label="steps")
                rank = gr.Slider(1, MAX_RANK, 8, step=1, label="rank (LoRA / LoKr)")
            with gr.Row():
                lr = gr.Number(1e-2, label="learning rate", minimum=1e-7, maximum=MAX_LR)
                batch = gr.Slider(1, MAX_BATCH, 32, step=1, label="batch size")
            with gr.Row():
                train_size = gr.Number(
                    800, precision=0, minimum=1, maximum=MAX_BUILTIN, label="built-in train images"
                )
                eval_size = gr.Number(
                    200, precision=0, minimum=1, maximum=MAX_BUILTIN, label="built-in eval images"
                )
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary", elem_id="vit-train-button")
                cancel_btn = gr.Button("Cancel", elem_id="vit-cancel-button")
        with gr.Column():
            status = gr.Markdown("no run yet", elem_id="vit-status")
            loss_plot = gr.LinePlot(x="step", y="loss", label="training loss", height=200)
            acc_plot = gr.LinePlot(
                x="step", y="top-1 %", label="validation accuracy", y_lim=[0, 100], height=200
            )
    confusion = gr.Dataframe(
        label="confusion matrix (rows: true class, columns: predicted)", interactive=False
    )
    table = gr.Dataframe(
        t.table(), label="method comparison: trainable parameters vs accuracy", interactive=False
    )
    job_id = gr.State(None)

    def train(task, folder, method, steps, rank, lr, batch, train_size, eval_size):
        try:
            job = t.submit(
                task,
                folder or "",
                method,
                whole_number(steps),
                whole_number(rank),
                float(lr),
                whole_number(batch),
                whole_number(train_size),
                whole_number(eval_size),
            )
        except PeftkitError as err:
            gr.Warning(str(err))
            yield refused_markdown(str(err)), *[gr.update()] * 5
            return
        while not job.wait(0.5):
            snap = job.snapshot()
            yield progress_markdown(snap), *curves(snap), gr.update(), gr.update(), job.id
        snap = job.snapshot()
        matrix = (
            confusion_frame(job.result["confusion"]) if snap["status"] == "done" else gr.update()
        )
        yield progress_markdown(snap), *curves(snap), matrix, t.table(), job.id

    def cancel(job):
        if job is None:
            return "nothing to cancel"
        state = t.runner.cancel(job).snapshot()
        return "cancelling…" if state["status"] not in FINISHED else progress_markdown(state)

    train_btn.click(
        train,
        [task, folder, method, steps, rank, lr, batch, train_size, eval_size],
        [status, loss_plot, acc_plot, confusion, table, job_id],
        api_name="vit_train",
        concurrency_limit=4,
    )
    cancel_btn.click(cancel, [job_id], [status], api_name="vit_cancel")
