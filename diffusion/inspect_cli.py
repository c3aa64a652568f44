"""`peftkit inspect FILE`: what an adapter file holds, from its safetensors header alone.

Format, core(s), rank and alpha, targets, components, base model and fingerprint, dtype and size,
without loading a model or the weights: tensors become shape-only meta tensors and only the scalar
`.alpha` values are read, then the same readers `peftkit convert` uses describe the file.

    peftkit inspect lokr_kohya.safetensors
    peftkit inspect my_peft_adapter/          # a peft save_pretrained folder
"""

from __future__ import annotations

import argparse
import json
import struct
from collections import Counter
from pathlib import Path

import torch

from ..common_kernels.errors import PeftkitError
from . import formats
from .formats.peft import read_peft_folder

FORMAT_NAMES = {
    "peftkit": "peftkit (load_adapter)",
    "peft": "peft / diffusers (lora_A, lora_B)",
    "old-diffusers": "old diffusers attention processors",
    "kohya": "kohya / A1111 / LyCORIS",
}
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """{key: {"dtype", "shape", ...}} and the metadata of a safetensors file, reading only its header."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > path.stat().st_size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise PeftkitError(
            f"{str(path)!r} is not a readable safetensors file ({err}): it may be truncated or "
            "corrupt"
        ) from None
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


def shape_only(path: Path, header: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Meta tensors of the header's shapes; the few scalar `.alpha` tensors read for real."""
    from safetensors import safe_open

    tensors = {
        k: torch.empty(v["shape"], dtype=DTYPES.get(v["dtype"], torch.float32), device="meta")
        for k, v in header.items()
    }
    scalars = [k for k in header if k.endswith(".alpha")]
    if scalars:
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in scalars})
    return tensors


def transformer_family(modules) -> str | None:
    """The DiT family a transformer adapter's module names point to: only Flux has single blocks."""
    if not modules:
        return None
    if any(m.startswith("single_transformer_blocks.") for m in modules):
        return "a Flux transformer (FluxPipeline.load_lora_weights)"
    return "an SD3 transformer (StableDiffusion3Pipeline.load_lora_weights)"


def describe(path: str | Path) -> list[str]:
    """The lines `peftkit inspect` prints for `path` (a .safetensors file or a peft folder)."""
    path = Path(path)
    if path.is_dir():
        path = read_peft_folder(path)
    if not path.is_file():
        raise PeftkitError(f"file {str(path)!r} does not exist: check the path")
    header, metadata = read_header(path)
    kind = formats.detect_format(header, metadata, path)
    adapters = formats.adapters_from(shape_only(path, header), metadata, path)
    entries = [(c, m, e) for c, es in adapters.items() for m, e in es.items()]
    cores = Counter(e.core for _, _, e in entries)
    ranks = Counter(e.rank for _, _, e in entries if e.rank is not None)
    alphas = Counter(round(e.alpha, 6) for _, _, e in entries if e.alpha is not None)
    dtypes = Counter(v["dtype"] for v in header.values())
    size = path.stat().st_size
    lines = [
        f"file: {path} ({size / 2**20:.2f} MiB, {len(header)} tensors, "
        + ", ".join(f"{d} x{n}" for d, n in dtypes.most_common())
        + ")",
        f"format: {FORMAT_NAMES[kind]}",
        "cores: " + ", ".join(f"{c} ({n} modules)" for c, n in cores.most_common()),
        "components: " + ", ".join(f"{c} ({len(es)})" for c, es in adapters.items()),
    ]
    if ranks:
        lines.append("rank: " + ", ".join(f"{r} x{n}" for r, n in sorted(ranks.items())))
    if alphas:
        lines.append("alpha: " + ", ".join(f"{a:g} x{n}" for a, n in sorted(alphas.items())))
    lines.append(f"targets: {len(entries)}, e.g. " + ", ".join(m for _, m, _ in entries[:3]))
    family = transformer_family(adapters.get("transformer", {}))
    if family:
        lines.append(f"made for: {family}")
    if metadata.get("config"):
        lines.append(f"config: {metadata['config']}")
    for key, label in (("base_model", "base model"), ("base_fingerprint", "base fingerprint")):
        if metadata.get(key):
            lines.append(f"{label}: {metadata[key]}")
    for key in ("ss_network_module", "ss_sd_model_name", "ss_base_model_version"):
        if metadata.get(key):
            lines.append(f"{key}: {metadata[key]}")
    return lines


def inspect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="peftkit inspect",
        description="print what an adapter file holds (format, cores, rank/alpha, targets, base) "
        "from its header, without loading a model",
    )
    parser.add_argument("file", help=".safetensors adapter file or peft save_pretrained folder")
    args = parser.parse_args(argv)
    print("\n".join(describe(args.file)))
    return 0
