r"""The math of :class:`~local_opt.VarianceTest`'s decision: small pure functions, tested alone.

VarianceTest gathers the pooled statistics of a round (:mod:`local_opt._stats`); this module turns
them into the next batch size. Two policies:

* ``"paper"`` — the published tests of `Lau et al., 2024 <https://arxiv.org/abs/2406.13936>`_
  as they are: one round's variances over :math:`\lVert\bar g\rVert^2`, :math:`b' =
  \lceil\cdot\rceil`, ``min(cap, max(b, b'))``. Computed by :func:`local_opt._stats.raw_batch_sizes`.
* ``"smoothed"`` (the default) — the same tests on estimates that are unbiased and averaged over
  rounds, the way the gradient noise scale is measured in practice (McCandlish et al., 2018,
  `An Empirical Model of Large-Batch Training <https://arxiv.org/abs/1812.06162>`_, appendix A;
  AdaptDL/Pollux's ``GradientNoiseScale``, Qiao et al., 2021). Per round, with :math:`N` pooled
  samples and the per-sample variance :math:`V = \operatorname{tr}\Sigma` (unbiased):

  .. math::
      \widehat{|G|^2} = \max\Big(\lVert\bar g\rVert^2 - \frac{V}{N},\;
          \varepsilon\,\lVert\bar g\rVert^2\Big)
      \qquad \big(\mathbb E\lVert\bar g\rVert^2 = |G|^2 + \operatorname{tr}\Sigma/N\big)

  then each numerator (:math:`V_{\text{norm}}`, :math:`V_{\text{ip}}/\lVert\bar g\rVert^2`,
  :math:`V_\perp`) and the denominator :math:`\widehat{|G|^2}` enter their own bias-corrected
  exponential moving average (:class:`EMA`, Adam's correction :math:`1/(1-\beta^t)`), after
  this round's :math:`\widehat{|G|^2}` is adjusted so that its noise scale is within
  ``outlier_ratio`` of the averaged one (:func:`robust_sq_norm`), and the test asks for the
  ratio of the averages, e.g.
  :math:`b' = \overline V / (M\eta^2\,\overline{|G|^2})`. With :math:`\eta = 1` that is the
  simple noise scale :math:`B_{\text{simple}} = \operatorname{tr}\Sigma/|G|^2` split over the
  :math:`M` workers. :func:`next_batch_size` then applies hysteresis, a growth limit per round,
  ``multiple_of`` rounding and the cap (the cap always wins).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "EMA",
    "debiased_sq_norm",
    "clip_ratio",
    "robust_sq_norm",
    "next_batch_size",
    "adascale_gain",
]


class EMA:
    r"""A bias-corrected exponential moving average (Adam's correction), as plain Python state.

    .. math::
        s_t = \beta s_{t-1} + (1-\beta) x_t,\quad s_0 = 0,\qquad
        \hat s_t = \frac{s_t}{1-\beta^t}

    so :math:`\hat s_t` is a weighted mean of :math:`x_1 \dots x_t` with weights
    :math:`\propto \beta^{t-i}` (no pull towards 0 in the first rounds). ``beta = 0`` keeps only
    the last observation.

    Args:
        beta (float): decay in ``[0, 1)``.
    """

    def __init__(self, beta: float) -> None:
        if not (0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta: {beta} (expected 0 <= beta < 1)")
        self.beta = float(beta)
        self.biased = 0.0
        self.steps = 0

    def update(self, x: float) -> float:
        """Add observation ``x``; return the corrected average."""
        self.biased = self.beta * self.biased + (1.0 - self.beta) * float(x)
        self.steps += 1
        return self.value

    @property
    def value(self) -> float:
        """The bias-corrected average (NaN before the first observation)."""
        if self.steps == 0:
            return math.nan
        return self.biased / (1.0 - self.beta**self.steps)

    def state_dict(self) -> dict[str, Any]:
        return {"biased": self.biased, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        biased, steps = state["biased"], state["steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"Invalid EMA state: steps={steps!r}")
        if not isinstance(biased, float) or not math.isfinite(biased):
            raise ValueError(f"Invalid EMA state: biased={biased!r}")
        self.biased, self.steps = biased, steps

    def __repr__(self) -> str:
        return f"EMA(beta={self.beta}, steps={self.steps}, value={self.value:.6g})"


def debiased_sq_norm(mean_sq_norm: float, variance: float, samples: int, floor: float) -> float:
    r"""Unbiased :math:`|G|^2` from the squared norm of a mean of ``samples`` samples, floored.

    :math:`\max(\lVert\bar g\rVert^2 - V/N,\ \text{floor}\cdot\lVert\bar g\rVert^2)`: since
    :math:`\mathbb E\lVert\bar g\rVert^2 = |G|^2 + \operatorname{tr}\Sigma/N` and ``variance``
    is an unbiased :math:`\operatorname{tr}\Sigma`, the difference is unbiased; it can be
    negative when the noise dominates, hence the floor (a fraction of the observed norm, so that
    the result stays positive and has the gradient's units).
    """
    return max(mean_sq_norm - variance / samples, floor * mean_sq_norm)


def clip_ratio(x: float, reference: float, ratio: float | None) -> float:
    """``x`` clipped to ``[reference / ratio, reference * ratio]`` (unchanged if no reference)."""
    if ratio is None or not math.isfinite(reference) or reference <= 0:
        return x
    return min(max(x, reference / ratio), reference * ratio)


def robust_sq_norm(
    variance: float, sq_norm: float, noise_scale: float, ratio: float | None
) -> float:
    r"""This round's :math:`\widehat{|G|^2}`, raised or lowered so that its noise scale
    :math:`V/\widehat{|G|^2}` is within ``ratio`` of the moving average's ``noise_scale``.

    Robustness of the moving averages: one round whose :math:`|G|^2` estimate is far off (near
    its floor when the noise dominates; on the project's LM task the smoothed noise scale once
    jumped from 27 to 104 in one round) moves the averaged noise scale by a bounded factor. The clip acts on
    the ratio, which has no units: when the gradient and its noise shrink together by orders of
    magnitude (as the loss falls), nothing is clipped. Clipping each average separately would
    instead freeze them at their old scale.
    """
    if variance <= 0 or sq_norm <= 0:
        return sq_norm
    return variance / clip_ratio(variance / sq_norm, noise_scale, ratio)


def next_batch_size(
    batch_size: int,
    raw: float,
    *,
    cap: int | None = None,
    growth: float | None = None,
    hysteresis: float = 0.0,
    multiple_of: int = 1,
) -> int:
    r"""The next batch size from the real-valued size ``raw`` a test asks for.

    1. **Never shrink, hysteresis:** keep ``batch_size`` unless
       :math:`\text{raw} > (1 + \text{hysteresis})\,b`.
    2. **Growth limit:** at most :math:`\lfloor \text{growth}\cdot b\rfloor` (at least
       :math:`b + 1`): :math:`b_{\text{new}} = \min(\lceil\text{raw}\rceil, \lfloor g b\rfloor)`.
    3. **Rounding:** up to a multiple of ``multiple_of``, or down when up would break the growth
       limit and down is still above :math:`b`.
    4. **Cap:** ``min(cap, ·)`` last, so the cap always wins, also over a ``batch_size`` that is
       already above it.

    With the defaults (no growth limit, no hysteresis, ``multiple_of=1``) this is the paper's
    ``min(cap, max(b, ceil(raw)))``.
    """
    b = batch_size
    new = b
    if raw > (1.0 + hysteresis) * b:
        new = max(b, math.ceil(raw))
        if growth is not None:
            new = min(new, max(b + 1, math.floor(growth * b)))
        if multiple_of > 1:
            up = -(-new // multiple_of) * multiple_of
            down = new // multiple_of * multiple_of
            limit = math.inf if growth is None else max(b + 1, math.floor(growth * b))
            new = up if up <= limit or down <= b else down
    return new if cap is None else min(cap, new)


def adascale_gain(variance: float, sq_norm: float, scale: float) -> float:
    r"""AdaScale's gain ratio for a batch ``scale`` times the base batch (Johnson et al., 2020).

    .. math::
        r = \frac{\operatorname{tr}\Sigma_0 + |G|^2}{\operatorname{tr}\Sigma_0/S + |G|^2}
          \in [1, S]

    with :math:`\Sigma_0` the covariance of the *base batch's* gradient (``variance`` = the
    per-sample trace divided by the base batch size): :math:`r \approx S` when noise dominates
    (linear scaling), :math:`r \approx 1` when the gradient does.
    """
    return (variance + sq_norm) / (variance / scale + sq_norm)
