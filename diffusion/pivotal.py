"""Pivotal tuning (Roich et al. 2022, "Pivotal Tuning"; as in diffusers' advanced DreamBooth LoRA
script): a new token gets a trainable embedding in every text encoder (Textual Inversion's
`NewTokenEmbedding`, initialized from `init_word`), trained in the same steps as the UNet LoRA at
its own learning rate. Saved as a Textual Inversion file diffusers loads beside the LoRA:
{token: vectors} for SD 1.x/2.x, {"clip_l": ..., "clip_g": ...} for SDXL's two encoders.

    pipe.load_textual_inversion("out/learned_embeds.safetensors")          # SD 1.x/2.x
    pipe.load_lora_weights("out")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..common_kernels.adapter_file import read_tensors, save_tensors
from ..common_kernels.errors import PeftkitError
from .base import DiffusionBase
from .textual_inversion import SINGLE_FILE, TIConfig, add_tokens
from .ti_format import save_textual_inversion

SDXL_KEYS = ("clip_l", "clip_g")  # the key per text encoder that SDXL embedding files use


class PivotalTokens:
    """The new token's trainable rows in each text encoder of `base` (tokenizers extended)."""

    def __init__(self, base: DiffusionBase, token: str, init_word: str, vectors: int = 1) -> None:
        self.config = TIConfig(tokens=[token], init_word=init_word, num_vectors=vectors)
        self.token, self.kind = token, base.kind
        for tokenizer in base.tokenizers:
            taken = [n for n in self.config.names(token) if n in tokenizer.get_vocab()]
            if taken:
                raise PeftkitError(
                    f"new token {token!r} is already in the tokenizer's vocabulary as {taken}: "
                    f"pick a name it lacks, e.g. '<{token.strip('<>')}-1>'"
                )
        self.embeddings = [
            add_tokens(tokenizer, encoder, self.config)
            for tokenizer, encoder in zip(base.tokenizers, base.text_encoders)
        ]
        for embedding in self.embeddings:
            embedding.rows.requires_grad_(True)

    def parameters(self) -> list[nn.Parameter]:
        return [e.rows for e in self.embeddings]

    def prompt(self, text: str) -> str:
        """`text` with the token spelled as its vectors' names (`tok tok_1 ...`), as diffusers'
        `maybe_convert_prompt` expands it at generation."""
        return text.replace(self.token, self.config.placeholder(self.token))

    def check_prompts(self, prompts: list[str]) -> None:
        if not any(self.token in p for p in prompts):
            raise PeftkitError(
                f"no prompt or caption contains the new token {self.token!r}: put it in --prompt, "
                f"e.g. 'a photo of {self.token} dog'"
            )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"tokens{i}": e.rows.detach() for i, e in enumerate(self.embeddings)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, e in enumerate(self.embeddings):
                e.rows.copy_(state[f"tokens{i}"])

    def save(self, folder: str | Path) -> Path:
        """The embeddings file `pipe.load_textual_inversion` reads (SDXL: once per encoder, with
        state_dict["clip_l"] / ["clip_g"], the token, and text_encoder(_2)/tokenizer(_2))."""
        rows = [e.rows.detach().float().cpu() for e in self.embeddings]
        path = Path(folder) / SINGLE_FILE
        if self.kind == "sd":
            return save_textual_inversion(path, {self.token: rows[0]})[0]
        return save_tensors(path, dict(zip(SDXL_KEYS, rows)), {"token": self.token})


def load_pivotal(base: DiffusionBase, path: str | Path) -> None:
    """Add a pivotal embeddings file's token to `base`'s tokenizers and text encoders, as diffusers
    does (SDXL files: one call per encoder)."""
    tensors, metadata = read_tensors(path)
    if not set(SDXL_KEYS) <= set(tensors):
        base.pipe.load_textual_inversion(str(path))
        return
    for key, tokenizer, encoder in zip(SDXL_KEYS, base.tokenizers, base.text_encoders):
        base.pipe.load_textual_inversion(
            tensors[key], token=metadata["token"], text_encoder=encoder, tokenizer=tokenizer
        )
