"""Baseline batch-size schedules: closed-form values, the shared interface, state, bad input."""

from __future__ import annotations

import pytest
import torch

from local_opt.schedules import ConstantBatchSize, LinearRampBatchSize, StagewiseBatchSize


def _run(schedule, rounds: int) -> list[int]:
    """The batch sizes returned by ``rounds`` calls of suggest, as a training loop makes them."""
    x, y = torch.zeros(3, 2), torch.zeros(3)
    return [schedule.suggest(x, y, 7) for _ in range(rounds)]


def test_constant():
    s = ConstantBatchSize(48)
    assert _run(s, 5) == [48] * 5
    assert s.batch_size_at(0) == 48 and s.round == 5
    assert s.last_stats == {"schedule": "ConstantBatchSize", "round": 5, "suggested": 48}


def test_stagewise_closed_form():
    s = StagewiseBatchSize(32, milestones=[3, 5], factor=2)
    # Round 0 uses 32; the r-th call returns round r's size, doubled at rounds 3 and 5.
    assert [s.batch_size_at(r) for r in range(7)] == [32, 32, 32, 64, 64, 128, 128]
    assert _run(s, 6) == [32, 32, 64, 64, 128, 128]
    # Non-integer factors round half up; the cap applies.
    s = StagewiseBatchSize(10, milestones=[1, 2, 3], factor=1.25, max_batch_size=18)
    assert [s.batch_size_at(r) for r in range(5)] == [10, 13, 16, 18, 18]  # 12.5, 15.625, 19.53
    assert StagewiseBatchSize(8, milestones=[], factor=3).batch_size_at(100) == 8


def test_linear_ramp_closed_form():
    s = LinearRampBatchSize(16, 64, ramp_rounds=4)
    assert [s.batch_size_at(r) for r in range(7)] == [16, 28, 40, 52, 64, 64, 64]
    s = LinearRampBatchSize(10, 17, ramp_rounds=3)
    # 10 + floor(7 r / 3): 10, 12, 14, 17.
    assert _run(s, 5) == [12, 14, 17, 17, 17]
    assert LinearRampBatchSize(5, 5, ramp_rounds=2).batch_size_at(1) == 5


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConstantBatchSize(4),
        lambda: StagewiseBatchSize(4, milestones=[2, 4], factor=2),
        lambda: LinearRampBatchSize(4, 20, ramp_rounds=5),
    ],
)
def test_interface_and_state_dict_round_trip(make):
    a = make()
    assert a.suggest(None, None, None) == a.batch_size_at(1)  # inputs/targets/batch_size ignored
    _run(a, 2)
    state = a.state_dict()
    assert state == {"round": 3}
    b = make()
    b.load_state_dict(state)
    assert _run(a, 5) == _run(b, 5)  # lock step after the restore
    assert a.last_stats == b.last_stats
    with pytest.raises(ValueError, match="round"):
        b.load_state_dict({"round": -1})
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({})


def test_monotone_non_decreasing():
    for s in (
        StagewiseBatchSize(3, milestones=[1, 4, 9], factor=1.5, max_batch_size=20),
        LinearRampBatchSize(3, 50, ramp_rounds=7),
    ):
        values = [s.batch_size_at(r) for r in range(15)]
        assert values == sorted(values)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ConstantBatchSize(0), "Invalid batch_size"),
        (lambda: ConstantBatchSize(2.0), "Invalid batch_size"),
        (lambda: ConstantBatchSize(True), "Invalid batch_size"),
        (lambda: StagewiseBatchSize(0, [1]), "Invalid batch_size"),
        (lambda: StagewiseBatchSize(4, [3, 2]), "Invalid milestones"),
        (lambda: StagewiseBatchSize(4, [2, 2]), "Invalid milestones"),
        (lambda: StagewiseBatchSize(4, [0, 2]), "Invalid milestones"),
        (lambda: StagewiseBatchSize(4, 5), "Invalid milestones"),
        (lambda: StagewiseBatchSize(4, "12"), "Invalid milestones"),
        (lambda: StagewiseBatchSize(4, [2], factor=0.5), "Invalid factor"),
        (lambda: StagewiseBatchSize(4, [2], factor=float("inf")), "Invalid factor"),
        (lambda: StagewiseBatchSize(4, [2], factor="2"), "Invalid factor"),
        (lambda: StagewiseBatchSize(4, [2], max_batch_size=0), "Invalid max_batch_size"),
        (lambda: LinearRampBatchSize(0, 4, 2), "Invalid start"),
        (lambda: LinearRampBatchSize(8, 4, 2), "Invalid end"),
        (lambda: LinearRampBatchSize(2, 4, 0), "Invalid ramp_rounds"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_repr():
    assert repr(StagewiseBatchSize(4, [2], 2.0)) == (
        "StagewiseBatchSize(batch_size=4, milestones=[2], factor=2.0)"
    )
    assert (
        repr(LinearRampBatchSize(1, 2, 3)) == "LinearRampBatchSize(start=1, end=2, ramp_rounds=3)"
    )
    assert repr(ConstantBatchSize(5)) == "ConstantBatchSize(batch_size=5)"
