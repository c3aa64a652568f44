"""`peftkit` command line. Subcommands live beside their code and are imported only when run, so
`peftkit --help` stays instant. Each entry names a module and a function taking argv."""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import sys
from typing import NoReturn

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("peftkit.apps.cli", "info", "list adapter methods and library versions"),
    "vit-train": (
        "peftkit.vision.cli",
        "vit_train",
        "fine-tune a ViT with an adapter (VTAB-1k, ImageFolder, built-in tasks)",
    ),
    "vit-eval": ("peftkit.vision.cli", "vit_eval", "evaluate a ViT adapter on a dataset split"),
    "train-concept": (
        "peftkit.diffusion.cli",
        "train_concept",
        "DreamBooth: train a concept adapter from a few images",
    ),
    "train-concepts": (
        "peftkit.diffusion.multitenant_cli",
        "train_concepts",
        "train several concept adapters together over one frozen UNet (jobs.yaml)",
    ),
    "train-ti": (
        "peftkit.diffusion.cli",
        "train_ti",
        "Textual Inversion: learn new token embeddings",
    ),
    "generate": (
        "peftkit.diffusion.cli",
        "generate",
        "generate images with one or several adapters",
    ),
    "evaluate-concept": (
        "peftkit.diffusion.cli",
        "evaluate_concept",
        "CLIP-I / CLIP-T / DINO metrics for a concept",
    ),
    "convert": (
        "peftkit.diffusion.convert_cli",
        "convert",
        "convert adapter files between peftkit, diffusers/peft and kohya/LyCORIS formats",
    ),
    "inspect": (
        "peftkit.diffusion.inspect_cli",
        "inspect",
        "print what an adapter file holds (format, cores, rank/alpha, targets, base)",
    ),
    "train-control": (
        "peftkit.diffusion.control_cli",
        "train_control",
        "train a zero-conv control branch (ControlNet-style)",
    ),
    "train-ip-adapter": (
        "peftkit.diffusion.control_cli",
        "train_ip_adapter",
        "train an IP-Adapter image prompt",
    ),
    "serve": (
        "peftkit.apps.serve",
        "serve",
        "HTTP API: many adapters over one base, batched into one forward",
    ),
    "demo": (
        "peftkit.apps.demo",
        "demo",
        "train a concept adapter on sample images; before/after grid (CPU, minutes)",
    ),
    "app": (
        "peftkit.apps.app",
        "app",
        "Gradio app: personalize a diffusion model, tune a ViT (127.0.0.1)",
    ),
}


def info(argv: list[str]) -> int:
    import argparse
    from importlib import metadata

    argparse.ArgumentParser(prog="peftkit info", description=COMMANDS["info"][2]).parse_args(argv)
    from peftkit import __version__
    from peftkit.common_kernels import core, core_names

    print(f"peftkit {__version__}")
    print("adapter cores:")
    for name in core_names():
        entry = core(name)
        aliases = f" (also {', '.join(entry.aliases)})" if entry.aliases else ""
        print(f"  {name}{aliases}: {entry.summary}")
    print(
        "vision methods: vpt-shallow, vpt-deep, adaptformer, ssf, bitfit, linear, full + the cores"
    )
    print("diffusion: dreambooth with any core, textual inversion, control branch, IP-Adapter")
    for pkg in (
        "torch",
        "diffusers",
        "transformers",
        "timm",
        "open_clip_torch",
        "accelerate",
        "gradio",
        "safetensors",
        "xformers",
    ):
        try:
            version = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"  {pkg:16s} {version}")
    import torch

    print(
        f"  device           {'cuda: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}"
    )
    return 0


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: peftkit [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {n:{width}s}  {h}" for n, (_, _, h) in COMMANDS.items()]
    lines += ["", "run 'peftkit <command> --help' for a command's options"]
    lines += ["--debug (anywhere): show the Python traceback of an error instead of one line"]
    return "\n".join(lines)


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.exit(2, f"{parser.prog}: error: {message} (see '{parser.prog} --help')\n")


def _os_message(err: OSError) -> str:
    where = f" {str(err.filename)!r}" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full{where}: free some space and run again"
    return f"{err.strerror or err}{where}: check the path and its permissions"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"peftkit: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[argv[0]]
    from peftkit.common_kernels.errors import PeftkitError

    prefix = f"peftkit {argv[0]}: error:"
    parse_error = argparse.ArgumentParser.error
    # Every command's parser: one error line (argparse prints the whole usage block first).
    argparse.ArgumentParser.error = _one_line_error
    try:
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    except KeyboardInterrupt:
        print(
            f"peftkit {argv[0]}: interrupted; checkpoints written so far are kept", file=sys.stderr
        )
        return 130
    except Exception as err:
        if debug:
            raise
        # Exit code 2 for what the user can fix (as argparse does), 1 for our own failures.
        if isinstance(err, PeftkitError):
            print(f"{prefix} {err}", file=sys.stderr)
            return 2
        if isinstance(err, OSError):
            print(f"{prefix} {_os_message(err)}", file=sys.stderr)
            return 2
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(
            f"{prefix} unexpected {type(err).__name__}: {first} "
            "(please report it; rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        argparse.ArgumentParser.error = parse_error
        if "torch" in sys.modules:  # a command that never imported torch launched nothing
            from peftkit.common_kernels.training.launch import end_launch

            end_launch()


def console() -> NoReturn:
    """The `peftkit` script: `main` in a process of its own, ended as launch.exit_process says
    (without the interpreter's last garbage collections; a launched process at once)."""
    code = main()
    if "torch" in sys.modules:  # only a command that imported torch can be part of a launch
        from peftkit.common_kernels.training.launch import exit_process

        exit_process(code)
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
