"""GPU readiness: the same checks on a CUDA device, skipped when there is none (``make gpu-check``).

Every test takes the device from ``LOCAL_OPT_TEST_DEVICE`` (default ``cuda``) and skips when it is a
CUDA device and CUDA is not available; ``LOCAL_OPT_TEST_DEVICE=cpu`` runs the same code on the CPU
(how this file is checked on machines without a GPU). A round runs over nccl when there are at
least two GPUs, over gloo (which takes CUDA tensors) otherwise.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn

from local_opt import LocalOptimizer, VarianceTest

DEVICE = os.environ.get("LOCAL_OPT_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
pytestmark = pytest.mark.skipif(
    ON_CUDA and not torch.cuda.is_available(), reason="no CUDA device (make gpu-check needs one)"
)


def _backend() -> str:
    return "nccl" if ON_CUDA and torch.cuda.device_count() >= 2 else "gloo"


def _device(rank: int = 0) -> torch.device:
    if not ON_CUDA:
        return torch.device(DEVICE)
    return torch.device("cuda", rank % torch.cuda.device_count())


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _round_on_device(rank: int, world: int) -> dict:
    device = _device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = _conv_net().to(device, memory_format=torch.channels_last)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = LocalOptimizer(inner, sync_every=2, module=model)
    pre = {}
    inner.register_step_post_hook(lambda *_: pre.update(
        x=torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        rm=model[1].running_mean.clone()))
    for t in range(2):
        g = torch.Generator().manual_seed(10 * rank + t)
        x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
        x = x.to(device, memory_format=torch.channels_last)
        opt.zero_grad()
        F.cross_entropy(model(x), y.to(device)).backward()
        opt.step()
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected, rm = pre["x"] / world, pre["rm"] / world
    dist.all_reduce(expected)
    dist.all_reduce(rm)
    return dict(
        diff=(got - expected).abs().max().item(),
        rm_diff=(model[1].running_mean - rm).abs().max().item(),
        device=str(got.device),
        channels_last=model[0].weight.is_contiguous(memory_format=torch.channels_last),
        syncs=opt.num_syncs,
    )


@pytest.mark.timeout(180)
def test_round_with_device_tensors_on_two_ranks():
    for r in run_distributed(_round_on_device, 2, backend=_backend()):
        assert r["syncs"] == 1 and r["device"].startswith(DEVICE.split(":")[0])
        assert r["diff"] < 1e-6 and r["rm_diff"] < 1e-6 and r["channels_last"]


@pytest.mark.parametrize("test", ["norm", "augmented"])
def test_hooks_backend_on_device_matches_cpu(test):
    torch.manual_seed(1)
    x, y = torch.randn(12, 3, 6, 6), torch.randint(0, 3, (12,))
    stats = []
    for device in ("cpu", _device()):
        model = _conv_net().to(device)
        vt = VarianceTest(model, F.cross_entropy, test=test, eta=1.0, theta=1.0, nu=1.0,
                          backend="hooks")
        vt.suggest(x.to(device), y.to(device), 12)
        stats.append(vt.last_stats)
    for key in ("mean_sq_norm", "norm_variance", "inner_product_variance", "orthogonal_variance"):
        if key in stats[0]:
            assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-4, nan_ok=True), key
    assert stats[0]["norm_variance"] > 0 and stats[0]["backend"] == "hooks"


def test_autocast_and_grad_scaler_on_device():
    """fp16 autocast + GradScaler and bf16 autocast: the wrapper is the bare optimizer bit for bit,
    a skipped step (inf) included."""
    device = _device()
    for dtype in (torch.float16, torch.bfloat16):
        ref = _conv_net().to(device)
        ours = copy.deepcopy(ref)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        opt = LocalOptimizer(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9),
                             sync_every=2)
        scalers = [torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
                   for _ in range(2)]
        for t in range(3):
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
            for model, o, scaler in ((ref, ref_opt, scalers[0]), (ours, opt, scalers[1])):
                o.zero_grad()
                with torch.autocast(device.type, dtype=dtype):
                    loss = F.cross_entropy(model(x.to(device)), y.to(device))
                scaler.scale(loss).backward()
                if t == 1 and dtype == torch.float16:
                    model[0].weight.grad[0, 0, 0, 0] = float("inf")
                scaler.step(o)
                scaler.update()
            for a, b in zip(ours.parameters(), ref.parameters()):
                assert torch.equal(a, b)
        assert opt.steps == 3 and opt.num_syncs == 1
