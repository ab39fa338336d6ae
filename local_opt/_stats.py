r"""The one statistics core behind every variance test and every per-sample backend.

A backend turns a batch into :class:`GradStats`: the sufficient statistics of ``n`` gradient
*units* ``g_1 … g_n`` held by one rank. A unit is one sample for exact backends (``unit_size=1``)
or the mean gradient of a micro-batch of ``m`` samples for the micro-batch estimator
(``unit_size=m``).

:func:`pool` sums those statistics over the process group (law of total variance: summing the raw
moments is exact, unlike averaging per-rank variances) with one all-reduce of gradient size plus
two of a few scalars:

.. math::
    N = \sum_r n_r, \quad
    \bar g = \frac1N \sum_i g_i, \quad
    S_2 = \sum_i \lVert g_i \rVert^2, \quad
    Q = \sum_i \langle g_i, \bar g\rangle^2 .

The three variances the tests need are closed forms of these sums (unbiased, divided by
``N - 1``), multiplied by ``unit_size`` to turn a variance of micro-batch means into a
per-sample variance:

.. math::
    V_{\text{norm}} &= \tfrac{m}{N-1}\big(S_2 - N\lVert\bar g\rVert^2\big)
        = m\,\textstyle\sum_j \widehat{\operatorname{Var}}_i(g_{ij}) \\
    V_{\text{ip}} &= \tfrac{m}{N-1}\big(Q - N\lVert\bar g\rVert^4\big)
        = m\,\widehat{\operatorname{Var}}_i\langle g_i, \bar g\rangle \\
    V_{\perp} &= \tfrac{m}{N-1}\big(S_2 - Q/\lVert\bar g\rVert^2\big)
        = m\,\textstyle\sum_j \widehat{\operatorname{Var}}_i
          \big(g_i - \tfrac{\langle g_i,\bar g\rangle}{\lVert\bar g\rVert^2}\bar g\big)_j

(the mean of :math:`\langle g_i,\bar g\rangle` is :math:`\lVert\bar g\rVert^2` and the mean of the
orthogonal parts is 0, which gives the second and third lines).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from local_opt import _comm

__all__: list[str] = []  # private module


@dataclass
class GradStats:
    """Sufficient statistics of one rank's gradient units (see the module docstring).

    Attributes:
        count: number of units ``n`` on this rank.
        unit_size: samples per unit (1 for exact per-sample backends, ``m`` for micro-batches).
        grad_sum: ``Σ_i g_i / sum_scale``, one tensor per parameter (parameter order of the
            backend). :func:`pool` only reads it, so it may be the model's own ``.grad``.
        sq_norm_sum: ``Σ_i ‖g_i‖²`` as a 0-dim float64 tensor.
        inner_sq_sum: ``v ↦ Σ_i ⟨g_i, v⟩²`` (0-dim float64) for a vector ``v`` given per
            parameter, like ``grad_sum``. Called once, with a multiple of the pooled mean
            gradient (the pooled ``grad_sum``).
        sum_scale: the factor between ``grad_sum`` and ``Σ_i g_i`` (default: 1.0; may differ
            between ranks), so that a backend can hand over a scaled sum without a copy.
    """

    count: int
    unit_size: int
    grad_sum: list[Tensor]
    sq_norm_sum: Tensor
    inner_sq_sum: Callable[[Sequence[Tensor]], Tensor]
    sum_scale: float = 1.0


@dataclass
class PooledStats:
    """The pooled sums over every rank of the group; all values are Python floats."""

    count: int  # N, pooled number of units
    unit_size: int  # m
    world_size: int  # M
    mean_sq_norm: float  # ‖ḡ‖²
    sq_norm_sum: float  # S₂ = Σ‖g_i‖²
    inner_sum: float  # Σ⟨g_i, ḡ⟩ = N‖ḡ‖²
    inner_sq_sum: float  # Q = Σ⟨g_i, ḡ⟩²

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def pool(stats: GradStats, process_group: dist.ProcessGroup | None = None) -> PooledStats:
    r"""Sum one rank's :class:`GradStats` over the group and evaluate ``Q`` at the pooled mean.

    Communication: one all-reduce of the gradient's size (a flat buffer per dtype), then two
    all-reduces of 2 and 1 float64 scalars. Without torch.distributed (or with one rank) nothing is
    communicated or copied. The mean :math:`\bar g = c\,T` is never materialized, and
    :math:`\lVert\bar g\rVert^2 = c^2\lVert T\rVert^2`, :math:`Q(\bar g) = c^2 Q(T)` (``Q`` is
    quadratic in its argument). On one rank :math:`T` is ``grad_sum`` itself and
    :math:`c` = ``sum_scale / N``; over several, :math:`T` is the all-reduced sum of each rank's
    ``sum_scale * grad_sum`` (scaled in the all-reduce's own buffer, so ranks may differ in
    ``sum_scale``) and :math:`c = 1/N`.
    """
    world = _comm.world_size(process_group)
    grads = [g.detach() for g in stats.grad_sum]
    device = grads[0].device
    scalars = torch.stack(
        [torch.tensor(float(stats.count), dtype=torch.float64), stats.sq_norm_sum.double().cpu()]
    ).to(device)
    if _comm.is_distributed(process_group):  # scaled in the flat copy, before the sum
        total, scale = _comm.all_reduce_sum(grads, process_group, stats.sum_scale), 1.0
    else:  # no copy: the scale stays a factor
        total, scale = grads, stats.sum_scale
    _comm.all_reduce_sum_(scalars, process_group)
    n = int(round(scalars[0].item()))
    c = scale / max(n, 1)
    if any(t.dtype == torch.float16 for t in total):  # c·T could fit where T does not
        total, c = torch._foreach_mul(total, c), 1.0
    # per-tensor norms (one fused kernel), squared and summed in float64
    mean_sq_norm = c * c * math.fsum(float(x) ** 2 for x in torch._foreach_norm(total))
    q = stats.inner_sq_sum(total).double().reshape(1).to(device) * (c * c)
    _comm.all_reduce_sum_(q, process_group)
    return PooledStats(
        count=n,
        unit_size=stats.unit_size,
        world_size=world,
        mean_sq_norm=mean_sq_norm,
        sq_norm_sum=float(scalars[1]),
        inner_sum=n * mean_sq_norm,
        inner_sq_sum=float(q[0]),
    )


def norm_variance(s: PooledStats) -> float:
    """``V_norm``: trace of the per-sample gradient covariance (unbiased)."""
    return s.unit_size * (s.sq_norm_sum - s.count * s.mean_sq_norm) / (s.count - 1)


def inner_product_variance(s: PooledStats) -> float:
    """``V_ip``: variance of the per-sample projections ``⟨g_i, ḡ⟩`` (unbiased)."""
    return s.unit_size * (s.inner_sq_sum - s.count * s.mean_sq_norm**2) / (s.count - 1)


def orthogonal_variance(s: PooledStats) -> float:
    """``V_⊥``: trace of the covariance of the parts of ``g_i`` orthogonal to ``ḡ`` (unbiased)."""
    return s.unit_size * (s.sq_norm_sum - s.inner_sq_sum / s.mean_sq_norm) / (s.count - 1)


def norm_test(s: PooledStats, eta: float) -> float:
    r"""Batch size the norm test asks for: :math:`V_{norm} / (M \eta^2 \lVert\bar g\rVert^2)`."""
    return norm_variance(s) / (s.world_size * eta**2 * s.mean_sq_norm)


def inner_product_test(s: PooledStats, theta: float) -> float:
    r"""Batch size the inner-product test asks for: :math:`V_{ip} / (M\theta^2\lVert\bar g\rVert^4)`."""
    return inner_product_variance(s) / (s.world_size * theta**2 * s.mean_sq_norm**2)


def orthogonality_test(s: PooledStats, nu: float) -> float:
    r"""Batch size the orthogonality test asks for: :math:`V_\perp / (M\nu^2\lVert\bar g\rVert^2)`."""
    return orthogonal_variance(s) / (s.world_size * nu**2 * s.mean_sq_norm)


def augmented_test(s: PooledStats, theta: float, nu: float) -> float:
    """The augmented inner-product test: the larger of the inner-product and orthogonality tests.

    NaN when either part is NaN (a bare ``max`` would hide a NaN in its second argument).
    """
    ip, orth = inner_product_test(s, theta), orthogonality_test(s, nu)
    return math.nan if math.isnan(ip) or math.isnan(orth) else max(ip, orth)
