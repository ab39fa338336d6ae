"""Learning-rate coupling (local_opt/lr.py) inside VarianceTest and the schedules, SampleLR and
DoublingBatchSize.

References: closed forms written out here, an optimizer that records the learning rate it sees
inside ``step()``, the uncoupled optimizer run in lock step (bit for bit), hand-computed
schedules.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from local_opt import (
    ConstantBatchSize,
    DoublingBatchSize,
    LinearRampBatchSize,
    LocalOptimizer,
    LRCoupling,
    SampleLR,
    StagewiseBatchSize,
    VarianceTest,
    warmup_cosine,
)
from local_opt.lr import RULES, auto_rule, lr_factor, optimizer_family
from local_opt.policy import adascale_gain

D = 5


class SpySGD(torch.optim.SGD):
    """SGD that records every group's learning rate as its ``step()`` sees it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[list[float]] = []

    def step(self, closure=None):
        self.seen.append([float(g["lr"]) for g in self.param_groups])
        return super().step(closure)


def problem(seed: int = 0, n: int = 16, noise: float = 1.0):
    torch.manual_seed(seed)
    model = nn.Linear(D, 1, bias=False).double()
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    y = x.sum(1, keepdim=True) + noise * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    return model, x, y


def train_step(model, opt, x, y):
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()


def grown_test(opt, rule, **kw):
    """A VarianceTest coupled to ``opt`` whose first suggestion grows the batch past b0 = 4."""
    model = opt.param_groups[0]["params"][0]._model  # set by make()
    vt = VarianceTest(model, F.mse_loss, min_dof=0, eta=0.05, optimizer=opt, lr_coupling=rule, **kw)
    return vt


def make(lr: float = 0.1, spy: bool = True, seed: int = 0):
    model, x, y = problem(seed)
    opt = (SpySGD if spy else torch.optim.SGD)(model.parameters(), lr=lr, momentum=0.9)
    opt.param_groups[0]["params"][0]._model = model
    return model, opt, x, y


# ------------------------------------------------------------------ closed forms


def test_lr_factor_closed_forms():
    assert lr_factor("none", 16) == 1.0
    assert lr_factor("sqrt", 16) == 4.0
    assert lr_factor("linear", 16) == 16.0
    assert lr_factor("adascale", 16, variance=3.0, sq_norm=1.0) == adascale_gain(3.0, 1.0, 16)
    assert lr_factor("adascale", 16) == 1.0  # no estimates yet
    # seesaw: S^k capped at 1/d (the coupled lr never above the schedule's peak)
    assert lr_factor("seesaw", 16, decay=1.0) == 1.0  # no decay yet: nothing to stand in for
    assert lr_factor("seesaw", 16, decay=0.5) == 2.0  # cap 1/d = 2 < sqrt(16)
    assert lr_factor("seesaw", 16, decay=0.1) == 4.0  # sqrt(16) < 10
    assert lr_factor("seesaw", 16, decay=0.1, power=1.0) == 10.0  # SGD's k = 1, capped
    assert lr_factor("seesaw", 4, decay=0.0, power=1.0) == 4.0  # lr 0: no cap
    for rule in RULES:  # every rule is exactly 1 at S = 1
        assert lr_factor(rule, 1, variance=2.0, sq_norm=1.0, decay=0.3) == 1.0


@pytest.mark.parametrize("v,g", [(1e-6, 1.0), (0.3, 1.0), (1.0, 1.0), (50.0, 0.01), (1e9, 1.0)])
@pytest.mark.parametrize("s", [1.5, 2.0, 16.0, 1000.0])
def test_adascale_factor_between_one_and_scale(v, g, s):
    f = lr_factor("adascale", s, variance=v, sq_norm=g)
    assert 1.0 <= f <= s * (1 + 1e-12)
    assert f == pytest.approx((v + g) / (v / s + g), rel=1e-12)


