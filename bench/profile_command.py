"""Where one `peftkit` command's wall clock and GPU memory go, from the interpreter's start to its
exit: the command runs in this process while a thread samples the main thread's stack and the CUDA
caching allocator every few milliseconds. Writes profile.json and profile.md under --out: time per
phase (the peftkit function, or the library being imported), and the stack at peak reserved memory.
Usage: python bench/profile_command.py --out DIR --launched $(date +%s.%N) -- train-concept --model ... --steps 500
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from pathlib import Path

STARTED = time.time()  # this module is the process's first code
DEPTH = 7  # of the peftkit frames that name a sample's outer calls


def phase(frame) -> tuple[str, str]:
    """A sample's labels: (the innermost peftkit function on the stack as module:function, the
    outermost DEPTH - 1 joined by '>'), or while importing, the outermost library module executing."""
    stack = []
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    stack.reverse()
    for f in stack:
        package = f.f_globals.get("__name__", "").split(".")[0]
        if f.f_code.co_name == "<module>" and package not in ("peftkit", "__main__", ""):
            return "import " + package, "import " + package
    inner = [f for f in stack if f.f_globals.get("__name__", "").startswith("peftkit.")]
    if not inner:
        return ("python " + (stack[-1].f_code.co_name if stack else "?"),) * 2
    names = [f"{f.f_globals['__name__'][8:]}:{f.f_code.co_name}" for f in inner]
    return names[-1], " > ".join(names[1:DEPTH])


class Sampler(threading.Thread):
    def __init__(self, every_s: float) -> None:
        super().__init__(daemon=True, name="profile-sampler")
        self.every_s, self.main = every_s, threading.main_thread().ident
        self.samples: list[tuple[float, str, str, float, float]] = []
        self.peak: tuple[float, str, list[str]] = (0.0, "", [])
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every_s):
            frame = sys._current_frames().get(self.main)
            if frame is None:
                continue
            reserved = allocated = 0.0
            torch = sys.modules.get("torch")
            if torch is not None and hasattr(torch, "cuda") and torch.cuda.is_initialized():
                reserved = torch.cuda.memory_reserved() / 2**30
                allocated = torch.cuda.memory_allocated() / 2**30
            label, outer = phase(frame)
            self.samples.append((time.time(), label, outer, reserved, allocated))
            if reserved > self.peak[0]:
                self.peak = (reserved, label, stack_lines(frame))


def stack_lines(frame) -> list[str]:
    lines = []
    while frame is not None:
        code = frame.f_code
        lines.append(f"{code.co_filename.split('/')[-1]}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return lines[::-1][-25:]


def report(
    out: Path, sampler: Sampler, marks: dict[str, float], command: list[str], code: int
) -> None:
    spans, outers = collections.Counter(), collections.Counter()
    peaks: dict[str, float] = {}
    for i, (t, label, outer, reserved, _) in enumerate(sampler.samples):
        nxt = sampler.samples[i + 1][0] if i + 1 < len(sampler.samples) else marks["main_end"]
        spans[label] += nxt - t
        outers[outer] += nxt - t
        peaks[label] = max(peaks.get(label, 0.0), reserved)
        peaks[outer] = max(peaks.get(outer, 0.0), reserved)
    start = marks["process"]
    rows = [
        ("interpreter start to this script", marks["script"] - start),
        ("imports before main", marks["main_start"] - marks["script"]),
        ("main()", marks["main_end"] - marks["main_start"]),
    ]
    lines = [f"# profile of `peftkit {' '.join(command)}` (exit {code})", ""]
    lines += ["| span | s |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in rows]
    for title, counts in (("outer calls", outers), ("innermost peftkit function", spans)):
        lines += ["", f"| {title} (sampled) | s | peak reserved GiB |", "|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {peaks[k]:.2f} |" for k, v in counts.most_common(30)]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        stats = torch.cuda.memory_stats()
        lines += [
            "",
            f"max reserved {stats.get('reserved_bytes.all.peak', 0) / 2**30:.2f} GiB, "
            f"max allocated {stats.get('allocated_bytes.all.peak', 0) / 2**30:.2f} GiB "
            "(the allocator's own peaks; nvidia-smi adds the CUDA context and libraries)",
        ]
    lines += [
        "",
        f"stack at the sampled peak ({sampler.peak[0]:.2f} GiB, {sampler.peak[1]}):",
        "```",
    ]
    lines += sampler.peak[2] + ["```"]
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    timeline = [
        (round(t - start, 3), *labels, round(r, 3), round(a, 3))
        for t, *labels, r, a in sampler.samples
    ]
    (out / "profile.json").write_text(json.dumps({"marks": marks, "timeline": timeline}))


if __name__ == "__main__":
    marks = {"script": STARTED}
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--every-ms", type=float, default=5.0)
    p.add_argument(
        "--launched", type=float, help="epoch seconds the shell started python at: $(date +%%s.%%N)"
    )
    opts = p.parse_args(sys.argv[1:split])
    command = sys.argv[split + 1 :]
    opts.out.mkdir(parents=True, exist_ok=True)
    marks["process"] = opts.launched or STARTED
    sampler = Sampler(opts.every_ms / 1000)
    sampler.start()
    from peftkit.apps import cli

    sys.argv = ["peftkit", *command]
    marks["main_start"] = time.time()
    try:
        code = cli.main()
    except SystemExit as stop:
        code = stop.code
    marks["main_end"] = time.time()
    sampler.halt.set()
    sampler.join()
    report(opts.out, sampler, marks, command, code or 0)
    print((opts.out / "profile.md").read_text())
