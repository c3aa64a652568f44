"""Several methods x tasks x hyper-parameter grids in one go, summarized like the VTAB-1k tables of
VPT / SSF / NOAH: one row per method (and grid point), top-1 per task, the mean of each group
(Natural, Specialized, Structured, and Built-in for the offline tasks), the mean of the group
means, the mean over tasks, and trainable parameters in millions (head included, averaged over
tasks, as those papers do). The grid points of one method and task train in one pass
(batched.py); every run folder resumes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from peftkit.common_kernels.adapter_file import atomic_write
from peftkit.common_kernels.errors import PeftkitError

from .batched import group_configs, train_together
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
# What a grid may vary: run settings, and method options (a changed option starts a new group).
GRID_FIELDS = ("lr", "weight_decay", "warmup_epochs", "label_smoothing", "seed", "epochs")
GRID_OPTIONS = (
    "vpt_length",
    "bottleneck",
    "adapter_scale",
    "r",
    "alpha",
    "block_size",
    "factor",
)
LEGEND = (
    "Mean (groups): the mean of the group means (the VPT / SSF tables' 'mean'); Mean (tasks): the "
    "mean over the tasks (other tables' 'average'). Params (M): trainable parameters with the "
    "head, averaged over tasks. NaN: the run diverged."
)


def group_of(task: str) -> str:
    for group, names in VTAB_GROUPS.items():
        if task in names:
            return group
    return (
        "Built-in" if task in ("counting", "location", "orientation", "shape", "color") else "Other"
    )


def parse_grid(items: list[str] | None) -> dict[str, list[float]]:
    """`["lr=1e-3,1e-2", "weight_decay=0,1e-4"]` -> {"lr": [0.001, 0.01], ...}."""
    grid: dict[str, list[float]] = {}
    for item in items or []:
        key, _, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in GRID_FIELDS + GRID_OPTIONS or not values:
            raise PeftkitError(
                f"--grid {item!r}: write KEY=V1,V2,... with KEY one of {list(GRID_FIELDS + GRID_OPTIONS)}"
            )
        try:
            grid[key] = [json.loads(v) for v in values.split(",")]
        except json.JSONDecodeError:
            raise PeftkitError(f"--grid {item!r}: the values must be numbers") from None
    return grid


def grid_configs(base: ViTTrainConfig, grid: dict[str, list]) -> list[tuple[str, ViTTrainConfig]]:
    """(name, config) for every point of `grid` on `base` (just ("", base) without a grid)."""
    points = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        fields = {k: v for k, v in point.items() if k in GRID_FIELDS}
        options = {**base.method_options, **{k: v for k, v in point.items() if k in GRID_OPTIONS}}
        name = "_".join(f"{k}{v}" for k, v in point.items())
        points.append((name, replace(base, **fields, method_options=options)))
    return points


def sweep_configs(
    base: ViTTrainConfig,
    methods: list[str],
    datas: list[str],
    output_dir: str | Path,
    grid: dict[str, list] | None = None,
) -> list[tuple[str, ViTTrainConfig]]:
    """Every (data, method, grid point) run, each in <output_dir>/<task>/<method>[/<point>]."""
    runs = []
    for data in datas:
        task = Path(data.partition(":")[2]).name
        for method in methods:
            for name, config in grid_configs(replace(base, data=data, method=method), grid or {}):
                folder = Path(output_dir) / task / method / name
                runs.append((name, replace(config, output_dir=str(folder))))
    return runs


def run_sweep(
    base: ViTTrainConfig,
    methods: list[str],
    datas: list[str],
    output_dir: str,
    grid: dict[str, list] | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every (method, data, grid point) run not finished yet, the runs that can share a pass
    together, and write <output_dir>/results.md and results.csv. Returns every run's results."""
    runs = sweep_configs(base, methods, datas, output_dir, grid)
    todo = [c for _, c in runs if not (Path(c.output_dir) / "results.json").is_file()]
    for group in group_configs(todo):
        if len(group) == 1:
            train_vit(group[0], on_event=on_event)
        else:
            # Checkpoints of a group live beside its runs, named by who is in it.
            ident = json.dumps([c.output_dir for c in group]).encode()
            where = Path(output_dir) / ".groups" / hashlib.sha1(ident).hexdigest()[:12]
            train_together(group, group_dir=str(where), on_event=on_event)
    rows = []
    for name, config in runs:
        done = Path(config.output_dir) / "results.json"
        if done.is_file():  # a group stopped early writes none
            rows.append({**json.loads(done.read_text()), "point": name})
    write_table(rows, output_dir)
    return rows


def label(row: dict[str, Any]) -> str:
    return f"{row['method']} [{row['point']}]" if row.get("point") else row["method"]


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
    for name in dict.fromkeys(label(r) for r in rows):
        mine = [r for r in rows if label(r) == name]
        acc = {r["task"]: r["top1"] for r in mine}
        params = [r["trainable"] for r in mine]
        # A diverged task leaves its group's mean and the means over groups and tasks undefined.
        gmeans = [_mean([acc[t] for t in tasks if group_of(t) == g and t in acc]) for g in groups]
        line = [name, f"{sum(params) / len(params) / 1e6:.3f}"]
        line += [_fmt(acc[t]) if t in acc else "-" for t in tasks] + [_fmt(m) for m in gmeans]
        line += [_fmt(_mean(gmeans)), _fmt(_mean(list(acc.values())))]
        body.append(line)
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body]) + "\n"


def write_table(rows: list[dict[str, Any]], output_dir: str | Path, extra: str = "") -> str:
    """results.md (the table, its legend and `extra`) and results.csv (the table) in `output_dir`."""
    header, body = table(rows)
    md = markdown(header, body) + "\n" + LEGEND + "\n" + extra
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *body])
    out = Path(output_dir)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(md))
    atomic_write(out / "results.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))
    return md


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _fmt(value: float | None) -> str:
    return "NaN" if value is None else f"{value:.1f}"
