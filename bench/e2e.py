"""The user-facing commands end to end on one GPU, against what a practitioner would run instead:
`peftkit train-concept` vs diffusers' own examples/dreambooth/train_dreambooth_lora.py (an
unmodified copy, --diffusers-script) on a random-weight SD1.5-shaped pipeline, and `peftkit
vit-train` vs a plain timm + peft loop (bench/e2e_workloads.py) on a VTAB-1k-layout JPEG folder.
Each run is a subprocess timed from start to exit while nvidia-smi samples GPU memory; steady
step = (long - short) / (step difference), set-up = short - its steps x steady step.
Bytecode is cached under the work folder for every child (see Runner). `--profile` adds one
long train-concept run under bench/profile_command.py (profile-<kind>.md: where its wall clock and
GPU memory go, imports included). peftkit adapts the modules diffusers' script adapts (--targets
attn), so both train the same 128 LoRA pairs.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from e2e_workloads import instance_images, vtab_folder  # noqa: E402

WORKLOADS = [sys.executable, str(HERE / "e2e_workloads.py")]
PEFTKIT = [sys.executable, "-m", "peftkit.apps.cli"]  # what the `peftkit` console script runs
PROMPT = "a photo of sks toy"
REF = ROOT / ".e2e_ref"  # git-ignored copies of diffusers' scripts, never part of the package
WARM_UP = (
    "import torch, diffusers, transformers, timm, peft, torchvision\n"
    "if torch.cuda.is_available(): torch.zeros(1).cuda()"
)
TIMEOUT_S = {"build": 300, "sd15": 300, "sdxl": 540, "vit": 300}
WARM = 3  # steps of the unreported first run of each tool


class GpuMemory:
    """Peak `memory.used` of one GPU while the block runs, sampled every 100 ms by nvidia-smi
    (pynvml when nvidia-smi is absent); no samples on a machine without an NVIDIA driver."""

    def __init__(self) -> None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        self.gpu = visible if visible.isdigit() else "0"
        self.smi = shutil.which("nvidia-smi")
        self.samples: list[float] = []

    def query(self, field: str) -> str | None:
        if not self.smi:
            return None
        cmd = [self.smi, "-i", self.gpu, f"--query-gpu={field}", "--format=csv,noheader,nounits"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (done.stdout.strip() or None) if done.returncode == 0 else None

    def __enter__(self) -> GpuMemory:
        self.samples, self.stop, self.proc = [], threading.Event(), None
        if self.smi:
            cmd = [self.smi, "-i", self.gpu, "--query-gpu=memory.used"]
            self.proc = subprocess.Popen(
                cmd + ["--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE,
                text=True,
            )
        self.reader = threading.Thread(target=self._smi if self.smi else self._nvml, daemon=True)
        self.reader.start()
        return self

    def _smi(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def _nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(self.gpu))
        except Exception:  # no NVIDIA driver (pynvml raises its own error types)
            return
        while not self.stop.wait(0.1):
            self.samples.append(pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
        self.reader.join(timeout=5)


class Runner:
    """Runs commands one at a time within a total wall-clock budget. A failing, timed-out or
    skipped run is a row with its status and output tail, never an exception."""

    def __init__(self, out: Path, work: Path, budget_s: float) -> None:
        self.work, self.deadline = work, time.monotonic() + budget_s
        self.log = out / "e2e.log"
        self.log.write_text("")
        self.rows: list[dict] = []
        self.memory = GpuMemory()
        # `import peftkit` resolves to this checkout in every child, installed or not.
        link = work / "pkgroot" / "peftkit"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        path = [str(link.parent), os.environ.get("PYTHONPATH", "")]
        # Bytecode is kept as an installed environment keeps it (pip compiles at install): a
        # machine whose packages ship no .pyc and whose Python runs with PYTHONDONTWRITEBYTECODE
        # (the lent GPU's) would compile torch, diffusers and transformers in every process, ~10 s
        # of each run. The warm-up runs fill the cache for both tools alike.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.env = {
            **env,
            "PYTHONPATH": os.pathsep.join(p for p in path if p),
            "PYTHONPYCACHEPREFIX": str(work / "pycache"),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }

    def skip(self, name: str, why: str, cmd: list = (), **info) -> dict:
        row = {"name": name, **info, "cmd": [str(c) for c in cmd], "status": "skipped"}
        return self._record({**row, "wall_s": None, "peak_gib": None, "tail": why})

    def __call__(
        self, name: str, cmd: list, timeout: float, clear: Path | None = None, **info
    ) -> dict:
        """Run `cmd` (after removing `clear`, its output folder: a rerun would resume)."""
        if clear:
            shutil.rmtree(clear, ignore_errors=True)
        left = self.deadline - time.monotonic() - 5
        if left < 20:
            return self.skip(name, "the --budget-s ran out before this run", cmd, **info)
        row = {"name": name, **info, "cmd": [str(c) for c in cmd], "peak_gib": None}
        idle = self.memory.query("memory.used")
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        limit = min(timeout, left)
        with log.open("w") as f, self.memory:
            start = time.perf_counter()
            # its own session: a timeout kills the whole tree, DataLoader workers included
            proc = subprocess.Popen(
                row["cmd"],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.work,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=limit)
                row["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                row["status"] = f"timeout ({limit:.0f} s)"
            row["wall_s"] = round(time.perf_counter() - start, 2)
        if self.memory.samples:
            row["peak_gib"] = round(max(self.memory.samples) / 1024, 2)
            row["idle_gib"] = round(float(idle) / 1024, 2) if idle and idle.isdigit() else None
        row["tail"] = log.read_text(errors="replace")[-4000:]
        return self._record(row)

    def _record(self, row: dict) -> dict:
        self.rows.append(row)
        head = f"{row['name']}: {row['status']}, {row['wall_s']} s, peak {row['peak_gib']} GiB"
        with self.log.open("a") as f:
            f.write(f"\n===== {head}\n$ {' '.join(row['cmd'])}\n{row['tail']}\n")
        print(f"[e2e] {head}", flush=True)
        return row


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def concept_args(args, base, images, out, steps, res) -> list:
    """train-concept's arguments for one e2e run: the LoRA diffusers' script trains (rank 4 on the
    attention projections), its other settings the command's defaults."""
    cmd = ["train-concept", "--model", base, "--images", images, "--prompt", PROMPT]
    cmd += ["--output", out, "--steps", steps, "--resolution", res, "--batch-size", 1]
    return cmd + ["--method", "lora", "--rank", 4, "--targets", "attn"] + args.peftkit_args.split()


