"""The VTAB-1k protocol end to end (VPT, Jia et al. ECCV 2022, Sec. 4.1; SSF and NOAH follow it):
sweep the grid on train800 -> val200, pick per task and method the configuration with the best
final val200 top-1 (never test), retrain it on train800val200 and evaluate test top-1 once.

    rows, md = run_protocol(base, ["lora", "vpt-deep"], ["vtab:vtab-1k/dtd"], "runs/vtab",
                            {"lr": [1e-3, 1e-2], "weight_decay": [1e-4, 1e-2]})
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .sweep import markdown, run_sweep, sweep_configs, write_table
from .train import ViTTrainConfig, train_vit

NEVER = 10**9  # epochs between evaluations of a final run: test is read once, at the end


def select(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any] | None]:
    """Per (task, method): the tune run with the best val200 top-1 (the first in grid order on a
    tie), or None when every configuration diverged."""
    best: dict[tuple[str, str], dict[str, Any] | None] = {}
    for row in rows:
        key = (row["task"], row["method"])
        best.setdefault(key, None)
        if row["top1"] is not None and (best[key] is None or row["top1"] > best[key]["top1"]):
            best[key] = row
    return best


def run_protocol(
    base: ViTTrainConfig,
    methods: list[str],
    datas: list[str],
    output_dir: str,
    grid: dict[str, list] | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Tune into <output_dir>/tune, retrain the chosen configurations into <output_dir>/final,
    and write the test table with the chosen configurations to <output_dir>/results.md/csv.
    Finished runs are read back, so a rerun resumes (or just rewrites the table)."""
    tuning = replace(base, protocol="tune")
    tuned = run_sweep(tuning, methods, datas, str(Path(output_dir) / "tune"), grid, on_event)
    configs = {c.output_dir: c for _, c in sweep_configs(tuning, methods, datas, "", grid)}
    finals, chosen = [], []
    for (task, method), row in select(tuned).items():
        if row is None:
            chosen.append([task, method, "every configuration diverged", "NaN", "-"])
            continue
        picked = configs[str(Path(task) / method / row["point"])]
        final = replace(
            picked,
            protocol="final",
            eval_every_epochs=NEVER,
            output_dir=str(Path(output_dir) / "final" / task / method),
        )
        done = Path(final.output_dir) / "results.json"
        results = (
            json.loads(done.read_text()) if done.is_file() else train_vit(final, on_event=on_event)
        )
        finals.append({**results, "point": ""})
        top1 = "NaN" if results["top1"] is None else f"{results['top1']:.1f}"
        chosen.append([task, method, row["point"] or "(base)", f"{row['top1']:.1f}", top1])
    extra = (
        "\nChosen configuration per task (best final val200 top-1 of the tune sweep; test top-1 "
        "of its train800val200 retraining, evaluated once):\n\n"
        + markdown(["Task", "Method", "Configuration", "val200 top-1", "test top-1"], chosen)
    )
    return finals, write_table(finals, output_dir, extra)
