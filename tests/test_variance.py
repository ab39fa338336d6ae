"""VarianceTest against brute-force per-sample autograd loops, single process and pooled on gloo.

The references here never use ``local_opt._stats``: per-sample gradients come from a Python loop
of ``torch.autograd.grad`` (or closed forms), and the variances from ``torch.var`` (unbiased) on
the stacked gradients.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dist_utils import run_distributed

from local_opt import _stats, backends
from local_opt.backends.microbatch import micro_batch_grads, microbatch_stats
from local_opt.backends.vmap import per_sample_grads, uses_batch_statistics, vmap_stats
from local_opt.variance import VarianceTest

TESTS = ("norm", "inner_product", "augmented")
B = 12  # per-rank batch size
RTOL = 1e-9  # float64 models: statistics agree to rounding


class Net(nn.Module):
    """Conv, GroupNorm, BatchNorm, Linear, LayerNorm (2949 parameters), inputs 2x8x8."""

    def __init__(self, p_drop: float = 0.0) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(128, 16)
        self.ln = nn.LayerNorm(16)
        self.drop = nn.Dropout(p_drop)
        self.out = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn(self.c1(x)))
        x = F.relu(self.bn(self.c2(x)))
        return self.out(self.drop(F.relu(self.ln(self.fc(x.flatten(1))))))


def make_net(p_drop: float = 0.0, dtype: torch.dtype = torch.float64) -> Net:
    torch.manual_seed(0)
    net = Net(p_drop)
    with torch.no_grad():  # non-trivial running statistics for BatchNorm in eval mode
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.to(dtype).eval()


def make_data(rank: int, n: int = B, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(n, 2, 8, 8, generator=gen, dtype=dtype)
    y = torch.randint(0, 5, (n,), generator=gen)
    return x, y


def brute_force_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rows g_i = grad of F.cross_entropy(model(x_i[None]), y_i[None]), one autograd call each."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows).double()


def brute_force_batch_coupled(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rows g_i = grad of sample i's term of the batch loss (one forward of the whole batch)."""
    model = copy.deepcopy(model)  # its forward in train mode moves running statistics
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    losses = [F.cross_entropy(out[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])]
    rows = []
    for loss in losses:
        g = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows).double()


def reference(
    units: torch.Tensor, world: int, eta=1.0, theta=1.0, nu=1.0, unit_size=1, policy="paper"
) -> dict:
    """Variances and raw b' straight from stacked units with torch.var (divides by n - 1).

    The published formulas: what ``VarianceTest(policy="paper")`` computes.
    """
    assert policy == "paper"
    gbar = units.mean(0)
    g2 = gbar.dot(gbar)
    ip = units @ gbar
    orth = units - (ip / g2)[:, None] * gbar
    v_norm = unit_size * units.var(0, unbiased=True).sum()
    v_ip = unit_size * ip.var(unbiased=True)
    v_orth = unit_size * orth.var(0, unbiased=True).sum()
    out = {
        "mean_sq_norm": g2,
        "norm_variance": v_norm,
        "inner_product_variance": v_ip,
        "orthogonal_variance": v_orth,
        "raw_norm": v_norm / (world * eta**2 * g2),
        "raw_inner_product": v_ip / (world * theta**2 * g2**2),
        "raw_orthogonality": v_orth / (world * nu**2 * g2),
    }
    out = {k: float(v) for k, v in out.items()}
    out["raw_augmented"] = max(out["raw_inner_product"], out["raw_orthogonality"])
    return out


def expected(raw: float, batch_size: int, cap: int | None = None) -> int:
    b = max(batch_size, math.ceil(raw))
    return b if cap is None else min(cap, b)


def pick_constants(ref1: dict, batch_size: int) -> dict:
    """eta, theta, nu such that the raw b' are 3.3b (norm), 2.2b (ip), 2.7b (orthogonality).

    With ``policy="paper"``: the published formulas, which these tests check bit for bit.
    """
    return {
        "policy": "paper",
        "eta": math.sqrt(ref1["raw_norm"] / (3.3 * batch_size)),
        "theta": math.sqrt(ref1["raw_inner_product"] / (2.2 * batch_size)),
        "nu": math.sqrt(ref1["raw_orthogonality"] / (2.7 * batch_size)),
    }


RAW_KEYS = {
    "norm": ("raw_norm",),
    "inner_product": ("raw_inner_product",),
    "augmented": ("raw_inner_product", "raw_orthogonality", "raw_augmented"),
}


