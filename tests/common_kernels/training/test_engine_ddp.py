import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("ddp_script.py")


def test_two_processes_train_the_same_adapter_as_one_with_the_same_global_batch(tmp_path):
    """Two CPU processes (gloo, launched by torchrun as `accelerate launch` does on GPUs) with
    batch 4 each against one process with batch 8."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "one.json"), "8"],
        check=True,
        env=env,
        capture_output=True,
    )
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(SCRIPT),
        str(tmp_path / "two.json"),
        "4",
    ]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    for key in one:
        assert torch.allclose(torch.tensor(one[key]), torch.tensor(two[key]), atol=1e-5), key


def test_a_command_leaves_the_launch_process_group_when_done(tmp_path):
    import torch.distributed as dist

    from peftkit.common_kernels.training.launch import end_launch

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert dist.is_initialized()
    end_launch()
    assert not dist.is_initialized()
    end_launch()  # nothing launched: nothing to leave


def test_a_launched_process_ends_at_once_with_its_status_and_its_output_flushed():
    ended = (
        "import sys; sys.stdout.write('saved'); "
        "from peftkit.common_kernels.training.launch import exit_process; exit_process(3)"
    )
    for world in ("2", "1"):  # one of a launch's processes (os._exit), then a lone one
        env = {**os.environ, "WORLD_SIZE": world}
        done = subprocess.run(
            [sys.executable, "-c", ended], env=env, capture_output=True, text=True
        )
        assert (done.returncode, done.stdout) == (3, "saved"), (world, done.stderr[-500:])
