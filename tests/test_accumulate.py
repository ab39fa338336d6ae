"""VarianceTest.accumulate: the README's accumulation + clipping + bf16 block, run as written, gives
the same steps, statistics and batch sizes as the record_micro_batches path (suggestion asked
before clipping), in one process and on 2 gloo ranks."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn

from local_opt import LocalOptimizer, VarianceTest
from samplers import AdaptiveBatchSampler, micro_batches

KEYS = ("count", "weight_sum", "mean_sq_norm", "norm_variance", "inner_product_variance",
        "orthogonal_variance", "raw", "suggested")


def readme_block() -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(opt\.zero_grad\(\)\nacc = test\.accumulate\(.*?)```", text, re.S)
    assert block is not None, "the accumulation block is missing from README.md"
    return block.group(1)


def build(rank: int, world: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync_every=2)
    test = VarianceTest(model, F.cross_entropy, test="augmented", theta=0.3, nu=1.0, min_dof=0,
                        max_batch_size=64)
    sampler = AdaptiveBatchSampler(range(4096), 6, num_replicas=world, rank=rank,
                                   max_batch_size=64)
    return model, opt, test, sampler


def reference_step(model, opt, test, sampler, x, y, micro_batch_size: int) -> float:
    """The record_micro_batches path, with the suggestion asked before clipping."""
    opt.zero_grad()
    chunks = micro_batches((x, y), micro_batch_size)
    sizes = [len(xs) for xs, _ in chunks]
    will_sync = opt.will_sync
    with test.record_micro_batches(sizes) if will_sync else contextlib.nullcontext() as rec:
        for xs, ys in chunks:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(xs), ys)
            (loss * len(xs) / len(x)).backward()
    new = test.suggest_from_recorded(rec, sampler.batch_size) if will_sync else None
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    opt.step()
    if opt.synced:
        sampler.set_batch_size(new)
    return float(norm)


def _compare(rank: int, world: int, block: str, micro_batch_size: int) -> dict:
    code = compile(block, "README.md", "exec")
    model, opt, test, sampler = build(rank, world)
    ref = build(rank, world)
    sizes, max_diff, stats_equal, norms = [], 0.0, [], []
    for step in range(8):
        g = torch.Generator().manual_seed(1000 * rank + step)
        n = sampler.batch_size
        x, y = 4 * torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
        exec(code, {"torch": torch, "F": F, "model": model, "opt": opt, "test": test,
                    "sampler": sampler, "x": x, "y": y, "micro_batch_size": micro_batch_size})
        norms.append(reference_step(*ref, x, y, micro_batch_size))
        max_diff = max(max_diff, max((a - b).abs().max().item()
                                     for a, b in zip(model.parameters(), ref[0].parameters())))
        if opt.synced:
            a, b = test.last_stats, ref[2].last_stats
            stats_equal.append(all(a.get(k) == pytest.approx(b.get(k), rel=1e-12, nan_ok=True)
                                   for k in KEYS) and a.get("reason") == b.get("reason"))
        sizes.append((sampler.batch_size, ref[3].batch_size))
    return {"sizes": sizes, "max_diff": max_diff, "stats_equal": stats_equal,
            "rounds": opt.num_syncs, "norms": norms}


def _check(results: list[dict]) -> None:
    for r in results:
        assert r["max_diff"] == 0.0
        assert r["rounds"] == 4 and r["stats_equal"] == [True] * 4
        assert all(a == b for a, b in r["sizes"])
        assert r["sizes"][-1][0] > 6  # the batch grew, so the comparison means something
        assert max(r["norms"]) > 1.0  # and clipping changed .grad after the recorded backward
    assert all(r["sizes"] == results[0]["sizes"] for r in results)  # the same on every rank


@pytest.mark.parametrize("micro_batch_size", [4, 3])  # uneven / even micro-batches of b = 6
def test_readme_accumulation_block_one_process(micro_batch_size):
    _check([_compare(0, 1, readme_block(), micro_batch_size)])


@pytest.mark.timeout(180)
def test_readme_accumulation_block_two_ranks():
    _check(run_distributed(_compare, 2, readme_block(), 4))


def test_accumulate_errors():
    model, opt, test, _ = build(0, 1)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with pytest.raises(TypeError, match="has no will_sync; pass the LocalOptimizer"):
        test.accumulate(torch.optim.SGD(model.parameters(), lr=0.1), (x, y), 4)
    with pytest.raises(ValueError, match="Invalid micro_batch_size: 0"):
        test.accumulate(opt, (x, y), 0)
    with pytest.raises(ValueError, match=r"Invalid batch: its tensors have \[5, 6\] samples"):
        test.accumulate(opt, (x, y[:5]), 4)
    acc = test.accumulate(opt, {"x": x, "y": y}, 4)
    assert [len(c["x"]) for c, _ in acc] == [4, 2]
    with pytest.raises(RuntimeError, match="already iterated"):
        list(acc)
    with pytest.raises(RuntimeError, match="iterate over all micro-batches first"):
        test.accumulate(opt, (x, y), 4).suggest(6)