@pytest.fixture(scope="module")
def setup():
    model = make_net()
    x, y = make_data(0)
    grads = brute_force_grads(model, x, y)
    consts = pick_constants(reference(grads, 1), B)
    return model, x, y, grads, consts


# --------------------------------------------------------------------------- single process


@pytest.mark.parametrize("backend", ["vmap", "hooks", "auto"])
@pytest.mark.parametrize("test", TESTS)
def test_matches_brute_force(setup, test, backend):
    model, x, y, grads, consts = setup
    ref = reference(grads, 1, **consts)
    vt = VarianceTest(model, F.cross_entropy, test=test, backend=backend, chunk_size=5, **consts)
    b = vt.suggest(x, y, B)
    s = vt.last_stats
    # "auto" picks the hooks backend: it covers conv, GroupNorm, BatchNorm, Linear, LayerNorm
    assert s["backend"] == ("hooks" if backend == "auto" else backend)
    assert s["count"] == B and s["world_size"] == 1
    for key in ("mean_sq_norm", "norm_variance", *RAW_KEYS[test]):
        assert s[key] == pytest.approx(ref[key], rel=RTOL), key
    assert s["raw"] == pytest.approx(ref[f"raw_{test}"], rel=RTOL)
    assert isinstance(b, int) and b == expected(ref[f"raw_{test}"], B) > B
    assert s["suggested"] == b and s["reason"] is None


def test_float32_model_close_to_float64_reference(setup):
    _, x, y, grads, consts = setup
    model32 = make_net(dtype=torch.float32)
    ref = reference(grads, 1, **consts)
    vt = VarianceTest(model32, F.cross_entropy, test="augmented", **consts)
    vt.suggest(x.float(), y, B)
    for key in ("norm_variance", "inner_product_variance", "orthogonal_variance", "raw_augmented"):
        assert vt.last_stats[key] == pytest.approx(ref[key], rel=1e-4), key


