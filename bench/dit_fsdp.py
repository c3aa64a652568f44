"""FSDP on the Flux-shaped transformer of bench/dit.py (LoRA r16 on the `attn` preset, bf16 base,
1024 px, batch 1 per GPU): process 0 first times the unsharded step alone (one GPU), then every
process trains with FSDP2 as `train-concept` under `--use_fsdp` shards it (one unit per block,
the LoRA with its block, the rest as the root unit), with and without resharding after forward
(without: no re-gather of the frozen weights in backward, at the memory of whole blocks).
Reports images/s vs one GPU at the same per-GPU batch and the peak memory per GPU.

    torchrun --nproc_per_node 2 bench/dit_fsdp.py --out results/dit-fsdp          # two GPUs
    torchrun --nproc_per_node 2 bench/dit_fsdp.py --cpu-smoke --out /tmp/dit-fsdp # gloo, tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402
from dit import adapt, build, shapes, train_step  # noqa: E402


def timed(step, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(median ms per step, peak GiB allocated on this process) after 3 warm-up steps."""
    cuda = device.type == "cuda"
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return statistics.median(times), peak


def run(
    shape, bs, device, world, reshard: bool | None, repeats: int, prefetch: bool = False
) -> dict:
    """One configuration: unsharded (`reshard` None) or FSDP2 with reshard_after_forward=reshard;
    `prefetch`: each block also starts the next block's all-gather (forward) and the previous
    one's (backward) explicitly, instead of when the host reaches that block."""
    cuda = device.type == "cuda"
    net, rows = build("flux", shape, bs, device, torch.bfloat16 if cuda else torch.float32)
    params = adapt(net, "peftkit-lora")
    for p in params:
        p.data = p.data.float()
    if reshard is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        blocks = [*net.transformer_blocks, *net.single_transformer_blocks]
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(net, mesh=mesh)
        if prefetch:
            for i, block in enumerate(blocks):
                block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 2])
                block.set_modules_to_backward_prefetch(blocks[max(i - 1, 0) : i])
        params = [p for p in net.parameters() if p.requires_grad]  # the sharded ones
    ms, peak = timed(train_step("flux", net, rows, params, device), device, repeats)
    processes = 1 if reshard is None else world
    row = dict(
        mode="single" if reshard is None else f"fsdp x{world}" + (" prefetch" if prefetch else ""),
        reshard_after_forward=reshard,
        bs_per_process=bs,
        ms=round(ms, 1),
        images_per_s=round(processes * bs * 1000 / ms, 2),
        peak_gib=None if peak is None else round(peak, 2),
    )
    del net, rows, params
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--flux-depth", default="6,12", help="double,single blocks (19,38 full)")
    parser.add_argument("--bs", type=int, default=1, help="batch per process")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, gloo on the CPU")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    dist.init_process_group("gloo" if smoke else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if smoke else torch.device("cuda", rank)
    if not smoke:
        torch.cuda.set_device(device)
    shape = shapes(tuple(int(v) for v in args.flux_depth.split(",")), smoke)["flux"]
    rows = []
    if rank == 0:
        rows.append(run(shape, args.bs, device, world, None, args.repeats))
    dist.barrier()
    for reshard, prefetch in ((True, False), (False, False), (True, True)):
        row = run(shape, args.bs, device, world, reshard, args.repeats, prefetch)
        if row["peak_gib"] is not None:  # the largest process's peak
            peak = torch.tensor(row["peak_gib"], device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            row["peak_gib"] = round(float(peak), 2)
        rows.append(row)
    if rank == 0:
        single = rows[0]
        for row in rows[1:]:
            row["x_one_gpu_images_per_s"] = round(row["images_per_s"] / single["images_per_s"], 2)
            if single["peak_gib"]:
                row["x_one_gpu_peak"] = round(row["peak_gib"] / single["peak_gib"], 2)
        lines = [
            "| mode | reshard after forward | ms/step | images/s | x one GPU | peak GiB/GPU | x one GPU |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['mode']} | {r['reshard_after_forward']} | {r['ms']} | {r['images_per_s']} | "
                f"{r.get('x_one_gpu_images_per_s', '')} | {r['peak_gib']} | {r.get('x_one_gpu_peak', '')} |"
            )
        meta = {
            "environment": {"device": "cpu"} if smoke else environment(),
            "shape": {**shape, "config": dict(shape["config"])},
            "world": world,
        }
        write_results(args.out, "dit_fsdp", rows, "\n".join(lines) + "\n", meta)
        print(json.dumps(rows), flush=True)
        print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
