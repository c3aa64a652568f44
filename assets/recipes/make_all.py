"""Make both starter models and measure them in one run (one GPU call of about 9 minutes).

    python -m peftkit.assets.recipes.make_all --out /tmp/starters            # CUDA: the shipped recipe
    python -m peftkit.assets.recipes.make_all --out /tmp/smoke --tiny --device cpu   # seconds, CPU

Writes <out>/starter-sd and <out>/starter-vit (copy them into assets/, or pass --install),
<out>/logs/*.log, <out>/eval/ (t2i.json/.md, t2i_samples.png, vit/results.md/.csv) and
<out>/summary.json + summary.md. A --deadline-minutes guard skips the ViT runs that would not
finish in time (they are listed in the summary), so the whole run stays inside one call.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from .evaluate_starter import VIT_METHODS, evaluate_t2i, evaluate_vit, t2i_markdown
from .recipe_run import folder_megabytes, pick_device
from .train_starter_sd import SDRecipe, train_starter_sd
from .train_starter_vit import ViTRecipe, train_starter_vit

ASSETS = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--minutes-sd", type=float, default=4.5, help="VAE + UNet budget")
    parser.add_argument("--minutes-vit", type=float, default=1.25)
    parser.add_argument(
        "--deadline-minutes", type=float, default=8.5, help="stop starting ViT eval runs after this"
    )
    parser.add_argument(
        "--vit-epochs", type=int, default=15, help="fine-tuning epochs per ViT eval run"
    )
    parser.add_argument("--seeds", type=int, default=2, help="seeds per color x shape prompt")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models and a few steps (CPU smoke test)"
    )
    parser.add_argument(
        "--install", action="store_true", help="also copy the finished folders into assets/"
    )
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device, out = pick_device(args.device), Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    sd_dir, vit_dir, eval_dir = out / "starter-sd", out / "starter-vit", out / "eval"

    if args.tiny:
        sd_recipe = SDRecipe.tiny(steps=3, vae_steps=3)
        vit_recipe = ViTRecipe.tiny(steps=3)
    else:
        sd_recipe, vit_recipe = (
            SDRecipe(minutes=args.minutes_sd),
            ViTRecipe(minutes=args.minutes_vit),
        )
    summary: dict = {"device": str(device)}
    summary["starter_sd"] = train_starter_sd(
        sd_recipe, sd_dir, device, out / "logs" / "starter-sd.log"
    )
    summary["starter_vit"] = train_starter_vit(
        vit_recipe, vit_dir, device, out / "logs" / "starter-vit.log"
    )
    summary["training_seconds"] = time.perf_counter() - start

    if not args.skip_eval:
        quick = (
            dict(seeds=1, steps=2, classifier_steps=2, limit=3)
            if args.tiny
            else dict(seeds=args.seeds, classifier_steps=800)
        )
        summary["t2i"] = {
            k: v
            for k, v in evaluate_t2i(sd_dir, eval_dir, device, **quick).items()
            if k != "per_sample"
        }
        print(t2i_markdown(summary["t2i"]), flush=True)
        tasks = (
            ["shape", "color"]
            if args.tiny
            else ["counting", "location", "orientation", "shape", "color"]
        )
        methods = ["linear", "lora"] if args.tiny else list(VIT_METHODS)
        deadline = start + 60 * args.deadline_minutes
        rows = evaluate_vit(
            vit_dir.resolve(),
            eval_dir / "vit",
            device,
            tasks,
            methods,
            epochs=1 if args.tiny else args.vit_epochs,
            builtin_sizes=(64, 32) if args.tiny else None,
            deadline=deadline,
        )
        summary["vit_runs"] = len(rows)
        summary["vit_table"] = (eval_dir / "vit" / "results.md").read_text() if rows else ""
        print(summary["vit_table"], flush=True)

    for folder in (sd_dir, vit_dir):
        summary[f"{folder.name}_mb"] = folder_megabytes(folder)
        if args.install:
            shutil.copytree(folder, ASSETS / folder.name, dirs_exist_ok=True)
    summary["total_seconds"] = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text(summary_markdown(summary))
    print(summary_markdown(summary), flush=True)
    return 0


def summary_markdown(s: dict) -> str:
    sd, vit = s["starter_sd"], s["starter_vit"]
    lines = [
        f"# Starter models ({s['device']}{', ' + str(sd.get('gpu')) if sd.get('gpu') else ''})",
        "",
        f"- starter-sd: {s.get('starter-sd_mb', 0):.1f} MB, parameters {sd['parameters']}; VAE {sd['vae_steps']} "
        f"steps ({sd['vae_seconds']:.0f}s, PSNR {sd['vae_psnr_db']:.1f} dB), UNet+text {sd['unet_steps']} steps "
        f"({sd['unet_seconds']:.0f}s, final loss {sd['unet_final_loss']:.4f})",
        f"- starter-vit: {s.get('starter-vit_mb', 0):.1f} MB, {vit['parameters']} parameters; {vit['steps']} steps "
        f"({vit['train_seconds']:.0f}s, final loss {vit['final_loss']:.3f}); held-out top-1 per head: "
        + ", ".join(f"{k} {v:.1f}" for k, v in vit["held_out_top1"].items()),
        f"- training {s['training_seconds']:.0f}s, total {s.get('total_seconds', 0):.0f}s",
        "",
    ]
    if "t2i" in s:
        lines += [
            t2i_markdown(s["t2i"]),
            "Starter ViT fine-tuning on the built-in tasks (top-1 %, test split):",
            "",
            s.get("vit_table", ""),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
