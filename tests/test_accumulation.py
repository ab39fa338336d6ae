"""Gradient accumulation with unequal micro-batches: the recorder weights them by their sizes.

Reference: per-sample gradients by an autograd loop on a float64 copy of the model; the
micro-batch means, the batch mean and the unbiased weighted variances of ``local_opt._stats``
computed from them by hand. A Monte Carlo over random splits checks that those formulas are
unbiased for the per-sample variance (and that the equal-weight formula is not).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from local_opt import LocalOptimizer, VarianceTest
from samplers import AdaptiveBatchSampler, micro_batches

B, MB = 10, 3  # batch 10 in micro-batches of at most 3: sizes 3, 3, 3, 1
SIZES = [3, 3, 3, 1]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def make_data(seed: int, n: int = B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def per_sample_grads(model: nn.Module, x, y) -> torch.Tensor:
    """(n, P) float64 per-sample gradients, one autograd call per sample on a float64 copy."""
    m64 = copy.deepcopy(model).double()
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(m64(x[i : i + 1].double()), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, m64.parameters())]))
    return torch.stack(rows)


def weighted_variances(g: torch.Tensor, sizes: list[int]) -> dict[str, float]:
    """The unbiased variances for unequal micro-batches, from per-sample gradients (float64)."""
    units = torch.stack([c.mean(0) for c in g.split(sizes)])
    n = torch.tensor(sizes, dtype=torch.float64)
    k, mean = len(sizes), g.mean(0)
    g2 = mean.dot(mean)
    ip = units @ mean
    orth = units - (ip / g2)[:, None] * mean
    return {
        "mean_sq_norm": float(g2),
        "norm_variance": float((n * (units - mean).pow(2).sum(1)).sum() / (k - 1)),
        "inner_product_variance": float((n * (ip - g2) ** 2).sum() / (k - 1)),
        "orthogonal_variance": float((n * orth.pow(2).sum(1)).sum() / (k - 1)),
    }


def accumulate(model, x, y, sizes) -> None:
    start = 0
    for n in sizes:
        xs, ys = x[start : start + n], y[start : start + n]
        (F.cross_entropy(model(xs), ys) * n / len(x)).backward()
        start += n


@pytest.mark.parametrize("test", ["norm", "inner_product", "augmented"])
def test_unequal_micro_batches_match_the_per_sample_float64_reference(test):
    x, y = make_data(0)
    model, plain = make_model(), make_model()
    accumulate(plain, x, y, SIZES)
    vt = VarianceTest(model, F.cross_entropy, test=test, eta=1.0, theta=1.0, nu=1.0)
    with vt.record_micro_batches(SIZES) as rec:
        accumulate(model, x, y, SIZES)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), plain.parameters()))
    vt.suggest_from_recorded(rec, B)
    s = vt.last_stats
    ref = weighted_variances(per_sample_grads(make_model(), x, y), SIZES)
    assert (s["count"], s["unit_size"], s["weight_sum"]) == (4, 1, B)
    keys = ["mean_sq_norm", "norm_variance"]
    if test != "norm":
        keys += ["inner_product_variance", "orthogonal_variance"]
    for key in keys:
        assert s[key] == pytest.approx(ref[key], rel=1e-4), key


def test_equal_sizes_as_a_list_equal_the_int_form():
    x, y = make_data(1, n=9)
    out = []
    for spec in ([3, 3, 3], 3):
        model = make_model()
        vt = VarianceTest(model, F.cross_entropy, test="augmented", eta=1.0, theta=1.0, nu=1.0)
        with vt.record_micro_batches(spec, grad_scale=None) as rec:
            if isinstance(spec, int):  # the int form's default: (mean loss / k)
                for xs, ys in zip(x.chunk(3), y.chunk(3)):
                    (F.cross_entropy(model(xs), ys) / 3).backward()
            else:
                accumulate(model, x, y, spec)
        vt.suggest_from_recorded(rec, 9)
        out.append(vt.last_stats)
    for key in ("mean_sq_norm", "norm_variance", "inner_product_variance", "orthogonal_variance"):
        assert out[0][key] == pytest.approx(out[1][key], rel=1e-5)


@pytest.mark.parametrize("sizes", [SIZES, [7, 1, 1, 1]])
def test_weighted_formula_is_unbiased_and_equal_weights_are_not(sizes):
    """Over random splits of one batch into micro-batches of the given sizes, the weighted norm
    variance averages to the per-sample variance S² = Σ‖g_i − ḡ‖² / (N − 1). Equal weights with
    a unit size of N // K (what ``record_micro_batches(len(x) // k)`` assumed) are off by 57 %
    for sizes 7, 1, 1, 1 (for 3, 3, 3, 1 they happen to be close: 2 × mean(1/n_l) = 1)."""
    g = per_sample_grads(make_model(), *make_data(2))
    s2 = float((g - g.mean(0)).pow(2).sum() / (B - 1))
    gen = torch.Generator().manual_seed(0)
    perms = torch.stack([torch.randperm(B, generator=gen) for _ in range(20000)])
    shuffled = g[perms]  # (T, N, P)
    units = torch.stack([c.mean(1) for c in shuffled.split(sizes, dim=1)], 1)  # (T, K, P)
    n = torch.tensor(sizes, dtype=torch.float64)
    k = len(sizes)
    weighted = ((units - g.mean(0)).pow(2).sum(2) * n).sum(1) / (k - 1)
    naive = (B // k) * (units - units.mean(1, keepdim=True)).pow(2).sum(2).sum(1) / (k - 1)
    assert float(weighted.mean()) == pytest.approx(s2, rel=0.03)
    if sizes != SIZES:
        assert float(naive.mean()) / s2 - 1 > 0.3


def test_size_mismatches_are_refused():
    x, y = make_data(0)
    model = make_model()
    vt = VarianceTest(model, F.cross_entropy, eta=1.0)
    # the int form with x.chunk(4) on 10 samples: the model saw 3, 3, 3, 1
    with vt.record_micro_batches(B // 4) as rec:
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            (F.cross_entropy(model(xs), ys) / 4).backward()
    with pytest.raises(ValueError, match=r"micro_batch_size.*\[3, 3, 3, 1\]"):
        vt.suggest_from_recorded(rec, B)
    model.zero_grad()
    with vt.record_micro_batches([3, 3, 4]) as rec:
        accumulate(model, x, y, SIZES)
    with pytest.raises(ValueError, match="micro_batch_size: 3 sizes"):
        vt.suggest_from_recorded(rec, B)
    for bad, exc in (([], ValueError), ([3, 0], ValueError), ([3, 2.5], TypeError)):
        with pytest.raises(exc, match="micro_batch_size"):
            vt.record_micro_batches(bad)


def _readme_snippet() -> str:
    """The record_micro_batches block (moved from the README to docs/design.md; the README shows
    VarianceTest.accumulate, tested in test_accumulate.py)."""
    text = (Path(__file__).parent.parent / "docs" / "design.md").read_text()
    block = re.search(r"```python\n(chunks = micro_batches.*?)```", text, re.S)
    assert block is not None, "the accumulation snippet is missing from docs/design.md"
    return block.group(1)


@pytest.mark.parametrize("batch_size,micro_batch_size", [(10, 3), (8, 4)])
def test_readme_accumulation_snippet_as_written(batch_size, micro_batch_size):
    """The README's snippet, run as written, with b % micro_batch_size != 0 and == 0."""
    snippet = compile(_readme_snippet(), "README.md", "exec")
    model = make_model()
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2)
    test = VarianceTest(model, F.cross_entropy, eta=1.0, max_batch_size=10**6)
    sampler = AdaptiveBatchSampler(range(1000), batch_size, num_replicas=1, rank=0)
    env = dict(F=F, contextlib=contextlib, micro_batches=micro_batches, model=model, opt=opt,
               test=test, sampler=sampler, micro_batch_size=micro_batch_size)
    for step in range(4):
        x, y = make_data(10 + step, n=batch_size)
        expected_grad = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        ref = weighted_variances(per_sample_grads(model, x, y),
                                 [len(c) for c in x.split(micro_batch_size)])
        grads: list[torch.Tensor] = []
        h = opt.register_step_pre_hook(
            lambda *_, out=grads: out.extend(p.grad.clone() for p in model.parameters())
        )
        opt.zero_grad()  # the loop around the snippet (README's quick start) does
        exec(snippet, dict(env, x=x, y=y))
        h.remove()
        for got, exp in zip(grads, expected_grad, strict=True):  # .grad: the batch's mean gradient
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
        assert opt.synced == (step % 2 == 1)
        if opt.synced:
            s = test.last_stats
            assert s["norm_variance"] == pytest.approx(ref["norm_variance"], rel=1e-4)
            assert sampler.batch_size == s["suggested"]
            assert s["suggested"] >= math.ceil(ref["norm_variance"] / ref["mean_sq_norm"]) or \
                s["suggested"] == batch_size


def test_grad_scale_with_sizes_is_a_factor_on_top_of_the_size_weights():
    """A GradScaler-like factor S on every micro-batch loss (mean_loss * S * n_l / N), declared as
    grad_scale=S, gives the statistics of the unscaled step."""
    x, y = make_data(3)
    out = []
    for scale in (None, 1024.0):
        model = make_model()
        vt = VarianceTest(model, F.cross_entropy, test="augmented", eta=1.0, theta=1.0, nu=1.0)
        with vt.record_micro_batches(SIZES, grad_scale=scale) as rec:
            start = 0
            for n in SIZES:
                loss = F.cross_entropy(model(x[start : start + n]), y[start : start + n])
                (loss * (scale or 1.0) * n / B).backward()
                start += n
        vt.suggest_from_recorded(rec, B)
        out.append(vt.last_stats)
    for key in ("mean_sq_norm", "norm_variance", "inner_product_variance", "orthogonal_variance"):
        assert out[1][key] == pytest.approx(out[0][key], rel=1e-5), key
