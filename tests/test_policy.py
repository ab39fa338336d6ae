"""The batch-size policy (local_opt/policy.py, VarianceTest's decision) and the LR coupling.

References are closed forms: per-sample gradients of least squares written out by hand, moving
averages as explicit weighted sums, the published test formulas with torch.var.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from local_opt import LRCoupling, VarianceTest
from local_opt._stats import raw_batch_sizes
from local_opt.policy import (
    EMA,
    adascale_gain,
    clip_ratio,
    debiased_sq_norm,
    next_batch_size,
    robust_sq_norm,
)

D = 6


def least_squares(seed: int = 0, n: int = 16, noise: float = 1.0):
    """A float64 linear model, a batch, and its per-sample gradients in closed form."""
    torch.manual_seed(0)
    model = nn.Linear(D, 1, bias=False).double()
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    y = x @ torch.linspace(-1, 1, D, dtype=torch.float64)[:, None] + noise * torch.randn(
        n, 1, generator=gen, dtype=torch.float64
    )
    return model, x, y


def per_sample_grads(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g_i = 2 (w·x_i - y_i) x_i: the gradient of F.mse_loss on sample i alone."""
    r = x @ model.weight.detach()[0] - y[:, 0]
    return 2 * r[:, None] * x


def published(units: torch.Tensor, eta: float, theta: float, nu: float) -> dict:
    """The paper's b' from one batch of per-sample gradients (torch.var, divides by N - 1)."""
    gbar = units.mean(0)
    g2 = float(gbar.dot(gbar))
    ip = units @ gbar
    orth = units - (ip / g2)[:, None] * gbar
    norm = float(units.var(0).sum()) / (eta**2 * g2)
    inner = float(ip.var()) / (theta**2 * g2**2)
    orth_b = float(orth.var(0).sum()) / (nu**2 * g2)
    return {"norm": norm, "inner_product": inner, "augmented": max(inner, orth_b)}


# ------------------------------------------------------------------ pure functions


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_ema_is_the_bias_corrected_weighted_mean(beta):
    xs = [3.0, -1.0, 10.0, 0.5, 7.0]
    ema = EMA(beta)
    assert math.isnan(ema.value)
    for t in range(1, len(xs) + 1):
        got = ema.update(xs[t - 1])
        w = [beta ** (t - i) for i in range(1, t + 1)]  # weights of x_1 … x_t
        assert got == pytest.approx(sum(a * b for a, b in zip(w, xs)) / sum(w), rel=1e-12)
    other = EMA(beta)
    other.load_state_dict(ema.state_dict())
    assert other.update(2.0) == ema.update(2.0)
    if beta == 0.0:
        assert ema.value == 2.0  # no smoothing: the last observation, exactly
    with pytest.raises(ValueError, match="beta"):
        EMA(1.0)


def test_debiased_sq_norm_is_unbiased_and_floored():
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    scale = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    n, trials = 8, 20000
    g = mean + scale * torch.randn(trials, n, 4, generator=gen, dtype=torch.float64)
    gbar = g.mean(1)
    g2 = (gbar**2).sum(1)
    v = g.var(1).sum(1)  # unbiased trace of the covariance, per trial
    est = g2 - v / n  # the estimator without its floor: unbiased for |G|^2
    true = float(mean.dot(mean))
    assert float(g2.mean()) == pytest.approx(true + float((scale**2).sum()) / n, rel=0.02)
    assert float(est.mean()) == pytest.approx(true, abs=4 * float(est.std()) / trials**0.5)
    assert debiased_sq_norm(2.0, 8.0, 8, 0.01) == 1.0
    assert debiased_sq_norm(2.0, 40.0, 8, 0.01) == 0.02  # noise dominates: the floor


def test_clip_ratio_and_robust_sq_norm():
    assert clip_ratio(100.0, 10.0, 4.0) == 40.0
    assert clip_ratio(1.0, 10.0, 4.0) == 2.5
    assert clip_ratio(12.0, 10.0, 4.0) == 12.0
    assert clip_ratio(100.0, math.nan, 4.0) == 100.0  # no average yet
    assert clip_ratio(100.0, 10.0, None) == 100.0
    # noise scale 50 / 0.5 = 100 against an average of 10: |G|^2 raised to 50 / 40
    assert robust_sq_norm(50.0, 0.5, 10.0, 4.0) == 50.0 / 40.0
    assert robust_sq_norm(50.0, 5.0, 10.0, 4.0) == 5.0  # within the ratio
    assert robust_sq_norm(1e-6, 1e-7, 10.0, 4.0) == 1e-7  # a smaller scale alone is no outlier


