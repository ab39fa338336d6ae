r"""The one statistics core behind every variance test and every per-sample backend.

A backend turns a batch into :class:`GradStats`: the sufficient statistics of ``K`` gradient
*units* ``g_1 … g_K`` held by one rank. A unit is one sample for exact backends, or the mean
gradient of a micro-batch of ``m_l`` samples for the micro-batch estimator. Every backend builds
its :class:`GradStats` with :func:`reduce_units` from per-unit statistics (the per-unit squared
norms and a function giving the per-unit inner products), so a new backend is one function that
computes those.

Each unit carries a weight :math:`w_l` (the number of samples it stands for, relative to
``unit_size``; 1 for every unit unless a backend says otherwise), and :math:`W = \sum_l w_l`.
:func:`pool` sums the statistics over the process group (law of total variance: summing the raw
moments is exact, unlike averaging per-rank variances):

.. math::
    K = \sum_r K_r, \quad W = \sum_l w_l, \quad
    \bar g = \frac1W \sum_l w_l g_l, \quad
    S_2 = \sum_l w_l \lVert g_l \rVert^2, \quad
    Q = \sum_l w_l \langle g_l, \bar g\rangle^2 .

The three variances the tests need are closed forms of these sums (unbiased, ``K - 1`` degrees of
freedom), multiplied by ``unit_size`` :math:`m` to turn a variance of micro-batch means into a
per-sample variance:

.. math::
    V_{\text{norm}} &= \tfrac{m}{K-1}\big(S_2 - W\lVert\bar g\rVert^2\big)
        = \tfrac{m}{K-1}\textstyle\sum_l w_l \lVert g_l - \bar g\rVert^2 \\
    V_{\text{ip}} &= \tfrac{m}{K-1}\big(Q - W\lVert\bar g\rVert^4\big)
        = \tfrac{m}{K-1}\textstyle\sum_l w_l
          \big(\langle g_l, \bar g\rangle - \lVert\bar g\rVert^2\big)^2 \\
    V_{\perp} &= \tfrac{m}{K-1}\big(S_2 - Q/\lVert\bar g\rVert^2\big)
        = \tfrac{m}{K-1}\textstyle\sum_l w_l \big\lVert g_l
          - \tfrac{\langle g_l,\bar g\rangle}{\lVert\bar g\rVert^2}\bar g\big\rVert^2

(the weighted mean of :math:`\langle g_l,\bar g\rangle` is :math:`\lVert\bar g\rVert^2`, which
gives the second forms). With unit weights (:math:`W = K`) these are the usual unbiased sample
variances times ``m``.

**Unequal units.** Micro-batches of unequal sizes :math:`m_l` (summing to :math:`N`) are units
with ``unit_size=1`` and weights :math:`w_l = m_l`; then :math:`\bar g` is the batch gradient and
:math:`V_{\text{norm}} = \frac{1}{K-1}\sum_l m_l\lVert G_l - \bar g\rVert^2` is unbiased for the
per-sample variance :math:`\sigma^2` (for a random split,
:math:`\mathbb E\lVert G_l - \bar g\rVert^2 = \sigma^2 (N - m_l)/(N m_l)`, and
:math:`\sum_l (N - m_l)/N = K - 1`); the same holds for the two other variances (linear maps of
:math:`g`). With all :math:`m_l = m` it equals the equal-size estimate with ``unit_size=m``.

The pure formulas of the tests (:func:`norm_test`, :func:`inner_product_test`,
:func:`orthogonality_test`, :func:`augmented_test`, and :func:`raw_batch_sizes` for all of them at
once) read only :class:`PooledStats`.
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

#: ``v ↦ (⟨g_l, v⟩)_l``: the per-unit inner products with a vector given per parameter, as a
#: ``(K,)`` tensor (any float dtype; summed in float64).
UnitDots = Callable[[Sequence[Tensor]], Tensor]


@dataclass
class GradStats:
    """Sufficient statistics of one rank's gradient units (see the module docstring).

    Build it with :func:`reduce_units`.

    Attributes:
        count: number of units ``K`` on this rank.
        unit_size: samples per unit of weight 1 (1 for exact per-sample backends, ``m`` for
            equal micro-batches).
        grad_sum: ``Σ_l w_l g_l / sum_scale``, one tensor per parameter (parameter order of the
            backend). :func:`pool` only reads it, so it may be the model's own ``.grad``.
        sq_norm_sum: ``Σ_l w_l ‖g_l‖²`` as a 0-dim float64 tensor.
        inner_sq_sum: ``v ↦ Σ_l w_l ⟨g_l, v⟩²`` (0-dim float64) for a vector ``v`` given per
            parameter, like ``grad_sum``. Called once, with a multiple of the pooled mean
            gradient (the pooled ``grad_sum``).
        sum_scale: the factor between ``grad_sum`` and ``Σ_l w_l g_l`` (default: 1.0; may differ
            between ranks), so that a backend can hand over a scaled sum without a copy.
        weight_sum: ``W = Σ_l w_l`` (default: None, meaning ``count``: unit weights).
        inner_products: False when ``inner_sq_sum`` only returns NaN (the norm test needs no
            inner products); :func:`pool` then skips its second collective (default: True).
    """

    count: int
    unit_size: int
    grad_sum: list[Tensor]
    sq_norm_sum: Tensor
    inner_sq_sum: Callable[[Sequence[Tensor]], Tensor]
    sum_scale: float = 1.0
    weight_sum: float | None = None
    inner_products: bool = True


def reduce_units(
    grad_sum: Sequence[Tensor],
    sq_norms: Tensor,
    dots: UnitDots | None,
    *,
    unit_size: int = 1,
    weights: Tensor | None = None,
    sum_scale: float = 1.0,
) -> GradStats:
    r"""The one reducer: :class:`GradStats` from per-unit statistics, for every backend.

    A backend computes, for its ``K`` units, what it can compute cheaply — the per-unit squared
    norms now, the per-unit inner products later (the vector is the pooled mean gradient, known
    only after the all-reduce) — and this function turns them into the weighted sums
    :math:`S_2 = \sum_l w_l\lVert g_l\rVert^2` and :math:`Q(v) = \sum_l w_l\langle g_l,
    v\rangle^2` that :func:`pool` pools.

    Args:
        grad_sum (sequence of Tensor): :math:`\sum_l w_l g_l` divided by ``sum_scale``, one
            tensor per parameter (not copied; it may be the model's ``.grad``).
        sq_norms (Tensor): ``(K,)`` per-unit squared norms :math:`\lVert g_l\rVert^2` (any
            float dtype, summed in float64). ``K = len(sq_norms)`` is the unit count.
        dots (callable or None): ``v ↦ (K,)`` per-unit inner products
            :math:`\langle g_l, v\rangle` for ``v`` given per parameter like ``grad_sum``; None
            when the inner products are not needed (``inner_sq_sum`` then returns NaN).
        unit_size (int): samples per unit of weight 1 (default: 1).
        weights (Tensor, optional): ``(K,)`` unit weights :math:`w_l`, e.g. the sizes of
            unequal micro-batches with ``unit_size=1`` (default: None, every weight 1).
        sum_scale (float): the factor between ``grad_sum`` and :math:`\sum_l w_l g_l`
            (default: 1.0).

    Returns:
        GradStats: with ``count = K`` and ``weight_sum = Σ w_l`` (None for unit weights).
    """
    sq = sq_norms.detach().double().reshape(-1)
    count = int(sq.shape[0])
    if count == 0:
        raise ValueError("Invalid inputs: the batch is empty")
    w = None if weights is None else weights.detach().double().reshape(-1).to(sq.device)
    if w is not None and w.shape[0] != count:
        raise ValueError(f"Invalid weights: {w.shape[0]} weights for {count} units")

    def inner_sq_sum(v: Sequence[Tensor]) -> Tensor:
        if dots is None:
            return torch.tensor(float("nan"), dtype=torch.float64)
        d = dots(v).double().reshape(-1)
        d2 = d * d
        return d2.sum() if w is None else (d2 * w.to(d.device)).sum()

    return GradStats(
        count=count,
        unit_size=unit_size,
        grad_sum=list(grad_sum),
        sq_norm_sum=sq.sum() if w is None else (sq * w).sum(),
        inner_sq_sum=inner_sq_sum,
        sum_scale=sum_scale,
        weight_sum=None if w is None else float(w.sum()),
        inner_products=dots is not None,
    )


@dataclass
class PooledStats:
    """The pooled sums over every rank of the group; all values are Python floats."""

    count: int  # K, pooled number of units
    unit_size: int  # m
    world_size: int  # M
    mean_sq_norm: float  # ‖ḡ‖²
    sq_norm_sum: float  # S₂ = Σ w_l ‖g_l‖²
    inner_sum: float  # Σ w_l ⟨g_l, ḡ⟩ = W‖ḡ‖²
    inner_sq_sum: float  # Q = Σ w_l ⟨g_l, ḡ⟩²
    weight_sum: float  # W = Σ w_l (= count with unit weights)

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def pool(stats: GradStats, process_group: dist.ProcessGroup | None = None) -> PooledStats:
    r"""Sum one rank's :class:`GradStats` over the group and evaluate ``Q`` at the pooled mean.

    Communication: **one** all-reduce of the gradient's size (a flat buffer per dtype) that also
    carries the scalars ``K``, ``W`` and :math:`S_2` (in the float64 buffer, else the float32 one:
    :func:`~local_opt._comm.all_reduce_sum_packed`); the inner-product tests add a second
    all-reduce of one float64 scalar, :math:`Q` at the pooled mean, which only that first
    collective makes known. Statistics built without inner products (``inner_products=False``)
    skip it. Without torch.distributed (or with one rank) nothing is communicated or copied.
    The host waits for the device twice (three times with inner products), never once per
    parameter tensor.

    The mean :math:`\bar g = c\,T` is never materialized, and
    :math:`\lVert\bar g\rVert^2 = c^2\lVert T\rVert^2`, :math:`Q(\bar g) = c^2 Q(T)` (``Q`` is
    quadratic in its argument). On one rank :math:`T` is ``grad_sum`` itself and
    :math:`c` = ``sum_scale / W``; over several, :math:`T` is the all-reduced sum of each rank's
    ``sum_scale * grad_sum`` (scaled in the all-reduce's own buffer, so ranks may differ in
    ``sum_scale``) and :math:`c = 1/W`.
    """
    world = _comm.world_size(process_group)
    grads = [g.detach() for g in stats.grad_sum]
    device = grads[0].device
    weight = float(stats.count) if stats.weight_sum is None else float(stats.weight_sum)
    sq = stats.sq_norm_sum.detach().double().reshape(1)
    scalars = torch.cat([torch.tensor([float(stats.count), weight], dtype=torch.float64).to(sq), sq])
    distributed = _comm.is_distributed(process_group)
    scale = 1.0 if distributed else stats.sum_scale  # scaled in the flat copy, before the sum
    total, summed = _comm.all_reduce_sum_packed(grads, scalars, process_group, stats.sum_scale)
    n_f, w, sq_sum = summed.tolist()  # host sync 1
    n = int(round(n_f))
    c = scale / w if w > 0 else scale
    if any(t.dtype == torch.float16 for t in total):  # c·T could fit where T does not
        total, c = torch._foreach_mul(total, c), 1.0
    # per-tensor norms (one fused kernel), squared and summed in float64: host sync 2
    norms = torch.stack(torch._foreach_norm(total)).double()  # one conversion, not one a tensor
    mean_sq_norm = c * c * float(norms.square().sum())
    if stats.inner_products:
        q = stats.inner_sq_sum(total).double().reshape(1).to(device) * (c * c)
        _comm.all_reduce_sum_(q, process_group)
        inner_sq = float(q[0])  # host sync 3
    else:
        inner_sq = math.nan
    return PooledStats(
        count=n,
        unit_size=stats.unit_size,
        world_size=world,
        mean_sq_norm=mean_sq_norm,
        sq_norm_sum=sq_sum,
        inner_sum=w * mean_sq_norm,
        inner_sq_sum=inner_sq,
        weight_sum=w,
    )


def norm_variance(s: PooledStats) -> float:
    """``V_norm``: trace of the per-sample gradient covariance (unbiased)."""
    return s.unit_size * (s.sq_norm_sum - s.weight_sum * s.mean_sq_norm) / (s.count - 1)


def inner_product_variance(s: PooledStats) -> float:
    """``V_ip``: variance of the per-sample projections ``⟨g_i, ḡ⟩`` (unbiased)."""
    return s.unit_size * (s.inner_sq_sum - s.weight_sum * s.mean_sq_norm**2) / (s.count - 1)


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


def raw_batch_sizes(pooled: PooledStats, eta: float, theta: float, nu: float) -> dict[str, float]:
    """The variances and the real-valued batch size each test asks for, from pooled statistics.

    Keys: ``norm_variance``, ``inner_product_variance``, ``orthogonal_variance`` and ``raw_norm``,
    ``raw_inner_product``, ``raw_orthogonality``, ``raw_augmented`` (before ``ceil``). Requires
    ``pooled.count >= 2`` and ``pooled.mean_sq_norm > 0``.
    """
    return {
        "norm_variance": norm_variance(pooled),
        "inner_product_variance": inner_product_variance(pooled),
        "orthogonal_variance": orthogonal_variance(pooled),
        "raw_norm": norm_test(pooled, eta),
        "raw_inner_product": inner_product_test(pooled, theta),
        "raw_orthogonality": orthogonality_test(pooled, nu),
        "raw_augmented": augmented_test(pooled, theta, nu),
    }
