"""Running statistics follow the batch (``bn_momentum="samples"``, local_opt/lr.py ``_RunningStats``)
in VarianceTest and the schedules.

References: torch's own BatchNorm update run step by step at ``b0`` (the running statistics a
grown batch must reproduce), and the closed form ``1 - (1 - m0)^(b/b0)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from local_opt import (
    ConstantBatchSize,
    LinearRampBatchSize,
    LocalOptimizer,
    StagewiseBatchSize,
    VarianceTest,
)


def bn_model(momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.BatchNorm1d(8, momentum=momentum),
        nn.ReLU(),
        nn.BatchNorm1d(8, momentum=None),  # cumulative average: left alone
        nn.BatchNorm1d(8, track_running_stats=False),  # no running statistics: left alone
        nn.Linear(8, 2),
    )


def momenta(model):
    return [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm1d)]


def with_batch(vt, b0, b):
    """Tell the test it returned ``b`` with base ``b0`` (its state_dict, a public route)."""
    state = vt.state_dict()
    state["lr_coupling"].update(base_batch_size=b0, batch_size=b)
    vt.load_state_dict(state)


@pytest.mark.parametrize("m0", [0.1, 0.01, 0.5])
@pytest.mark.parametrize("scale", [2, 3, 8])
def test_a_grown_step_does_the_work_of_scale_steps_at_b0(m0, scale):
    """torch's BatchNorm update: ``scale`` steps at b0 on batches whose mean is mu leave the
    running mean at ``mu (1 - (1 - m0)^scale)``; one step at ``scale * b0`` with the coupled
    momentum leaves it at the same value (and the same for the variance)."""
    b0 = 4
    ref, grown = bn_model(m0), bn_model(m0)
    vt = VarianceTest(grown, F.cross_entropy)
    with_batch(vt, b0, scale * b0)
    mu = torch.linspace(-1, 2, 8)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(scale * b0, 8, generator=gen)
    z = (z - z.mean(0)) / z.std(0) * 0.5 + mu  # every block of rows gets its own moments below
    bn_ref, bn_grown = ref[1], grown[1]
    ref.train()
    grown.train()
    for k in range(scale):  # b0-sized batches with the same mean and variance as the big one
        block = z[k * b0 : (k + 1) * b0]
        block = (block - block.mean(0)) / block.std(0) * z.std(0) + z.mean(0)
        bn_ref(block)
    bn_grown(z)
    assert bn_grown.momentum == pytest.approx(1 - (1 - m0) ** scale, rel=1e-12)
    torch.testing.assert_close(bn_grown.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn_grown.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-6)


def test_variance_test_sets_and_restores_the_momenta():
    model = bn_model(0.1)
    vt = VarianceTest(model, F.cross_entropy)
    assert vt.bn_momentum == "samples"
    with_batch(vt, 16, 64)
    assert momenta(model) == [pytest.approx(1 - 0.9**4), None, 0.1]
    with_batch(vt, 16, 16)  # back at b0: m0 exactly
    assert momenta(model) == [0.1, None, 0.1]
    with_batch(vt, 16, 64)
    vt._running.remove()
    assert momenta(model) == [0.1, None, 0.1]


def test_a_suggestion_moves_the_momentum():
    """Through ``suggest``: a test that grows the batch (tiny eta) sets the momentum for it."""
    model = bn_model(0.1).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (32,), generator=gen)
    vt = VarianceTest(model, F.cross_entropy, eta=0.05, min_dof=0, max_batch_size=32,
                      batch_statistics="backend")  # the layer without running statistics
    b = vt.suggest(x[:8], y[:8], 8)
    assert b > 8
    assert momenta(model)[0] == pytest.approx(1 - 0.9 ** (b / 8))


@pytest.mark.parametrize("kw", [dict(bn_momentum="none"), dict(policy="paper")])
def test_opt_out_and_paper_policy_leave_the_momenta(kw):
    model = bn_model(0.1)
    vt = VarianceTest(model, F.cross_entropy, **kw)
    assert vt.bn_momentum == "none"
    with_batch(vt, 16, 64)
    assert momenta(model) == [0.1, None, 0.1]


def test_schedules_through_the_local_optimizer_module():
    model = bn_model(0.1)
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2, module=model)
    sched = StagewiseBatchSize(8, milestones=[2, 4], factor=2.0, optimizer=opt)
    assert sched.bn_momentum == "samples"
    seen = [momenta(model)[0]]
    for _ in range(4):
        sched.suggest()
        seen.append(momenta(model)[0])
    assert seen == [0.1, 0.1, pytest.approx(1 - 0.9**2), pytest.approx(1 - 0.9**2),
                    pytest.approx(1 - 0.9**4)]
    state = sched.state_dict()
    model2 = bn_model(0.1)
    opt2 = LocalOptimizer(torch.optim.SGD(model2.parameters(), lr=0.1), sync_every=2, module=model2)
    sched2 = StagewiseBatchSize(8, milestones=[2, 4], factor=2.0, optimizer=opt2)
    sched2.load_state_dict(state)  # resume: the momentum of the saved round
    assert momenta(model2)[0] == pytest.approx(1 - 0.9**4)
    # constant-large against a small b0: from the start, as the learning rate
    model3 = bn_model(0.1)
    opt3 = LocalOptimizer(torch.optim.SGD(model3.parameters(), lr=0.1), sync_every=2, module=model3)
    ConstantBatchSize(64, optimizer=opt3, base_batch_size=16)
    assert momenta(model3)[0] == pytest.approx(1 - 0.9**4)


def test_schedules_without_module_or_opted_out_leave_the_momenta():
    model = bn_model(0.1)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)  # no module to find the layers in
    sched = LinearRampBatchSize(8, 64, 2, optimizer=plain)
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2, module=model)
    sched2 = LinearRampBatchSize(8, 64, 2, optimizer=opt, bn_momentum="none")
    for _ in range(3):
        sched.suggest()
        sched2.suggest()
    assert momenta(model) == [0.1, None, 0.1]


def test_observe_only_test_does_not_move_the_momenta():
    """A schedule's observe-only test (for AdaScale's estimates) makes decisions that are
    ignored: only the schedule's batch size sets the momentum."""
    model = bn_model(0.1).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (16,), generator=gen)
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2, module=model)
    observe = VarianceTest(model, F.cross_entropy, eta=0.05, min_dof=0, batch_statistics="backend")
    sched = ConstantBatchSize(16, optimizer=opt, lr_coupling="adascale", variance_test=observe,
                              base_batch_size=8)
    for _ in range(2):
        sched.suggest(x, y, 16)
    assert momenta(model)[0] == pytest.approx(1 - 0.9**2)


def test_errors():
    model = bn_model()
    with pytest.raises(ValueError, match="bn_momentum"):
        VarianceTest(model, F.cross_entropy, bn_momentum="linear")
    with pytest.raises(ValueError, match="bn_momentum"):
        ConstantBatchSize(8, bn_momentum=True)