def concept(run: Runner, args: argparse.Namespace, kind: str) -> None:
    """train-concept vs diffusers' DreamBooth LoRA script, same pipeline, images and settings."""
    smoke = args.cpu_smoke
    res = 64 if smoke else {"sd15": 512, "sdxl": 1024}[kind]
    script = Path(args.diffusers_sdxl_script if kind == "sdxl" else args.diffusers_script)
    base, images = run.work / f"{kind}-base", run.work / f"images-{res}"
    build = WORKLOADS + ["pipeline", "--kind", kind, "--out", base] + ["--tiny"] * smoke
    built = run(f"build-{kind}", build, TIMEOUT_S["build"], workload=kind, tool="build")
    instance_images(images, res)
    # A first 3-step run of each tool, not reported: the first process on a fresh machine JITs and
    # caches kernels (~10 s), a cost that would otherwise fall on whichever tool runs first.
    sizes = args.sdxl_steps if kind == "sdxl" else args.steps
    for warm, n in [(True, WARM)] + [(False, n) for n in sizes]:
        info = dict(workload=kind, size=n)
        out = run.work / f"{kind}-peftkit-{n}"
        cmd = PEFTKIT + concept_args(args, base, images, out, n, res)
        pairs = [("peftkit", f"{kind}-peftkit-{n}", cmd, out, "train.json")]
        out = run.work / f"{kind}-diffusers-{n}"
        cmd = [sys.executable, script, "--pretrained_model_name_or_path", base]
        cmd += ["--instance_data_dir", images, "--instance_prompt", PROMPT, "--output_dir", out]
        cmd += ["--resolution", res, "--train_batch_size", 1, "--rank", 4, "--max_train_steps", n]
        cmd += ["--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", 0]
        cmd += ["--mixed_precision", "no" if smoke else "bf16", "--seed", 0]
        cmd += ["--checkpointing_steps", 10**9]  # no checkpoints, as the peftkit run
        if importlib.util.find_spec("tensorboard") is None:  # the script's default tracker
            cmd += ["--report_to", "all"]  # = whatever trackers exist: none
        pairs.append(("diffusers", f"{kind}-diffusers-{n}", cmd, out, None))
        pairs = [pair for pair in pairs if pair[0] in args.tools.split(",")]
        for tool, name, cmd, out, summary in pairs:
            tool, name = ("warm-up", f"{name}-warm-up") if warm else (tool, name)
            if built["status"] != "ok":
                run.skip(name, "the pipeline was not built", cmd, tool=tool, **info)
            elif tool == "diffusers" and not script.is_file():
                run.skip(
                    name, f"no script at {script}: pass --diffusers-script", cmd, tool=tool, **info
                )
            else:
                row = run(name, cmd, TIMEOUT_S[kind], clear=out, tool=tool, **info)
                row["reported"] = read_json(out / summary) if summary else None
    if args.profile and built["status"] == "ok":
        n = sizes[-1]
        out, name = run.work / f"{kind}-peftkit-profile", f"{kind}-peftkit-profile"
        cmd = [sys.executable, HERE / "profile_command.py", "--out", run.log.parent / name]
        cmd += [
            "--launched",
            f"{time.time():.3f}",
            "--",
            *concept_args(args, base, images, out, n, res),
        ]
        run(name, cmd, TIMEOUT_S[kind], clear=out, workload=kind, tool="profile", size=n)


