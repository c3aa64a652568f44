"""Generation: grids with contact sheets, per-adapter scales, mixed-adapter batches equal to solo runs,
and a clear error for an adapter made for another base."""

import numpy as np
import pytest
import torch

from peftkit.common_kernels.adapter_file import save_adapter
from peftkit.common_kernels.errors import PeftkitError
from peftkit.common_kernels.inject import inject
from peftkit.common_kernels.lora import LoRAConfig
from peftkit.diffusion.base import load_base
from peftkit.diffusion.data import ConceptDataset
from peftkit.diffusion.dreambooth import ConceptConfig, ConceptTask, save_concept
from peftkit.diffusion.generate import ConceptRef, generate_grid, generate_mixed, load_concepts

KW = {"steps": 2, "resolution": 16, "guidance": 2.0}


def _concept(tiny_sd_path, concept_dir, folder, seed):
    """A saved concept with random (non-zero) LoRA weights, without spending time on training."""
    task = ConceptTask(
        load_base(str(tiny_sd_path)),
        ConceptDataset(concept_dir, "sks toy", 16),
        ConceptConfig(instance_prompt="sks toy", resolution=16, text_encoder_rank=2),
        seed=seed,
    )
    with torch.no_grad():
        for p in task.trainable_parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    save_concept(task, folder)
    return folder


@pytest.fixture(scope="module")
def concepts(tiny_sd_path, concept_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    return [
        _concept(tiny_sd_path, concept_dir, root / name, seed)
        for seed, name in enumerate(["dog", "hat"])
    ]


def _pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_grid_writes_pngs_and_a_contact_sheet(tiny_sd_path, concepts, tmp_path):
    base = load_base(str(tiny_sd_path))
    assert load_concepts(
        base, [ConceptRef.parse(f"{concepts[0]}:0.8"), ConceptRef.parse(f"{concepts[1]}:0.5:h")]
    ) == ["dog", "h"]
    rows = generate_grid(base, ["sks toy", "a toy"], seeds=[0, 1], out_dir=tmp_path, **KW)
    assert len(rows) == 2 and len(rows[0]) == 2
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "grid.png",
        "p0-s0.png",
        "p0-s1.png",
        "p1-s0.png",
        "p1-s1.png",
    ]


def test_scale_zero_gives_the_base_image(tiny_sd_path, concepts):
    plain = generate_grid(load_base(str(tiny_sd_path)), ["sks toy"], seeds=[3], **KW)[0][0]
    base = load_base(str(tiny_sd_path))
    load_concepts(base, [ConceptRef(str(concepts[0]), 0.0)])
    assert (
        np.abs(
            _pixels(generate_grid(base, ["sks toy"], seeds=[3], **KW)[0][0]) - _pixels(plain)
        ).max()
        <= 1
    )
    load_concepts(base, [ConceptRef(str(concepts[1]), 1.0)])
    assert (
        np.abs(
            _pixels(generate_grid(base, ["sks toy"], seeds=[3], **KW)[0][0]) - _pixels(plain)
        ).max()
        > 1
    )


def test_mixed_batch_rows_match_solo_runs(tiny_sd_path, concepts, tmp_path):
    base = load_base(str(tiny_sd_path))
    load_concepts(base, [ConceptRef(str(c)) for c in concepts])
    prompts, choice = ["sks toy", "sks toy", "sks toy"], ["dog", "hat", None]
    mixed = generate_mixed(base, prompts, choice, seed=5, out_dir=tmp_path, **KW)
    assert (tmp_path / "grid.png").is_file()
    for i, (prompt, name) in enumerate(zip(prompts, choice)):
        solo = generate_mixed(base, [prompt], [name], seed=5 + i, **KW)[0]
        assert np.abs(_pixels(mixed[i]) - _pixels(solo)).max() <= 1, i
    assert np.abs(_pixels(mixed[0]) - _pixels(mixed[1])).max() > 1


def test_adapter_for_another_base_is_refused(tiny_sd_path, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=32,
        attention_head_dim=8,
    )
    save_adapter(
        inject(other, LoRAConfig(targets=["to_k"], r=2), base_model="other-base"),
        tmp_path / "x.safetensors",
    )
    with pytest.raises(PeftkitError, match="other-base"):
        load_concepts(load_base(str(tiny_sd_path)), [ConceptRef(str(tmp_path / "x.safetensors"))])


def test_diffusers_format_file_draws_like_the_peftkit_folder(tiny_sd_path, concepts):
    ours = load_base(str(tiny_sd_path))
    load_concepts(ours, [ConceptRef(str(concepts[0]))])
    theirs = load_base(str(tiny_sd_path))
    load_concepts(
        theirs, [ConceptRef(str(concepts[0] / "pytorch_lora_weights.safetensors"), name="dog")]
    )
    a = generate_mixed(ours, ["sks toy"], ["dog"], seed=1, **KW)[0]
    b = generate_mixed(theirs, ["sks toy"], ["dog"], seed=1, **KW)[0]
    assert np.abs(_pixels(a) - _pixels(b)).max() <= 1
