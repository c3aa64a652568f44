"""The app's Personalize tab: train a concept from a few images (any adapter core of the registry
through DreamBooth, or Textual Inversion), watch the loss, then generate side by side with the base model at an
adapter scale, combine two concepts, and download or import adapter files.

`Personalizer` holds the logic (validation, training jobs, generation) so tests can call it without
a browser; `build_tab` lays out the Gradio components and wires them to it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import gradio as gr
import pandas as pd
import torch
from PIL import Image

from ..common_kernels.adapter_file import atomic_write, read_tensors
from ..common_kernels.errors import PeftkitError
from ..common_kernels.registry import core, core_names
from ..diffusion.concept_defaults import CONCEPT_DEFAULTS
from ..diffusion.multitenant import ConceptJob
from .concept_queue import ConceptQueue
from .demo import (
    INSTANCE_PROMPT,
    SAMPLE_PHRASE,
    SAMPLES,
    concept_job,
    native_resolution,
    open_base,
)
from .jobs import (
    FINISHED,
    Job,
    JobRunner,
    in_range,
    progress_markdown,
    refused_markdown,
    whole_number,
)

# Dropdown label -> method: every registered core (the concept trainer takes each), LoRA first,
# then Textual Inversion.
METHODS = {
    **{core(n).label: n for n in sorted(core_names(), key=lambda n: (n != "lora", n))},
    "Textual Inversion": "ti",
}
MIN_IMAGES, MAX_IMAGES, MAX_BYTES, MAX_PIXELS = 3, 20, 10 * 2**20, 4096 * 4096
# Bounds of the page's inputs, enforced again on the server for API clients.
MAX_STEPS, MAX_RANK, MAX_LR, MAX_SAMPLE_STEPS, MAX_GUIDANCE, MAX_SCALE = 2000, 64, 1.0, 100, 30, 2
ADAPTER_FILES = (
    "unet_adapter.safetensors",
    "pytorch_lora_weights.safetensors",
    "learned_embeds.safetensors",
)
INFO = "concept_info.json"


def validate_uploads(paths: list[str], folder: Path) -> list[Path]:
    """Check 3-20 uploaded files are readable images under the size caps and store them as PNGs in
    `folder`; raise a PeftkitError naming the first problem, leaving no `folder` behind."""
    if not MIN_IMAGES <= len(paths) <= MAX_IMAGES:
        raise PeftkitError(
            f"upload {MIN_IMAGES} to {MAX_IMAGES} images of your concept; got {len(paths)}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return [_store_image(path, folder / f"image-{i:02d}.png") for i, path in enumerate(paths)]
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def discard_uploads(paths: list[str]) -> None:
    """Delete Gradio's temporary copies of a rejected upload (accepted ones stay: Train may be
    clicked again), touching nothing outside Gradio's upload folder."""
    from gradio.utils import get_upload_folder

    cache = Path(get_upload_folder()).resolve()
    for path in paths or []:
        file = Path(path).resolve()
        if file.is_relative_to(cache) and file.is_file():
            file.unlink(missing_ok=True)
            if file.parent != cache and not any(file.parent.iterdir()):
                file.parent.rmdir()


def _store_image(path: str, target: Path) -> Path:
    """One upload checked (size, decodable, pixels) and stored at `target` as a PNG."""
    name = Path(path).name
    if not Path(path).is_file():
        raise PeftkitError(f"{name} is no longer on the server: upload the images again")
    if os.path.getsize(path) > MAX_BYTES:
        raise PeftkitError(f"{name} is larger than {MAX_BYTES // 2**20} MB: upload a smaller image")
    try:
        with Image.open(path) as image:
            image.verify()  # checks the file structure; a verified image must be reopened to decode
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise PeftkitError(
                    f"{name} has {image.width}x{image.height} pixels: the limit is 4096x4096"
                )
            rgb = image.convert("RGB")
    except PeftkitError:
        raise
    except Exception as err:  # PIL raises many types for files that are not images
        raise PeftkitError(
            f"{name} is not an image that can be read ({type(err).__name__}): upload PNG, "
            "JPEG or WebP files"
        ) from None
    if min(rgb.size) < 16:
        raise PeftkitError(
            f"{name} is only {rgb.width}x{rgb.height} pixels: use images of at least 16x16"
        )
    rgb.save(target)
    return target


