"""Several methods x several tasks in one go, summarized like the VTAB-1k tables of VPT / SSF /
NOAH: one row per method, top-1 per task, the mean of each group (Natural, Specialized,
Structured, and Built-in for the offline tasks), the mean of the group means, the mean over tasks,
and trainable parameters in millions (head included, averaged over tasks, as those papers do).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from peftkit.common_kernels.adapter_file import atomic_write

from .train import ViTTrainConfig, train_vit

# Task folder names of the public VTAB-1k releases, grouped as in the VTAB paper.
VTAB_GROUPS = {
    "Natural": [
        "cifar",
        "caltech101",
        "dtd",
        "oxford_flowers102",
        "oxford_iiit_pet",
        "svhn",
        "sun397",
    ],
    "Specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "Structured": [
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ],
}


def group_of(task: str) -> str:
    for group, names in VTAB_GROUPS.items():
        if task in names:
            return group
    return (
        "Built-in" if task in ("counting", "location", "orientation", "shape", "color") else "Other"
    )


def run_sweep(
    base: ViTTrainConfig,
    methods: list[str],
    datas: list[str],
    output_dir: str,
    on_event: Callable[[dict], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every (method, data) pair into <output_dir>/<task>/<method>/ (each resumable) and write
    <output_dir>/results.md and results.csv. Returns the per-run results."""
    rows = []
    for data in datas:
        task = Path(data.partition(":")[2]).name
        for method in methods:
            config = replace(
                base, data=data, method=method, output_dir=str(Path(output_dir) / task / method)
            )
            done = Path(config.output_dir) / "results.json"
            results = (
                json.loads(done.read_text())
                if done.is_file()
                else train_vit(config, on_event=on_event)
            )
            rows.append(results)
            write_table(rows, output_dir)
    return rows


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary: method, params (M), tasks by group, group means, means."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    order = [*VTAB_GROUPS, "Built-in", "Other"]
    tasks.sort(
        key=lambda t: (order.index(group_of(t)), [*sum(VTAB_GROUPS.values(), []), t].index(t))
    )
    groups = [g for g in order if any(group_of(t) == g for t in tasks)]
    header = [
        "Method",
        "Params (M)",
        *tasks,
        *[f"{g} mean" for g in groups],
        "Mean (groups)",
        "Mean (tasks)",
    ]
    body = []
    for method in dict.fromkeys(r["method"] for r in rows):
        acc = {r["task"]: r["top1"] for r in rows if r["method"] == method}
        params = [r["trainable"] for r in rows if r["method"] == method]
        gmeans = [_mean([acc[t] for t in tasks if group_of(t) == g and t in acc]) for g in groups]
        line = [method, f"{sum(params) / len(params) / 1e6:.3f}"]
        line += [_fmt(acc.get(t)) for t in tasks] + [_fmt(m) for m in gmeans]
        line += [_fmt(_mean([m for m in gmeans if m is not None])), _fmt(_mean(list(acc.values())))]
        body.append(line)
    return header, body


def write_table(rows: list[dict[str, Any]], output_dir: str) -> str:
    header, body = table(rows)
    md = (
        "\n".join(
            ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(line) + " |" for line in body]
        )
        + "\n"
    )
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *body])
    out = Path(output_dir)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(md))
    atomic_write(out / "results.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))
    return md


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
