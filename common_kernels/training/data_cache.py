"""Data at GPU speed: a small dataset is decoded once into tensors and batches are gathered from
them by index; a larger one streams through DataLoader workers with pinned memory and prefetch.

A dataset can be cached when it offers `raw(i)` (its item before the last, cheap step: e.g. a
resized uint8 image and its label) and `finish(fields)` (that step on a whole batch, e.g. scale
and normalize, run on the device). Both paths read rows in the engine's seeded order
(`engine.batch_rows`), so a cached, streamed or plain run sees the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import PeftkitError

DEVICE_SHARE = 0.25  # at most this share of the GPU's free memory goes to a cache
HOST_LIMIT = 8 * 2**30  # larger datasets stream instead of filling pinned host memory


def batch_rows(n: int, batch_size: int, seed: int, index: int, rank: int = 0, world: int = 1):
    """The dataset rows of batch `index` for process `rank`: the seeded order every loader shares.
    Each global batch of batch_size * world rows is split by rank, so N processes see what one
    process with the global batch would. The last batch of an epoch is filled up from the start
    of the epoch's order, so every row is seen each epoch at a fixed batch shape (120 rows at
    batch 64: 2 batches, 8 rows seen twice); a dataset smaller than one batch is repeated."""
    total = batch_size * world
    per_epoch = -(-n // total)
    epoch, pos = divmod(index, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    rows = order[torch.arange(pos * total, (pos + 1) * total) % n]
    return rows[rank * batch_size : (rank + 1) * batch_size]


def batches(
    dataset,
    batch_size: int,
    seed: int,
    start: int,
    collate: Callable | None,
    rank: int = 0,
    world: int = 1,
) -> Iterator[Any]:
    """Endless batches in the seeded order (`batch_rows`) from batch `start`, so a resumed run sees
    exactly the batches the uninterrupted one would have; made in this process. A dataset with a
    `batch(rows)` method (a TensorCache) gathers its rows itself instead of item by item; one with
    `batch_rows(batch_size, seed, index, rank, world)` chooses them (e.g. one aspect bucket each)."""
    from torch.utils.data import default_collate

    n = len(dataset)
    if n == 0:
        raise PeftkitError("the training set is empty: add examples or check the data path")
    collate = collate or default_collate
    index = start
    while True:
        if hasattr(dataset, "batch_rows"):
            rows = dataset.batch_rows(batch_size, seed, index, rank, world)
        else:
            rows = batch_rows(n, batch_size, seed, index, rank, world)
        if hasattr(dataset, "batch"):
            yield dataset.batch(rows)
        else:
            yield collate([dataset[i] for i in rows.tolist()])
        index += 1


def training_batches(
    dataset,
    batch_size: int,
    seed: int,
    start: int,
    collate: Callable | None,
    rank: int,
    world: int,
    device: torch.device,
    notice: Callable[[str], None] = print,
) -> Iterator[Any]:
    """The engine's batches: from a cache when `dataset` can be cached, else decoded by workers
    on GPU runs (unless it is an in-memory list), else made in this process; the same seeded
    order every way."""
    from torch.utils.data import default_collate

    cache = cache_dataset(dataset, device, notice)
    if cache is not None:
        return batches(cache, batch_size, seed, start, None, rank, world)
    # A list or tuple is already in memory: workers would only add start-up and pickling.
    in_memory = isinstance(dataset, (list, tuple)) or hasattr(dataset, "batch")
    if loader_workers(device) and len(dataset) and not in_memory:
        sampler = SeededBatches(len(dataset), batch_size, seed, start, rank, world)
        return streamed(dataset, sampler, collate or default_collate, device)
    return batches(dataset, batch_size, seed, start, collate, rank, world)


class TensorCache:
    """A dataset's `raw` items stacked into tensors (on the GPU or in pinned host memory); its
    `batch(rows)` is the batch the dataset's collated items would give, gathered by index."""

    def __init__(self, fields: list[torch.Tensor], finish: Callable[[tuple], Any]) -> None:
        self.fields, self.finish = fields, finish

    def __len__(self) -> int:
        return self.fields[0].shape[0]

    def batch(self, rows: torch.Tensor) -> Any:
        rows = rows.to(self.fields[0].device, non_blocking=True)
        return self.finish(tuple(f.index_select(0, rows) for f in self.fields))


def cache_dataset(
    dataset, device: torch.device, notice: Callable[[str], None] = print
) -> TensorCache | None:
    """`dataset` decoded once into a TensorCache, or None when it cannot be cached (no `raw`),
    is too large, or building the cache runs out of memory (then one `notice` line says so)."""
    if not (hasattr(dataset, "raw") and hasattr(dataset, "finish")) or len(dataset) == 0:
        return None
    first = [torch.as_tensor(v) for v in dataset.raw(0)]
    n = len(dataset)
    size = n * sum(f.numel() * f.element_size() for f in first)
    where, pin = torch.device("cpu"), False
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if size <= DEVICE_SHARE * free:
            where = device
        else:
            pin = True
    if where.type == "cpu" and size > HOST_LIMIT:
        return None
    try:
        fields = [
            torch.empty((n, *f.shape), dtype=f.dtype, device=where, pin_memory=pin) for f in first
        ]
        for i in range(n):
            for field, value in zip(fields, first if i == 0 else dataset.raw(i)):
                field[i].copy_(torch.as_tensor(value), non_blocking=True)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if "out of memory" not in str(err).lower():
            raise
        notice(
            f"data cache: out of memory caching {n} examples ({size / 2**20:.0f} MiB); streaming"
        )
        return None
    return TensorCache(fields, dataset.finish)


def loader_workers(device: torch.device) -> int:
    """DataLoader workers for streamed data: decode in parallel on GPU runs; none on the CPU,
    where the training process already uses the cores."""
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


class SeededBatches:
    """A DataLoader batch sampler of the engine's endless seeded order from batch `start`."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, rank: int, world: int):
        self.args = (n, batch_size, seed)
        self.start, self.rank, self.world = start, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        index = self.start
        while True:
            yield batch_rows(*self.args, index, self.rank, self.world).tolist()
            index += 1


def streamed(dataset, sampler, collate, device: torch.device) -> Iterator[Any]:
    """Batches of `sampler` decoded by worker processes, pinned for fast copies, prefetched."""
    workers = loader_workers(device)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    return iter(loader)


def eval_batches(dataset, batch_size: int, device: torch.device) -> Iterator[Any]:
    """`dataset` in order, in batches: gathered from its cache, or decoded by workers."""
    if hasattr(dataset, "batch"):
        for start in range(0, len(dataset), batch_size):
            yield dataset.batch(torch.arange(start, min(start + batch_size, len(dataset))))
        return
    workers = loader_workers(device)
    yield from torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
