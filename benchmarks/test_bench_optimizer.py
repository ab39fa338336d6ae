"""LocalOptimizer speed: step overhead between rounds, one round vs torch's averaging, bytes/sample.

Ratios are measured against a baseline in the same run (``_ratio.interleaved_ratio``); ``make bench``
runs the real sizes (timm resnet18, 11.7M parameters), ``make test`` the tiny ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _ratio import device, interleaved_ratio, quick, record
from dist_utils import run_distributed
from torch import nn
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from local_opt import LocalOptimizer


def _model(small: bool) -> nn.Module:
    """The benchmark's model on ``_ratio.device()`` (the CPU unless make gpu-check)."""
    if small:
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to(device())
    import timm

    return timm.create_model("resnet18", num_classes=1000).to(device())


def _with_grads(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


@pytest.mark.benchmark(group="optimizer-step")
def test_step_between_rounds_vs_wrapped_step(benchmark, request):
    small = quick(request)
    torch.manual_seed(0)
    # the same inner optimizer on the same tensors: the difference is the wrapper alone
    bare = torch.optim.SGD(_with_grads(_model(small)).parameters(), lr=1e-3, momentum=0.9)
    local = LocalOptimizer(bare, sync_every=10**9)
    res = interleaved_ratio(local.step, bare.step, repeats=5 if small else 60)
    record(benchmark, "step_overhead", res, goal=1.02)
    benchmark(local.step)
    assert local.num_syncs == 0


def _sync_timings(rank: int, world: int, small: bool, repeats: int) -> dict:
    torch.manual_seed(rank)
    model = _model(small)
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=10**9)
    # torch's average_parameters leaves the parameters as views of its own buffer: give it and
    # the loop a model of their own, so each method runs on the layout it keeps
    params = list(_model(small).parameters())

    def torch_avg():
        average_parameters(iter(params), dist.group.WORLD)

    def per_param_loop():
        with torch.no_grad():
            for p in params:
                p.div_(world)
                dist.all_reduce(p)

    ours = interleaved_ratio(opt.sync, torch_avg, repeats=repeats)
    loop = interleaved_ratio(per_param_loop, torch_avg, repeats=repeats)
    return {"ours": ours, "loop": loop, "numel": sum(p.numel() for p in model.parameters()),
            "bytes_per_round": opt.bytes_communicated // max(1, opt.num_syncs)}


@pytest.mark.timeout(600)
@pytest.mark.benchmark(group="optimizer-sync")
def test_one_round_vs_torch_average_parameters(benchmark, request):
    small = quick(request)
    out = []
    benchmark.pedantic(
        lambda: out.append(run_distributed(_sync_timings, 2, small, 3 if small else 30, timeout=500)),
        rounds=1, iterations=1,
    )
    r0 = out[0][0]
    record(benchmark, "sync_vs_torch_average_parameters", r0["ours"], goal=1.0)
    record(benchmark, "per_param_loop_vs_torch_average_parameters", r0["loop"])
    assert r0["bytes_per_round"] == r0["numel"] * 4


def _bytes_per_sample(rank: int, world: int, sizes: list[int], h: int) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), sync_every=h)
    rows = []
    for b in sizes:
        before = opt.bytes_communicated
        for _ in range(h):
            x, y = torch.randn(b, 16), torch.randint(0, 4, (b,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert opt.synced
        sent = opt.bytes_communicated - before
        rows.append({"batch_size": b, "bytes_per_round": sent,
                     "bytes_per_sample": sent / (world * h * b)})
    return rows


@pytest.mark.timeout(120)
@pytest.mark.benchmark(group="optimizer-comm")
def test_communication_per_sample_as_the_batch_grows(benchmark):
    sizes, h = [8, 16, 32, 64, 128], 4
    out = []
    benchmark.pedantic(lambda: out.append(run_distributed(_bytes_per_sample, 2, sizes, h)),
                       rounds=1, iterations=1)
    rows = out[0][0]
    print("\n| per-worker b | bytes/round/rank | bytes/sample |")
    for r in rows:
        print(f"| {r['batch_size']} | {r['bytes_per_round']} | {r['bytes_per_sample']:.2f} |")
        benchmark.extra_info[f"bytes_per_sample_b{r['batch_size']}"] = r["bytes_per_sample"]
    # a round costs the same bytes whatever b is, so the cost per sample falls as 1/b
    assert len({r["bytes_per_round"] for r in rows}) == 1
    for r0, r1 in zip(rows, rows[1:]):
        assert r1["bytes_per_sample"] == pytest.approx(r0["bytes_per_sample"] / 2)


def _compressed_round_timings(rank: int, world: int, small: bool, repeats: int) -> dict:
    torch.manual_seed(0)
    out = {}
    models = {fmt: _model(small) for fmt in (None, "bf16", "int8")}
    opts = {
        fmt: LocalOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1), sync_every=10**9, compression=fmt
        )
        for fmt, m in models.items()
    }
    numel = sum(p.numel() for p in models[None].parameters())
    for fmt in ("bf16", "int8"):
        res = interleaved_ratio(opts[fmt].sync, opts[None].sync, repeats=repeats)
        out[fmt] = res
    out["bytes_per_round"] = {
        str(fmt): o.bytes_communicated // max(1, o.num_syncs) for fmt, o in opts.items()
    }
    out["numel"] = numel
    return out


@pytest.mark.timeout(600)
@pytest.mark.benchmark(group="optimizer-sync")
def test_compressed_round_vs_fp32_round(benchmark, request):
    """A round with compression="bf16"/"int8" (encode, all_to_all, fp32 shard sums, re-encode,
    all_gather, decode) vs the fp32 all-reduce round, on 2 gloo ranks; the bytes are exact."""
    from local_opt._compress import mean_nbytes

    small = quick(request)
    out = []
    benchmark.pedantic(
        lambda: out.append(
            run_distributed(_compressed_round_timings, 2, small, 3 if small else 20, timeout=500)
        ),
        rounds=1,
        iterations=1,
    )
    r0 = out[0][0]
    record(benchmark, "bf16_round_vs_fp32_round", r0["bf16"])
    record(benchmark, "int8_round_vs_fp32_round", r0["int8"])
    n, b = r0["numel"], r0["bytes_per_round"]
    assert b["None"] == 4 * n
    assert b["bf16"] == mean_nbytes(n, 2, "bf16") and b["int8"] == mean_nbytes(n, 2, "int8")
    benchmark.extra_info["bytes_ratio_bf16"] = b["None"] / b["bf16"]
    benchmark.extra_info["bytes_ratio_int8"] = b["None"] / b["int8"]
    print(f"\nbytes per round: fp32 {b['None']}, bf16 {b['bf16']}, int8 {b['int8']}")
