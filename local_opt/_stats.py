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
        grad_sum: ``Σ_i g_i``, one tensor per parameter (parameter order of the backend).
        sq_norm_sum: ``Σ_i ‖g_i‖²`` as a 0-dim float64 tensor.
        inner_sq_sum: ``v ↦ Σ_i ⟨g_i, v⟩²`` (0-dim float64) for a vector ``v`` given per
            parameter, like ``grad_sum``. Called once, with the pooled mean gradient.
    """

    count: int
    unit_size: int
    grad_sum: list[Tensor]
    sq_norm_sum: Tensor
    inner_sq_sum: Callable[[Sequence[Tensor]], Tensor]


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
    """Sum one rank's :class:`GradStats` over the group and evaluate ``Q`` at the pooled mean.

    Communication: one all-reduce of the gradient's size (a flat buffer per dtype), then two
    all-reduces of 2 and 1 float64 scalars. Without torch.distributed (or with one rank) nothing is
    communicated and nothing is copied but the mean.
    """
    world = _comm.world_size(process_group)
    grads = [g.detach() for g in stats.grad_sum]
    device = grads[0].device
    scalars = torch.stack(
        [torch.tensor(float(stats.count), dtype=torch.float64), stats.sq_norm_sum.double().cpu()]
    ).to(device)
    total = _comm.all_reduce_sum(grads, process_group)
    _comm.all_reduce_sum_(scalars, process_group)
    n = int(round(scalars[0].item()))
    mean_list = torch._foreach_div(total, float(n))
    # per-tensor norms (one fused kernel), squared and summed in float64
    mean_sq_norm = math.fsum(float(x) ** 2 for x in torch._foreach_norm(mean_list))
    q = stats.inner_sq_sum(mean_list).double().reshape(1).to(device)
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
