import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit.common_kernels.adapter_file import read_tensors
from peftkit.diffusion.dreambooth import UNET_FILE

SCRIPT = Path(__file__).with_name("concept_ddp_script.py")
STARTER = Path(__file__).resolve().parents[2] / "assets" / "starter-sd"


@pytest.mark.skipif(not STARTER.is_dir(), reason="needs the bundled starter model")
def test_two_processes_train_the_concept_one_process_trains_with_the_global_batch(tmp_path):
    """Each process must draw the noise and timesteps of the whole global batch and keep its own
    rows: drawing only its own would repeat the other process's noise and differ by order 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "one"), "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            str(SCRIPT),
            str(tmp_path / "two"),
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a, _ = read_tensors(tmp_path / "one" / UNET_FILE)
    b, _ = read_tensors(tmp_path / "two" / UNET_FILE)
    assert a.keys() == b.keys()
    moved = max(float(v.norm()) for k, v in a.items() if k.endswith("B"))
    assert moved > 0  # the adapter trained: B starts at zero
    # Per tensor, not per element: AdamW's first steps move each element by about lr whatever its
    # gradient's size, so elements with near-zero gradients differ by summation order alone.
    # Repeated noise (the fault this guards) moves whole tensors by order 1.
    for key in a:
        assert float((a[key] - b[key]).norm() / a[key].norm().clamp_min(1e-12)) < 2e-3, key