def test_cap_and_monotonicity(setup):
    model, x, y, grads, consts = setup
    raw = reference(grads, 1, **consts)["raw_norm"]  # about 3.3 * B
    vt = VarianceTest(model, F.cross_entropy, max_batch_size=B + 5, **consts)
    assert vt.suggest(x, y, B) == B + 5  # capped
    vt = VarianceTest(model, F.cross_entropy, max_batch_size=10_000, **consts)
    assert vt.suggest(x, y, B) == math.ceil(raw)
    # Never below the current batch size: the test asks for ~40 but we already use 500.
    assert vt.suggest(x, y, 500) == 500
    assert vt.last_stats["raw"] < 500
    # The cap wins over a current batch size above it.
    vt = VarianceTest(model, F.cross_entropy, max_batch_size=20, **consts)
    assert vt.suggest(x, y, 500) == 20


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["training"] == b["training"] and a["requires_grad"] == b["requires_grad"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for k in a["grad"]:
        assert (a["grad"][k] is None) == (b["grad"][k] is None), k
        if a["grad"][k] is not None:
            assert torch.equal(a["grad"][k], b["grad"][k]), k


@pytest.mark.parametrize("backend", ["vmap", "microbatch"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_untouched(backend, mode):
    model = make_net(p_drop=0.2)
    model.train(mode == "train")
    model.out.eval()  # a mixed-mode model: this flag must survive too
    model.c1.bias.requires_grad_(False)  # a frozen parameter
    model.fc.weight.grad = torch.randn_like(model.fc.weight)  # one .grad set, the others None
    model.bn.num_batches_tracked.fill_(7)
    x, y = make_data(0)
    before = _snapshot(model)
    vt = VarianceTest(model, F.cross_entropy, test="augmented", backend=backend, micro_batches=3)
    b = vt.suggest(x, y, B)
    assert isinstance(b, int) and b >= B
    _assert_same(before, _snapshot(model))
    # The frozen parameter is left out of the statistics: the brute force without it agrees.
    if backend == "vmap" and mode == "eval":
        ref = reference(brute_force_grads(model, x, y), 1)
        assert vt.last_stats["norm_variance"] == pytest.approx(ref["norm_variance"], rel=RTOL)


@pytest.mark.parametrize("mode", ["eval", "train", "dropout"])
def test_chunking_and_second_pass_equivalence(mode):
    model = make_net(p_drop=0.3 if mode == "dropout" else 0.0)
    if mode == "train":
        model.train()  # BatchNorm uses batch statistics: the batch-coupled path
    elif mode == "dropout":
        model.drop.train()  # random per-sample masks: pass two must replay pass one's
    assert uses_batch_statistics(model) == (mode == "train")
    x, y = make_data(0, n=7)
    results = []
    for chunk_size, store_bytes in [(1, 2**30), (3, 0), (None, 0), (None, 2**30)]:
        if mode == "dropout":
            torch.manual_seed(123)  # the same masks for every configuration
        stats = vmap_stats(
            model, F.cross_entropy, x, y, chunk_size=chunk_size, store_bytes=store_bytes
        )
        results.append(_stats.pool(stats))
    first = results[0]
    for other in results[1:]:
        for key in ("count", "mean_sq_norm", "sq_norm_sum", "inner_sq_sum"):
            assert getattr(other, key) == pytest.approx(getattr(first, key), rel=1e-12), key
    if mode == "dropout":  # and the masks really were random: another seed differs
        torch.manual_seed(321)
        other = _stats.pool(vmap_stats(model, F.cross_entropy, x, y, chunk_size=None))
        assert other.sq_norm_sum != pytest.approx(first.sq_norm_sum, rel=1e-6)


def test_batchnorm_train_definition():
    model = make_net().train()
    x, y = make_data(0)
    before = _snapshot(model)
    per_sample = per_sample_grads(model, F.cross_entropy, x, y, chunk_size=5)
    flat = torch.cat([g.reshape(B, -1) for g in per_sample], dim=1)
    # The rows of the Jacobian of the per-sample losses of one batched forward ...
    assert torch.allclose(flat, brute_force_batch_coupled(model, x, y), rtol=1e-10, atol=1e-12)
    # ... whose mean is exactly the batch gradient training uses.
    copy_ = copy.deepcopy(model)
    batch_grad = torch.autograd.grad(F.cross_entropy(copy_(x), y), list(copy_.parameters()))
    batch_grad = torch.cat([g.reshape(-1) for g in batch_grad])
    assert torch.allclose(flat.mean(0), batch_grad, rtol=1e-10, atol=1e-13)
    # It differs from the single-sample forward, which has no batch statistics to use.
    assert not torch.allclose(flat, brute_force_grads(make_net(), x, y), atol=1e-3)
    # And VarianceTest runs on it, matching the reference, without moving running statistics.
    ref1 = reference(flat, 1)
    consts = pick_constants(ref1, B)
    ref = reference(flat, 1, **consts)
    for test in TESTS:
        vt = VarianceTest(model, F.cross_entropy, test=test, backend="vmap", chunk_size=4, **consts)
        assert vt.suggest(x, y, B) == expected(ref[f"raw_{test}"], B)
        assert vt.last_stats["raw"] == pytest.approx(ref[f"raw_{test}"], rel=RTOL)
    _assert_same(before, _snapshot(model))


def test_batchnorm_without_running_stats_is_batch_coupled():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)
    ).double()
    model.eval()  # still normalizes with batch statistics
    assert uses_batch_statistics(model)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    flat = torch.cat([g.reshape(6, -1) for g in per_sample_grads(model, F.cross_entropy, x, y)], 1)
    assert torch.allclose(flat, brute_force_batch_coupled(model, x, y), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- micro-batches


def _least_squares(d: int = 3, n: int = 6):
    torch.manual_seed(5)
    model = nn.Linear(d, 1, bias=False).double()
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randn(n, dtype=torch.float64)

    def loss_fn(out, target):
        return F.mse_loss(out.squeeze(-1), target)

    # Closed form: loss_i = (x_i.w - y_i)^2, so g_i = 2 (x_i.w - y_i) x_i.
    w = model.weight.detach().reshape(-1)
    exact_grads = 2 * (x @ w - y)[:, None] * x
    return model, loss_fn, x, y, exact_grads


def _pair_partitions(n: int):
    """All partitions of range(n) into n/2 unordered pairs, as orderings (pairs consecutive)."""
    if n == 0:
        yield []
        return
    for j in range(1, n):
        rest = [i for i in range(1, n) if i != j]
        for tail in _pair_partitions(len(rest)):
            yield [0, j] + [rest[i] for i in tail]


@pytest.mark.parametrize("test", TESTS)
def test_microbatch_estimate_is_unbiased(test):
    model, loss_fn, x, y, exact_grads = _least_squares()
    ref = reference(exact_grads, 1)  # the exact per-sample statistics of the 6 samples
    orders = list(_pair_partitions(6))
    assert (
        len(orders) == 15
        and len({frozenset(map(frozenset, zip(o[::2], o[1::2]))) for o in orders}) == 15
    )
    keys = ("norm_variance", "inner_product_variance", "orthogonal_variance", f"raw_{test}")
    if test == "augmented":
        keys = keys[:-1] + ("raw_inner_product", "raw_orthogonality")
    sums = dict.fromkeys(keys, 0.0)
    singles = []
    for order in orders:
        vt = VarianceTest(
            model, loss_fn, test=test, backend="microbatch", micro_batches=3, eta=1, theta=1, nu=1,
            policy="paper",
        )
        vt.suggest(x[order], y[order], 6)
        s = vt.last_stats
        assert (s["count"], s["unit_size"]) == (3, 2)
        assert s["mean_sq_norm"] == pytest.approx(ref["mean_sq_norm"], rel=1e-12)
        for k in keys:
            sums[k] += s[k] / len(orders)
        singles.append(s["norm_variance"])
    for k in keys:  # averaged over every split: exactly the per-sample values
        assert sums[k] == pytest.approx(ref[k], rel=1e-10), k
    assert max(singles) - min(singles) > 1e-3 * ref["norm_variance"]  # single splits do vary


def test_microbatch_remainder_and_precomputed_grads():
    model = make_net()
    x, y = make_data(0, n=10)
    grads, m = micro_batch_grads(model, F.cross_entropy, x, y, micro_batches=4)
    assert (len(grads), m) == (4, 2)  # 10 = 4 * 2 + 2 left out
    params = list(model.parameters())
    for i, unit in enumerate(grads):  # each unit is an ordinary micro-batch mean gradient
        ref = torch.autograd.grad(
            F.cross_entropy(model(x[2 * i : 2 * i + 2]), y[2 * i : 2 * i + 2]), params
        )
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(unit, ref))
    stats = microbatch_stats(model, F.cross_entropy, x, y, micro_batches=4)
    assert (stats.count, stats.unit_size) == (4, 2)
    units = torch.stack([torch.cat([g.reshape(-1) for g in unit]) for unit in grads])
    ref = reference(units, 1, unit_size=2)
    for test in TESTS:
        ones = {"eta": 1.0, "theta": 1.0, "nu": 1.0, "policy": "paper"}
        a = VarianceTest(
            model, F.cross_entropy, test=test, backend="microbatch", micro_batches=4, **ones
        )
        b = VarianceTest(model, F.cross_entropy, test=test, **ones)
        ba = a.suggest(x, y, 10)
        bb = b.suggest_from_micro_batch_grads(grads, 2, 10)
        assert ba == bb and a.last_stats["raw"] == pytest.approx(b.last_stats["raw"], rel=1e-12)
        assert a.last_stats["raw"] == pytest.approx(ref[f"raw_{test}"], rel=RTOL)
        assert b.last_stats["backend"] == "microbatch_grads"


# --------------------------------------------------------------------------- degenerate cases


def test_zero_gradient_warns_and_keeps_batch_size():
    model = nn.Linear(4, 1).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.zeros(8, 1, dtype=torch.float64)  # model(x) == y: every gradient vanishes
    for backend in ("vmap", "microbatch"):
        for test in TESTS:
            vt = VarianceTest(model, F.mse_loss, test=test, backend=backend, micro_batches=2)
            with pytest.warns(RuntimeWarning, match="zero mean gradient"):
                assert vt.suggest(x, y, 8) == 8
            assert vt.last_stats["reason"] == "zero mean gradient"


def test_non_finite_warns_and_keeps_batch_size():
    model = make_net()
    x, y = make_data(0)
    x[3] = float("nan")
    for test in TESTS:
        vt = VarianceTest(model, F.cross_entropy, test=test)
        with pytest.warns(RuntimeWarning, match="non-finite"):
            b = vt.suggest(x, y, B)
        assert b == B and isinstance(b, int) and "non-finite" in vt.last_stats["reason"]


def test_single_sample_warns():
    model = make_net()
    x, y = make_data(0, n=1)
    vt = VarianceTest(model, F.cross_entropy)
    with pytest.warns(RuntimeWarning, match="fewer than two"):
        assert vt.suggest(x, y, 5) == 5


def test_every_runs_every_kth_call_without_communication(setup, monkeypatch):
    model, x, y, grads, consts = setup
    calls = []
    real_pool = _stats.pool

    def spy_pool(stats, group=None):
        calls.append("pool")
        return real_pool(stats, group)

    monkeypatch.setattr(_stats, "pool", spy_pool)
    vt = VarianceTest(model, F.cross_entropy, every=3, **consts)
    first = vt.suggest(x, y, B)
    assert first > B and calls == ["pool"]
    outs = [vt.suggest(x, y, B), vt.suggest(x, y, 200)]  # skipped rounds
    assert outs == [first, 200] and calls == ["pool"] and vt.last_stats["ran"] is False
    assert vt.suggest(x, y, B) == first and len(calls) == 2  # the 4th call runs


def test_state_dict_round_trip(setup):
    model, x, y, grads, consts = setup
    a = VarianceTest(model, F.cross_entropy, every=2, **consts)
    a.suggest(x, y, B)
    a.suggest(x, y, B)
    a.suggest(x[:6], y[:6], B)
    state = a.state_dict()
    assert state["calls"] == 3 and state["last_suggestion"] == a._last
    b = VarianceTest(model, F.cross_entropy, every=2, **consts)
    b.load_state_dict(state)
    for i in range(4):
        xi, yi = make_data(10 + i)
        assert a.suggest(xi, yi, B) == b.suggest(xi, yi, B)
        assert a.last_stats["ran"] == b.last_stats["ran"] == (i % 2 == 1)
    with pytest.raises(ValueError, match="calls"):
        b.load_state_dict({"calls": -1, "last_suggestion": None})
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"calls": 1})


