"""`peftkit convert IN OUT --to {peftkit,diffusers,kohya}`: adapter files between the formats.

The input format (peftkit, diffusers/peft file or folder, kohya/LyCORIS) is detected from the keys.
Conversion needs only the file: module names travel in the keys and peftkit metadata follows from
the factor shapes. `--base` (a diffusers pipeline folder) resolves kohya names exactly, checks that
the file fits that base, and supplies the base weights OFT needs to be written for LyCORIS.

    peftkit convert lora_kohya.safetensors out/pytorch_lora_weights.safetensors --to diffusers
    peftkit convert out/unet_lora.safetensors lora_kohya.safetensors --to kohya
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common_kernels.adapter_file import save_tensors
from ..common_kernels.args import existing_path, output_file
from ..common_kernels.errors import PeftkitError
from . import formats


def _components(base: str | None) -> dict | None:
    if base is None:
        return None
    from .base import load_base

    loaded = load_base(base)
    components = {("transformer" if loaded.is_transformer else "unet"): loaded.unet}
    components.update(
        {
            ("text_encoder" if i == 0 else f"text_encoder_{i + 1}"): e
            for i, e in enumerate(loaded.text_encoders)
        }
    )
    return components


def convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="peftkit convert",
        description="convert adapter files (LoRA, DoRA, LoHa, LoKr, OFT) between peftkit, "
        "diffusers/peft (load_lora_weights) and kohya/A1111/LyCORIS formats",
    )
    parser.add_argument(
        "input",
        type=existing_path,
        help=".safetensors file or peft folder (format detected from its keys)",
    )
    parser.add_argument(
        "output",
        type=output_file,
        help="output file; for --to peftkit with several components, a folder",
    )
    parser.add_argument("--to", required=True, choices=["peftkit", "diffusers", "kohya"])
    parser.add_argument(
        "--component",
        choices=list(formats.COMPONENTS),
        help="component of inputs that do not name one (peft state dicts, peftkit files)",
    )
    parser.add_argument(
        "--base",
        help="diffusers pipeline folder or hub id: resolve kohya names exactly and check fit",
    )
    args = parser.parse_args(argv)
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise PeftkitError("input and output are the same file: choose another output path")
    components = _components(args.base)
    lora = formats.read_adapters(args.input, components, args.component)
    if components:
        _attach_base(lora, components, args.input)
    written = []
    if args.to == "diffusers":
        written.append(save_tensors(args.output, formats.diffusers_tensors(lora), {"format": "pt"}))
    elif args.to == "kohya":
        written.append(
            save_tensors(args.output, formats.kohya_tensors(lora), formats.kohya_metadata(lora))
        )
    else:
        for component, entries in lora.items():
            target = (
                Path(args.output)
                if len(lora) == 1
                else Path(args.output) / f"{component}.safetensors"
            )
            written.append(save_tensors(target, *formats.peftkit_tensors(entries, component)))
    modules = sum(len(e) for e in lora.values())
    cores = sorted({e.core for entries in lora.values() for e in entries.values()})
    for path in written:
        print(f"wrote {path}")
    counts = ", ".join(f"{c}: {len(e)}" for c, e in lora.items())
    print(f"{modules} {'/'.join(cores)} modules ({counts}) -> {args.to}")
    return 0


def _attach_base(lora: formats.AdapterSet, components: dict, path) -> None:
    """Check the file fits the base and keep each layer's base weight with its entry."""
    for component, entries in lora.items():
        if component not in components:
            continue
        model = components[component]
        local = formats.localize({component: entries}, components)[component]
        formats.check_fits(component, model, local, path)
        modules = dict(model.named_modules())
        for entry, name in zip(entries.values(), local):
            entry.base = modules[name].weight.detach().cpu()
