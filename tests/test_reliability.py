"""Reliability: whole-state resume, determinism, and a rank that stops stepping."""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from local_opt import LocalOptimizer
from local_opt.checkpoint import load_checkpoint, save_checkpoint
from local_opt.schedules import StagewiseBatchSize
from local_opt.variance import VarianceTest
from samplers import AdaptiveBatchSampler

ROUNDS = 8


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return TensorDataset(x, y, torch.arange(90))


def _build(policy_kind: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync_every=2,
                         module=model)
    sampler = AdaptiveBatchSampler(_dataset(), 2, max_batch_size=16, seed=3)
    if policy_kind == "variance":
        policy = VarianceTest(model, F.cross_entropy, test="norm", eta=0.5, max_batch_size=16,
                              backend="vmap")
    else:
        policy = StagewiseBatchSize(2, milestones=[1, 2], factor=2, max_batch_size=16)
    return model, opt, sampler, policy


def _train(rank: int, world: int, policy_kind: str, ckpt_dir: str | None, mode: str) -> dict:
    """mode: 'full' (ROUNDS rounds), 'stop' (save mid-round, mid-epoch, then quit), 'resume'."""
    model, opt, sampler, policy = _build(policy_kind)
    # DataLoader draws a seed from the global RNG at every iter(); its own generator keeps the
    # global RNG (dropout) identical between an uninterrupted and a resumed run.
    loader = DataLoader(_dataset(), batch_sampler=sampler, generator=torch.Generator())
    path = None if ckpt_dir is None else os.path.join(ckpt_dir, f"ckpt.{rank}.pt")
    if mode == "resume":
        load_checkpoint(path, model=model, optimizer=opt, sampler=sampler, policy=policy)
    log: list[tuple[int, int, list[int]]] = []  # (step, batch size, sample indices)
    while opt.num_syncs < ROUNDS:
        for x, y, idx in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            log.append((opt.steps, len(idx), idx.tolist()))
            if opt.synced:
                sampler.set_batch_size(policy.suggest(x, y, sampler.batch_size))
            if mode == "stop" and opt.steps == 9:  # mid-round (local_step 1), mid-epoch
                assert opt.local_step == 1 and 0 < sampler.state_dict()["position"]
                save_checkpoint(path, model=model, optimizer=opt, sampler=sampler, policy=policy)
                return {"log": log}
            if opt.num_syncs >= ROUNDS:
                break
        else:
            sampler.set_epoch(sampler.epoch + 1)
    return {"log": log, "params": [p.detach().clone() for p in model.parameters()],
            "epoch": sampler.epoch, "batch_size": sampler.batch_size}


def _check_resume(results_full, results_stop, results_resume) -> None:
    for full, stop, resumed in zip(results_full, results_stop, results_resume):
        assert stop["log"] + resumed["log"] == full["log"]  # steps, batch sizes, sample order
        assert all(torch.equal(a, b) for a, b in zip(full["params"], resumed["params"]))
        assert full["batch_size"] > 2  # the policy grew the batch, so the test means something


def _single(policy_kind: str, ckpt_dir: str | None, mode: str) -> dict:
    return _train(0, 1, policy_kind, ckpt_dir, mode)


@pytest.mark.parametrize("policy_kind", ["variance", "stagewise"])
def test_resume_single_process_continues_exactly(policy_kind):
    with tempfile.TemporaryDirectory() as d:
        full = _single(policy_kind, None, "full")
        stop = _single(policy_kind, d, "stop")
        resumed = _single(policy_kind, d, "resume")
    _check_resume([full], [stop], [resumed])
    assert full["epoch"] >= 1  # the run crossed an epoch boundary


@pytest.mark.timeout(240)
def test_resume_two_ranks_continues_exactly():
    with tempfile.TemporaryDirectory() as d:
        full = run_distributed(_train, 2, "variance", None, "full")
        stop = run_distributed(_train, 2, "variance", d, "stop")
        resumed = run_distributed(_train, 2, "variance", d, "resume")
    _check_resume(full, stop, resumed)
    # the ranks read different samples but agree on the batch sizes (pooled test)
    sizes = [[b for _, b, _ in r["log"]] for r in full]
    assert sizes[0] == sizes[1]
    assert {i for _, _, ix in full[0]["log"] for i in ix} != {i for _, _, ix in full[1]["log"] for i in ix}


def test_same_seed_same_run_bit_for_bit():
    a = _single("variance", None, "full")
    b = _single("variance", None, "full")
    assert a["log"] == b["log"]
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))


def test_checkpoint_names_missing_piece():
    model, opt, sampler, policy = _build("stagewise")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.pt")
        save_checkpoint(path, extra={"round": 3}, model=model, optimizer=opt)
        assert load_checkpoint(path, model=model) == {"round": 3}
        with pytest.raises(KeyError, match="sampler"):
            load_checkpoint(path, model=model, sampler=sampler)
        with pytest.raises(TypeError, match="state_dict"):
            save_checkpoint(path, model=object())


def _stalled_rank(rank: int, world: int) -> dict:
    """Rank 1 stops calling step(); rank 0's round must fail within the group's timeout."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    if rank == 1:
        time.sleep(12)  # longer than the group's 3 s timeout: rank 1 never reaches the round
        return {"error": None}
    t0 = time.monotonic()
    try:
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    except Exception as e:  # gloo raises a RuntimeError-derived DistBackendError on timeout
        return {"error": f"{type(e).__name__}: {e}", "elapsed": time.monotonic() - t0}
    return {"error": None, "elapsed": time.monotonic() - t0}


@pytest.mark.timeout(120)
def test_a_stalled_rank_ends_in_an_error_within_the_group_timeout():
    res = run_distributed(_stalled_rank, 2, pg_timeout=3.0, timeout=90)
    assert res[0]["error"] is not None, "the round should have failed"
    assert res[0]["elapsed"] < 10.0