@pytest.mark.parametrize(
    "b, raw, kwargs, out",
    [
        (8, 30.2, {}, 31),  # the paper: ceil
        (8, 3.0, {}, 8),  # never shrinks
        (500, 3.0, {"cap": 20}, 20),  # the cap wins over the current batch size
        (500, 900.0, {"cap": 20, "growth": 2.0, "hysteresis": 0.05}, 20),
        (8, 30.2, {"growth": 2.0}, 16),  # growth limit
        (1, 30.2, {"growth": 1.5}, 2),  # at least one more
        (8, 8.3, {"hysteresis": 0.05}, 8),  # a 4 % step does not move the batch
        (8, 8.5, {"hysteresis": 0.05}, 9),  # a 6 % step does
        (8, 9.5, {"multiple_of": 8}, 16),  # rounded up to a multiple
        (8, 9.5, {"multiple_of": 8, "growth": 1.5}, 16),  # down would not move: up wins
        (16, 30.0, {"multiple_of": 8, "growth": 1.75}, 24),  # up breaks the limit: round down
        (8, 100.0, {"multiple_of": 8, "cap": 60}, 60),  # the cap wins over the rounding
    ],
)
def test_next_batch_size(b, raw, kwargs, out):
    assert next_batch_size(b, raw, **kwargs) == out


def test_next_batch_size_defaults_are_the_paper_rule():
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        b = int(torch.randint(1, 200, (1,), generator=gen))
        raw = float(torch.rand(1, generator=gen)) * 400
        cap = int(torch.randint(1, 300, (1,), generator=gen))
        assert next_batch_size(b, raw, cap=cap) == min(cap, max(b, math.ceil(raw)))


def test_adascale_gain_closed_form():
    assert adascale_gain(3.0, 1.0, 4.0) == pytest.approx(4.0 / (0.75 + 1.0))
    assert adascale_gain(1e9, 1.0, 4.0) == pytest.approx(4.0, rel=1e-8)  # noise: linear
    assert adascale_gain(1e-9, 1.0, 4.0) == pytest.approx(1.0, rel=1e-8)  # no noise: none
    assert adascale_gain(3.0, 1.0, 1.0) == 1.0


# ------------------------------------------------------------------ VarianceTest's decision


@pytest.mark.parametrize("test", ["norm", "inner_product", "augmented"])
def test_paper_policy_is_the_published_formula_bit_for_bit(test):
    model, x, y = least_squares()
    units = per_sample_grads(model, x, y)
    vt = VarianceTest(model, F.mse_loss, test=test, policy="paper")
    assert (vt.eta, vt.theta, vt.nu) == (0.1, 0.9, 5.84)  # the paper's defaults
    for b in (4, 16, 10_000):
        out = vt.suggest(x, y, b)
        raw = vt.last_stats["raw"]
        assert raw == pytest.approx(published(units, 0.1, 0.9, 5.84)[test], rel=1e-10)
        # bit for bit the formulas of _stats (raw_batch_sizes) and the rule min(cap, max(b, ceil))
        again = raw_batch_sizes(_pooled(vt), 0.1, 0.9, 5.84)[f"raw_{test}"]
        assert raw == again and out == max(b, math.ceil(raw))


def _pooled(vt: VarianceTest):
    from local_opt._stats import PooledStats

    keys = PooledStats.__dataclass_fields__
    return PooledStats(**{k: vt.last_stats[k] for k in keys})


def test_paper_policy_refuses_the_smoothed_knobs():
    model, _, _ = least_squares()
    for knob in ("smoothing", "growth", "hysteresis", "outlier_ratio", "min_dof"):
        with pytest.raises(RuntimeError, match=knob):
            VarianceTest(model, F.mse_loss, policy="paper", **{knob: 0.5})
    for kwargs, match in [
        ({"policy": "adaptdl"}, "policy"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"growth": 1.0}, "growth"),
        ({"hysteresis": -0.1}, "hysteresis"),
        ({"outlier_ratio": 0.5}, "outlier_ratio"),
        ({"multiple_of": 0}, "multiple_of"),
        ({"min_dof": -1}, "min_dof"),
        ({"min_dof": 2.5}, "min_dof"),
    ]:
        with pytest.raises(ValueError, match=match):
            VarianceTest(model, F.mse_loss, **kwargs)