def test_seesaw_reproduces_seesaw_schedule():
    """Under Seesaw's own schedule (batch grown by 1/d when the schedule decayed by d), the
    coupled learning rate is Seesaw's lr_peak * sqrt(d) for Adam-type (k = 1/2)."""
    peak = 0.01
    for cuts in range(5):
        d = 0.5**cuts
        lr = peak * d
        assert lr * lr_factor("seesaw", 1 / d, decay=d) == pytest.approx(peak * math.sqrt(d))


def test_auto_rule_by_optimizer_family():
    p = [nn.Parameter(torch.zeros(2))]
    sgd, adamw = torch.optim.SGD(p, lr=0.1), torch.optim.AdamW(p, lr=1e-3)
    assert optimizer_family(sgd) == "sgd" and optimizer_family(adamw) == "adam"
    assert optimizer_family(LocalOptimizer(adamw, sync_every=2)) == "adam"  # looked through
    assert (auto_rule(sgd), auto_rule(adamw)) == ("linear", "adascale")  # docs/lr-coupling.md
    model, x, y = problem()
    assert VarianceTest(model, F.mse_loss).lr_coupling == "none"  # no optimizer: nothing coupled
    assert ConstantBatchSize(4).lr_coupling == "none"


# ------------------------------------------------------------------ inside the step


@pytest.mark.parametrize("rule", ["sqrt", "linear", "adascale", "seesaw"])
def test_variance_test_scales_lr_inside_step_and_restores(rule):
    model, opt, x, y = make()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9**k)
    vt = grown_test(opt, rule)
    train_step(model, opt, x[:4], y[:4])  # before any suggestion: factor 1
    assert opt.seen[-1] == [0.1]
    sched.step()
    b = vt.suggest(x[:4], y[:4], 4)
    assert b > 4 and vt.base_batch_size == 4
    for k in range(3):
        lr = opt.param_groups[0]["lr"]
        f = vt.lr_factor()
        train_step(model, opt, x[: 4 * k + 4], y[: 4 * k + 4])
        assert opt.seen[-1] == [pytest.approx(lr * f, rel=1e-15)]
        assert vt.last_lr_factors == [f]
        assert opt.param_groups[0]["lr"] == lr  # restored exactly
        assert opt.state_dict()["param_groups"][0]["lr"] == lr
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9 ** (k + 2))
    s = b / 4
    if rule == "sqrt":
        assert vt.lr_factor() == pytest.approx(math.sqrt(s))
    elif rule == "linear":
        assert vt.lr_factor() == pytest.approx(s)
    elif rule == "adascale":
        est = vt.noise_estimates()
        want = (est["variance"] / 4 + est["sq_norm"]) / (est["variance"] / b + est["sq_norm"])
        assert vt.lr_factor() == pytest.approx(want) and 1.0 < vt.lr_factor() <= s
    else:  # seesaw, SGD: k = 1, capped at peak / lr = 1 / 0.9^4
        assert vt.lr_factor() == pytest.approx(min(s, 1 / 0.9**4))


def test_one_cycle_lr_keeps_its_schedule():
    """OneCycleLR (which also cycles momentum) under a coupling: the step sees the schedule's
    lr times sqrt(S); the schedule's lrs are those of an uncoupled twin."""
    model, opt, x, y = make()
    twin_model, twin, _, _ = make()
    kw = dict(max_lr=0.5, total_steps=20)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, **kw)
    twin_sched = torch.optim.lr_scheduler.OneCycleLR(twin, **kw)
    sched_b = StagewiseBatchSize(4, milestones=[1], factor=4, optimizer=opt, lr_coupling="sqrt")
    sched_b.suggest()  # batch 16: factor 2
    for _ in range(10):
        train_step(model, opt, x, y)
        train_step(twin_model, twin, x, y)
        assert opt.seen[-1] == [pytest.approx(2.0 * twin.seen[-1][0], rel=1e-15)]
        sched.step()
        twin_sched.step()
        assert opt.param_groups[0]["lr"] == twin.param_groups[0]["lr"]
        assert opt.param_groups[0]["momentum"] == twin.param_groups[0]["momentum"]


