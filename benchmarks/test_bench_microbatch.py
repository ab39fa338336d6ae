"""The micro-batch variance estimate inside an accumulated training step vs the same step without it.

Gradient accumulation already computes one gradient per micro-batch. Two ways to use them:

* ``recorded`` — ``VarianceTest.record_micro_batches`` around the unchanged accumulation loop
  (hooks read each micro-batch gradient on its way into ``.grad``), then
  ``suggest_from_recorded``: the way the goal (<= 1.05x) is meant to be met;
* ``grads`` — the loop rewritten with ``torch.autograd.grad`` to keep each micro-batch gradient,
  then ``suggest_from_micro_batch_grads`` (copies and passes over every kept gradient).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _ratio import device, interleaved_ratio, quick, record
from torch import nn

from local_opt import VarianceTest

K = 4  # micro-batches per step


def _setup(small: bool, batch: int = 64):
    torch.manual_seed(0)
    if small:
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, 10))
        x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    else:
        import timm

        model = timm.create_model("resnet18", num_classes=10)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    dev = device()  # the CPU unless make gpu-check
    return model.to(dev), x.to(dev), y.to(dev)


def _step_plain(model, opt, x, y):
    opt.zero_grad()
    for xs, ys in zip(x.chunk(K), y.chunk(K)):
        (F.cross_entropy(model(xs), ys) / K).backward()
    opt.step()


def _step_with_test(model, opt, vt, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    opt.zero_grad()
    grads = []
    for xs, ys in zip(x.chunk(K), y.chunk(K)):
        g = torch.autograd.grad(F.cross_entropy(model(xs), ys), params)
        grads.append(g)
        for p, gi in zip(params, g):
            p.grad = gi / K if p.grad is None else p.grad.add_(gi, alpha=1 / K)
    opt.step()
    return vt.suggest_from_micro_batch_grads(grads, len(x) // K, len(x))


def _step_recorded(model, opt, vt, x, y):
    opt.zero_grad()
    with vt.record_micro_batches(len(x) // K) as rec:
        for xs, ys in zip(x.chunk(K), y.chunk(K)):
            (F.cross_entropy(model(xs), ys) / K).backward()
    opt.step()
    return vt.suggest_from_recorded(rec, len(x))


@pytest.mark.benchmark(group="microbatch")
@pytest.mark.parametrize("batch", [64, 256])
@pytest.mark.parametrize("test", ["norm", "augmented"])
def test_recorded_estimate_inside_accumulated_step(benchmark, request, batch, test):
    """The hooks add one read of each micro-batch gradient (a norm per parameter); the test adds
    one pass over the sum and, for the augmented test, one dot product per kept gradient."""
    small = quick(request)
    if small and (batch != 64 or test != "augmented"):
        pytest.skip("one size is enough as a smoke test")
    model, x, y = _setup(small, batch)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    vt = VarianceTest(model, F.cross_entropy, test=test)
    torch.set_num_threads(2)
    res = interleaved_ratio(lambda: _step_recorded(model, opt, vt, x, y),
                            lambda: _step_plain(model, opt, x, y), repeats=3 if small else 20)
    record(benchmark, f"recorded_{test}_in_accumulated_step_b{batch}", res, goal=1.05)
    b = benchmark(lambda: _step_recorded(model, opt, vt, x, y))
    assert isinstance(b, int) and b >= len(x)
    assert vt.last_stats["backend"] == "microbatch_recorded"


@pytest.mark.benchmark(group="microbatch")
@pytest.mark.parametrize("batch", [64, 256])
def test_microbatch_estimate_inside_accumulated_step(benchmark, request, batch):
    """The extra cost is a few passes over the K micro-batch gradients (norms, dot products),
    fixed for a model, so its share falls as the accumulated batch grows."""
    small = quick(request)
    if small and batch != 64:
        pytest.skip("one size is enough as a smoke test")
    model, x, y = _setup(small, batch)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    vt = VarianceTest(model, F.cross_entropy, test="augmented", backend="microbatch")
    torch.set_num_threads(2)
    res = interleaved_ratio(lambda: _step_with_test(model, opt, vt, x, y),
                            lambda: _step_plain(model, opt, x, y), repeats=3 if small else 20)
    record(benchmark, f"grads_augmented_in_accumulated_step_b{batch}", res)
    b = benchmark(lambda: _step_with_test(model, opt, vt, x, y))
    assert isinstance(b, int) and b >= len(x)
    assert vt.last_stats["backend"] == "microbatch_grads"
