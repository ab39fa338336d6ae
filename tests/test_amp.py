"""Mixed precision through LocalOptimizer: bf16 autocast, fp16 with GradScaler (1 and 2 ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn

from local_opt import LocalOptimizer

INF_STEP = 1  # the step whose gradients get an inf (on one rank in the distributed test)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _scaled_step(model, opt, scaler, x, y, inject_inf: bool, unscale_first: bool = False) -> None:
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if inject_inf:
        with torch.no_grad():
            model[0].weight.grad[0, 0] = float("inf")
    if unscale_first:  # e.g. for gradient clipping
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("inner", ["sgd", "adam_fused"])
def test_grad_scaler_single_process_is_the_wrapped_optimizer(inner, unscale_first):
    """One process: scaler.step(LocalOptimizer) is scaler.step(bare optimizer) bit for bit, skips
    included; the wrapper counts the skipped call."""
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    }[inner]
    ref, ours = _model(), _model()
    ref_opt = make(ref.parameters())
    opt = LocalOptimizer(make(ours.parameters()), sync_every=2)
    ref_scaler, scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for t in range(4):
        x, y = _batch(t)
        before = _params(ours)
        _scaled_step(ref, ref_opt, ref_scaler, x, y, t == INF_STEP, unscale_first)
        _scaled_step(ours, opt, scaler, x, y, t == INF_STEP, unscale_first)
        assert torch.equal(_params(ours), _params(ref))
        assert torch.equal(_params(ours), before) == (t == INF_STEP)  # skipped exactly there
        assert scaler.get_scale() == ref_scaler.get_scale()
    assert opt.steps == 4 and opt.num_syncs == 2  # the skipped step is counted
    assert ref_scaler.get_scale() == 65536.0 / 2  # halved once, at the inf


def _amp_run(rank: int, world: int) -> dict:
    out: dict = {}
    # fp16 + GradScaler; rank 1's gradients hold an inf at INF_STEP, so its inner step is skipped
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = LocalOptimizer(inner, sync_every=2)
    scaler = torch.amp.GradScaler("cpu")
    stepped = {}  # step index -> parameters right after the inner step (not called when skipped)
    inner.register_step_post_hook(lambda *_: stepped.update({opt.steps: _params(model)}))
    after = []
    for t in range(4):
        x, y = _batch(10 * rank + t)
        _scaled_step(model, opt, scaler, x, y, inject_inf=(rank == 1 and t == INF_STEP))
        after.append(_params(model))
    # what this rank brought to the round that ended step INF_STEP
    brought = stepped.get(INF_STEP, after[INF_STEP - 1])
    out["fp16"] = dict(steps=opt.steps, syncs=opt.num_syncs, inner_steps=sorted(stepped),
                       after=after, scale=scaler.get_scale(), brought=brought)

    # bf16 autocast, no scaler: a whole short run, rounds aligned
    model = _model()
    opt = LocalOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), sync_every=2, module=model)
    for t in range(4):
        x, y = _batch(20 * rank + t)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    out["bf16"] = dict(params=_params(model), dtype=model[0].weight.dtype, syncs=opt.num_syncs,
                       loss=loss.item())
    gathered = [torch.empty_like(out["bf16"]["params"]) for _ in range(world)]
    dist.all_gather(gathered, out["bf16"]["params"])
    out["bf16"]["same"] = all(torch.equal(g, gathered[0]) for g in gathered)
    return out


@pytest.mark.timeout(180)
def test_amp_on_two_ranks_rounds_stay_aligned_when_one_rank_skips():
    res = run_distributed(_amp_run, 2)
    a, b = res[0]["fp16"], res[1]["fp16"]
    assert a["steps"] == b["steps"] == 4 and a["syncs"] == b["syncs"] == 2
    assert a["inner_steps"] == [0, 1, 2, 3]  # rank 0 stepped every time
    assert b["inner_steps"] == [0, 2, 3]  # rank 1 skipped its second step ...
    # the round averaged rank 0's new model with rank 1's unchanged one
    torch.testing.assert_close(a["after"][INF_STEP], (a["brought"] + b["brought"]) / 2,
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(b["brought"], b["after"][INF_STEP - 1])
    assert a["scale"] == 65536.0 and b["scale"] == 65536.0 / 2  # ... and halved its own scale
    for t in (1, 3):  # both rounds happened on both ranks, at the same steps
        assert torch.equal(a["after"][t], b["after"][t])
    assert not torch.equal(a["after"][2], b["after"][2])
    for r in res:
        assert r["bf16"]["same"] and r["bf16"]["syncs"] == 2
        assert r["bf16"]["dtype"] == torch.float32 and r["bf16"]["loss"] == r["bf16"]["loss"]