def test_auto_prefers_registered_exact_backend(setup, monkeypatch):
    model, x, y, grads, consts = setup
    seen = []

    def fake(model, loss_fn, inputs, targets, **opts):
        seen.append(sorted(opts))
        return backends.REGISTRY["vmap"](model, loss_fn, inputs, targets, **opts)

    monkeypatch.setitem(backends.REGISTRY, "fake", fake)
    monkeypatch.setattr(backends, "AUTO_PREFERENCE", [("fake", lambda m: m is model)])
    assert backends.resolve("auto", model) == "fake"
    assert backends.resolve("auto", nn.Linear(2, 2)) == "vmap"
    vt = VarianceTest(model, F.cross_entropy, **consts)
    vt.suggest(x, y, B)
    assert vt.last_stats["backend"] == "fake" and seen
    VarianceTest(model, F.cross_entropy, backend="fake")  # a registered name is accepted


_MODEL = nn.Linear(2, 2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"test": "bogus"}, ValueError, "Invalid test"),
        ({"eta": 0.0}, ValueError, "Invalid eta"),
        ({"eta": -1.0}, ValueError, "Invalid eta"),
        ({"eta": float("inf")}, ValueError, "Invalid eta"),
        ({"eta": float("nan")}, ValueError, "Invalid eta"),
        ({"eta": "0.1"}, ValueError, "Invalid eta"),
        ({"theta": 0}, ValueError, "Invalid theta"),
        ({"nu": -2.0}, ValueError, "Invalid nu"),
        ({"max_batch_size": 0}, ValueError, "Invalid max_batch_size"),
        ({"max_batch_size": 2.5}, ValueError, "Invalid max_batch_size"),
        ({"max_batch_size": True}, ValueError, "Invalid max_batch_size"),
        ({"backend": "hooks?"}, ValueError, "Invalid backend"),
        ({"every": 0}, ValueError, "Invalid every"),
        ({"chunk_size": 0}, ValueError, "Invalid chunk_size"),
        ({"micro_batches": 1}, ValueError, "Invalid micro_batches"),
        ({"model": "not a module"}, TypeError, "Invalid model"),
        ({"loss_fn": 3}, TypeError, "Invalid loss_fn"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"model": _MODEL, "loss_fn": F.mse_loss}
    args.update(kwargs)
    model, loss_fn = args.pop("model"), args.pop("loss_fn")
    with pytest.raises(error, match=match):
        VarianceTest(model, loss_fn, **args)


