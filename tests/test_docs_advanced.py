"""docs/advanced.md's two blocks, run as written on 2 gloo ranks: warm-up rounds, DiLoCo's outer
step against its closed form, averaged AdamW moments, and a diverged worker skipped by name."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn

from local_opt import LocalOptimizer


def doc_blocks() -> list[str]:
    text = (Path(__file__).parent.parent / "docs" / "advanced.md").read_text()
    blocks = re.findall(r"```python\n(opt = LocalOptimizer\(.*?)```", text, re.S)
    assert len(blocks) == 2, "docs/advanced.md should hold the warm-up and the DiLoCo blocks"
    return blocks


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def gather(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return out


def _run(rank: int, world: int, warmup_block: str, diloco_block: str) -> dict:
    out: dict = {}
    model = make_model()
    env = {"torch": torch, "LocalOptimizer": LocalOptimizer, "model": model}
    exec(warmup_block, env)
    opt = env["opt"]
    synced = []
    for t in range(120):
        step(model, opt, 1000 * rank + t)
        synced.append(opt.synced)
    out["warmup_rounds"] = [t + 1 for t, s in enumerate(synced) if s]

    model = make_model()
    env = {"torch": torch, "LocalOptimizer": LocalOptimizer, "model": model}
    exec(diloco_block, env)
    opt = env["opt"]
    theta0 = [p.detach().clone() for p in model.parameters()]  # the global copy (rank 0's model)
    local: list[torch.Tensor] = []
    opt.optimizer.register_step_post_hook(  # the local models just before the round's average
        lambda *_: local.__setitem__(slice(None), [p.detach().clone() for p in model.parameters()]))
    for t in range(4):
        step(model, opt, 2000 * rank + t)
    mean = torch.stack(gather(local)).mean(0)
    flat0 = torch.cat([p.reshape(-1) for p in theta0])
    delta = flat0 - mean  # the pseudo-gradient; first Nesterov step: theta - lr * (1 + m) * delta
    expected = flat0 - 0.7 * (1 + 0.9) * delta
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out["outer_err"] = (got - expected).abs().max().item()
    moments = [opt.state[p][k] for p in model.parameters() for k in ("exp_avg", "exp_avg_sq")]
    out["moments_equal"] = all(torch.equal(a, gather(moments)[0]) for a in gather(moments))
    out["params_equal"] = all(torch.equal(a, gather(list(model.parameters()))[0])
                              for a in gather(list(model.parameters())))
    if rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(4):
            step(model, opt, 3000 * rank + t)
    out["warned"] = [str(w.message) for w in caught if "skipped" in str(w.message)]
    out["num_syncs"] = opt.num_syncs
    return out


@pytest.mark.timeout(180)
def test_the_documented_options_on_two_ranks():
    for r in run_distributed(_run, 2, *doc_blocks()):
        assert r["warmup_rounds"] == list(range(1, 101)) + [108, 116]
        assert r["outer_err"] < 1e-6
        assert r["moments_equal"] and r["params_equal"]
        assert len(r["warned"]) == 1 and "rank [1]" in r["warned"][0]
        assert r["num_syncs"] == 1  # the skipped round is not counted
