"""The README's loop on 2 gloo ranks: LocalOptimizer + AdaptiveBatchSampler + VarianceTest."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from local_opt import LocalOptimizer, VarianceTest
from samplers import AdaptiveBatchSampler, micro_batches


def _readme_loop(rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x @ torch.randn(8, 4, generator=g)).argmax(1)
    dataset = TensorDataset(x, y)
    torch.manual_seed(rank)  # different init per rank: LocalOptimizer broadcasts rank 0's

    # --- the README quick start, verbatim apart from the model and data ---
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=4, module=model)
    sampler = AdaptiveBatchSampler(dataset, batch_size=4, max_batch_size=128)
    loader = DataLoader(dataset, batch_sampler=sampler)
    test = VarianceTest(model, F.cross_entropy, max_batch_size=128)   # library defaults, no tuning
    sizes = []
    for epoch in range(8):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if opt.synced:  # a communication round just happened
                sampler.set_batch_size(test.suggest(x, y, sampler.batch_size))
                sizes.append(sampler.batch_size)
    # ---
    with torch.no_grad():
        acc = (model(dataset.tensors[0]).argmax(1) == dataset.tensors[1]).float().mean().item()
    return {"sizes": sizes, "rounds": opt.num_syncs, "acc": acc,
            "params": [p.detach().clone() for p in model.parameters()], "synced": opt.synced}


@pytest.mark.timeout(240)
def test_readme_loop_grows_the_batch_on_two_ranks():
    r0, r1 = run_distributed(_readme_loop, 2)
    assert r0["sizes"] == r1["sizes"]  # pooled test: every rank gets the same size
    assert r0["sizes"] == sorted(r0["sizes"])  # never shrinks
    assert r0["sizes"][-1] >= 4 * 4  # and it grew from the initial 4
    assert r0["rounds"] == len(r0["sizes"]) > 3
    assert r0["acc"] > 0.8
    if r0["synced"]:  # the epoch ended right after a round: the models agree
        assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))


def _weighted_augmented(units: torch.Tensor, n: list[int], world: int, theta=0.3, nu=1.0) -> float:
    """The augmented test's raw b' from every rank's micro-batch mean gradients (float64), each
    weighted by its size (the unbiased formulas for unequal units of local_opt._stats)."""
    everything = [torch.empty_like(units) for _ in range(world)]
    dist.all_gather(everything, units)
    g = torch.cat(everything)
    w = torch.tensor(n * world, dtype=torch.float64)
    k = len(w)
    mean = (w[:, None] * g).sum(0) / w.sum()
    g2 = mean.dot(mean)
    ip = g @ mean
    v_ip = (w * (ip - g2) ** 2).sum() / (k - 1)
    v_orth = (w * (g - (ip / g2)[:, None] * mean).pow(2).sum(1)).sum() / (k - 1)
    return max(float(v_ip / (world * theta**2 * g2**2)), float(v_orth / (world * nu**2 * g2)))


def _accumulation_loop(rank: int, world: int) -> dict:
    import contextlib

    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(512, 8, generator=g)
    y_all = (x_all @ torch.randn(8, 4, generator=g)).argmax(1)
    dataset = TensorDataset(x_all, y_all)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=4, module=model)
    sampler = AdaptiveBatchSampler(dataset, batch_size=8, max_batch_size=128)
    loader = DataLoader(dataset, batch_sampler=sampler)
    test = VarianceTest(model, F.cross_entropy, test="augmented", theta=0.3, nu=1.0,
                        max_batch_size=128)
    micro_batch_size, sizes, checks = 5, [], []  # uneven micro-batches for most batch sizes
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            # --- the README's accumulation snippet ---
            chunks = micro_batches((x, y), micro_batch_size)
            chunk_sizes = [len(xs) for xs, _ in chunks]
            with test.record_micro_batches(chunk_sizes) if opt.will_sync else contextlib.nullcontext() as rec:
                for xs, ys in chunks:
                    (F.cross_entropy(model(xs), ys) * len(xs) / len(x)).backward()
            # the same micro-batch gradients, the explicit way, for the check below
            if opt.will_sync:
                params = list(model.parameters())
                units = torch.stack([
                    torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                        F.cross_entropy(model(xs), ys), params)]).double()
                    for xs, ys in chunks])
            opt.step()
            if opt.synced:
                sampler.set_batch_size(test.suggest_from_recorded(rec, sampler.batch_size))
                # ---
                raw = test.last_stats["raw_augmented"]  # the one-round statistic
                checks.append((raw, _weighted_augmented(units, chunk_sizes, world)))
                sizes.append(sampler.batch_size)
    return {"sizes": sizes, "checks": checks, "rounds": opt.num_syncs}


@pytest.mark.timeout(240)
def test_accumulation_snippet_on_two_ranks():
    r0, r1 = run_distributed(_accumulation_loop, 2)
    assert r0["sizes"] == r1["sizes"] and r0["rounds"] == len(r0["sizes"]) > 3
    assert r0["sizes"][-1] > 8  # the batch grew
    for raw, ref in r0["checks"] + r1["checks"]:
        assert raw == pytest.approx(ref, rel=1e-4)
