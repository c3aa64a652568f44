"""Generation with concept adapters: prompts x seeds grids with several adapters at chosen scales,
and mixed-adapter batches where each prompt row uses its own concept in one pipeline call.

    base = load_base("./sd15")
    names = load_concepts(base, [ConceptRef("out/dog", scale=0.8, name="dog"), ConceptRef("out/hat", 0.5)])
    images = generate_grid(base, ["a photo of sks dog"], seeds=[0, 1], out_dir="samples")
    images = generate_mixed(base, ["sks dog", "sks hat", "a cat"], ["dog", "hat", None], seed=0)

A peftkit adapter folder (from train-concept) or file loads with any core; diffusers/peft and
kohya LoRA files load through diffusion/formats/ as peftkit adapters, so they mix and route like the rest.
Textual Inversion files (from train-ti) add their tokens to the tokenizer. A control branch and an
IP-Adapter join through `attach_image_prompts`, alone or together, with any loaded concepts.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..common_kernels.adapter_file import load_adapter, read_tensors
from ..common_kernels.errors import PeftkitError
from ..common_kernels.inject import adapted_layers, routing
from .base import DiffusionBase
from .dreambooth import TEXT_FILE, UNET_FILE
from .formats import load_lora_file
from .pivotal import load_pivotal
from .textual_inversion import SINGLE_FILE as PIVOTAL_FILE

PROMPTS_FILE = "prompts.json"


@dataclass
class ConceptRef:
    """An adapter to load: a train-concept output folder or a .safetensors file, its scale, and a
    name (default: the folder or file stem)."""

    path: str
    scale: float = 1.0
    name: str | None = None

    @staticmethod
    def parse(text: str) -> ConceptRef:
        """ "path", "path:0.7" or "path:0.7:name"."""
        parts = text.split(":")
        try:
            scale = float(parts[1]) if len(parts) > 1 else 1.0
        except ValueError:
            raise PeftkitError(
                f"adapter {text!r}: the scale after ':' must be a number, e.g. out/dog:0.8"
            ) from None
        return ConceptRef(parts[0], scale, parts[2] if len(parts) > 2 else None)


def _is_textual_inversion(path: Path) -> bool:
    tensors, metadata = read_tensors(path)
    return (
        "config" not in metadata and len(tensors) == 1 and next(iter(tensors.values())).dim() == 2
    )


def _components(base: DiffusionBase) -> dict:
    names = ["text_encoder", "text_encoder_2"]
    return {"unet": base.unet, **dict(zip(names, base.text_encoders))}


def load_concepts(base: DiffusionBase, refs: list[ConceptRef]) -> list[str]:
    """Load each adapter onto the pipeline at its scale; returns the names given to them."""
    names: list[str] = []
    for ref in refs:
        path = Path(ref.path)
        name = ref.name or (path.stem if path.is_file() else path.name)
        if name in names:
            raise PeftkitError(f"two adapters are named {name!r}: give names with path:scale:name")
        if path.is_dir():
            if not (path / UNET_FILE).is_file():
                embeds = sorted(path.glob("*.safetensors"))
                if embeds and all(_is_textual_inversion(p) for p in embeds):
                    base.pipe.load_textual_inversion([str(p) for p in embeds])
                    names.append(name)
                    continue
                raise PeftkitError(
                    f"{path} has no {UNET_FILE}: pass a train-concept output folder or a LoRA file"
                )
            load_adapter(base.unet, path / UNET_FILE, name=name, scale=ref.scale)
            for i, encoder in enumerate(base.text_encoders):
                text = path / (
                    TEXT_FILE
                    if i == 0
                    else TEXT_FILE.replace("text_encoder", f"text_encoder_{i + 1}")
                )
                if text.is_file():
                    load_adapter(encoder, text, name=name, scale=ref.scale)
            if (path / PIVOTAL_FILE).is_file():  # the new token of a pivotal-tuning run
                load_pivotal(base, path / PIVOTAL_FILE)
        elif _is_textual_inversion(path):
            base.pipe.load_textual_inversion(str(path))
        elif "config" in read_tensors(path)[1]:
            load_adapter(base.unet, path, name=name, scale=ref.scale)
        else:
            load_lora_file(_components(base), path, name=name, scale=ref.scale)
        names.append(name)
    return names


@dataclass
class ImagePrompts:
    """A control branch and/or an IP-Adapter attached to a base pipeline: the pipeline to call and
    the extra call arguments holding their images."""

    pipe: object
    kwargs: dict
    # diffusers takes one set of IP-Adapter embeddings per call, so such calls draw one image each.
    one_per_call: bool


def attach_image_prompts(
    base: DiffusionBase,
    control: str | None = None,
    control_image: str | None = None,
    control_scale: float = 1.0,
    ip_adapter: str | None = None,
    ip_image: str | None = None,
    ip_scale: float = 1.0,
    ip_encoder: str | None = None,
    guidance: float = 7.5,
) -> ImagePrompts | None:
    """Attach a control branch (folder or hub id, with its condition image) and/or an IP-Adapter
    file (with its reference image) to `base`; None when neither is given."""
    from .data import open_image

    for what, model, image in (
        ("--control", control, control_image),
        ("--ip-adapter", ip_adapter, ip_image),
    ):
        if bool(model) != bool(image):
            flag = "--control-image" if what == "--control" else "--ip-image"
            raise PeftkitError(
                f"{what} and {flag} go together: pass both (the model and the image it reads)"
            )
    if not control and not ip_adapter:
        return None
    pipe, kwargs = base.pipe, {}
    if control:
        from .control import attach_control

        attached = attach_control(pipe, control, scale=control_scale)
        pipe, kwargs = attached.pipe, attached.kwargs(open_image(control_image))
    if ip_adapter:
        from .ip_adapter import attach_ip_adapter

        attached = attach_ip_adapter(pipe, ip_adapter, scale=ip_scale, image_encoder=ip_encoder)
        kwargs.update(attached.kwargs(open_image(ip_image), guidance=guidance > 1.0))
    return ImagePrompts(pipe, kwargs, one_per_call=bool(ip_adapter))


def _call(
    base: DiffusionBase,
    prompts: list[str],
    generators: list[torch.Generator],
    steps: int,
    guidance: float,
    resolution: int,
    negative: str = "",
    image_prompts: ImagePrompts | None = None,
) -> list[Image.Image]:
    if steps < 1:  # 0 divides by zero in the scheduler; negative ones return plain noise
        raise PeftkitError(f"steps must be at least 1, got {steps}")
    if resolution < 8 or resolution % 8:
        raise PeftkitError(
            f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {resolution}"
        )
    pipe, extra = (image_prompts.pipe, image_prompts.kwargs) if image_prompts else (base.pipe, {})
    timesteps = pipe.scheduler.config.get("num_train_timesteps", steps + 1)
    if steps >= timesteps:
        raise PeftkitError(
            f"steps must be below the scheduler's {timesteps} timesteps, got {steps}"
        )
    groups = (
        [[i] for i in range(len(prompts))]
        if image_prompts and image_prompts.one_per_call
        else [list(range(len(prompts)))]
    )
    images = []
    for rows in groups:
        images += pipe(
            [prompts[i] for i in rows],
            negative_prompt=[negative] * len(rows),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[generators[i] for i in rows],
            height=resolution,
            width=resolution,
            **extra,
        ).images
    return images


def generate_grid(
    base: DiffusionBase,
    prompts: list[str],
    seeds: list[int],
    out_dir: str | Path | None = None,
    steps: int = 30,
    guidance: float = 7.5,
    resolution: int = 512,
    image_prompts: ImagePrompts | None = None,
) -> list[list[Image.Image]]:
    """images[prompt][seed] with every loaded adapter active at its scale (and the control branch /
    IP-Adapter of `image_prompts`); saved as p<i>-s<seed>.png plus grid.png (rows = prompts,
    columns = seeds) when `out_dir` is given."""
    rows = [
        _call(
            base,
            [p] * len(seeds),
            [torch.Generator("cpu").manual_seed(s) for s in seeds],
            steps,
            guidance,
            resolution,
            image_prompts=image_prompts,
        )
        for p in prompts
    ]
    if out_dir is not None:
        _save(
            rows,
            prompts,
            prompts,
            [f"seed {s}" for s in seeds],
            Path(out_dir),
            [f"s{s}" for s in seeds],
        )
    return rows


def generate_mixed(
    base: DiffusionBase,
    prompts: list[str],
    adapters: list[str | None],
    seed: int = 0,
    out_dir: str | Path | None = None,
    steps: int = 30,
    guidance: float = 7.5,
    resolution: int = 512,
    image_prompts: ImagePrompts | None = None,
) -> list[Image.Image]:
    """One batch, row i drawn with adapter adapters[i] alone (None: the base model), all rows in
    the same UNet forwards through per-row routing. Row i equals a solo run of prompt i with seed+i."""
    if len(adapters) != len(prompts):
        raise PeftkitError(
            f"{len(prompts)} prompts but {len(adapters)} adapter choices: give one per prompt"
        )
    names = sorted({a for a in adapters if a is not None})
    ids = [names.index(a) if a is not None else -1 for a in adapters]
    # Classifier-free guidance runs the negative rows before the positive ones in one UNet batch.
    unet_ids = ids + ids if guidance > 1.0 else ids
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    with contextlib.ExitStack() as stack:
        stack.enter_context(routing(base.unet, unet_ids, names))
        for encoder in base.text_encoders:
            held = {n for layer in adapted_layers(encoder) for n in layer.deltas}
            if not held:
                continue
            if not set(names) <= held:
                raise PeftkitError(
                    f"a mixed batch needs text-encoder adapters for all of {names} or none; the text "
                    f"encoder has {sorted(held)}: load concepts trained alike"
                )
            stack.enter_context(routing(encoder, ids, names))
        if image_prompts and image_prompts.one_per_call:
            raise PeftkitError(
                "a mixed-adapter batch cannot take an IP-Adapter image (diffusers reads one image "
                "prompt per call): generate the IP-Adapter images without --mixed"
            )
        images = _call(
            base, prompts, generators, steps, guidance, resolution, image_prompts=image_prompts
        )
    if out_dir is not None:
        _save(
            [[im] for im in images],
            prompts,
            [f"[{a or 'base'}] {p}" for a, p in zip(adapters, prompts)],
            ["mixed"],
            Path(out_dir),
            ["mixed"],
        )
    return images


def contact_sheet(
    rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]
) -> Image.Image:
    """A labelled grid: one row per prompt, one column per seed."""
    w, h = rows[0][0].size
    pad = 14
    sheet = Image.new("RGB", (len(col_labels) * w, pad + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(col_labels):
        draw.text((j * w + 2, 1), label, fill="black")
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = pad + i * (h + pad)
        draw.text((2, y), label[:80], fill="black")
        for j, image in enumerate(row):
            sheet.paste(image, (j * w, y + pad))
    return sheet


def _save(rows, prompts, row_labels, col_labels, out_dir: Path, col_tags) -> None:
    """PNGs p<row>-<tag>.png, the contact sheet grid.png, and prompts.json (file -> prompt) for
    evaluate-concept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {}
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        for tag, image in zip(col_tags, row):
            image.save(out_dir / f"p{i}-{tag}.png")
            record[f"p{i}-{tag}.png"] = prompt
    contact_sheet(rows, row_labels, col_labels).save(out_dir / "grid.png")
    (out_dir / PROMPTS_FILE).write_text(json.dumps(record, indent=1))