class Personalizer:
    """Training and generation for one base model; jobs run on the shared `runner`."""

    def __init__(self, base: str, device: str, runner: JobRunner, root: Path) -> None:
        self.base_path, self.device, self.runner, self.root = base, device, runner, Path(root)
        self._gen = None
        self._ti_tokens: dict[str, str] = {}  # token -> file it was loaded from
        self._lock = threading.Lock()
        # Adapter-core jobs train together, joining as they are queued (concept_queue.py).
        self.concepts = ConceptQueue(self._load, device)

    def _load(self):
        return open_base(self.base_path, self.device)

    def images_folder(self, files: list[str] | None, use_samples: bool) -> Path:
        if files:
            folder = self.root / "uploads" / uuid.uuid4().hex[:12]
            try:
                validate_uploads(list(files), folder)
            except PeftkitError:
                discard_uploads(list(files))
                raise
            return folder
        if use_samples:
            return SAMPLES
        raise PeftkitError(
            f"no images: upload {MIN_IMAGES}-{MAX_IMAGES} images or tick 'use the bundled samples'"
        )

    def _samples_as(self, phrase: str) -> Path:
        """A copy of the bundled samples whose captions name the concept `phrase`: they say
        "sks flower", which would otherwise train that phrase instead of the user's."""
        folder = self.root / "uploads" / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        for image in SAMPLES.glob("*.png"):
            shutil.copy(image, folder / image.name)
            caption = image.with_suffix(".txt")
            if caption.is_file():
                text = caption.read_text(encoding="utf-8").replace(SAMPLE_PHRASE, phrase)
                (folder / caption.name).write_text(text, encoding="utf-8")
        return folder

    def submit(
        self,
        images: Path,
        method: str,
        steps: int,
        rank: int,
        lr: float,
        identifier: str,
        class_word: str,
    ) -> Job:
        """Queue a training job; the adapter lands in <job folder>/adapter/."""
        in_range("steps", steps, 1, MAX_STEPS)
        in_range("rank", rank, 1, MAX_RANK)
        in_range("learning rate", lr, 0, MAX_LR)
        if not identifier.strip() or " " in identifier.strip() or not class_word.strip():
            raise PeftkitError("give a one-word identifier (e.g. sks) and a class word (e.g. toy)")
        method = METHODS.get(method, method)
        identifier, class_word = identifier.strip(), class_word.strip()
        if images == SAMPLES and f"{identifier} {class_word}" != SAMPLE_PHRASE:
            images = self._samples_as(f"{identifier} {class_word}")

        if method == "ti":
            return self.runner.submit(
                "concept",
                lambda job: self._train_ti(job, images, steps, lr, identifier, class_word),
            )
        phrase = f"{identifier} {class_word}"
        job = self.runner.track("concept")
        out = job.output_dir / "adapter"

        def make(base) -> ConceptJob:
            resolution = native_resolution(base)
            job.emit({"kind": "message", "text": f"training {method} at {resolution}x{resolution}"})
            return concept_job(
                job.id,
                images,
                f"a photo of {phrase}",
                method,
                steps,
                rank,
                out,
                lr=lr or None,
                resolution=resolution,
                device=self.device,
                class_prompt=f"a photo of a {class_word}",
                min_snr_gamma=CONCEPT_DEFAULTS.min_snr_for(base),
            )

        def done() -> Path:
            self._write_info(out, job, method, phrase, class_word, steps)
            return out

        self.concepts.submit(job, make, done)
        return job

    def _train_ti(
        self, job: Job, images: Path, steps: int, lr: float, identifier: str, class_word: str
    ) -> Path:
        from ..common_kernels.training.engine import TrainConfig, train
        from ..diffusion.data import ConceptDataset
        from ..diffusion.textual_inversion import TIConfig, TITask, save_embeddings

        job.emit({"kind": "message", "text": f"loading {self.base_path}"})
        base = self._load()
        out = job.output_dir / "adapter"
        resolution = native_resolution(base)
        job.emit({"kind": "message", "text": f"training ti at {resolution}x{resolution}"})
        token = f"<{identifier}>"
        task = TITask(
            base,
            ConceptDataset(images, "", resolution),
            TIConfig(tokens=[token], init_word=class_word, resolution=resolution),
        )
        train(
            task,
            task.dataset(),
            TrainConfig(
                steps=steps,
                batch_size=1,
                lr=lr or 5e-3,
                schedule="constant",
                output_dir=str(out),
                progress=False,
                cpu=self.device == "cpu",
            ),
            on_event=job.emit,
            should_stop=job.should_stop,
        )
        save_embeddings(task, out)
        self._write_info(out, job, "ti", f"a {token}", class_word, steps)
        return out

    @staticmethod
    def _write_info(
        out: Path, job: Job, method: str, phrase: str, class_word: str, steps: int
    ) -> None:
        info = {
            "name": job.id,
            "method": method,
            "phrase": phrase,
            "class_word": class_word,
            "steps": steps,
        }
        atomic_write(out / INFO, lambda tmp: Path(tmp).write_text(json.dumps(info)))

    def adapters(self) -> list[tuple[str, str]]:
        """(label, path) of every adapter under the output folder: trained here or imported."""
        found = []
        for info in sorted(self.root.glob(f"*/adapter/{INFO}"), key=os.path.getmtime):
            meta = json.loads(info.read_text())
            found.append(
                (f"{meta['name']} · {meta['method']} · “{meta['phrase']}”", str(info.parent))
            )
        found += [
            (f"imported · {p.stem}", str(p))
            for p in sorted((self.root / "imported").glob("*.safetensors"))
        ]
        return found

    def import_adapter(self, path: str) -> str:
        read_tensors(path)  # a clear error for a file that is not safetensors
        target = self.root / "imported" / Path(path).name
        atomic_write(target, lambda tmp: shutil.copyfile(path, tmp))
        return str(target)

    def generate(
        self,
        prompt: str,
        seed: int,
        adapters: list[tuple[str, float]],
        steps: int = 25,
        guidance: float = 5.0,
    ) -> tuple[Image.Image, Image.Image]:
        """(base image, adapted image) for one prompt and seed; the base image drops the adapters and
        writes Textual Inversion tokens as their class word."""
        from ..common_kernels.inject import remove_adapters
        from ..diffusion.generate import ConceptRef, load_concepts

        if not prompt.strip():
            raise PeftkitError("the prompt is empty: describe the image, e.g. 'a photo of sks toy'")
        in_range("seed", seed, 0, 2**63 - 1)
        in_range("sampler steps", steps, 1, MAX_SAMPLE_STEPS)
        in_range("guidance", guidance, 0, MAX_GUIDANCE)
        for _, scale in adapters:
            in_range("adapter scale", scale, 0, MAX_SCALE)
        with self._lock:
            tokens = {t: p for path, _ in adapters for t, p in self._ti_of(path).items()}
            if self._gen is None or any(
                self._ti_tokens.get(t, src) != src for t, src in tokens.items()
            ):
                self._gen, self._ti_tokens = (
                    self._load(),
                    {},
                )  # a token can only be added once per tokenizer
            base = self._gen
            for model in (base.unet, *base.text_encoders):
                remove_adapters(model)
            plain = prompt
            for path, _ in adapters:
                info = Path(path) / INFO
                if info.is_file() and json.loads(info.read_text())["method"] == "ti":
                    meta = json.loads(info.read_text())
                    plain = plain.replace(meta["phrase"].split()[-1], meta["class_word"])
            resolution = native_resolution(base)
            call = dict(
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=resolution,
                width=resolution,
            )
            base.unet.eval()
            with torch.no_grad():
                before = base.pipe(
                    plain, generator=torch.Generator("cpu").manual_seed(seed), **call
                ).images[0]
                refs = [
                    ConceptRef(p, s, name=f"concept{i}")
                    for i, (p, s) in enumerate(adapters)
                    if not (self._ti_of(p) and set(self._ti_of(p)) <= set(self._ti_tokens))
                ]
                load_concepts(base, refs)
                self._ti_tokens.update(tokens)
                after = base.pipe(
                    prompt, generator=torch.Generator("cpu").manual_seed(seed), **call
                ).images[0]
        folder = self.root / "generated"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{uuid.uuid4().hex[:8]}-s{seed}"
        before.save(folder / f"{stem}-base.png")
        after.save(folder / f"{stem}-adapted.png")
        return before, after

    def judge(self, adapter: str) -> str:
        """`peftkit demo`'s judge line for a LoRA/LoKr/OFT adapter: the demo's prompts and seeds
        without and with it, counted by the bundled concept judge (it knows the sample flower)."""
        from ..common_kernels.inject import remove_adapters
        from ..diffusion.concept_judge import ConceptJudge
        from .demo import judge_adapter, judge_line

        if not adapter or self._ti_of(adapter) or not Path(adapter).exists():
            raise PeftkitError("choose a LoRA, LoKr or OFT adapter to judge")
        with self._lock:
            if self._gen is None:
                self._gen, self._ti_tokens = self._load(), {}
            for model in (self._gen.unet, *self._gen.text_encoders):
                remove_adapters(model)
            return judge_line(judge_adapter(self._gen, adapter, ConceptJudge()))

    @staticmethod
    def _ti_of(path: str) -> dict[str, str]:
        """Textual Inversion tokens an adapter folder adds (token -> folder), {} for other adapters."""
        info = Path(path) / "ti.json"
        return (
            {t: str(path) for t in json.loads(info.read_text())["tokens"]} if info.is_file() else {}
        )


