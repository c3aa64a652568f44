"""The starter T2I model's tokenizer: CLIP's byte-level BPE, with all 256 byte tokens (so any text
encodes) plus merges learned on the caption words, so caption words are whole tokens.

    >>> tok = build_tokenizer(Path("/tmp/tok"), max_length=32)       # doctest: +SKIP
    >>> tok.tokenize("a photo of sks toy")                             # doctest: +SKIP
    ['a</w>', 'photo</w>', 'of</w>', 's', 'k', 's</w>', 'toy</w>']
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .shapes import caption_words

# Words that are not in captions but that demos and users type ("a photo of sks toy"): whole
# tokens, like in a real CLIP vocabulary. Rare identifiers ("sks") stay split into bytes.
EXTRA_WORDS = (
    "toy",
    "dog",
    "cat",
    "style",
    "painting",
    "with",
    "and",
    "object",
    "thing",
    "shape",
    "shapes",
    "color",
    "colored",
    "drawing",
    "sticker",
    "logo",
    "icon",
    "cartoon",
    "pattern",
)


def _byte_alphabet() -> list[str]:
    # GPT-2/CLIP's reversible byte -> printable unicode map: printable bytes map to themselves
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges, most frequent pair first, until every word is one token. Applying merges in
    this order (what CLIP's tokenizer does) reproduces the same whole-word tokens."""
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in pieces.values():
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(sorted(counts), key=lambda pair: counts[pair])
        merges.append(best)
        for w, seq in pieces.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            pieces[w] = out


def build_tokenizer(folder: Path, max_length: int):
    """A CLIPTokenizer with all 256 byte tokens (so any text encodes) plus merged caption words."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    merges = learn_merges(sorted(set(caption_words()) | set(EXTRA_WORDS)))
    vocab = {
        tok: i
        for i, tok in enumerate(
            alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
        )
    }
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )


def encode_captions(tokenizer, captions: list[str]) -> torch.Tensor:
    """Padded token ids of many captions, tokenizing each distinct word once: CLIP's BPE works word
    by word, so this equals tokenizing every caption (checked on the first ones), and it stays fast
    with transformers 4's pure-Python CLIPTokenizer."""
    words = {w for c in captions for w in c.split()}
    pieces = dict(zip(sorted(words), tokenizer(sorted(words), add_special_tokens=False).input_ids))
    length, bos, eos = tokenizer.model_max_length, tokenizer.bos_token_id, tokenizer.eos_token_id
    rows = []
    for c in captions:
        row = [bos, *[t for w in c.split() for t in pieces[w]]][: length - 1] + [eos]
        rows.append(row + [tokenizer.pad_token_id] * (length - len(row)))
    ids = torch.tensor(rows)
    check = tokenizer(
        captions[:64], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    if not torch.equal(ids[:64], check):
        raise RuntimeError("word-wise tokenization differs from the tokenizer's own: report this")
    return ids