def test_reduce_lr_on_plateau_sees_the_schedule_lr():
    model, opt, x, y = make()
    sched = StagewiseBatchSize(4, milestones=[1], factor=4, optimizer=opt, lr_coupling="linear")
    sched.suggest()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for _ in range(3):
        train_step(model, opt, x, y)
        plateau.step(1.0)  # no improvement after the first: halve
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    assert opt.seen == [[0.4], [0.4], [0.2]]


def test_local_optimizer_and_param_groups():
    """The hooks on a LocalOptimizer reach the wrapped optimizer's groups; each group its own
    lr times the factor."""
    model, x, y = problem()
    extra = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    inner = SpySGD([{"params": model.parameters()}, {"params": [extra], "lr": 0.01}], lr=0.1)
    opt = LocalOptimizer(inner, sync_every=2)
    sched = ConstantBatchSize(9, base_batch_size=4, optimizer=opt, lr_coupling="sqrt")
    train_step(model, opt, x, y)
    assert inner.seen[-1] == [pytest.approx(0.15), pytest.approx(0.015)]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert sched.last_lr_factors == [1.5, 1.5]


def test_failed_step_restores_on_next_step():
    model, opt, x, y = make()
    StagewiseBatchSize(4, milestones=[1], factor=4, optimizer=opt, lr_coupling="sqrt").suggest()

    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(boom)
    train_step(model, opt, x, y)  # the scaled lr left by the failed step is not scaled again
    assert opt.seen[-1] == [pytest.approx(0.2)] and opt.param_groups[0]["lr"] == 0.1


# ------------------------------------------------------------------ bit for bit when inactive


@pytest.mark.parametrize("case", ["b_equals_b0", "none"])
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_bit_for_bit_with_uncoupled_optimizer(case, optim):
    def build():
        model, x, y = problem(noise=0.5)
        if optim == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, x, y

    model, opt, x, y = build()
    ref_model, ref_opt, _, _ = build()
    sched = SampleLR(opt, warmup_cosine(0.2), 200)
    ref_sched = SampleLR(ref_opt, warmup_cosine(0.2), 200)
    if case == "none":  # the batch grows, the coupling is off
        vt = VarianceTest(model, F.mse_loss, min_dof=0, eta=0.05, optimizer=opt, lr_coupling="none")
    else:  # a coupling whose batch stays at b0 (the cap)
        vt = VarianceTest(model, F.mse_loss, max_batch_size=4, optimizer=opt, lr_coupling="sqrt")
    b = 4
    for step in range(12):
        train_step(model, opt, x[:b], y[:b])
        train_step(ref_model, ref_opt, x[:b], y[:b])
        sched.step(b)
        ref_sched.step(b)
        if step % 3 == 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b = vt.suggest(x[:b], y[:b], b)
            assert torch.equal(model.weight, ref_model.weight)
    assert (b > 4) == (case == "none")
    assert torch.equal(model.weight, ref_model.weight)
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert sd["param_groups"] == ref_sd["param_groups"]  # the schedule's lr, nothing else
    for key, value in sd["state"][0].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(ref_sd["state"][0][key]))


# ------------------------------------------------------------------ state_dict round trips


