"""Pivotal tuning: a new token's embeddings train beside the UNet LoRA at their own learning rate,
and plain diffusers (`load_textual_inversion` + `load_lora_weights`) rebuilds the same UNet input
embeddings and output for SD and SDXL; tokens the tokenizer has, or prompts without the token,
are refused with the fix."""

import pytest
import torch

from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.training.engine import TrainConfig
from peftkit.diffusion.base import DiffusionBase, load_base
from peftkit.diffusion.data import ConceptDataset
from peftkit.diffusion.dreambooth import ConceptConfig, ConceptTask, train_concept
from peftkit.diffusion.pivotal import load_pivotal

PROMPT = "a photo of <sks> toy"


def _config(**kw):
    return ConceptConfig(
        **{
            "instance_prompt": PROMPT,
            "resolution": 16,
            "rank": 4,
            "new_token": "<sks>",
            "init_word": "toy",
            **kw,
        }
    )


def _train(path, images, out, steps=3, every=0, **kw):
    tc = TrainConfig(steps=steps, batch_size=2, lr=1e-2, schedule="constant", progress=False)
    tc.output_dir, tc.checkpoint_every = (str(out) if out else None), every
    return train_concept(load_base(str(path)), images, _config(**kw), tc)


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind,vectors", [("sd", 1), ("sd", 2), ("sdxl", 1)])
def test_diffusers_loads_the_token_and_lora_to_the_same_unet_input_and_output(
    kind, vectors, tiny_sd_path, tiny_sdxl_path, concept_dir, tmp_path
):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = tiny_sd_path if kind == "sd" else tiny_sdxl_path
    task, _ = _train(path, concept_dir, tmp_path, text_encoder_rank=2, token_vectors=vectors)
    if kind == "sd":
        pipe = StableDiffusionPipeline.from_pretrained(
            path, safety_checker=None, requires_safety_checker=False
        )
        pipe.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(path)
        load_pivotal(
            DiffusionBase(pipe, "sdxl", str(path)), tmp_path / "learned_embeds.safetensors"
        )
    pipe.load_lora_weights(str(tmp_path))
    hidden, extra = task.base.encode_prompt([task.pivotal.prompt(PROMPT)], resolution=16)
    with torch.no_grad():
        encoded = pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    assert _rel(encoded[0], hidden) < 1e-5
    if kind == "sdxl":
        assert _rel(encoded[2], extra["text_embeds"]) < 1e-5
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        ours = task.base.predict(task.base.unet, x, t, hidden, extra)
        theirs = task.base.predict(pipe.unet, x, t, encoded[0], extra)
    assert _rel(theirs, ours) < 1e-5
    # the token trained away from its init word; the rest of the vocabulary did not move
    embedding = task.pivotal.embeddings[0]
    toy = pipe.tokenizer("toy", add_special_tokens=False).input_ids
    init = embedding.base.weight[toy].mean(0)
    assert _rel(embedding.rows[0].detach(), init) > 1e-3
    fresh = load_base(str(path)).text_encoders[0].get_input_embeddings().weight
    assert torch.equal(embedding.base.weight, fresh)


def test_generate_loads_the_token_with_the_adapter_folder(tiny_sd_path, concept_dir, tmp_path):
    from peftkit.diffusion.generate import ConceptRef, load_concepts

    task, _ = _train(tiny_sd_path, concept_dir, tmp_path, steps=2)
    fresh = load_base(str(tiny_sd_path))
    load_concepts(fresh, [ConceptRef(str(tmp_path))])
    hidden, _ = task.base.encode_prompt([PROMPT])
    with torch.no_grad():
        theirs = fresh.pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )[0]
    assert _rel(theirs, hidden) < 1e-5


def test_the_token_trains_at_its_own_learning_rate(tiny_sd_path, concept_dir):
    moved = []
    for token_lr in (1e-9, 1e-2):
        task, _ = _train(tiny_sd_path, concept_dir, None, steps=2, token_lr=token_lr)
        rows = task.pivotal.embeddings[0]
        toy = task.base.tokenizers[0]("toy", add_special_tokens=False).input_ids
        moved.append(float((rows.rows[0] - rows.base.weight[toy].mean(0)).detach().abs().max()))
        lora = task.unet_handle.state_dict()  # the LoRA trains at lr 1e-2 either way
        assert max(float(v.abs().max()) for k, v in lora.items() if k.endswith(".B")) > 1e-3
    # Adam moves a parameter about lr per step: 2e-9 against 2e-2
    assert moved[0] < 1e-7 < 1e-3 < moved[1]


def test_resume_restores_the_token(tiny_sd_path, concept_dir, tmp_path):
    whole, _ = _train(tiny_sd_path, concept_dir, tmp_path / "whole", steps=4)
    _train(tiny_sd_path, concept_dir, tmp_path / "cut", steps=2, every=2)
    cut, result = _train(tiny_sd_path, concept_dir, tmp_path / "cut", steps=4, every=2)
    assert result.resumed_from == 2
    torch.testing.assert_close(
        cut.pivotal.embeddings[0].rows, whole.pivotal.embeddings[0].rows, rtol=1e-5, atol=1e-7
    )


def test_a_token_the_tokenizer_has_is_refused_with_the_fix(tiny_sd_path, concept_dir):
    images = ConceptDataset(concept_dir, "a photo of a toy", 16)
    with pytest.raises(PeftkitError, match=r"already in the tokenizer.*pick a name it lacks"):
        ConceptTask(load_base(str(tiny_sd_path)), images, _config(new_token="a"))


def test_prompts_without_the_token_are_refused(tiny_sd_path, concept_dir):
    images = ConceptDataset(concept_dir, "a photo of sks toy", 16)
    with pytest.raises(PeftkitError, match=r"contains the new token '<sks>'"):
        ConceptTask(load_base(str(tiny_sd_path)), images, _config(instance_prompt="sks toy"))
    with pytest.raises(PeftkitError, match="init_word"):
        ConceptConfig(instance_prompt=PROMPT, new_token="<sks>")


def test_a_step_gathers_its_token_ids_from_the_captions_ids_and_can_be_captured(
    tiny_sd_path, concept_dir
):
    from types import SimpleNamespace

    task = ConceptTask(
        load_base(str(tiny_sd_path)),
        ConceptDataset(concept_dir, PROMPT, 16),
        _config(caption_dropout=0.5),
    )
    cpu = SimpleNamespace(
        device=torch.device("cpu"), mixed_precision="no", process_index=0, num_processes=1
    )
    task.prepare(cpu)
    # the ids the host tokenizes for each image's caption (the token spelled as its vectors)
    captions = task.base.tokenize(task.captions[0])[0]
    empty = task.base.tokenize([""])[0][0]
    assert task.graph_unsafe is None
    dropped = 0
    for index in (torch.tensor([0, 3]), torch.tensor([2, 2]), torch.tensor([1, 0])):
        for _ in range(10):
            ids = task.draw({"instance": index}).cond["ids"][0]
            for row, image in zip(ids, index):
                assert torch.equal(row, captions[image]) or torch.equal(row, empty)
                dropped += torch.equal(row, empty)
    assert 0.3 < dropped / 60 < 0.7  # caption_dropout 0.5 still drops from the task's stream