def test_bad_suggest_arguments():
    vt = VarianceTest(_MODEL, F.mse_loss)
    x, y = torch.randn(4, 2), torch.randn(4, 2)
    for bad in (0, -3, 2.0, True, None):
        with pytest.raises(ValueError, match="Invalid batch_size"):
            vt.suggest(x, y, bad)
    with pytest.raises(ValueError, match="Invalid inputs/targets"):
        vt.suggest(x, y[:3], 4)
    with pytest.raises(ValueError, match="Invalid micro_batch_size"):
        vt.suggest_from_micro_batch_grads([[torch.zeros(2)]], 0, 4)
    assert vt.state_dict()["calls"] == 0  # rejected calls do not count


# --------------------------------------------------------------------------- pooled over ranks


def _pooled_worker(rank: int, world: int, consts: dict) -> dict:
    model = make_net()
    x, y = make_data(rank)
    out = {}
    for test in TESTS:
        vt = VarianceTest(model, F.cross_entropy, test=test, chunk_size=5, **consts)
        out[test] = (vt.suggest(x, y, B), vt.last_stats)
    vt = VarianceTest(
        model, F.cross_entropy, test="augmented", backend="microbatch", micro_batches=3, **consts
    )
    out["microbatch"] = (vt.suggest(x, y, B), vt.last_stats)
    model.train()  # the vmap backend's definition (Jacobian rows) is the reference's
    vt = VarianceTest(model, F.cross_entropy, test="augmented", backend="vmap", **consts)
    out["bn_train"] = (vt.suggest(x, y, B), vt.last_stats)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_pooled_over_ranks_matches_concatenated_brute_force(world):
    model = make_net()
    data = [make_data(r) for r in range(world)]
    grads = torch.cat([brute_force_grads(model, x, y) for x, y in data])
    consts = pick_constants(reference(grads, world), B)
    ref = reference(grads, world, **consts)
    # Micro-batch units: 3 micro-batches of 4 per rank, pooled.
    params = list(model.parameters())
    units = []
    for x, y in data:
        for i in range(3):
            g = torch.autograd.grad(
                F.cross_entropy(model(x[4 * i : 4 * i + 4]), y[4 * i : 4 * i + 4]), params
            )
            units.append(torch.cat([t.reshape(-1) for t in g]))
    ref_micro = reference(torch.stack(units).double(), world, unit_size=4, **consts)
    train_model = make_net().train()
    ref_bn = reference(
        torch.cat([brute_force_batch_coupled(train_model, x, y) for x, y in data]), world, **consts
    )

    results = run_distributed(_pooled_worker, world, consts, timeout=120)

    for key, r in [*((t, ref) for t in TESTS), ("microbatch", ref_micro), ("bn_train", ref_bn)]:
        test = key if key in TESTS else "augmented"
        values = {res[key][0] for res in results}
        assert len(values) == 1, (key, values)  # every rank returns the same int
        (b,) = values
        stats = results[0][key][1]
        assert stats["world_size"] == world and stats["count"] == (
            3 * world if key == "microbatch" else B * world
        )
        for k in RAW_KEYS[test]:
            assert stats[k] == pytest.approx(r[k], rel=1e-8), (key, k)
        assert b == expected(r[f"raw_{test}"], B), key
        assert [res[key][1]["rank"] for res in results] == list(range(world))
    assert results[0]["norm"][0] > B  # the batch grows