@pytest.mark.parametrize("test", ["norm", "inner_product", "augmented"])
def test_smoothed_policy_matches_moving_averages_of_debiased_estimates(test):
    """Three rounds on different batches vs explicit weighted means of the closed forms."""
    model, _, _ = least_squares()
    beta, eta, theta, nu = 0.7, 1.3, 0.8, 2.0
    vt = VarianceTest(
        model, F.mse_loss, test=test, smoothing=beta, eta=eta, theta=theta, nu=nu,
        outlier_ratio=math.inf, growth=math.inf, hysteresis=0.0,
    )  # fmt: skip
    obs = []
    for r in range(3):
        _, x, y = least_squares(seed=r, noise=0.3)
        units = per_sample_grads(model, x, y)
        n = units.shape[0]
        gbar = units.mean(0)
        g2, v = float(gbar.dot(gbar)), float(units.var(0).sum())
        ip = units @ gbar
        orth = units - (ip / g2)[:, None] * gbar
        obs.append(
            {
                "v": v,
                "g2": max(g2 - v / n, 0.01 * g2),
                "dir": float(ip.var()) / g2,
                "orth": float(orth.var(0).sum()),
            }
        )
        b = vt.suggest(x, y, 1)
        w = [beta ** (r - i) for i in range(r + 1)]

        def avg(key, w=w):
            return sum(wi * o[key] for wi, o in zip(w, obs)) / sum(w)

        want = {
            "norm": avg("v") / (eta**2 * avg("g2")),
            "inner_product": avg("dir") / (theta**2 * avg("g2")),
        }
        want["augmented"] = max(want["inner_product"], avg("orth") / (nu**2 * avg("g2")))
        s = vt.last_stats
        assert s["sq_norm_debiased"] == pytest.approx(obs[-1]["g2"], rel=1e-10)
        assert s["noise_scale"] == pytest.approx(avg("v") / avg("g2"), rel=1e-10)
        assert s["raw"] == pytest.approx(want[test], rel=1e-10)
        assert b == max(1, math.ceil(s["raw"]))