def vit(run: Runner, args: argparse.Namespace) -> None:
    """vit-train vs the plain timm + peft loop on the same JPEG folder, LoRA r8, bf16."""
    smoke = args.cpu_smoke
    data = run.work / "vtab"
    vtab_folder(data, *((40, 20, 32) if smoke else (1000, 1000, 224)))
    model = ["--model", "vit_tiny_patch16_224" if smoke else "vit_base_patch16_224"]
    kw = json.dumps({"img_size": 32} if smoke else {})
    bs = 8 if smoke else 64
    for n in args.vit_epochs:
        info = dict(workload="vit", size=n, images_per_epoch=(1000 if not smoke else 40) // bs * bs)
        out = run.work / f"vit-peftkit-{n}"
        cmd = PEFTKIT + ["vit-train", "--data", f"vtab:{data}", "--random-init", "--method", "lora"]
        cmd += model + ["--model-kwargs", kw, "--r", 8, "--num-classes", 10, "--epochs", n]
        cmd += ["--batch-size", bs, "--mixed-precision", "no" if smoke else "bf16", "--output", out]
        row = run(f"vit-peftkit-{n}", cmd, TIMEOUT_S["vit"], clear=out, tool="peftkit", **info)
        row["reported"] = read_json(out / "results.json")
        out = run.work / f"vit-loop-{n}"
        cmd = WORKLOADS + ["vit-loop", "--data", data, "--output", out, "--epochs", n] + model
        cmd += ["--kw", kw, "--batch-size", bs, "--workers", 2 if smoke else 8]
        row = run(f"vit-loop-{n}", cmd, TIMEOUT_S["vit"], clear=out, tool="timm+peft loop", **info)
        row["reported"] = read_json(out / "results.json")


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (workload, tool): wall clock per run size, steady step, set-up, peak memory."""
    lines = []
    timed = [r for r in rows if r["tool"] not in ("build", "warm-up", "profile")]
    for key in dict.fromkeys((r["workload"], r["tool"]) for r in timed):
        runs = sorted(
            (r for r in timed if (r["workload"], r["tool"]) == key), key=lambda r: r["size"]
        )
        ok = [r for r in runs if r["status"] == "ok"]
        line = {"workload": key[0], "tool": key[1]}
        line["status"] = ", ".join(sorted({r["status"] for r in runs}))
        line.update({f"wall_s@{r['size']}": r["wall_s"] for r in runs})
        peaks = [r["peak_gib"] for r in ok if r["peak_gib"] is not None]
        line["peak_gib"] = max(peaks) if peaks else None
        if len(ok) >= 2:
            short, long = ok[0], ok[-1]
            steady = (long["wall_s"] - short["wall_s"]) / (long["size"] - short["size"])
            line["setup_s"] = round(short["wall_s"] - short["size"] * steady, 1)
            if key[0] == "vit":  # an epoch: its training images and its evaluation
                line["steady_epoch_s"] = round(steady, 2)
                line["steady_images_per_s"] = round(long["images_per_epoch"] / steady, 1)
            else:
                line["steady_step_ms"] = round(steady * 1000, 1)
        reported = (ok[-1].get("reported") or {}) if ok else {}
        for field in ("images_per_s", "top1", "samples_per_s", "final_loss"):
            if isinstance(reported.get(field), (int, float)):
                line[f"reported_{field}"] = round(reported[field], 3)
        lines.append(line)
    return lines


def columns(workload: str, sizes: list[int]) -> list[tuple[str, str, bool]]:
    """(header, summary key, whether a peftkit/other ratio means something) for one table."""
    unit = "epochs" if workload == "vit" else "steps"
    cols = [(f"wall s, {n} {unit}", f"wall_s@{n}", True) for n in sizes]
    if workload == "vit":
        cols += [("steady epoch s", "steady_epoch_s", True)]
        cols += [("images/s, steady incl. eval", "steady_images_per_s", True)]
        cols += [("images/s, self-reported", "reported_images_per_s", True)]
    else:
        cols += [("steady step ms", "steady_step_ms", True)]
    cols += [("set-up s", "setup_s", True), ("peak GiB (nvidia-smi)", "peak_gib", True)]
    return cols + ([("top-1 %", "reported_top1", False)] if workload == "vit" else [])


def markdown(lines: list[dict], meta: dict) -> str:
    out = [f"# e2e: {meta['gpu']}, {meta['date']}", ""]
    for workload in dict.fromkeys(line["workload"] for line in lines):
        group = [line for line in lines if line["workload"] == workload]
        sizes = sorted({int(k[7:]) for line in group for k in line if k.startswith("wall_s@")})
        cols = columns(workload, sizes)
        out += [f"## {workload}", "", "| tool | " + " | ".join(c[0] for c in cols) + " | status |"]
        out.append("|---" * (len(cols) + 2) + "|")
        for line in group:
            cells = ["-" if line.get(key) is None else str(line[key]) for _, key, _ in cols]
            out.append(f"| {line['tool']} | " + " | ".join(cells) + f" | {line['status']} |")
        if len(group) == 2:
            cells = []
            for _, key, ratio in cols:
                a, b = group[0].get(key), group[1].get(key)
                cells.append(f"{a / b:.2f}x" if ratio and a is not None and b else "-")
            out.append(f"| {group[0]['tool']} / {group[1]['tool']} | " + " | ".join(cells) + " | |")
        out.append("")
    out.append("Commands, exit codes and output tails: e2e.log; every number: e2e.json.")
    return "\n".join(out) + "\n"


def script_info(path: str) -> dict | None:
    p = Path(path)
    if not p.is_file():
        return None
    text = p.read_text()
    pin = next((line for line in text.splitlines() if line.startswith("check_min_version")), None)
    return {"path": str(p), "sha256": hashlib.sha256(text.encode()).hexdigest(), "requires": pin}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", help="results folder (default bench/results/<date>-<gpu>-e2e)")
    p.add_argument("--only", default="sd15,vit", help="comma list of sd15, vit, sdxl")
    p.add_argument("--diffusers-script", default=str(REF / "train_dreambooth_lora.py"))
    p.add_argument("--diffusers-sdxl-script", default=str(REF / "train_dreambooth_lora_sdxl.py"))
    p.add_argument("--steps", default="30,500", help="short,long concept runs (steps)")
    p.add_argument("--sdxl-steps", default="20,200", help="short,long SDXL runs (steps)")
    p.add_argument("--vit-epochs", default="2,6", help="short,long vit runs (epochs)")
    p.add_argument(
        "--peftkit-args",
        default="",
        help="extra train-concept arguments, e.g. '--mixed-precision bf16'",
    )
    p.add_argument(
        "--budget-s", type=float, default=540, help="total wall clock; later runs are skipped"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one long train-concept run (bench/profile_command.py) into profile-<kind>/",
    )
    p.add_argument(
        "--tools",
        default="peftkit,diffusers",
        help="concept runs of these tools only (diffusers' side unchanged since a previous run)",
    )
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument(
        "--cpu-smoke", action="store_true", help="tiny models and data, 2-3 steps, on the CPU"
    )
    args = p.parse_args()
    unknown = set(args.only.split(",")) - {"sd15", "sdxl", "vit"}
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from sd15, sdxl, vit")
    if args.cpu_smoke:
        args.steps, args.sdxl_steps, args.vit_epochs = "2,3", "2,3", "1,2"
    args.steps, args.sdxl_steps, args.vit_epochs = (
        [int(v) for v in s.split(",")] for s in (args.steps, args.sdxl_steps, args.vit_epochs)
    )
    memory = GpuMemory()
    gpu = memory.query("name") or "cpu"
    today = datetime.date.today().isoformat()
    out = Path(args.out or HERE / "results" / f"{today}-{gpu.split()[-1].lower()}-e2e")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="peftkit-e2e-"))
    versions = {}
    for pkg in ("torch", "diffusers", "peft", "timm", "transformers", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    meta = {
        "gpu": gpu,
        "date": today,
        "args": vars(args),
        "versions": versions,
        "python": sys.version.split()[0],
        "bytecode": "cached under <work>/pycache (PYTHONPYCACHEPREFIX), filled by the warm-ups",
    }
    meta["diffusers_scripts"] = [
        script_info(s) for s in (args.diffusers_script, args.diffusers_sdxl_script)
    ]
    run = Runner(out, work, args.budget_s)
    try:
        # loads what every tool imports once, so no tool's first run pays the cold disk alone
        run("warm-up", [sys.executable, "-c", WARM_UP], 120, workload="-", tool="build")
        for what in args.only.split(","):
            vit(run, args) if what == "vit" else concept(run, args, what)
    finally:
        lines = summarize(run.rows)
        table = markdown(lines, meta)
        (out / "e2e.json").write_text(
            json.dumps({"meta": meta, "summary": lines, "runs": run.rows}, indent=1)
        )
        (out / "e2e.md").write_text(table)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        print(table)


if __name__ == "__main__":
    main()
