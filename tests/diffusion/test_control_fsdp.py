"""The full-copy control branch under FSDP: two gloo processes (what `accelerate launch` starts)
with --fsdp train the branch one process trains with the same global batch, and a run with the
frozen UNet sharded too, stopped at a checkpoint, resumes to the same branch.

Tolerance: 2e-3 relative per tensor, as tests/diffusion/test_concept_ddp.py: AdamW's first steps
move each element by about lr whatever its gradient's size, so summation order alone moves the
smallest-gradient elements; a wrong reduction (sum instead of mean, one process's batch) or a
resume that loses the shards' optimizer state moves whole tensors by order 1."""

import json
import os
import subprocess
import sys

import pytest
import torch

from peftkit.common_kernels.adapter_file import read_tensors

from .conftest import write_box_pairs

WEIGHTS = "controlnet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_box_pairs(tmp_path_factory.mktemp("fsdp-pairs"), conditions=False)


def _train(tiny_sd_path, images, out, processes, batch_size, steps, *extra):
    command = [
        "-m",
        "peftkit.apps.cli",
        "train-control",
        "--model",
        str(tiny_sd_path),
        "--data",
        str(images),
        "--output",
        str(out),
        "--condition-from",
        "canny",
        "--mode",
        "full",
        "--steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--resolution",
        "16",
        "--lr",
        "1e-3",
        "--cpu",
        "--no-progress",
        *extra,
    ]
    launcher = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        "29537",
    ]
    done = subprocess.run(
        [sys.executable, *(launcher if processes > 1 else []), *command],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "train.json").read_text())


def _assert_same_branch(a_dir, b_dir):
    a, _ = read_tensors(a_dir / WEIGHTS)
    b, _ = read_tensors(b_dir / WEIGHTS)
    assert a.keys() == b.keys()
    assert (
        float(a["controlnet_down_blocks.0.weight"].norm()) > 0
    )  # zero convs start at zero: it trained
    for key in a:
        scale = float(a[key].float().norm())
        if scale > 0:
            assert float((a[key].float() - b[key].float()).norm()) / scale < 2e-3, key


def test_two_fsdp_processes_train_the_branch_one_process_trains(tiny_sd_path, images, tmp_path):
    one = _train(tiny_sd_path, images, tmp_path / "one", 1, 4, 3)
    two = _train(tiny_sd_path, images, tmp_path / "two", 2, 2, 3, "--fsdp")
    assert (one["parallel"], two["parallel"]) == ("single", "fsdp x2")
    assert two["steps"] == 3
    _assert_same_branch(tmp_path / "one", tmp_path / "two")
    # With the frozen UNet sharded too, stopped after a checkpoint at step 2, then resumed to 3:
    # the shards' weights and AdamW states come back from the whole tensors the checkpoint holds.
    sharded = ("--fsdp", "--fsdp-shard-frozen")
    _train(tiny_sd_path, images, tmp_path / "resumed", 2, 2, 2, *sharded, "--checkpoint-every", "1")
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000002").is_dir()
    _train(tiny_sd_path, images, tmp_path / "resumed", 2, 2, 3, *sharded)
    _assert_same_branch(tmp_path / "one", tmp_path / "resumed")


def test_fsdp_refuses_an_adapter_on_the_copy(tiny_sd_path, images, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29538",
        "-m",
        "peftkit.apps.cli",
        "train-control",
        "--model",
        str(tiny_sd_path),
        "--data",
        str(images),
        "--output",
        str(tmp_path / "out"),
        "--condition-from",
        "canny",
        "--mode",
        "lora",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--resolution",
        "16",
        "--cpu",
        "--no-progress",
        "--fsdp",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode != 0 and "launch without --fsdp" in done.stderr


def test_bf16_fsdp_gathers_in_bf16_and_trains_what_one_bf16_process_trains(
    tiny_sd_path, images, tmp_path
):
    """In a bf16 run the units gather bf16 weights and reduce fp32 gradients; the branch saved is
    fp32 and ends where one bf16 process's does, within bf16's rounding."""
    bf16 = ("--mixed-precision", "bf16")
    _train(tiny_sd_path, images, tmp_path / "one", 1, 4, 3, *bf16)
    _train(tiny_sd_path, images, tmp_path / "two", 2, 2, 3, "--fsdp", *bf16)
    a, _ = read_tensors(tmp_path / "one" / WEIGHTS)
    b, _ = read_tensors(tmp_path / "two" / WEIGHTS)
    assert a.keys() == b.keys() and all(t.dtype == torch.float32 for t in b.values())
    # Over the whole branch: bf16's rounding moves single elements (the zero-initialised norm
    # biases by up to ~25% of their small norm), a wrong reduction moves everything.
    diff = sum(float((a[k].float() - b[k].float()).square().sum()) for k in a) ** 0.5
    scale = sum(float(a[k].float().square().sum()) for k in a) ** 0.5
    assert diff / scale < 5e-3