def test_smoothed_policy_clips_outliers_and_limits_growth():
    model, x, y = least_squares(noise=0.3)
    vt = VarianceTest(model, F.mse_loss, max_batch_size=1000)
    b = vt.suggest(x, y, 4)
    v1, g1 = vt.last_stats["smoothed_variance"], vt.last_stats["smoothed_sq_norm"]
    assert b <= 8  # growth limit 2x per round (default)
    # A round whose gradients nearly cancel (pairs with opposite residuals): its |G|^2 is
    # raised so that its noise scale is 4x the average's (defaults: outlier_ratio 4,
    # smoothing 0.9), then both averages move.
    w = model.weight.detach()[0]
    y_opposite = (2 * x @ w)[:, None] - y + 1e-3 * torch.randn_like(y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vt.suggest(torch.cat([x, x]), torch.cat([y, y_opposite]), b)
    s = vt.last_stats
    v2 = s["norm_variance"]
    assert v2 / s["sq_norm_debiased"] > 4 * v1 / g1  # an outlier indeed
    g2 = v2 / (4 * v1 / g1)
    assert s["smoothed_variance"] == pytest.approx((0.09 * v1 + 0.1 * v2) / 0.19, rel=1e-12)
    assert s["smoothed_sq_norm"] == pytest.approx((0.09 * g1 + 0.1 * g2) / 0.19, rel=1e-12)
    # Gradients 10^4 times smaller with the same noise scale (x, y scaled by 0.01): no clip,
    # the averaged noise scale does not move although each average does.
    vt = VarianceTest(model, F.mse_loss)
    vt.suggest(x, y, 4)
    ns = vt.last_stats["noise_scale"]
    vt.suggest(0.01 * x, 0.01 * y, 4)
    assert vt.last_stats["noise_scale"] == pytest.approx(ns, rel=1e-9)
    assert vt.last_stats["smoothed_variance"] == pytest.approx(0.09 / 0.19 * v1, rel=1e-6)


def test_cap_always_wins():
    """Zero gradient, skipped rounds and ordinary rounds: never above max_batch_size."""
    model = nn.Linear(4, 1).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.zeros(8, 1, dtype=torch.float64)  # every gradient vanishes
    for policy in ("smoothed", "paper"):
        vt = VarianceTest(model, F.mse_loss, max_batch_size=20, policy=policy)
        with pytest.warns(RuntimeWarning, match="zero mean gradient"):
            assert vt.suggest(x, y, 500) == 20
        assert vt.last_stats["suggested"] == 20
        vt = VarianceTest(model, F.mse_loss, max_batch_size=20, policy=policy, every=2)
        with pytest.warns(RuntimeWarning):
            assert vt.suggest(x, y, 8) == 8
        assert vt.suggest(x, y, 500) == 20  # a skipped round
    model, x, y = least_squares()
    for policy in ("smoothed", "paper"):
        vt = VarianceTest(model, F.mse_loss, max_batch_size=20, policy=policy, every=2)
        assert vt.suggest(x, y, 500) == 20
        assert vt.suggest(x, y, 500) == 20


def test_state_dict_round_trip_is_exact_and_weights_only():
    model, _, _ = least_squares()
    a = VarianceTest(model, F.mse_loss, max_batch_size=10_000)
    b_a = 2
    for r in range(3):
        _, x, y = least_squares(seed=r, noise=0.5)
        b_a = a.suggest(x, y, b_a)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = VarianceTest(model, F.mse_loss, max_batch_size=10_000)
    b.load_state_dict(state)
    assert b.noise_estimates() == a.noise_estimates()
    b_b = b_a
    for r in range(3, 6):
        _, x, y = least_squares(seed=r, noise=0.5)
        b_a, b_b = a.suggest(x, y, b_a), b.suggest(x, y, b_b)
        assert b_a == b_b and a.last_stats["raw"] == b.last_stats["raw"]
    old = {"calls": 3, "last_suggestion": 4}  # saved before the moving averages existed
    b.load_state_dict(old)
    assert b.noise_estimates() is None
    with pytest.raises(ValueError, match="ema"):
        b.load_state_dict({**old, "ema": {"nope": {}}})


# ------------------------------------------------------------------ LR coupling


def test_lr_coupling_factors():
    assert LRCoupling("none", 4).factor(64) == 1.0
    assert LRCoupling("sqrt", 4).factor(64) == 4.0
    assert LRCoupling("linear", 4).factor(64) == 16.0
    model, x, y = least_squares(noise=0.5)
    vt = VarianceTest(model, F.mse_loss)
    c = LRCoupling("adascale", 4, variance_test=vt)
    assert c.factor(64) == 1.0  # no estimates yet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vt.suggest(x, y, 4)
    units = per_sample_grads(model, x, y)
    gbar = units.mean(0)
    v = float(units.var(0).sum())
    g2 = max(float(gbar.dot(gbar)) - v / len(units), 0.01 * float(gbar.dot(gbar)))
    want = (v / 4 + g2) / (v / 64 + g2)  # Johnson et al.'s r for S = 16 over base batch 4
    assert c.factor(64) == pytest.approx(want, rel=1e-10)
    assert 1.0 <= c.factor(64) <= 16.0 and c.factor(4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rule"):
        LRCoupling("cubic", 4)
    with pytest.raises(ValueError, match="variance_test"):
        LRCoupling("adascale", 4)
    with pytest.raises(ValueError, match="base_batch_size"):
        LRCoupling("sqrt", 0)


def test_lr_coupling_composes_with_lambda_lr():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    coupling, size = LRCoupling("sqrt", 4), {"b": 4}
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5**step * coupling.factor(size["b"])
    )
    opt.step()
    size["b"] = 16
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * 2.0)


# ------------------------------------------------------------------ BatchNorm in train mode


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _bn_setup(rank: int, b: int = 10):
    torch.manual_seed(0)
    model = _BNNet().double().train()
    gen = torch.Generator().manual_seed(50 + rank)
    x = torch.randn(b, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (b,), generator=gen)
    return model, x, y


def _bn_worker(rank: int, world: int) -> dict:
    model, x, y = _bn_setup(rank)
    out = {}
    for stats in ("worker", "backend"):
        vt = VarianceTest(model, F.cross_entropy, batch_statistics=stats, policy="paper", eta=1)
        vt.suggest(x, y, len(y))
        out[stats] = {k: vt.last_stats[k] for k in ("backend", "count", "norm_variance")}
    out["default"] = VarianceTest(model, F.cross_entropy).batch_statistics
    return out