@pytest.mark.parametrize("rule", ["seesaw", "adascale", "sqrt"])
def test_variance_test_state_dict_round_trip(rule):
    """Prime, save (model, optimizer, scheduler, test), load into fresh objects, continue both
    in lock step: identical learning rates and parameters."""

    def build():
        model, opt, x, y = make(lr=0.05)
        sched = SampleLR(opt, warmup_cosine(0.1), 400)
        vt = grown_test(opt, rule)
        return model, opt, sched, vt, x, y

    def run(model, opt, sched, vt, x, y, b, steps):
        for k in range(steps):
            train_step(model, opt, x[:b], y[:b])
            sched.step(b)
            if k % 2 == 1:
                b = vt.suggest(x[:b], y[:b], b)
        return b

    model, opt, sched, vt, x, y = build()
    b = run(model, opt, sched, vt, x, y, 4, 6)
    assert b > 4
    saved = copy.deepcopy(
        (model.state_dict(), opt.state_dict(), sched.state_dict(), vt.state_dict())
    )
    assert saved[3]["lr_coupling"]["base_batch_size"] == 4
    assert saved[3]["lr_coupling"]["batch_size"] == b
    model2, opt2, sched2, vt2, _, _ = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    vt2.load_state_dict(saved[3])
    assert vt2.lr_factor() == vt.lr_factor()
    run(model, opt, sched, vt, x, y, b, 6)
    run(model2, opt2, sched2, vt2, x, y, b, 6)
    assert opt.seen[-6:] == opt2.seen[-6:]
    assert torch.equal(model.weight, model2.weight)
    vt2.load_state_dict({"calls": 0, "last_suggestion": None})  # a state from before coupling
    assert vt2.lr_factor() == 1.0  # no batch size saved: b unknown, factor 1


def test_schedule_state_dict_round_trip_with_observe_only_test():
    def build():
        model, opt, x, y = make()
        observer = VarianceTest(model, F.mse_loss, min_dof=0)
        s = StagewiseBatchSize(
            4, milestones=[2, 4], optimizer=opt, lr_coupling="adascale", variance_test=observer
        )
        return model, opt, s, x, y

    model, opt, s, x, y = build()
    for _ in range(3):
        train_step(model, opt, x, y)
        s.suggest(x[:4], y[:4], 4)
    state = copy.deepcopy(s.state_dict())
    assert set(state) == {"round", "lr_coupling", "variance_test"}
    model2, opt2, s2, _, _ = build()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # else the momentum buffer is shared
    s2.load_state_dict(state)
    assert s2.lr_factor() == s.lr_factor() and 1.0 < s.lr_factor() <= 4.0
    for _ in range(3):
        for m, o, sch in ((model, opt, s), (model2, opt2, s2)):
            train_step(m, o, x, y)
            sch.suggest(x[:4], y[:4], 4)
    assert opt.seen[-3:] == opt2.seen[-3:] and torch.equal(model.weight, model2.weight)


# ------------------------------------------------------------------ policy="paper"


def test_paper_policy_auto_is_none_and_decisions_unchanged():
    model, opt, x, y = make()
    vt = VarianceTest(model, F.mse_loss, policy="paper", optimizer=opt)
    assert vt.lr_coupling == "none"
    coupled = VarianceTest(model, F.mse_loss, policy="paper", optimizer=opt, lr_coupling="linear")
    plain = VarianceTest(model, F.mse_loss, policy="paper")
    b1, b2 = 4, 4
    for k in range(3):
        b1 = coupled.suggest(x[: 4 + k], y[: 4 + k], b1)
        b2 = plain.suggest(x[: 4 + k], y[: 4 + k], b2)
        assert b1 == b2
        assert coupled.last_stats["raw"] == plain.last_stats["raw"]


# ------------------------------------------------------------------ SampleLR


def test_sample_lr_against_hand_computed_schedule():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.2)
    sched = SampleLR(opt, warmup_cosine(0.1, final=0.05), total_samples=1000)
    seen = 0
    for n in [16, 16, 32, 64, 64, 128, 256, 256, 512]:  # a growing batch
        opt.step()
        sched.step(n)
        seen += n
        p_ = min(seen / 1000, 1.0)
        if p_ < 0.1:
            want = 0.2 * p_ / 0.1
        else:
            q = (p_ - 0.1) / 0.9
            want = 0.2 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * q)))
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.05)  # past the budget: final
    step_lr = SampleLR(opt, lambda q: 0.1 if q >= 0.5 else 1.0, total_samples=100)
    step_lr.step(49)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    step_lr.step(1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)