@pytest.mark.parametrize("backend", ["vmap", "microbatch"])
def test_works_under_no_grad(setup, backend):
    model, x, y, grads, consts = setup
    vt = VarianceTest(model, F.cross_entropy, test="augmented", backend=backend, **consts)
    b = vt.suggest(x, y, B)
    raw = vt.last_stats["raw"]
    with torch.no_grad():
        assert vt.suggest(x, y, B) == b
    assert vt.last_stats["raw"] == pytest.approx(raw, rel=1e-12)


def test_no_warnings_on_regular_use(setup):
    model, x, y, grads, consts = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for test in TESTS:
            VarianceTest(model, F.cross_entropy, test=test, **consts).suggest(x, y, B)


def test_repr():
    assert "test='augmented'" in repr(VarianceTest(_MODEL, F.mse_loss, test="augmented"))


class WithConv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(1, 2, 2)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv3d(x).mean((2, 3, 4)))


def test_auto_falls_back_to_vmap_once_with_a_warning_naming_the_layer():
    torch.manual_seed(0)
    model = WithConv3d().double()
    x, y = torch.randn(6, 1, 3, 3, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    vt = VarianceTest(model, F.cross_entropy, max_batch_size=10**6, policy="paper")
    with pytest.warns(RuntimeWarning, match="conv3d"):
        b1 = vt.suggest(x, y, 6)
    assert vt.last_stats["backend"] == "vmap"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning for the same model
        b2 = vt.suggest(x, y, 6)
    # and the fallback is exact: the same as the brute-force loop
    grads = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))])
        for i in range(6)
    ])
    trace = grads.var(0, unbiased=True).sum().item()
    assert vt.last_stats["norm_variance"] == pytest.approx(trace, rel=1e-9)
    assert b1 == b2 == max(6, math.ceil(trace / (0.1**2 * grads.mean(0).pow(2).sum().item())))
