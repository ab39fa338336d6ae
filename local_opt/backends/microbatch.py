r"""The micro-batch backend: an unbiased variance estimate from ``k`` micro-batch gradients.

Any model works (nothing per-sample is needed): the batch of :math:`b` samples is split, in order,
into :math:`k` micro-batches of :math:`m = \lfloor b/k \rfloor` samples (the last
:math:`b - km` samples are left out), and the gradient units are the micro-batch mean gradients

.. math::
    G_l = \frac1m \sum_{i \in B_l} g_i = \nabla_\theta\, \texttt{loss\_fn}(f_\theta(x_{B_l}), y_{B_l}),
    \qquad l = 1, \dots, k,

computed by ordinary forward/backward passes (:func:`torch.autograd.grad`; ``.grad`` is not
touched) — the very gradients that gradient accumulation computes, so with
:meth:`~local_opt.VarianceTest.suggest_from_micro_batch_grads` the test costs no extra
forward/backward. With :math:`K` units pooled over the ranks and :math:`\bar G` their mean (the
batch gradient :math:`\bar g`), the per-sample variances are estimated as

.. math::
    \widehat V_{\text{norm}} &= \frac{m}{K-1} \sum_{l=1}^{K} \lVert G_l - \bar G\rVert^2, \\
    \widehat V_{\text{ip}} &= \frac{m}{K-1} \sum_{l=1}^{K}
        \big(\langle G_l, \bar G\rangle - \lVert\bar G\rVert^2\big)^2, \\
    \widehat V_{\perp} &= \frac{m}{K-1} \sum_{l=1}^{K}
        \Big\lVert G_l - \frac{\langle G_l, \bar G\rangle}{\lVert \bar G\rVert^2}\bar G\Big\rVert^2,

which :mod:`local_opt._stats` evaluates with ``unit_size = m``. Each estimate is unbiased: for a
uniformly random split of :math:`N = Km` samples into :math:`K` groups of :math:`m`, each
:math:`G_l` is the mean of a simple random sample without replacement, so
:math:`\mathbb E\lVert G_l - \bar g\rVert^2 = \frac{N-m}{N m}\,\sigma^2` with
:math:`\sigma^2 = \frac{1}{N-1}\sum_i\lVert g_i - \bar g\rVert^2`, and summing over :math:`l`
gives :math:`\mathbb E\,\widehat V_{\text{norm}} = \sigma^2` exactly (finite-population
identity). The same holds for the linear maps :math:`g \mapsto \langle g, \bar g\rangle` and
:math:`g \mapsto g - \frac{\langle g,\bar g\rangle}{\lVert\bar g\rVert^2}\bar g`, since
:math:`\bar g` is the same for every split. With i.i.d. samples, a split in data order is as good
as a random one. The price of avoiding per-sample gradients is a noisier estimate (:math:`K-1`
degrees of freedom instead of :math:`N-1`).

BatchNorm in training mode normalizes each micro-batch with its own statistics, as gradient
accumulation does; the running statistics are not updated (the forward runs on clones of the
buffers). All ranks must use the same micro-batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from local_opt._stats import GradStats, reduce_units

__all__: list[str] = []  # private module


def _wide(t: Tensor) -> Tensor:
    """``t`` itself, or a float32 copy when it is half precision (norms, dots would overflow)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _dot(a: Tensor, w: Tensor) -> Tensor:
    """``⟨a, w⟩`` in float64 (0-dim); ``w`` flat and already wide."""
    a = _wide(a)
    return torch.dot(a.reshape(-1), w.to(a.dtype)).double()


def _check_micro_batch_size(micro_batch_size: object) -> None:
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int):
        raise TypeError(f"Invalid micro_batch_size: {micro_batch_size!r} (expected an int)")
    if micro_batch_size < 1:
        raise ValueError(f"Invalid micro_batch_size: {micro_batch_size}")


def stats_from_micro_batch_grads(
    grads: Sequence[Sequence[Tensor]], micro_batch_size: int
) -> GradStats:
    """:class:`GradStats` whose units are given micro-batch mean gradients.

    Args:
        grads: ``grads[l][j]`` is the gradient of the *mean* loss over micro-batch ``l`` with
            respect to parameter ``j`` (same parameters, in the same order, for every ``l`` and
            on every rank).
        micro_batch_size: samples per micro-batch, :math:`m`.
    """
    _check_micro_batch_size(micro_batch_size)
    if len(grads) == 0 or len(grads[0]) == 0:
        raise ValueError("Invalid grads: expected at least one micro-batch of at least one tensor")
    shapes = [g.shape for g in grads[0]]
    for u, unit in enumerate(grads):
        if [g.shape for g in unit] != shapes:
            raise ValueError(
                f"Invalid grads: micro-batch {u} has shapes {[tuple(g.shape) for g in unit]}, "
                f"micro-batch 0 has {[tuple(s) for s in shapes]}"
            )
    # No copies of the units: per-tensor norms and dot products, accumulated in float64.
    units = [[g.detach() for g in unit] for unit in grads]
    grad_sum = [g.clone() for g in units[0]]
    for unit in units[1:]:
        torch._foreach_add_(grad_sum, unit)
    norms = torch.stack([torch.stack(torch._foreach_norm(unit)) for unit in units])
    sq_norms = norms.double().pow(2).sum(1)

    def dots(v: Sequence[Tensor]) -> Tensor:
        flat_v = [_wide(t).reshape(-1) for t in v]
        return torch.stack(
            [torch.stack([_dot(g, w) for g, w in zip(unit, flat_v)]).sum() for unit in units]
        )

    return reduce_units(grad_sum, sq_norms, dots, unit_size=micro_batch_size)


def micro_batch_grads(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    micro_batches: int,
) -> tuple[list[list[Tensor]], int]:
    """The gradients of the mean loss of ``micro_batches`` consecutive equal micro-batches.

    Returns ``(grads, m)``: ``grads[l]`` has one tensor per trainable parameter
    (``model.parameters()`` order). With ``b`` samples, ``k = min(micro_batches, b)`` micro-batches
    of ``m = b // k`` samples are used and the last ``b - k*m`` samples are left out.
    """
    n = inputs.shape[0]
    if n < 1:
        raise ValueError("Invalid inputs: the batch is empty")
    k = min(micro_batches, n)
    m = n // k
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads: list[list[Tensor]] = []
    with torch.enable_grad():
        for u in range(k):
            sl = slice(u * m, (u + 1) * m)
            # Buffers are clones: BatchNorm running statistics of the model do not move.
            loss = loss_fn(functional_call(model, buffers, (inputs[sl],)), targets[sl])
            g = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append(
                [torch.zeros_like(p) if gi is None else gi.detach() for p, gi in zip(params, g)]
            )
    return grads, m


def microbatch_stats(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    micro_batches: int = 4,
    **_: object,
) -> GradStats:
    """Micro-batch :class:`GradStats` of one rank's batch (the ``"microbatch"`` backend)."""
    grads, m = micro_batch_grads(model, loss_fn, inputs, targets, micro_batches)
    return stats_from_micro_batch_grads(grads, m)
