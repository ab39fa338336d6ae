"""Checkpoint directories (one file per rank + a manifest) and the failure modes of single files,
on real gloo ranks: what Lightning / accelerate users write must either work or say what to do."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn

from local_opt import LocalOptimizer, load_checkpoint, save_checkpoint
from local_opt.checkpoint import is_checkpoint_dir
from samplers import AdaptiveBatchSampler


def build(rank: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync_every=3,
                         module=model, warmup_steps=1)
    sampler = AdaptiveBatchSampler(range(64), 4, seed=1)
    return model, opt, sampler


def train(model, opt, sampler, steps: int, rank: int) -> None:
    it = iter(sampler)
    for t in range(steps):
        idx = next(it)
        g = torch.Generator().manual_seed(100 * rank + t + len(idx))
        x, y = torch.randn(len(idx), 4, generator=g), torch.randint(0, 2, (len(idx),), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def snapshot(model, opt, sampler) -> dict:
    return {"params": [p.detach().clone() for p in model.parameters()],
            "sampler": sampler.state_dict(), "steps": opt.steps, "local_step": opt.local_step}


def same(a: dict, b: dict) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
            and a["sampler"] == b["sampler"] and a["steps"] == b["steps"]
            and a["local_step"] == b["local_step"])


def error_of(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return None


def _scenarios(rank: int, world: int, root: str) -> dict:
    out: dict = {}
    model, opt, sampler = build(rank)
    train(model, opt, sampler, 5, rank)  # mid-round (local_step 1), models differ across ranks
    saved = snapshot(model, opt, sampler)
    # 1. a directory: every rank calls save, every rank loads its own file back
    ckpt = os.path.join(root, "ckpt")
    save_checkpoint(ckpt, extra={"epoch": 0}, model=model, optimizer=opt, sampler=sampler)
    out["files"] = sorted(os.listdir(ckpt))  # complete on every rank when save returns
    model2, opt2, sampler2 = build(rank)
    out["extra"] = load_checkpoint(ckpt, model=model2, optimizer=opt2, sampler=sampler2)
    out["restored"] = same(snapshot(model2, opt2, sampler2), saved)
    flat = saved["params"][0].reshape(-1)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    out["models_differ"] = not torch.equal(gathered[0], gathered[1])
    dist.barrier()
    # 2. a directory missing this rank's file (e.g. rank 0 alone saved, or no shared disk)
    if rank == 0:
        shutil.copytree(ckpt, os.path.join(root, "partial"))
        os.remove(os.path.join(root, "partial", "rank00001.pt"))
    dist.barrier()
    out["partial"] = error_of(lambda: load_checkpoint(os.path.join(root, "partial"), model=model2))
    # 3. rank files swapped: each rank would get the other's state
    if rank == 0:
        swapped = os.path.join(root, "swapped")
        shutil.copytree(ckpt, swapped)
        os.replace(os.path.join(swapped, "rank00000.pt"), os.path.join(swapped, "tmp"))
        os.replace(os.path.join(swapped, "rank00001.pt"), os.path.join(swapped, "rank00000.pt"))
        os.replace(os.path.join(swapped, "tmp"), os.path.join(swapped, "rank00001.pt"))
    dist.barrier()
    out["swapped"] = error_of(lambda: load_checkpoint(os.path.join(root, "swapped"), model=model2))
    # 4. a rank file left from an earlier save (the new save did not finish on every rank)
    if rank == 0:
        shutil.copy(os.path.join(ckpt, "rank00001.pt"), os.path.join(root, "old_rank1.pt"))
    dist.barrier()
    save_checkpoint(ckpt, model=model, optimizer=opt, sampler=sampler)
    if rank == 0:
        shutil.copy(os.path.join(root, "old_rank1.pt"), os.path.join(ckpt, "rank00001.pt"))
    dist.barrier()
    out["stale"] = error_of(lambda: load_checkpoint(ckpt, model=model2))
    # 5. every rank saves one shared file at once: no race on a temporary file, and the ranks
    # whose state is not in it are refused when they load it
    shared = os.path.join(root, "shared.pt")
    out["shared_save"] = error_of(lambda: save_checkpoint(shared, model=model, optimizer=opt))
    dist.barrier()
    out["shared_load"] = error_of(lambda: load_checkpoint(shared, model=model2, optimizer=opt2))
    # 6. rank 0 alone saves f"ckpt.{rank}.pt": rank 1 finds nothing
    if rank == 0:
        save_checkpoint(os.path.join(root, f"single.{rank}.pt"), model=model)
    dist.barrier()
    out["rank0_only"] = error_of(
        lambda: load_checkpoint(os.path.join(root, f"single.{rank}.pt"), model=model2))
    out["leftovers"] = [f for f in os.listdir(root) if ".tmp" in f] + [
        f for f in os.listdir(ckpt) if ".tmp" in f]
    return out


@pytest.mark.timeout(180)
def test_directory_checkpoints_and_single_file_failures_on_two_ranks(tmp_path):
    results = run_distributed(_scenarios, 2, str(tmp_path))
    for r in results:
        assert r["files"] == ["manifest.json", "rank00000.pt", "rank00001.pt"]
        assert r["extra"] == {"epoch": 0} and r["restored"] and r["models_differ"]
        assert r["leftovers"] == []
        assert r["shared_save"] is None  # no FileNotFoundError on 'shared.pt.tmp'
    assert results[0]["partial"] is None
    assert "has no file for rank 1 (rank00001.pt): save_checkpoint must be called on every " \
        "rank" in results[1]["partial"]
    assert "saved by rank 1, but this is rank 0" in results[0]["swapped"]
    assert "saved by rank 0, but this is rank 1" in results[1]["swapped"]
    assert results[0]["stale"] is None
    assert results[1]["stale"].startswith("ValueError") and "another save" in results[1]["stale"]
    refused = [r["shared_load"] for r in results if r["shared_load"] is not None]
    assert len(refused) == 1 and "but this is rank" in refused[0]
    assert "save_checkpoint must be called on every rank" in refused[0]
    assert results[0]["rank0_only"] is None
    assert results[1]["rank0_only"].startswith("FileNotFoundError")
    assert "save_checkpoint must be called on every rank" in results[1]["rank0_only"]
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["world_size"] == 2
    assert manifest["files"] == ["rank00000.pt", "rank00001.pt"]
    assert manifest["counters"]["optimizer.steps"] == 5
    assert manifest["counters"]["optimizer.sync_every"] == 3
    assert manifest["counters"]["optimizer.warmup_steps"] == 1
    # a 2-rank directory in one process: refused, naming both world sizes
    model, opt, sampler = build(0)
    with pytest.raises(ValueError, match="saved with world_size=2, but this run has world_size=1"):
        load_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt)


def test_single_process_directory_round_trip_and_the_path_rule(tmp_path):
    model, opt, sampler = build(0)
    train(model, opt, sampler, 4, 0)
    saved = snapshot(model, opt, sampler)
    save_checkpoint(tmp_path / "run" / "step4", model=model, optimizer=opt, sampler=sampler)
    assert sorted(os.listdir(tmp_path / "run" / "step4")) == ["manifest.json", "rank00000.pt"]
    model2, opt2, sampler2 = build(0)
    load_checkpoint(str(tmp_path / "run" / "step4"), model=model2, optimizer=opt2,
                    sampler=sampler2)
    assert same(snapshot(model2, opt2, sampler2), saved)
    os.remove(tmp_path / "run" / "step4" / "manifest.json")
    with pytest.raises(FileNotFoundError, match="has no manifest.json: the save did not finish"):
        load_checkpoint(tmp_path / "run" / "step4", model=model2)
    with pytest.raises(FileNotFoundError, match="No checkpoint directory"):
        load_checkpoint(tmp_path / "nothing", model=model2)
    # the rule: an existing directory, or a new path without a suffix, is a directory
    (tmp_path / "existing.d").mkdir()
    (tmp_path / "file").write_text("")
    assert is_checkpoint_dir(tmp_path / "existing.d") and is_checkpoint_dir(tmp_path / "new")
    assert is_checkpoint_dir(str(tmp_path / "new") + "/")
    assert not is_checkpoint_dir(tmp_path / "c.pt") and not is_checkpoint_dir(tmp_path / "c.0")
    assert not is_checkpoint_dir(tmp_path / "file")  # an existing file stays a file


def _rank0_alone_saves_a_directory(rank: int, world: int, root: str) -> str | None:
    model, opt, sampler = build(rank)
    done = os.path.join(root, "rank0_done")
    if rank == 0:  # the DDP habit: only rank 0 saves
        error = error_of(lambda: save_checkpoint(os.path.join(root, "ckpt"), timeout=1.5,
                                                 model=model, optimizer=opt, sampler=sampler))
        open(done, "w").close()
        return error
    while not os.path.exists(done):  # rank 1 stays in the group, as a training rank would
        time.sleep(0.05)
    return None


@pytest.mark.timeout(120)
def test_a_directory_saved_on_rank_0_alone_fails_after_the_timeout_saying_what_to_do(tmp_path):
    start = time.monotonic()
    results = run_distributed(_rank0_alone_saves_a_directory, 2, str(tmp_path))
    assert results[1] is None
    assert results[0].startswith("RuntimeError: save_checkpoint(")
    assert "on rank 0 waited 1.5 s for the other 1 rank(s)" in results[0]
    assert "call it on every rank at the same point (not under `if rank == 0:`)" in results[0]
    assert time.monotonic() - start < 60  # not the process group's timeout
    assert not os.path.exists(tmp_path / "ckpt" / "manifest.json")


@pytest.mark.parametrize("timeout", [0, -1.0, "10", True])
def test_save_checkpoint_refuses_a_bad_timeout(tmp_path, timeout):
    model, _, _ = build(0)
    with pytest.raises(ValueError, match="Invalid timeout"):
        save_checkpoint(tmp_path / "ckpt", timeout=timeout, model=model)
