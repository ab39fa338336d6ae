"""Several nodes: DDP inside a node, LocalOptimizer across nodes (4 gloo ranks as 2 nodes x 2)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from local_opt import LocalOptimizer
from local_opt.topology import node_groups


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return out


def _two_nodes(rank: int, world: int) -> dict:
    out: dict = {}
    # bad sizes are refused before any group is built
    for bad in (3, 0):
        try:
            node_groups(bad)
        except ValueError as e:
            out.setdefault("errors", []).append(str(e))
    os.environ["LOCAL_WORLD_SIZE"] = "2"  # as torchrun sets it
    groups = node_groups()
    out["where"] = (groups.node_rank, groups.local_rank, groups.num_nodes, groups.local_world_size)

    # DDP over the whole world (the same ranks LocalOptimizer averages) is refused
    world_ddp = DDP(_model(0))
    try:
        LocalOptimizer(torch.optim.SGD(world_ddp.parameters(), lr=0.1), sync_every=2,
                       module=world_ddp)
    except ValueError as e:
        out["ddp_error"] = str(e)

    # DDP inside the node, Local SGD across the nodes; every rank starts from its own seed
    model = DDP(_model(10 + rank), process_group=groups.intra)
    inner = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    opt = LocalOptimizer(inner, sync_every=2, module=model, process_group=groups.inter)
    before_round = {}
    inner.register_step_post_hook(lambda *_: before_round.update(x=_flat(model)))
    out["start"] = _gather(_flat(model), world)
    out["after"], out["before_round"] = [], []
    for t in range(4):
        g = torch.Generator().manual_seed(100 * rank + t)  # every rank its own data
        x, y = torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        out["after"].append(_gather(_flat(model), world))
        out["before_round"].append(_gather(before_round["x"], world))
    out["synced"] = opt.num_syncs
    return out


@pytest.mark.timeout(180)
def test_ddp_inside_nodes_local_sgd_across_two_nodes():
    res = run_distributed(_two_nodes, 4)
    assert [r["where"] for r in res] == [(0, 0, 2, 2), (0, 1, 2, 2), (1, 0, 2, 2), (1, 1, 2, 2)]
    for r in res:
        assert len(r["errors"]) == 2 and all("local_world_size" in e for e in r["errors"])
        assert "DistributedDataParallel" in r["ddp_error"] and "every step" in r["ddp_error"]
        assert r["synced"] == 2
    r = res[0]
    assert all(torch.equal(s, r["start"][0]) for s in r["start"])  # rank 0's model everywhere
    for t, (after, pre) in enumerate(zip(r["after"], r["before_round"])):
        # DDP: the two ranks of a node agree after every step
        assert torch.equal(after[0], after[1]) and torch.equal(after[2], after[3])
        if t % 2 == 1:  # a round: every rank holds the mean of the two nodes' models
            expected = (pre[0] + pre[2]) / 2
            for a in after:
                torch.testing.assert_close(a, expected, rtol=1e-6, atol=1e-7)
        else:  # a local step: the nodes differ (different data)
            assert not torch.equal(after[0], after[2])
