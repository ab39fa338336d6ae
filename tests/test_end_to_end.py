"""The README's loop on 2 gloo ranks: LocalOptimizer + AdaptiveBatchSampler + VarianceTest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from local_opt import LocalOptimizer, VarianceTest
from samplers import AdaptiveBatchSampler


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
    test = VarianceTest(model, F.cross_entropy, test="norm", eta=1.0, max_batch_size=128,
                        policy="paper")  # the published test; 3 epochs leave no room to grow fast
    sizes = []
    for epoch in range(3):
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
    k, sizes, checks = 2, [], []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            # --- the README's accumulation snippet ---
            ends_round = opt.local_step + 1 == opt.sync_every
            with test.record_micro_batches(len(x) // k) if ends_round else contextlib.nullcontext() as rec:
                for xs, ys in zip(x.chunk(k), y.chunk(k)):
                    (F.cross_entropy(model(xs), ys) / k).backward()
            # the same micro-batch gradients, the explicit way, for the check below
            if ends_round:
                params = list(model.parameters())
                grads = [torch.autograd.grad(F.cross_entropy(model(xs), ys), params)
                         for xs, ys in zip(x.chunk(k), y.chunk(k))]
            opt.step()
            if opt.synced:
                sampler.set_batch_size(test.suggest_from_recorded(rec, sampler.batch_size))
                # ---
                raw = test.last_stats["raw_augmented"]  # the one-round statistic
                ref = VarianceTest(model, F.cross_entropy, test="augmented", theta=0.3, nu=1.0)
                ref.suggest_from_micro_batch_grads(grads, len(x) // k, len(x))
                checks.append((raw, ref.last_stats["raw_augmented"]))
                sizes.append(sampler.batch_size)
    return {"sizes": sizes, "checks": checks, "rounds": opt.num_syncs}


@pytest.mark.timeout(240)
def test_accumulation_snippet_on_two_ranks():
    r0, r1 = run_distributed(_accumulation_loop, 2)
    assert r0["sizes"] == r1["sizes"] and r0["rounds"] == len(r0["sizes"]) > 3
    assert r0["sizes"][-1] > 8  # the batch grew
    for raw, ref in r0["checks"] + r1["checks"]:
        assert raw == pytest.approx(ref, rel=1e-4)
