"""Where a run's numbers go: `metrics.jsonl` in the output folder (one line per step with the
training loss, one per evaluation with its metrics, e.g. the validation loss), and optionally
TensorBoard through accelerate's tracker. A resumed run drops the lines past its checkpoint, so
the file reads as one uninterrupted run.

    log = MetricsLog("out/dog", report_to="tensorboard")
    train(task, data, config, on_event=log)    # also log.images(step, {"sample-0": pil_image})
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PeftkitError

METRICS_FILE = "metrics.jsonl"
REPORT_TO = ("none", "tensorboard")


def check_report_to(report_to: str) -> None:
    """Refuse an unknown tracker, or TensorBoard without its package, before a run starts."""
    if report_to not in REPORT_TO:
        raise PeftkitError(f"report_to must be one of {list(REPORT_TO)}, got {report_to!r}")
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise PeftkitError(
                "report_to 'tensorboard' needs the tensorboard package: pip install "
                "'peftkit[tensorboard]' (or pip install tensorboard), or leave --report-to out"
            ) from None


class MetricsLog:
    """An engine `on_event` callback writing step and eval events to <output_dir>/metrics.jsonl and,
    with report_to="tensorboard", to TensorBoard event files under <output_dir>/logs."""

    def __init__(self, output_dir: str | Path, report_to: str = "none") -> None:
        check_report_to(report_to)
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tracker = None
        if report_to == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            self.tracker = TensorBoardTracker("tensorboard", Path(output_dir) / "logs")
            self.tracker.start()

    def __call__(self, event: dict) -> None:
        kind, step = event["kind"], event.get("step")
        if kind == "resume":
            self._truncate(step)
        elif kind == "step":
            self._write({"step": step, "loss": event["loss"], "lr": event["lr"]}, "train/")
        elif kind == "eval":
            self._write({"step": step, **event["metrics"]}, "eval/")
        elif kind == "done" and self.tracker is not None:
            self.tracker.finish()

    def images(self, step: int, images: dict) -> None:
        """Sample images (PIL) under their names, when a tracker takes them."""
        if self.tracker is not None and images:
            import numpy as np

            arrays = {f"samples/{k}": np.asarray(v)[None] for k, v in images.items()}
            self.tracker.log_images(arrays, step, dataformats="NHWC")

    def _write(self, row: dict, prefix: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            scalars = {prefix + k: v for k, v in row.items() if k != "step"}
            self.tracker.log(scalars, step=row["step"])

    def _truncate(self, step: int) -> None:
        # Lines past the checkpoint came from the interrupted run; the resumed run writes them anew.
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