def loss_frame(snap: dict) -> pd.DataFrame:
    return pd.DataFrame(snap["losses"] or [(0, float("nan"))], columns=["step", "loss"])


def build_tab(p: Personalizer) -> None:
    """The Personalize tab's components and events (call inside a gr.Blocks)."""
    with gr.Row():
        with gr.Column():
            files = gr.File(
                label=f"Concept images ({MIN_IMAGES}-{MAX_IMAGES}; PNG/JPEG/WebP, ≤10 MB each)",
                file_count="multiple",
                file_types=["image"],
                elem_id="concept-files",
            )
            use_samples = gr.Checkbox(
                True, label="use the bundled samples when nothing is uploaded"
            )
            gr.Gallery(
                [str(f) for f in sorted(SAMPLES.glob("*.png"))],
                label="bundled samples",
                columns=5,
                height=110,
                interactive=False,
            )
            with gr.Row():
                identifier = gr.Textbox("sks", label="identifier (a rare word)")
                class_word = gr.Textbox("flower", label="class word")
            method = gr.Dropdown(list(METHODS), value="LoRA", label="method")
            with gr.Row():
                steps = gr.Slider(
                    1, MAX_STEPS, CONCEPT_DEFAULTS.steps, step=1, label="steps", elem_id="steps"
                )
                rank = gr.Slider(
                    1, MAX_RANK, CONCEPT_DEFAULTS.rank, step=1, label="rank (cores with a rank)"
                )
                lr = gr.Number(
                    0, label="learning rate (0: method default)", minimum=0, maximum=MAX_LR
                )
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary", elem_id="train-button")
                cancel_btn = gr.Button("Cancel", elem_id="cancel-button")
        with gr.Column():
            status = gr.Markdown("no training yet", elem_id="train-status")
            loss_plot = gr.LinePlot(x="step", y="loss", label="training loss", height=220)
            download = gr.File(
                label="adapter files",
                file_count="multiple",
                interactive=False,
                elem_id="adapter-files",
            )
    job_id = gr.State(None)
    gr.Markdown("### Generate")
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(INSTANCE_PROMPT, label="prompt")
            with gr.Row():
                seed = gr.Number(0, precision=0, label="seed", minimum=0)
                sample_steps = gr.Slider(1, MAX_SAMPLE_STEPS, 25, step=1, label="sampler steps")
                guidance = gr.Slider(1.0, 15.0, 5.0, step=0.5, label="guidance")
            with gr.Row():
                adapter = gr.Dropdown(p.adapters(), label="adapter", allow_custom_value=False)
                scale = gr.Slider(0.0, 2.0, 1.0, step=0.05, label="adapter scale")
            with gr.Row():
                adapter_b = gr.Dropdown(p.adapters(), label="second concept (optional)")
                scale_b = gr.Slider(0.0, 2.0, 1.0, step=0.05, label="second scale")
            imported = gr.File(
                label="load a previously trained adapter (.safetensors)",
                file_types=[".safetensors"],
            )
            gen_btn = gr.Button("Generate", variant="primary", elem_id="generate-button")
            judge_btn = gr.Button("Judge: count the sample flower (as peftkit demo does)")
            verdict = gr.Markdown(elem_id="judge-line")
        base_img = gr.Image(label="base model", type="pil", format="png", interactive=False)
        adapted_img = gr.Image(label="with adapter(s)", type="pil", format="png", interactive=False)

    def train(files, use_samples, method, steps, rank, lr, identifier, class_word):
        images = None
        try:
            images = p.images_folder(files, use_samples)
            job = p.submit(
                images,
                method,
                whole_number(steps),
                whole_number(rank),
                float(lr or 0),
                identifier,
                class_word,
            )
        except PeftkitError as err:
            if images is not None and images.is_relative_to(p.root / "uploads"):
                shutil.rmtree(images, ignore_errors=True)  # a refused job leaves no upload behind
            gr.Warning(str(err))
            yield refused_markdown(str(err)), *[gr.update()] * 6
            return
        while not job.wait(0.5):
            snap = job.snapshot()
            yield (
                progress_markdown(snap),
                loss_frame(snap),
                None,
                gr.update(),
                gr.update(),
                gr.update(),
                job.id,
            )
        snap = job.snapshot()
        out = job.result if snap["status"] == "done" else None
        files_out = [str(out / f) for f in ADAPTER_FILES if out is not None and (out / f).is_file()]
        choices = p.adapters()
        new = gr.update(choices=choices, value=str(out)) if out else gr.update(choices=choices)
        phrase = json.loads((out / INFO).read_text())["phrase"] if out else None
        yield (
            progress_markdown(snap),
            loss_frame(snap),
            files_out or None,
            new,
            gr.update(choices=choices),
            gr.update(value=f"a photo of {phrase}") if phrase else gr.update(),
            job.id,
        )

    def cancel(job):
        if job is None:
            return "nothing to cancel"
        state = p.runner.cancel(job).snapshot()
        return "cancelling…" if state["status"] not in FINISHED else progress_markdown(state)

    def generate(prompt, seed, steps, guidance, adapter, scale, adapter_b, scale_b):
        chosen = [(a, float(s)) for a, s in ((adapter, scale), (adapter_b, scale_b)) if a]
        try:
            return p.generate(
                prompt, whole_number(seed), chosen, whole_number(steps), float(guidance)
            )
        except PeftkitError as err:
            raise gr.Error(str(err)) from None

    def judge(adapter):
        try:
            return p.judge(adapter)
        except PeftkitError as err:
            raise gr.Error(str(err)) from None

    def load(file):
        if not file:
            return gr.update(), gr.update()
        try:
            path = p.import_adapter(file)
        except PeftkitError as err:
            raise gr.Error(str(err)) from None
        return gr.update(choices=p.adapters(), value=path), gr.update(choices=p.adapters())

    train_btn.click(
        train,
        [files, use_samples, method, steps, rank, lr, identifier, class_word],
        [status, loss_plot, download, adapter, adapter_b, prompt, job_id],
        api_name="train",
        concurrency_limit=4,
    )
    cancel_btn.click(cancel, [job_id], [status], api_name="cancel")
    gen_btn.click(
        generate,
        [prompt, seed, sample_steps, guidance, adapter, scale, adapter_b, scale_b],
        [base_img, adapted_img],
        api_name="generate",
        concurrency_limit=1,
    )
    judge_btn.click(judge, [adapter], [verdict], api_name="judge", concurrency_limit=1)
    imported.upload(load, [imported], [adapter, adapter_b], api_name="import_adapter")
