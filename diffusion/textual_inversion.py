"""Textual Inversion (Gal et al. 2023, "An Image is Worth One Word", eq. 2):

    v* = argmin_v E || eps - eps_theta(x_t, t, c_theta(y with S* -> v)) ||^2

New pseudo-words S* get embedding vectors v, initialized from a word describing the concept; only v
trains. The original embedding table stays frozen and bit-identical: the new rows live in their
own parameter (`NewTokenEmbedding`), so no step, optimizer state or weight decay can touch the rest.
A token with several vectors becomes `tok tok_1 ... tok_{k-1}`, diffusers' multi-vector naming.

    config = TIConfig(tokens=["<cat-toy>"], init_word="toy")
    task = TITask(load_base("./sd15"), ConceptDataset("photos/", "a photo of <cat-toy>"), config)
    train(task, task.dataset(), TrainConfig(steps=2000, lr=5e-3))
    save_embeddings(task, "out")   # pipe.load_textual_inversion("out/learned_embeds.safetensors")
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..common_kernels.adapter_file import atomic_write, staged_folder
from ..common_kernels.errors import PeftkitError
from ..common_kernels.training.random_stream import RandomStream
from .base import DiffusionBase
from .data import ConceptDataset
from .objective import prediction_loss, process_denoising_targets

TEMPLATES = {
    "object": [
        "a photo of a {}",
        "a rendering of a {}",
        "a close-up photo of a {}",
        "a bright photo of the {}",
        "a cropped photo of a {}",
        "a good photo of a {}",
    ],
    "style": [
        "a painting in the style of {}",
        "a rendering in the style of {}",
        "a picture in the style of {}",
        "an artwork in the style of {}",
    ],
}
SINGLE_FILE = "learned_embeds.safetensors"


@dataclass
class TIConfig:
    """`tokens`: the new pseudo-words (e.g. "<cat-toy>"); `init_word`: a word close to the concept
    (several tokens are averaged); `templates`: "object" or "style" prompt sets."""

    tokens: list[str]
    init_word: str
    num_vectors: int = 1
    templates: str = "object"
    resolution: int = 512

    def __post_init__(self) -> None:
        if isinstance(self.tokens, str):
            self.tokens = [self.tokens]
        if not self.tokens or any(not t.strip() or " " in t for t in self.tokens):
            raise PeftkitError(
                f"TIConfig.tokens must be non-empty words without spaces, got {self.tokens!r}"
            )
        if self.num_vectors < 1:
            raise PeftkitError(f"TIConfig.num_vectors must be >= 1, got {self.num_vectors}")
        if self.templates not in TEMPLATES:
            raise PeftkitError(
                f"TIConfig.templates must be one of {sorted(TEMPLATES)}, got {self.templates!r}"
            )
        if self.resolution < 8 or self.resolution % 8:
            raise PeftkitError(
                f"TIConfig.resolution must be a positive multiple of 8, got {self.resolution}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def names(self, token: str) -> list[str]:
        return [token] + [f"{token}_{i}" for i in range(1, self.num_vectors)]

    def placeholder(self, token: str) -> str:
        return " ".join(self.names(token))


class NewTokenEmbedding(nn.Module):
    """A frozen embedding table plus trainable rows for `new_ids`: e(i) = rows[j] if i == new_ids[j]
    else base(i)."""

    def __init__(self, base: nn.Embedding, new_ids: list[int], init: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("new_ids", torch.tensor(new_ids, dtype=torch.long), persistent=False)
        self.rows = nn.Parameter(init.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.base.num_embeddings - 1))
        for j in range(self.rows.shape[0]):
            out = torch.where((ids == self.new_ids[j])[..., None], self.rows[j].to(out.dtype), out)
        return out


def add_tokens(tokenizer, text_encoder: nn.Module, config: TIConfig) -> NewTokenEmbedding:
    """Register the new tokens with `tokenizer` and give `text_encoder` their trainable rows."""
    vocab = tokenizer.get_vocab()
    names = [n for t in config.tokens for n in config.names(t)]
    taken = [n for n in names if n in vocab]
    if taken:
        raise PeftkitError(
            f"token(s) {taken} are already in the tokenizer's vocabulary: pick rare new names "
            "such as '<my-concept>'"
        )
    init_ids = tokenizer(config.init_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise PeftkitError(
            f"init word {config.init_word!r} has no tokens: give a word describing the concept"
        )
    table = text_encoder.get_input_embeddings()
    init = table.weight[torch.tensor(init_ids)].detach().float().mean(0)
    tokenizer.add_tokens(names)
    new_ids = tokenizer.convert_tokens_to_ids(names)
    wrapper = NewTokenEmbedding(table, new_ids, init.expand(len(names), -1))
    text_encoder.set_input_embeddings(wrapper)
    return wrapper


class TIModel(nn.Module):
    def __init__(self, base: DiffusionBase) -> None:
        super().__init__()
        self.text_encoder, self.unet = base.pipe.text_encoder, base.unet
        self._base = [base]

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(ids)[0]
        return self._base[0].predict(self.unet, noisy, t, hidden.to(noisy.dtype), {})


class TITask:
    """The engine task: batch rows are (image, template) index pairs. A step is `draw` (latents,
    noise and timesteps from the task's own random stream, made eagerly) then `drawn_loss`, so a
    CUDA-graphed step trains exactly what an eager one does and a resumed run draws on."""

    def __init__(
        self, base: DiffusionBase, images: ConceptDataset, config: TIConfig, seed: int = 0
    ) -> None:
        if base.kind != "sd":
            raise PeftkitError(
                "Textual Inversion supports SD 1.x/2.x pipelines; for SDXL train a concept LoRA "
                "with train-concept"
            )
        self.base, self.images, self.config, self.seed = base, images, config, seed
        self.stream = RandomStream(seed)
        self.scheduler = base.noise_scheduler()
        for module in (base.unet, base.vae, base.pipe.text_encoder):
            module.requires_grad_(False)
        self.embedding = add_tokens(base.pipe.tokenizer, base.pipe.text_encoder, config)
        prompts = [
            tpl.format(" ".join(config.placeholder(t) for t in config.tokens))
            for tpl in TEMPLATES[config.templates]
        ]
        self.template_ids = base.tokenize(prompts)[0]
        self.model = TIModel(base)

    def dataset(self) -> list[dict[str, int]]:
        n_t = len(self.template_ids)
        return [{"image": i, "template": j} for i in range(len(self.images)) for j in range(n_t)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.embedding.rows]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rows": self.embedding.rows.detach(), "rng.stream": self.stream.state}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embedding.rows.copy_(state["rows"])
        if "rng.stream" in state:
            self.stream.state = state["rng.stream"].to(torch.uint8)

    @torch.no_grad()
    def prepare(self, accelerator) -> None:
        from .pairs import encode_latents

        for module in (self.base.unet, self.base.vae, self.base.pipe.text_encoder):
            module.to(accelerator.device)
        self.latents = encode_latents(self.base.vae, self.images.pixels())
        # On the device, so a step gathers its prompts there and can be captured as a CUDA graph.
        self.template_ids = self.template_ids.to(accelerator.device)
        self.stream = RandomStream(self.seed, accelerator.device)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes

    def draw(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(x_t, t, target, prompt ids) of `batch`, drawn from the task's stream (under DDP each
        process keeps its slice of the global batch's draws)."""
        mean, std = self.latents
        index = batch["image"].to(mean.device)
        ids = self.template_ids[batch["template"].to(self.template_ids.device)]
        with self.stream.drawing():
            noisy, t, target, _ = process_denoising_targets(
                self.scheduler, mean, std, index, self.rank, self.world
            )
        return noisy, t, target, ids

    def drawn_loss(self, model: nn.Module, drawn: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The loss of drawn inputs: a pure function of tensors, which the engine can capture."""
        noisy, t, target, ids = drawn
        return prediction_loss(model(noisy, t, ids), target, None).mean()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.drawn_loss(model, self.draw(batch))


def embeddings(task: TITask) -> dict[str, torch.Tensor]:
    """token -> (num_vectors, dim) learned vectors."""
    rows, k = task.embedding.rows.detach().cpu(), task.config.num_vectors
    return {token: rows[i * k : (i + 1) * k].clone() for i, token in enumerate(task.config.tokens)}


def save_embeddings(task: TITask, output_dir: str | Path) -> list[Path]:
    """One safetensors file per token holding {token: (num_vectors, dim)}, the layout diffusers'
    `load_textual_inversion` reads: `learned_embeds.safetensors` for a single token, else
    `<token>.safetensors` each."""
    from .ti_format import save_textual_inversion

    output_dir = Path(output_dir)
    learned = embeddings(task)
    with staged_folder(output_dir) as stage:
        written = save_textual_inversion(
            stage / SINGLE_FILE if len(learned) == 1 else stage, learned
        )
        atomic_write(stage / "ti.json", lambda tmp: Path(tmp).write_text(task.config.to_json()))
    return [output_dir / p.name for p in written]
