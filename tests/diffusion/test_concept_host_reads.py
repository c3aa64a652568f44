"""Drawing a concept step's inputs reads nothing back from its tensors to the host: on a GPU
each read (`.cpu()`, `.item()`, `int(t)`...) would wait for the steps queued before it, and the
graphed loop launches the next step while one runs (common_kernels/training/late_read.py)."""

from types import SimpleNamespace

import pytest
import torch

from peftkit.diffusion.base import load_base
from peftkit.diffusion.data import ConceptDataset
from peftkit.diffusion.dreambooth import ConceptConfig, ConceptTask

READS = ("cpu", "item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"caption_dropout": 0.5, "flip": True, "min_snr_gamma": 5.0, "offset_noise": 0.05},
        {"new_token": "<sks>", "init_word": "toy", "caption_dropout": 0.5},
        {"text_encoder_rank": 2},
    ],
    ids=["plain", "dropout-flip-snr-offset", "pivotal", "text-lora"],
)
def test_drawing_a_step_reads_no_tensor_back_to_the_host(
    tiny_sd_path, concept_dir, monkeypatch, options
):
    prompt = "a photo of <sks> toy"
    config = ConceptConfig(instance_prompt=prompt, resolution=16, rank=2, **options)
    task = ConceptTask(
        load_base(str(tiny_sd_path)), ConceptDataset(concept_dir, prompt, 16), config
    )
    task.prepare(
        SimpleNamespace(
            device=torch.device("cpu"), mixed_precision="no", process_index=0, num_processes=1
        )
    )
    batch = {"instance": torch.tensor([0, 2])}
    reads = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    rows = task.draw(batch)
    monkeypatch.undo()
    assert reads == []
    assert rows.noisy.shape[0] == 2 and rows.t.shape == (2,)
