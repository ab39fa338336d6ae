"""Throughput of AdaptiveBatchSampler against torch's BatchSampler(DistributedSampler(...)).

One epoch of index batches over an index-only dataset: the sampler is all that runs, so the
timings compare the samplers' own overhead (the per-epoch shuffle plus the batching).

    .venv/bin/python -m pytest benchmarks/test_bench_sampler.py --benchmark-only
"""

from __future__ import annotations

import time

import pytest
from torch.utils.data import BatchSampler, DistributedSampler

from samplers.adaptive import AdaptiveBatchSampler

N = 200_000
BATCH = 64
REPLICAS = 2  # this rank is the last one


class IndexDataset:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def make_adaptive(replicas: int = REPLICAS) -> AdaptiveBatchSampler:
    return AdaptiveBatchSampler(IndexDataset(N), BATCH, num_replicas=replicas, rank=replicas - 1)


def make_torch(replicas: int = REPLICAS) -> BatchSampler:
    sampler = DistributedSampler(IndexDataset(N), num_replicas=replicas, rank=replicas - 1)
    return BatchSampler(sampler, BATCH, drop_last=False)


def adaptive_epoch(sampler: AdaptiveBatchSampler, epoch: int) -> int:
    sampler.set_epoch(epoch)
    return sum(len(batch) for batch in sampler)


def torch_epoch(sampler: BatchSampler, epoch: int) -> int:
    sampler.sampler.set_epoch(epoch)
    return sum(len(batch) for batch in sampler)


class _Epochs:
    """A new epoch (a new shuffle, no cached index list) on every call."""

    def __init__(self, run, sampler) -> None:
        self.run, self.sampler, self.epoch = run, sampler, 0

    def __call__(self) -> int:
        self.epoch += 1
        return self.run(self.sampler, self.epoch)


@pytest.mark.benchmark(group="sampler")
def test_bench_adaptive_batch_sampler(benchmark):
    assert benchmark(_Epochs(adaptive_epoch, make_adaptive())) == N // REPLICAS


@pytest.mark.benchmark(group="sampler")
def test_bench_torch_batch_sampler(benchmark):
    assert benchmark(_Epochs(torch_epoch, make_torch())) == N // REPLICAS


def _ratio(repeats: int, replicas: int) -> float:
    """Best-of-``repeats`` epoch time of the adaptive sampler over torch's, interleaved so that
    machine load hits both alike."""
    adaptive = _Epochs(adaptive_epoch, make_adaptive(replicas))
    reference = _Epochs(torch_epoch, make_torch(replicas))
    best = {"adaptive": float("inf"), "torch": float("inf")}
    for _ in range(repeats):
        for name, run in (("adaptive", adaptive), ("torch", reference)):
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best["adaptive"] / best["torch"]


@pytest.mark.benchmark(group="sampler-ratio")
@pytest.mark.parametrize("replicas", [1, 4])
def test_bench_sampler_ratio(benchmark, replicas):
    repeats = 3 if benchmark.disabled else 30
    ratio = benchmark.pedantic(_ratio, args=(repeats, replicas), rounds=1, iterations=1)
    benchmark.extra_info["ratio"] = round(ratio, 4)
    print(
        f"\n{replicas} replicas: AdaptiveBatchSampler / BatchSampler(DistributedSampler) "
        f"epoch time {ratio:.3f}x"
    )
    # the goal is <= 1.05x; the bound here only catches gross regressions on a noisy machine
    assert ratio < 1.5
