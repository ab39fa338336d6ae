r"""Baseline batch-size schedules with :class:`~local_opt.VarianceTest`'s interface.

The baselines of `Lau et al., 2024 <https://arxiv.org/abs/2406.13936>`_ against which the
adaptive tests are compared: a constant batch size, a stagewise schedule (multiply the batch size
by a factor at milestones) and a linear ramp-up. Each has ``suggest(inputs, targets,
batch_size) -> int``, ``last_stats``, ``state_dict()`` and ``load_state_dict()``, so one line
swaps a schedule for a variance test in a training loop.

**Indexing.** Schedules are indexed by *rounds* (communication rounds of Local SGD), counted by
the calls of ``suggest``, which is called once per round, after the round's synchronization.
Round 0 runs with the initial batch size; the :math:`r`-th call of ``suggest``
(:math:`r = 1, 2, \dots`) returns the batch size of round :math:`r`, like a learning-rate
scheduler's ``step()`` (``StagewiseBatchSize(b, milestones=[10], factor=2)`` returns ``b`` for
calls 1–9 and ``2b`` from the 10th call on, as ``MultiStepLR`` would). ``inputs``, ``targets``
and ``batch_size`` are accepted for interface compatibility and ignored: the schedule alone
decides.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from local_opt._validate import is_int
from local_opt.policy import adascale_gain

__all__ = ["ConstantBatchSize", "StagewiseBatchSize", "LinearRampBatchSize", "LRCoupling"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not is_int(value) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= {minimum})")
    return int(value)


class _Schedule:
    """Round counter, ``suggest`` and ``state_dict`` shared by the schedules."""

    def __init__(self) -> None:
        self.round = 0  # rounds completed = calls of suggest
        self.last_stats: dict[str, Any] = {}

    def batch_size_at(self, r: int) -> int:
        """The batch size of round ``r`` (round 0: the initial batch size)."""
        raise NotImplementedError

    def suggest(
        self, inputs: Tensor | None = None, targets: Tensor | None = None, batch_size: Any = None
    ) -> int:
        """Advance one round and return its batch size (the arguments are ignored)."""
        self.round += 1
        b = self.batch_size_at(self.round)
        self.last_stats = {"schedule": type(self).__name__, "round": self.round, "suggested": b}
        return b

    def state_dict(self) -> dict[str, Any]:
        """The round counter."""
        return {"round": self.round}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the round counter of :meth:`state_dict`."""
        if "round" not in state_dict:
            raise ValueError("Invalid state_dict: missing key 'round'")
        self.round = _check_int("round", state_dict["round"], 0)


class ConstantBatchSize(_Schedule):
    r"""The same batch size every round: :math:`b_r = b`.

    Args:
        batch_size (int): per-worker batch size.

    Example::

        >>> schedule = ConstantBatchSize(64)
        >>> sampler.set_batch_size(schedule.suggest(x, y, sampler.batch_size))  # 64
    """

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = _check_int("batch_size", batch_size, 1)

    def batch_size_at(self, r: int) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return f"ConstantBatchSize(batch_size={self.batch_size})"


