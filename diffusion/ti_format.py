"""Textual Inversion files: diffusers' {token: (num_vectors, dim)} layout (what
`pipe.load_textual_inversion` reads) and A1111's "emb_params" files, and adding loaded tokens to a
tokenizer and text encoder."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..common_kernels.adapter_file import read_tensors, save_tensors
from ..common_kernels.errors import PeftkitError


def save_textual_inversion(path: str | Path, embeddings: dict[str, torch.Tensor]) -> list[Path]:
    """{token: (num_vectors, dim)} as files `pipe.load_textual_inversion(file)` reads: `path` itself
    for one token, else `path` is a folder with `<token>.safetensors` per token (diffusers reads one
    token per file)."""
    path = Path(path)
    if len(embeddings) == 1:
        ((token, vectors),) = embeddings.items()
        return [
            save_tensors(path, {token: vectors.detach().reshape(-1, vectors.shape[-1]).float()}, {})
        ]
    return [
        save_tensors(
            path / (re.sub(r"[^A-Za-z0-9_.-]", "_", t) + ".safetensors"),
            {t: v.detach().reshape(-1, v.shape[-1]).float()},
            {},
        )
        for t, v in embeddings.items()
    ]


def load_textual_inversion_file(path: str | Path) -> dict[str, torch.Tensor]:
    """{token: (num_vectors, dim)} from a diffusers ({token: tensor}) or A1111 ("emb_params", token =
    file name) embedding file."""
    tensors, _ = read_tensors(path)
    if "emb_params" in tensors:
        return {Path(path).stem: tensors["emb_params"].reshape(-1, tensors["emb_params"].shape[-1])}
    if "clip_l" in tensors or "clip_g" in tensors:
        raise PeftkitError(
            f"{str(path)!r} is an SDXL embedding (clip_l/clip_g): load it with diffusers' "
            "load_textual_inversion for each text encoder"
        )
    if len(tensors) != 1:
        raise PeftkitError(
            f"{str(path)!r} holds {len(tensors)} tensors {sorted(tensors)[:4]}: a Textual Inversion "
            "file has one {token: vectors} entry or 'emb_params'"
        )
    ((token, vectors),) = tensors.items()
    return {token: vectors.reshape(-1, vectors.shape[-1])}


def add_tokens(
    tokenizer, text_encoder: nn.Module, embeddings: dict[str, torch.Tensor]
) -> dict[str, list[int]]:
    """Add each token (k vectors -> `tok tok_1 .. tok_{k-1}`, diffusers' naming) to the tokenizer
    and its rows to the text encoder's embedding table. Returns token -> new ids."""
    table = text_encoder.get_input_embeddings()
    names = {t: [t] + [f"{t}_{i}" for i in range(1, v.shape[0])] for t, v in embeddings.items()}
    for t, v in embeddings.items():
        if v.shape[-1] != table.weight.shape[1]:
            raise PeftkitError(
                f"embedding for {t!r} has dimension {v.shape[-1]} but the text encoder's is "
                f"{table.weight.shape[1]}: it was trained for another text encoder"
            )
        taken = [n for n in names[t] if n in tokenizer.get_vocab()]
        if taken:
            raise PeftkitError(
                f"token(s) {taken} are already in the tokenizer: load the embedding under another name"
            )
    tokenizer.add_tokens([n for ns in names.values() for n in ns])
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings()
    ids = {}
    with torch.no_grad():
        for t, v in embeddings.items():
            ids[t] = tokenizer.convert_tokens_to_ids(names[t])
            table.weight[ids[t]] = v.to(table.weight.dtype)
    return ids
