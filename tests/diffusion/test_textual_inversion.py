"""Textual Inversion: only the new rows train, the saved file loads in diffusers' load_textual_inversion."""

import pytest
import torch

from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training.engine import TrainConfig, train
from peftkit.diffusion.base import load_base
from peftkit.diffusion.data import ConceptDataset
from peftkit.diffusion.textual_inversion import TIConfig, TITask, save_embeddings


def _task(tiny_sd_path, concept_dir, **kw):
    config = TIConfig(**{"tokens": ["<toy>"], "init_word": "toy", "resolution": 16, **kw})
    return TITask(
        load_base(str(tiny_sd_path)), ConceptDataset(concept_dir, "a photo of <toy>", 16), config
    )


def test_only_new_rows_train_and_diffusers_loads_the_file(tiny_sd_path, concept_dir, tmp_path):
    task = _task(tiny_sd_path, concept_dir, num_vectors=2)
    table = task.embedding.base.weight.detach().clone()
    init = task.embedding.rows.detach().clone()
    train(task, task.dataset(), TrainConfig(steps=4, batch_size=4, lr=5e-2, progress=False))
    assert torch.equal(task.embedding.base.weight, table)
    assert not torch.allclose(task.embedding.rows, init)
    (path,) = save_embeddings(task, tmp_path)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd_path, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_textual_inversion(str(path))
    prompt = pipe.maybe_convert_prompt("a photo of <toy>", pipe.tokenizer)
    assert prompt == "a photo of <toy> <toy>_1"
    theirs_ids = pipe.tokenizer(
        prompt, padding="max_length", max_length=16, return_tensors="pt"
    ).input_ids
    ours_ids = task.base.tokenize([prompt])[0]
    with torch.no_grad():
        theirs = pipe.text_encoder(theirs_ids)[0]
        ours = task.base.pipe.text_encoder(ours_ids.to(task.embedding.rows.device))[0]
    assert (ours - theirs).norm() / theirs.norm() < 1e-5


def test_init_word_sets_the_new_rows(tiny_sd_path, concept_dir):
    task = _task(tiny_sd_path, concept_dir)
    tok, table = task.base.pipe.tokenizer, task.embedding.base.weight
    ids = tok("toy", add_special_tokens=False).input_ids
    torch.testing.assert_close(task.embedding.rows[0], table[ids].mean(0))


def test_existing_token_is_refused(tiny_sd_path, concept_dir):
    with pytest.raises(PeftkitError, match="already in the tokenizer"):
        _task(tiny_sd_path, concept_dir, tokens=["a</w>"])
