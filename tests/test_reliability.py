"""Reliability: whole-state resume, determinism, and a rank that stops stepping."""

from __future__ import annotations

import os
import pickle
import tempfile
import time

import numpy as np
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

ROUNDS = 12  # the variance test grows b = 2 once its variance rests on 8 degrees of freedom


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


# --- the loop PyTorch users write: set_epoch(epoch) at the top of every epoch -------------------

EPOCHS = 3


def _loader(kind: str, sampler: AdaptiveBatchSampler):
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(_dataset(), batch_sampler=sampler, generator=torch.Generator())
    return DataLoader(_dataset(), batch_sampler=sampler, generator=torch.Generator())


def _train_epochs(kind: str, path: str | None, mode: str) -> dict:
    """The standard epoch loop; mode 'full', 'stop' (save in epoch 1, mid-epoch and mid-round,
    and quit) or 'resume'.

    With the plain DataLoader (num_workers=0) the sampler is a piece of the checkpoint; with
    torchdata's StatefulDataLoader the loader is, and it restores the sampler itself.
    """
    model, opt, sampler, policy = _build("variance")
    loader = _loader(kind, sampler)
    data_piece = {"loader": loader} if kind == "stateful" else {"sampler": sampler}
    start_epoch = 0
    if mode == "resume":
        start_epoch = load_checkpoint(path, model=model, optimizer=opt, policy=policy,
                                      **data_piece)["epoch"]
    log: list[tuple[int, int, int, list[int]]] = []  # (epoch, step, batch size, sample indices)
    for epoch in range(start_epoch, EPOCHS):
        sampler.set_epoch(epoch)
        for x, y, idx in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            log.append((epoch, opt.steps, len(idx), idx.tolist()))
            if opt.synced:
                sampler.set_batch_size(policy.suggest(x, y, sampler.batch_size))
            if mode == "stop" and epoch == 1 and opt.local_step == 1:
                assert sampler.state_dict()["position"] < sampler.num_samples  # mid-epoch
                save_checkpoint(path, extra={"epoch": epoch}, model=model, optimizer=opt,
                                policy=policy, **data_piece)
                return {"log": log}
    return {"log": log, "params": [p.detach().clone() for p in model.parameters()],
            "batch_size": sampler.batch_size}


def _standard_loop_runs(rank: int, world: int, ckpt_dir: str, phase: str) -> dict:
    """For both loaders: phase 'first' runs an uninterrupted run and one that stops, 'resume' the
    resumption (fresh objects; the resumed state comes from the file alone), 'all' both."""
    out = {}
    for kind in ("plain", "stateful"):
        path = os.path.join(ckpt_dir, f"{kind}.{rank}.pt")
        runs = ()
        if phase in ("first", "all"):
            runs = (_train_epochs(kind, None, "full"), _train_epochs(kind, path, "stop"))
        if phase in ("resume", "all"):
            torch.manual_seed(12345)  # the checkpoint restores the RNG: no trace of this may remain
            runs = (*runs, _train_epochs(kind, path, "resume"))
        out[kind] = runs
    return out


def _two_rank_runs(rank: int, world: int, ckpt_dir: str, phase: str) -> dict:
    """Both resume tests on 2 ranks in two launches: 'first' (uninterrupted and stopped runs)
    and 'resume' (a fresh process that continues from the files)."""
    if phase == "first":
        old = (_train(rank, world, "variance", None, "full"),
               _train(rank, world, "variance", ckpt_dir, "stop"))
    else:
        old = (_train(rank, world, "variance", ckpt_dir, "resume"),)
    return {"old": old, "standard": _standard_loop_runs(rank, world, ckpt_dir, phase)}


def _check_standard_loop(runs: dict) -> None:
    for kind in ("plain", "stateful"):
        full, stop, resume = runs[kind]
        assert stop["log"] + resume["log"] == full["log"]  # epochs, steps, batch sizes, samples
        assert all(torch.equal(a, b) for a, b in zip(full["params"], resume["params"]))
        assert full["batch_size"] == resume["batch_size"]
        sizes = [b for _, _, b, _ in full["log"]]
        assert sizes[0] == 2 and full["batch_size"] > 2  # the policy grew the batch
        assert {e for e, *_ in full["log"]} == set(range(EPOCHS))
        assert stop["log"][-1][0] == 1  # the cut is in epoch 1
    assert runs["plain"][0]["log"] == runs["stateful"][0]["log"]


@pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")
def test_standard_epoch_loop_resumes_exactly_single_process(tmp_path):
    pytest.importorskip("torchdata.stateful_dataloader")
    _check_standard_loop(_standard_loop_runs(0, 1, str(tmp_path), "all"))


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")
def test_resume_two_ranks_continues_exactly(tmp_path):
    """Stopped mid-round and mid-epoch, resumed in new processes: the loop that skips set_epoch
    for the resumed epoch, and the standard epoch loop with both loaders."""
    pytest.importorskip("torchdata.stateful_dataloader")
    first = run_distributed(_two_rank_runs, 2, str(tmp_path), "first")
    resumed = run_distributed(_two_rank_runs, 2, str(tmp_path), "resume")
    full, stop = zip(*[r["old"] for r in first])
    _check_resume(full, stop, [r["old"][0] for r in resumed])
    for a, b in zip(first, resumed):
        _check_standard_loop({kind: (*a["standard"][kind], *b["standard"][kind])
                              for kind in ("plain", "stateful")})
    # the ranks read different samples but agree on the batch sizes (pooled test)
    sizes = [[b for _, b, _ in r["log"]] for r in full]
    assert sizes[0] == sizes[1]
    assert {i for _, _, ix in full[0]["log"] for i in ix} != {i for _, _, ix in full[1]["log"] for i in ix}
    logs = [r["standard"]["plain"][0]["log"] for r in first]
    assert [b for _, _, b, _ in logs[0]] == [b for _, _, b, _ in logs[1]]
    assert logs[0] != logs[1]
    # a checkpoint of the 2-rank run is refused by a single process (world size 1)
    model, opt, sampler, policy = _build("variance")
    with pytest.raises(ValueError, match="saved with world_size=2, but this run has world_size=1"):
        load_checkpoint(os.path.join(tmp_path, "plain.0.pt"), model=model, optimizer=opt,
                        sampler=sampler, policy=policy)


# --- what a checkpoint may hold, and what it is refused for --------------------------------------


class _Payload:
    """Unpickling it runs code: ``exec`` writes ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


class _Opaque:
    """A picklable object that torch.load(weights_only=True) does not load."""


def _primed():
    """The pieces after two steps (momentum buffers exist), and a copy of the parameters."""
    model, opt, sampler, policy = _build("stagewise")
    loader = DataLoader(_dataset(), batch_sampler=sampler, generator=torch.Generator())
    for _, (x, y, _) in zip(range(2), loader):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, sampler, policy, [p.detach().clone() for p in model.parameters()]


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    model, opt, sampler, policy, params = _primed()
    path, marker = str(tmp_path / "c.pt"), str(tmp_path / "marker")
    save_checkpoint(path, model=model, optimizer=opt)
    state = torch.load(path, weights_only=True)
    state["extra"]["note"] = _Payload(marker)  # a tampered file
    torch.save(state, path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    changed = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_checkpoint(path, model=model, optimizer=opt)
    assert not os.path.exists(marker)  # the payload never ran
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), changed))
    # the payload is live: loading the file as a trusted one runs it
    load_checkpoint(path, weights_only=False, model=model, optimizer=opt)
    assert open(marker).read() == "ran"
    assert not all(torch.equal(a, b) for a, b in zip(params, changed))


def test_save_names_what_weights_only_cannot_load(tmp_path):
    model, opt, sampler, policy, _ = _primed()
    path = str(tmp_path / "c.pt")
    last = list(model.parameters())[3]
    opt.state[last]["foo"] = _Opaque()
    with pytest.raises(TypeError, match=r"optimizer\.state\.3\.foo is a .*_Opaque"):
        save_checkpoint(path, model=model, optimizer=opt)
    del opt.state[last]["foo"]
    with pytest.raises(TypeError, match=r"extra\.metrics\.1\.loss is a numpy\.float64"):
        save_checkpoint(path, extra={"metrics": [{"loss": 1.0}, {"loss": np.float64(0.5)}]},
                        model=model)
    assert not os.listdir(tmp_path)  # nothing written
    # what the pieces of a run hold passes, RNG states included, and loads with weights_only
    save_checkpoint(path, extra={"epoch": 1, "records": [{"acc": None, "tag": "x"}]},
                    model=model, optimizer=opt, sampler=sampler, policy=policy)
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state())


def test_rng_state_survives(tmp_path):
    model, opt, *_ = _primed()
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, model=model)
    expected = torch.rand(5)
    torch.manual_seed(999)
    load_checkpoint(path, model=model)
    assert torch.equal(torch.rand(5), expected)
    torch.manual_seed(999)
    load_checkpoint(path, restore_rng=False, model=model)
    assert not torch.equal(torch.rand(5), expected)


def _other_sync_every(model, opt, sampler):
    return dict(optimizer=LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                         sync_every=3, module=model))


@pytest.mark.parametrize(
    "change,match",
    [
        (_other_sync_every,
         "saved with optimizer.sync_every=2, but this run has optimizer.sync_every=3"),
        (lambda m, o, s: dict(sampler=AdaptiveBatchSampler(_dataset(), 2, seed=4)),
         "saved with seed=3, but this sampler has seed=4"),
        (lambda m, o, s: dict(sampler=AdaptiveBatchSampler(range(80), 2, seed=3)),
         "saved with dataset_len=90, but this sampler has dataset_len=80"),
        (lambda m, o, s: dict(sampler=AdaptiveBatchSampler(_dataset(), 2, seed=3, shuffle=False)),
         "saved with shuffle=True, but this sampler has shuffle=False"),
        (lambda m, o, s: dict(sampler=AdaptiveBatchSampler(_dataset(), 2, seed=3, num_replicas=2,
                                                           rank=1)),
         "saved with num_replicas=1, but this sampler has num_replicas=2"),
    ],
)  # fmt: skip
def test_load_refuses_another_configuration(tmp_path, change, match):
    model, opt, sampler, policy, _ = _primed()
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, model=model, optimizer=opt, sampler=sampler)
    pieces = {"model": model, "optimizer": opt, "sampler": sampler}
    pieces.update(change(model, opt, sampler))
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, **pieces)


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
