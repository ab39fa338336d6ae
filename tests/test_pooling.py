"""The one reducer and the pooling collective of ``local_opt._stats``.

* ``reduce_units`` with unequal unit weights against the closed form, and its unbiasedness over
  random splits into unequal micro-batches (Monte Carlo against the per-sample variance);
* ``pool`` on 2 gloo ranks equals the single-process statistics of the concatenated batch, with
  one collective for the norm test and two with inner products.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn

from local_opt import _stats
from local_opt.backends import REGISTRY

KEYS = ("count", "weight_sum", "mean_sq_norm", "sq_norm_sum", "inner_sq_sum")


def _units_stats(units: torch.Tensor, weights: torch.Tensor | None, unit_size: int = 1):
    """GradStats of flat units ``(K, P)`` with weights, through the reducer."""
    w = torch.ones(units.shape[0], dtype=units.dtype) if weights is None else weights
    return _stats.reduce_units(
        [(w[:, None] * units).sum(0)],
        units.pow(2).sum(1),
        lambda v: units @ v[0],
        unit_size=unit_size,
        weights=weights,
    )


def test_reducer_unequal_weights_closed_form():
    gen = torch.Generator().manual_seed(0)
    units = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    m = torch.tensor([3.0, 1.0, 4.0, 2.0, 6.0], dtype=torch.float64)
    p = _stats.pool(_units_stats(units, m))
    mean = (m[:, None] * units).sum(0) / m.sum()
    ip = units @ mean
    ref = {
        "norm_variance": float((m * (units - mean).pow(2).sum(1)).sum() / 4),
        "inner_product_variance": float((m * (ip - mean @ mean).pow(2)).sum() / 4),
        "orthogonal_variance": float(
            (m * (units - ip[:, None] / (mean @ mean) * mean).pow(2).sum(1)).sum() / 4
        ),
    }
    assert (p.count, p.weight_sum) == (5, float(m.sum()))
    assert p.mean_sq_norm == pytest.approx(float(mean @ mean), rel=1e-12)
    for key, value in ref.items():
        assert getattr(_stats, key)(p) == pytest.approx(value, rel=1e-10), key
    # equal weights m: the same as unit_size=m with unit weights
    eq = _stats.pool(_units_stats(units, torch.full((5,), 3.0, dtype=torch.float64)))
    us = _stats.pool(_units_stats(units, None, unit_size=3))
    for f in ("norm_variance", "inner_product_variance", "orthogonal_variance"):
        assert getattr(_stats, f)(eq) == pytest.approx(getattr(_stats, f)(us), rel=1e-10), f
    with pytest.raises(ValueError, match="Invalid weights"):
        _stats.reduce_units([units.sum(0)], units.pow(2).sum(1), None, weights=m[:2])


def test_reducer_unequal_micro_batches_unbiased():
    """Random splits of N samples into micro-batches of sizes 1, 2, 3, 6: the mean of the
    estimate over splits is the per-sample variance (Monte Carlo, 4000 splits)."""
    gen = torch.Generator().manual_seed(1)
    n, sizes = 12, [1, 2, 3, 6]
    g = torch.randn(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    g += torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    sigma2 = float(g.var(0, unbiased=True).sum())
    mean = g.mean(0)
    ip_var = float((g @ mean).var(unbiased=True))
    m = torch.tensor(sizes, dtype=torch.float64)
    est_n, est_ip = [], []
    for _ in range(4000):
        perm = torch.randperm(n, generator=gen)
        units = torch.stack([part.mean(0) for part in g[perm].split(sizes)])
        p = _stats.pool(_units_stats(units, m))
        est_n.append(_stats.norm_variance(p))
        est_ip.append(_stats.inner_product_variance(p))
    # standard errors of these means are below 2 % here
    assert sum(est_n) / len(est_n) == pytest.approx(sigma2, rel=0.05)
    assert sum(est_ip) / len(est_ip) == pytest.approx(ip_var, rel=0.08)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 16, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _setup(dtype: torch.dtype, rank: int | None):
    torch.manual_seed(0)
    model = _Net().to(dtype)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(12, 2, 4, 4, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (12,), generator=gen)
    if rank is not None:
        x, y = x[rank * 6 : (rank + 1) * 6], y[rank * 6 : (rank + 1) * 6]
    return model, x, y


def _pool(backend: str, dtype: torch.dtype, inner: bool, rank: int | None) -> dict:
    model, x, y = _setup(dtype, rank)
    stats = REGISTRY[backend](model, F.cross_entropy, x, y, inner_products=inner, micro_batches=3)
    return _stats.pool(stats).as_dict()


def _pool_worker(rank: int, world: int, cases: list) -> list:
    calls = []
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counting  # this spawned process only
    out = []
    for case in cases:
        calls.clear()
        out.append((_pool(*case, rank=rank), len(calls)))
    return out


def test_pool_two_ranks_one_collective():
    cases = [
        ("hooks", torch.float64, False),
        ("hooks", torch.float64, True),
        ("vmap", torch.float32, True),
        ("microbatch", torch.float64, True),
    ]
    results = run_distributed(_pool_worker, 2, cases, timeout=120)
    assert results[0] == results[1] or all(
        a[0] == pytest.approx(b[0], nan_ok=True) for a, b in zip(*results)
    )
    for (backend, dtype, inner), (got, collectives) in zip(cases, results[0]):
        assert collectives == (2 if inner else 1), (backend, inner)
        if backend == "microbatch":  # 3 micro-batches of 2 per rank: 6 units of 2 samples
            ref = _pool_micro_reference(dtype)
        else:
            ref = _pool(backend, dtype, inner, rank=None)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert got["world_size"] == 2
        for key in KEYS:
            if not inner and key == "inner_sq_sum":
                assert got[key] != got[key]  # NaN: not computed, not communicated
                continue
            assert got[key] == pytest.approx(ref[key], rel=tol), (backend, key)


def _pool_micro_reference(dtype: torch.dtype) -> dict:
    """Single process: the 6 micro-batches of both ranks as given units."""
    from local_opt.backends.microbatch import micro_batch_grads, stats_from_micro_batch_grads

    model, x, y = _setup(dtype, None)
    grads = []
    for r in range(2):
        g, m = micro_batch_grads(model, F.cross_entropy, x[r * 6 : r * 6 + 6], y[r * 6 : r * 6 + 6], 3)
        grads += g
    return _stats.pool(stats_from_micro_batch_grads(grads, m)).as_dict()
