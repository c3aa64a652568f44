"""A Flux LoRA under FSDP: two gloo processes (what `accelerate launch --use_fsdp` starts) shard the
frozen transformer block by block with its LoRA and train the adapter one process trains with the
same global batch; other cores and UNet bases are refused with the fix.

Tolerance: 2e-3 relative per tensor, as tests/diffusion/test_control_fsdp.py (summation order
moves AdamW's smallest-gradient elements; a wrong reduction moves whole tensors by order 1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit.common_kernels.adapter_file import read_tensors
from peftkit.common_kernels.errors import PeftkitError
from peftkit.diffusion.base import load_base
from peftkit.diffusion.data import ConceptDataset
from peftkit.diffusion.dreambooth import (
    TEXT_FILE,
    UNET_FILE,
    ConceptConfig,
    ConceptTask,
)

from .dit_fsdp_script import main
from .tiny_dit import build_tiny_pipelines

PROMPT = "a photo of sks toy"


@pytest.fixture(scope="module")
def dit_paths(tiny_sd_path, tmp_path_factory):
    return build_tiny_pipelines(tiny_sd_path, tmp_path_factory.mktemp("tiny-dit"))


def test_two_fsdp_processes_train_the_flux_lora_one_process_trains(
    dit_paths,
    concept_dir,
    tmp_path,
):
    script = Path(__file__).with_name("dit_fsdp_script.py")
    model = str(dit_paths["flux"])
    main(model, str(concept_dir), str(tmp_path / "one"), 4)  # one process: fsdp does not apply
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571"]
    done = subprocess.run(
        [
            sys.executable,
            *launcher,
            str(script),
            model,
            str(concept_dir),
            str(tmp_path / "two"),
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "one" / "parallel.txt").read_text() == "single"
    assert (tmp_path / "two" / "parallel.txt").read_text() == "fsdp x2"
    for name in (UNET_FILE, TEXT_FILE):
        a, b = read_tensors(tmp_path / "one" / name)[0], read_tensors(tmp_path / "two" / name)[0]
        assert a.keys() == b.keys()
        for key in a:
            err = float((a[key] - b[key]).norm() / a[key].norm())
            assert err < 2e-3, (name, key, err)


@pytest.mark.parametrize(
    "kind,method,fix", [("flux", "oft", "--method lora"), ("sd", "lora", "DDP")]
)
def test_fsdp_is_refused_where_it_cannot_shard(
    dit_paths,
    tiny_sd_path,
    concept_dir,
    kind,
    method,
    fix,
):
    path = dit_paths["flux"] if kind == "flux" else tiny_sd_path
    config = ConceptConfig(PROMPT, resolution=16, method=method, block_size=8)
    task = ConceptTask(load_base(str(path)), ConceptDataset(concept_dir, PROMPT, 16), config)
    with pytest.raises(PeftkitError, match=fix):
        task.fsdp_blocks()
