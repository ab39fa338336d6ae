"""LocalOptimizer(warmup_steps=N): every step is a round for N steps, then every sync_every steps.

Reference: torch's post-local SGD as its docs set it up — a DDP model whose ``post_localSGD_hook``
all-reduces the gradients for the first iterations, and ``PostLocalSGDOptimizer`` with
``PeriodicModelAverager(period=H, warmup_steps=...)`` — on 2 gloo ranks, step by step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
    PostLocalSGDState,
    post_localSGD_hook,
)
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.optim import PostLocalSGDOptimizer

from local_opt import LocalOptimizer

N, H, STEPS = 3, 4, 14


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x, y = batch(seed)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def expected_rounds(steps: int, n: int = N, h: int = H) -> list[bool]:
    return [t <= n or (t - n) % h == 0 for t in range(1, steps + 1)]


def _parity(rank: int, world: int) -> dict:
    ours, theirs = make_model(), make_model()
    opt = LocalOptimizer(torch.optim.SGD(ours.parameters(), lr=0.1), sync_every=H, warmup_steps=N)
    # torch: gradients all-reduced by DDP for N - 1 iterations, then local; the averager's
    # warm-up ends at the same step and averages right away (step N), then every H steps
    ddp = nn.parallel.DistributedDataParallel(theirs)
    ddp.register_comm_hook(
        PostLocalSGDState(None, None, start_localSGD_iter=N - 1,
                          post_local_gradient_allreduce=False),
        post_localSGD_hook,
    )
    ref = PostLocalSGDOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1),
                                PeriodicModelAverager(period=H, warmup_steps=N - 1))
    diffs, synced, resumed_diffs = [], [], []
    resumed = None
    for t in range(STEPS):
        seed = 1000 * rank + t  # different data per rank
        step(ours, opt, seed)
        step(ddp, ref, seed)
        diffs.append(max((a - b).abs().max().item()
                         for a, b in zip(ours.parameters(), theirs.parameters())))
        synced.append(opt.synced)
        if resumed is not None:
            step(resumed[0], resumed[1], seed)
            resumed_diffs.append(max((a - b).abs().max().item()
                                     for a, b in zip(ours.parameters(), resumed[0].parameters())))
        if t == 1:  # mid-warm-up: a fresh optimizer (warmup_steps from the state) continues
            model2 = copy.deepcopy(ours)
            opt2 = LocalOptimizer(torch.optim.SGD(model2.parameters(), lr=0.1), sync_every=H)
            opt2.load_state_dict(opt.state_dict())
            resumed = (model2, opt2)
    flat = torch.cat([p.detach().reshape(-1) for p in ours.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return dict(diffs=diffs, synced=synced, num_syncs=opt.num_syncs, numel=flat.numel(),
                nbytes=opt.bytes_communicated, resumed_diffs=resumed_diffs,
                resumed_syncs=resumed[1].num_syncs, agree=torch.equal(gathered[0], gathered[1]))


@pytest.mark.timeout(180)
def test_warmup_equals_torch_post_local_sgd_on_two_ranks():
    for r in run_distributed(_parity, 2):
        assert max(r["diffs"]) < 1e-6  # gradient all-reduce vs model average: rounding only
        assert r["synced"] == expected_rounds(STEPS)
        rounds = sum(expected_rounds(STEPS))
        assert r["num_syncs"] == rounds == N + (STEPS - N) // H
        assert r["nbytes"] == rounds * r["numel"] * 4  # warm-up rounds are counted
        assert r["resumed_diffs"] and max(r["resumed_diffs"]) == 0.0  # bit for bit
        assert r["resumed_syncs"] == rounds
        assert r["agree"] == r["synced"][-1]


def test_single_process_schedule_will_sync_and_state_dict():
    model = make_model()
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=H, warmup_steps=N)
    will, synced = [], []
    for t in range(STEPS):
        will.append(opt.will_sync)
        step(model, opt, t)
        synced.append(opt.synced)
    assert synced == will == expected_rounds(STEPS)
    assert opt.state_dict()["local_opt"]["warmup_steps"] == N
    with pytest.raises(ValueError, match="Invalid warmup_steps: -1"):
        LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2, warmup_steps=-1)