def test_sample_lr_state_dict_and_either_order():
    def build():
        p = nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        return opt, SampleLR(opt, warmup_cosine(0.2), total_samples=100)

    opt, sched = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stepping the schedule before opt.step() is fine here
        sched.step(10)
        opt.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    opt2, sched2 = build()
    sched2.load_state_dict(sched.state_dict())
    assert sched2.samples_seen == 10
    sched.step(30)
    sched2.step(30)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_sample_lr_leaves_once_per_location_warnings_alone():
    """Found as a new user: ``SampleLR.step`` changed the warning filters on every call, which
    resets Python's "once per location" registries, so that every warning of the program (the
    user's own, VarianceTest's) was shown again after each step."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = SampleLR(opt, warmup_cosine(0.2), total_samples=100)

    def warn_once():
        warnings.warn("shown once per location", UserWarning, stacklevel=2)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's default action: once per location
        for _ in range(4):
            warn_once()
            sched.step(10)  # before opt.step(): no order warning either
            opt.step()
    assert [str(w.message) for w in seen] == ["shown once per location"]


# ------------------------------------------------------------------ DoublingBatchSize


def test_doubling_batch_sizes_and_lr_factors_at_milestones():
    model, opt, x, y = make()
    s = DoublingBatchSize(16, [1000, 3000], world_size=2, steps_per_round=8, optimizer=opt)
    assert s.lr_coupling == "sqrt"
    # 256 samples a round at b = 16: s_4 = 1024 >= 1000; then 512 a round: s_8 = 3072 >= 3000.
    sizes = [s.batch_size_at(r) for r in range(12)]
    assert sizes == [16] * 4 + [32] * 4 + [64] * 4
    assert [s.samples_before(r) for r in (4, 8)] == [1024, 3072]
    factors = []
    for r in range(1, 12):
        assert s.suggest() == sizes[r]
        train_step(model, opt, x, y)
        factors.append(opt.seen[-1][0] / 0.1)
    assert factors[2] == pytest.approx(1.0)  # round 3
    assert factors[3] == pytest.approx(math.sqrt(2))  # round 4: x sqrt(2)
    assert factors[7] == pytest.approx(2.0)  # round 8: x sqrt(2) again
    capped = DoublingBatchSize(16, [1, 2, 3], max_batch_size=32)
    assert [capped.batch_size_at(r) for r in range(4)] == [16, 32, 32, 32]
    none = DoublingBatchSize(16, [1], optimizer=opt, lr_coupling="none")
    none.suggest()
    assert none.lr_factor() == 1.0


def test_schedules_default_and_baseline_couplings():
    model, opt, x, y = make()
    ramp = LinearRampBatchSize(4, 16, ramp_rounds=2, optimizer=opt, lr_coupling="sqrt")
    ramp.suggest()
    ramp.suggest()
    assert ramp.lr_factor() == pytest.approx(2.0)
    plain = StagewiseBatchSize(4, milestones=[1])  # no optimizer: nothing coupled, old state
    plain.suggest()
    assert plain.state_dict() == {"round": 1}
    const = ConstantBatchSize(4, optimizer=opt)  # auto; b == b0: no estimates needed
    assert const.lr_factor() == 1.0


# ------------------------------------------------------------------ errors


def test_errors():
    model, opt, x, y = make()
    with pytest.raises(ValueError, match="lr_coupling"):
        VarianceTest(model, F.mse_loss, optimizer=opt, lr_coupling="cubic")
    with pytest.raises(ValueError, match="base_batch_size"):
        VarianceTest(model, F.mse_loss, optimizer=opt, base_batch_size=0)
    with pytest.raises(TypeError, match="optimizer"):
        VarianceTest(model, F.mse_loss, optimizer="sgd", lr_coupling="sqrt")
    with pytest.raises(ValueError, match="variance_test"):
        StagewiseBatchSize(4, milestones=[1], optimizer=opt, lr_coupling="adascale")
    with pytest.raises(ValueError, match="variance_test"):
        StagewiseBatchSize(4, milestones=[1], optimizer=opt, variance_test=object())
    coupled = VarianceTest(model, F.mse_loss, optimizer=opt, lr_coupling="sqrt")
    with pytest.raises(RuntimeError, match="observe-only"):
        StagewiseBatchSize(
            4, milestones=[1], optimizer=opt, lr_coupling="adascale", variance_test=coupled
        )
    observer = VarianceTest(model, F.mse_loss)
    s = StagewiseBatchSize(
        4, milestones=[1], optimizer=opt, lr_coupling="adascale", variance_test=observer
    )
    with pytest.raises(ValueError, match="inputs"):
        s.suggest()
    with pytest.raises(ValueError, match="rule"):
        lr_factor("cubic", 2)
    with pytest.raises(ValueError, match="scale"):
        lr_factor("sqrt", 0)
    with pytest.raises(ValueError, match="decay"):
        lr_factor("seesaw", 2, decay=1.5)
    with pytest.raises(ValueError, match="total_samples"):
        SampleLR(opt, lambda p: 1.0, 0)
    with pytest.raises(ValueError, match="lr_lambda"):
        SampleLR(opt, 3.0, 10)
    with pytest.raises(ValueError, match="samples"):
        SampleLR(opt, lambda p: 1.0, 10).step(-1)
    with pytest.raises(ValueError, match="warmup"):
        warmup_cosine(1.0)
    with pytest.raises(ValueError, match="milestones"):
        DoublingBatchSize(4, [3, 2])
    with pytest.raises(ValueError, match="world_size"):
        DoublingBatchSize(4, [3], world_size=0)
    with pytest.raises(ValueError, match="lr_coupling"):
        vt = VarianceTest(model, F.mse_loss, optimizer=opt)
        vt.load_state_dict({**vt.state_dict(), "lr_coupling": {"batch_size": 0}})
    assert LRCoupling("sqrt", 4).factor(16) == 2.0  # the by-hand factor still works


# ------------------------------------------------------------------ examples/train.py plumbing


def test_train_py_gives_every_strategy_the_same_rule():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
    import train

    model = nn.Linear(3, 2)

    def policy(argv, optim="sgd"):
        args = train.parse_args([*argv, "--optimizer", optim])
        opt = train.make_optimizer(args, model)
        return train.make_policy(args, model, F.cross_entropy, opt, world_size=2, budget=10_000)

    assert policy(["--strategy", "adaptive"]).lr_coupling == "linear"  # SGD's auto
    assert policy(["--strategy", "adaptive"], "adamw").lr_coupling == "adascale"
    assert policy(["--strategy", "adaptive", "--policy", "paper"]).lr_coupling == "none"
    stage = policy(["--strategy", "stagewise"], "adamw")  # the same rule, observe-only test
    assert stage.lr_coupling == "adascale" and isinstance(stage.variance_test, VarianceTest)
    assert stage.variance_test._coupling.optimizer is None
    const = policy(["--strategy", "constant"], "adamw")  # b == b0: no test needed
    assert const.lr_coupling == "adascale" and const.variance_test is None
    assert policy(["--strategy", "linear"]).lr_coupling == "linear"
    off = ["--lr-coupling", "none"]
    for strategy in ("adaptive", "constant", "stagewise", "linear", "doubling"):
        assert policy(["--strategy", strategy, *off], "adamw").lr_coupling == "none"
    doubling = policy(["--strategy", "doubling", "--batch-size", "16", "--max-batch-size", "128"])
    assert doubling.lr_coupling == "sqrt"  # the rule that defines it
    assert doubling.milestones == [2500, 5000, 7500]  # 16 -> 128: 3 doublings, evenly spaced
    at = policy(["--strategy", "doubling", "--doubling-at", "0.1", "0.3"])
    assert at.milestones == [1000, 3000]
    with pytest.raises(SystemExit):
        train.parse_args(["--strategy", "doubling", "--doubling-at", "0.5", "0.2"])