def test_batchnorm_train_uses_the_workers_batch_gradients():
    """With batch statistics, the units are the workers' batch gradients (BatchNorm as trained)."""
    from dist_utils import run_distributed

    grads = []
    for rank in range(2):
        model, x, y = _bn_setup(rank)
        g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    # unbiased per-sample variance from M = 2 units of b = 10 samples: b * ||G0 - G1||^2 / 2
    want = 10 * float((grads[0] - grads[1]).pow(2).sum()) / 2
    r0, r1 = run_distributed(_bn_worker, 2)
    for r in (r0, r1):
        assert r["worker"]["backend"] == "worker" and r["worker"]["count"] == 2
        assert r["worker"]["norm_variance"] == pytest.approx(want, rel=1e-10)
        assert r["backend"]["backend"] == "hooks"  # the backend's own per-sample contributions
        assert r["default"] == "worker"
    # One process: no second worker, the backend's own definition.
    model, x, y = _bn_setup(0)
    vt = VarianceTest(model, F.cross_entropy)
    vt.suggest(x, y, 10)
    assert vt.last_stats["backend"] == "hooks"
    assert VarianceTest(model, F.cross_entropy, policy="paper").batch_statistics == "backend"
    with pytest.raises(ValueError, match="batch_statistics"):
        VarianceTest(model, F.cross_entropy, batch_statistics="sample")


def _two_unit_grads(mean0: float, gen: torch.Generator) -> list[list[torch.Tensor]]:
    """Two micro-batch gradients around a mean (mean0, 0, ..., 0): one degree of freedom."""
    mean = torch.zeros(D, dtype=torch.float64)
    mean[0] = mean0
    noise = torch.randn(D, generator=gen, dtype=torch.float64)
    return [[(mean + noise)[None, :]], [(mean - noise)[None, :]]]


def test_smoothed_policy_waits_for_enough_degrees_of_freedom():
    """Units with one degree of freedom a round (M = 2 worker gradients, or 2 micro-batches): the
    batch does not grow, and no round is clipped, before the variance rests on 8 of them."""
    model = nn.Linear(D, 1, bias=False).double()
    _MIN_DOF = VarianceTest(model, F.mse_loss).min_dof
    assert _MIN_DOF == 8
    runs = {}
    for first in (1e-3, 3.0):  # round 1 an outlier (gradients that nearly cancel), or not
        gen = torch.Generator().manual_seed(0)
        vt = VarianceTest(model, F.mse_loss, max_batch_size=10_000)
        sizes, noise_scales = [], []
        for r in range(_MIN_DOF + 2):
            grads = _two_unit_grads(first if r == 0 else 3.0, gen)
            sizes.append(vt.suggest_from_micro_batch_grads(grads, 4, 4))
            noise_scales.append(vt.last_stats["noise_scale"])
            if r + 1 < _MIN_DOF:
                assert vt.last_stats["reason"].startswith("warming up")
        assert sizes[: _MIN_DOF - 1] == [4] * (_MIN_DOF - 1)
        runs[first] = noise_scales
    outlier, clean = runs[1e-3], runs[3.0]
    assert outlier[0] > 1000 * clean[0]
    # Not clipped against round 1's average: by round 8 the ratio of the averages has forgotten
    # the outlier (its weight in the |G|^2 average is ~8 %). A clip anchored to round 1 would
    # have held every later round's noise scale at >= 1/4 of the average's.
    assert outlier[_MIN_DOF - 1] == pytest.approx(clean[_MIN_DOF - 1], rel=0.15)
    # Per-sample units (16 samples: 15 degrees of freedom) may grow in the first round.
    model, x, y = least_squares(noise=3.0)
    vt = VarianceTest(model, F.mse_loss, max_batch_size=10_000)
    assert vt.suggest(x, y, 1) > 1
    state = vt.state_dict()
    assert state["dof"] == 15
    fresh = VarianceTest(model, F.mse_loss, max_batch_size=10_000)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    with pytest.raises(ValueError, match="dof"):
        fresh.load_state_dict({**state, "dof": -1})
    # min_dof=0 decides (and clips) from the first round: the policy before the warm-up existed.
    gen = torch.Generator().manual_seed(0)
    vt = VarianceTest(model, F.mse_loss, max_batch_size=10_000, min_dof=0)
    assert vt.suggest_from_micro_batch_grads(_two_unit_grads(3.0, gen), 4, 4) > 4