class StagewiseBatchSize(_Schedule):
    r"""Multiply the batch size by ``factor`` at each milestone round.

    .. math::
        b_r = \min\Big(b_{\max},\ \operatorname{round}\big(b \cdot
            \text{factor}^{\,|\{k : \text{milestone}_k \le r\}|}\big)\Big)

    Args:
        batch_size (int): per-worker batch size of round 0.
        milestones (sequence of int): strictly increasing rounds (>= 1) at which the batch size
            is multiplied.
        factor (float): multiplier at each milestone, >= 1 (default: 2).
        max_batch_size (int, optional): cap (default: None, no cap).

    Example::

        >>> schedule = StagewiseBatchSize(32, milestones=[100, 200], factor=2)
        >>> [schedule.batch_size_at(r) for r in (0, 99, 100, 250)]
        [32, 32, 64, 128]
    """

    def __init__(
        self,
        batch_size: int,
        milestones: Sequence[int],
        factor: float = 2.0,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise ValueError(f"Invalid milestones: {milestones!r} (expected a sequence of ints)")
        ms = [_check_int("milestones", m, 1) for m in milestones]
        if any(b <= a for a, b in zip(ms, ms[1:])):
            raise ValueError(f"Invalid milestones: {list(milestones)} (must strictly increase)")
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            raise ValueError(f"Invalid factor: {factor!r} (expected a number >= 1)")
        if not (math.isfinite(factor) and factor >= 1):
            raise ValueError(f"Invalid factor: {factor} (expected a finite number >= 1)")
        if max_batch_size is not None:
            max_batch_size = _check_int("max_batch_size", max_batch_size, 1)
        self.milestones = ms
        self.factor = factor
        self.max_batch_size = max_batch_size

    def batch_size_at(self, r: int) -> int:
        stage = sum(1 for m in self.milestones if m <= r)
        b = max(1, _round_half_up(self.batch_size * self.factor**stage))
        return b if self.max_batch_size is None else min(self.max_batch_size, b)

    def __repr__(self) -> str:
        cap = "" if self.max_batch_size is None else f", max_batch_size={self.max_batch_size}"
        return (
            f"StagewiseBatchSize(batch_size={self.batch_size}, milestones={self.milestones}, "
            f"factor={self.factor}{cap})"
        )


class LinearRampBatchSize(_Schedule):
    r"""Grow the batch size linearly from ``start`` to ``end`` over ``ramp_rounds`` rounds.

    .. math::
        b_r = \text{start} + \left\lfloor (\text{end} - \text{start})\,
            \frac{\min(r, R)}{R} \right\rfloor, \qquad R = \texttt{ramp\_rounds},

    so :math:`b_0 = \text{start}`, :math:`b_R = \text{end}`, constant afterwards.

    Args:
        start (int): per-worker batch size of round 0.
        end (int): batch size from round ``ramp_rounds`` on (>= ``start``).
        ramp_rounds (int): length of the ramp in rounds (>= 1).

    Example::

        >>> schedule = LinearRampBatchSize(16, 64, ramp_rounds=4)
        >>> [schedule.batch_size_at(r) for r in range(6)]
        [16, 28, 40, 52, 64, 64]
    """

    def __init__(self, start: int, end: int, ramp_rounds: int) -> None:
        super().__init__()
        self.start = _check_int("start", start, 1)
        self.end = _check_int("end", end, 1)
        if self.end < self.start:
            raise ValueError(f"Invalid end: {end} (expected >= start={start})")
        self.ramp_rounds = _check_int("ramp_rounds", ramp_rounds, 1)

    def batch_size_at(self, r: int) -> int:
        r = min(max(r, 0), self.ramp_rounds)
        return self.start + (self.end - self.start) * r // self.ramp_rounds

    def __repr__(self) -> str:
        return (
            f"LinearRampBatchSize(start={self.start}, end={self.end}, "
            f"ramp_rounds={self.ramp_rounds})"
        )


class LRCoupling:
    r"""A learning-rate factor for the current batch size, to multiply into your own schedule.

    As the batch grows from the base batch size :math:`b_0` to :math:`b` (per worker, with
    :math:`S = b/b_0`), :meth:`factor` returns

    * ``"none"``: :math:`1`;
    * ``"sqrt"``: :math:`\sqrt{S}` (the usual rule for Adam-type optimizers);
    * ``"linear"``: :math:`S` (Goyal et al., 2017, for SGD);
    * ``"adascale"``: AdaScale's gain ratio (`Johnson et al., 2020
      <https://arxiv.org/abs/2007.05105>`_, used by AdaptDL/Pollux)

      .. math::
          r = \frac{\operatorname{tr}\Sigma/b_0 + |G|^2}{\operatorname{tr}\Sigma/b + |G|^2}
            \in [1, S],

      from the same moving averages of the per-sample :math:`\operatorname{tr}\Sigma` and
      de-biased :math:`|G|^2` that drive ``variance_test``'s decision
      (:meth:`VarianceTest.noise_estimates`): linear scaling while the noise dominates, no
      scaling once the gradient does. Before the test's first round: 1.

    It changes nothing by itself and holds no state of its own (the ``"adascale"`` estimates
    are in the VarianceTest's ``state_dict``): the factor composes with any scheduler by
    multiplication, e.g. with :class:`torch.optim.lr_scheduler.LambdaLR`, whose lambda is
    evaluated at every ``scheduler.step()``.

    Which one: measured on the project's char-level LM (AdamW, :math:`\eta = 2`, equal sample
    budget), the final validation loss was 1.980 without coupling, 1.797 with ``"sqrt"`` and
    1.695 with ``"adascale"`` (constant small batch: 1.710), so ``"adascale"`` is the one to
    try first; there is no default because :class:`~local_opt.VarianceTest` never changes the
    learning rate by itself.

    Args:
        rule (str): ``"none"``, ``"sqrt"``, ``"linear"`` or ``"adascale"``.
        base_batch_size (int): :math:`b_0`, the per-worker batch size the learning rate was
            tuned for (usually the initial one).
        variance_test (VarianceTest, optional): required for ``"adascale"``.

    Example::

        >>> coupling = LRCoupling("sqrt", base_batch_size=sampler.batch_size)
        >>> scheduler = torch.optim.lr_scheduler.LambdaLR(
        ...     opt, lambda step: cosine(step) * coupling.factor(sampler.batch_size))
        >>> # in the loop: opt.step(); scheduler.step(); after a round sampler.set_batch_size(...)
    """

    RULES = ("none", "sqrt", "linear", "adascale")

    def __init__(self, rule: str, base_batch_size: int, variance_test: Any = None) -> None:
        if rule not in self.RULES:
            raise ValueError(f"Invalid rule: {rule!r} (expected one of {', '.join(self.RULES)})")
        self.rule = rule
        self.base_batch_size = _check_int("base_batch_size", base_batch_size, 1)
        if rule == "adascale" and not callable(getattr(variance_test, "noise_estimates", None)):
            raise ValueError(
                "Invalid variance_test: rule='adascale' needs the VarianceTest whose estimates "
                f"it uses, got {variance_test!r}"
            )
        self.variance_test = variance_test

    def factor(self, batch_size: int) -> float:
        """The learning-rate multiplier for per-worker batch size ``batch_size``."""
        scale = _check_int("batch_size", batch_size, 1) / self.base_batch_size
        if self.rule == "none":
            return 1.0
        if self.rule == "sqrt":
            return math.sqrt(scale)
        if self.rule == "linear":
            return scale
        est = self.variance_test.noise_estimates()
        if est is None:
            return 1.0
        return adascale_gain(est["variance"] / self.base_batch_size, est["sq_norm"], scale)

    def __repr__(self) -> str:
        return f"LRCoupling(rule={self.rule!r}, base_batch_size={self.base_batch_size})"


def _round_half_up(x: float) -> int:
    """Round to the nearest int, halves up (Python's ``round`` rounds halves to even)."""
    return math.floor(x + 0.5)
