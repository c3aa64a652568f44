"""The data cache: decoded once, batches gathered by index equal the items decoded one by one in
the engine's seeded order (so exact resume is unchanged), evaluation reads it in order, and
running out of memory while building it falls back to decoding with one notice."""

import torch

from peftkit.common_kernels.training import data_cache
from peftkit.common_kernels.training.data_cache import (
    SeededBatches,
    batch_rows,
    batches,
    cache_dataset,
    eval_batches,
)
from peftkit.vision.data import BuiltinTask, Preprocess

CPU = torch.device("cpu")


def _task(n=13):
    return BuiltinTask("counting", "train800", Preprocess(24, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), n)


def test_cached_batches_equal_decoded_batches_in_the_seeded_order():
    data = _task()
    cache = cache_dataset(data, CPU)
    assert cache is not None and cache.fields[0].dtype == torch.uint8 and len(cache) == 13
    plain, cached = batches(data, 4, 7, 5, None), batches(cache, 4, 7, 5, None)
    for _ in range(9):  # past an epoch boundary (3 batches per epoch)
        (x, y), (cx, cy) = next(plain), next(cached)
        assert torch.equal(x, cx) and torch.equal(y, cy)


def test_rows_split_by_rank_join_to_the_global_batch():
    whole = batch_rows(10, 4, 3, 2, 0, 1)
    halves = [batch_rows(10, 2, 3, 2, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
    sampler = iter(SeededBatches(10, 4, 3, 2, 0, 1))
    assert next(sampler) == whole.tolist()


def test_evaluation_reads_the_cache_in_order():
    data = _task(10)
    cache = cache_dataset(data, CPU)
    got = list(eval_batches(cache, 4, CPU))
    assert [len(y) for _, y in got] == [4, 4, 2]
    images = torch.cat([x for x, _ in got])
    assert torch.equal(images, torch.stack([data[i][0] for i in range(10)]))


def test_datasets_without_raw_items_are_not_cached():
    assert cache_dataset([(torch.zeros(2), 1)], CPU) is None


class RunsOutOnce(BuiltinTask):
    """Memory runs out once, while the cache is being built."""

    failed = False

    def raw(self, i):
        if i == 5 and not self.failed:
            self.failed = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return super().raw(i)


def test_out_of_memory_while_caching_falls_back_to_decoding_with_one_notice():
    data = RunsOutOnce("counting", "train800", Preprocess(24, (0.5,) * 3, (0.5,) * 3), 13)
    lines = []
    stream = data_cache.training_batches(data, 4, 0, 0, None, 0, 1, CPU, lines.append)
    assert len(lines) == 1 and "out of memory" in lines[0] and "streaming" in lines[0]
    x, y = next(stream)
    rows = batch_rows(13, 4, 0, 0).tolist()
    assert torch.equal(x, torch.stack([data[i][0] for i in rows]))
    assert y.tolist() == [data.label(i) for i in rows]


def test_in_memory_lists_are_batched_in_process_even_on_a_gpu_run(monkeypatch):
    # Worker processes for a list of row indices cost seconds of start-up and shutdown per run.
    started = []
    monkeypatch.setattr(data_cache, "streamed", lambda *a: started.append(a))
    rows = [{"i": i} for i in range(5)]
    got = data_cache.training_batches(rows, 2, 3, 0, None, 0, 1, torch.device("cuda"))
    first = next(got)
    assert not started
    assert first["i"].tolist() == [rows[i]["i"] for i in batch_rows(5, 2, 3, 0)]
