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

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from local_opt._stats import GradStats

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
    sq_norms = torch.stack([torch.stack(torch._foreach_norm(unit)) for unit in units])
    sq_norm_sum = sq_norms.double().pow(2).sum()

    def inner_sq_sum(v: Sequence[Tensor]) -> Tensor:
        flat_v = [_wide(t).reshape(-1) for t in v]
        dots = torch.stack(
            [torch.stack([_dot(g, w) for g, w in zip(unit, flat_v)]).sum() for unit in units]
        )
        return dots.pow(2).sum()

    return GradStats(
        count=len(grads),
        unit_size=micro_batch_size,
        grad_sum=grad_sum,
        sq_norm_sum=sq_norm_sum,
        inner_sq_sum=inner_sq_sum,
    )


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


class Workspace:
    """Gradient-sized buffers for :class:`MicroBatchRecorder`, reused from step to step."""

    def __init__(self) -> None:
        self.owner: object | None = None  # the recorder whose gradients the buffers hold
        self._buffers: dict[tuple[int, int], Tensor] = {}

    def buffer(self, param: int, slot: int, like: Tensor) -> Tensor:
        """The buffer of ``slot`` for parameter ``param``, shaped, typed and placed like ``like``."""
        buf = self._buffers.get((param, slot))
        if buf is None or (buf.shape, buf.dtype, buf.device) != (
            like.shape,
            like.dtype,
            like.device,
        ):
            buf = self._buffers[(param, slot)] = torch.empty_like(
                like, memory_format=torch.contiguous_format
            )
        return buf


class MicroBatchRecorder:
    r"""The micro-batch statistics of gradient accumulation, recorded from its own backward passes.

    Made by :meth:`local_opt.VarianceTest.record_micro_batches`. Inside the ``with`` block every
    ``backward()`` is one micro-batch :math:`l` of ``micro_batch_size`` samples whose gradient
    reaches the parameters as :math:`s\,G_l` (:math:`s` = ``grad_scale``, :math:`G_l` the
    gradient of the micro-batch's *mean* loss). A hook on each trainable parameter sees that
    gradient before autograd adds it to ``.grad`` and keeps, per micro-batch,

    * :math:`\lVert s\,G_{l,j}\rVert` for each parameter :math:`j` (one read of the gradient,
      so :math:`\sum_l \lVert G_l\rVert^2` needs no gradient kept), and
    * for the inner-product tests only, a copy of :math:`s\,G_{l,j}` in a buffer of
      ``workspace`` that lives from step to step (keeping autograd's own tensors instead is
      slower on CPU: memory they would have handed back to the allocator has to be faulted in
      anew every step). The first micro-batch in which a parameter gets a gradient is not
      kept; its inner product is recovered from the sum,
      :math:`\langle G_{l_0,j}, v\rangle = \langle S_j, v\rangle -
      \sum_{l \ne l_0}\langle G_{l,j}, v\rangle`.

    The sum :math:`S = \sum_l G_l` is ``.grad / s`` itself, referenced rather than copied when
    the block exits; ``.grad`` must then not change in place before the suggestion (an error
    says so if it did). Parameters whose ``.grad`` was not None when the block was entered
    (``zero_grad(set_to_none=False)``) have it copied once and subtracted.

    Cost per micro-batch: one read of its gradient (a norm per parameter), plus one copy for the
    inner-product tests; per test: one dot product per kept gradient and one over the sum.
    Memory: none for the norm test; for the inner-product tests ``k - 1`` gradient-sized
    buffers, kept in ``workspace`` for the next step. A workspace serves one recording at a
    time: entering a new recorder on it makes the previous one's statistics unavailable (an
    error, never stale numbers).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        micro_batch_size: int,
        *,
        grad_scale: float | None = None,
        keep_grads: bool = True,
        workspace: Workspace | None = None,
    ) -> None:
        _check_micro_batch_size(micro_batch_size)
        if grad_scale is not None and (
            isinstance(grad_scale, bool)
            or not isinstance(grad_scale, (int, float))
            or not math.isfinite(grad_scale)
            or grad_scale <= 0
        ):
            raise ValueError(f"Invalid grad_scale: {grad_scale!r} (expected a positive number)")
        if len(params) == 0:
            raise ValueError("Invalid params: no trainable parameters to record")
        self.params = list(params)
        self.micro_batch_size = micro_batch_size
        self.grad_scale = None if grad_scale is None else float(grad_scale)
        self.keep_grads = keep_grads
        self.workspace = Workspace() if workspace is None else workspace
        self._handles: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        self._units = 0  # backward passes completed inside the block
        self._queued = False  # end-of-backward callback queued for the current pass
        self._norms: list[list[Tensor]] = []  # per unit: ‖s G_{l,j}‖ of the parameters it reached
        self._first: dict[int, int] = {}  # parameter index -> first unit that reached it
        self._kept: dict[int, list[tuple[int, Tensor]]] = {}  # parameter -> (unit, copy of s G)
        self._base: dict[int, Tensor] = {}  # parameter -> .grad at entry (if not None)
        self._grads: list[tuple[Tensor, int] | None] | None = None  # .grad and version at exit

    @property
    def micro_batches(self) -> int:
        """The number of backward passes recorded so far."""
        return self._units

    def __enter__(self) -> MicroBatchRecorder:
        if self._handles:
            raise RuntimeError("MicroBatchRecorder is already recording")
        self._reset()
        self.workspace.owner = self
        for j, p in enumerate(self.params):
            if p.grad is not None:
                self._base[j] = p.grad.detach().clone()
            self._handles.append(p.register_hook(self._hook(j)))
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if exc_type is not None:  # the block's own error propagates; this recording is void
            self._units, self._grads = 0, None
            return
        if self._queued:
            raise RuntimeError("MicroBatchRecorder: the block ended inside a backward pass")
        self._grads = []
        for j, p in enumerate(self.params):
            if j not in self._first:
                self._grads.append(None)
            elif p.grad is None:
                raise RuntimeError(
                    f"MicroBatchRecorder: parameter {j} received gradients but its .grad is None "
                    "at the end of the block (was it zeroed inside the block?)"
                )
            else:
                self._grads.append((p.grad, p.grad._version))

    def _hook(self, j: int) -> Callable[[Tensor], None]:
        def hook(g: Tensor) -> None:
            if not self._queued:
                self._queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            u = self._units
            if len(self._norms) == u:
                self._norms.append([])
            g = g.detach()
            self._norms[u].append(torch.linalg.vector_norm(_wide(g)))
            if j not in self._first:
                self._first[j] = u
            elif self.keep_grads:
                kept = self._kept.setdefault(j, [])
                kept.append((u, self.workspace.buffer(j, len(kept), g).copy_(g)))

        return hook

    def _end_backward(self) -> None:
        self._queued = False
        self._units += 1

    def grad_stats(self) -> GradStats:
        """The :class:`GradStats` of the recorded micro-batches (``unit_size = micro_batch_size``)."""
        if self._handles:
            raise RuntimeError("MicroBatchRecorder: leave the with block before asking for stats")
        if self._grads is None or self._units == 0:
            raise RuntimeError("MicroBatchRecorder recorded no backward pass")
        if self.workspace.owner is not self:
            raise RuntimeError(
                "MicroBatchRecorder: a newer recording reused this workspace; ask for the "
                "suggestion before recording the next step"
            )
        k = self._units
        scale = 1.0 / k if self.grad_scale is None else self.grad_scale
        sums: list[Tensor] = []
        for j, (p, ref) in enumerate(zip(self.params, self._grads)):
            if ref is None:
                sums.append(torch.zeros_like(p))
                continue
            grad, version = ref
            if grad._version != version:
                raise RuntimeError(
                    "MicroBatchRecorder: a recorded .grad was modified in place after the block "
                    "(zero_grad(set_to_none=False), gradient clipping, a GradScaler's unscale_ "
                    "...); ask for the suggestion before that"
                )
            sums.append(grad - self._base[j] if j in self._base else grad)
        sq = torch.stack([torch.stack(unit).double().pow(2).sum() for unit in self._norms])
        keep, first, kept = self.keep_grads, dict(self._first), self._kept

        def inner_sq_sum(v: Sequence[Tensor]) -> Tensor:
            if not keep:
                return torch.tensor(float("nan"), dtype=torch.float64)
            dots = torch.zeros(k, dtype=torch.float64, device=v[0].device)
            for j, u0 in first.items():
                w = _wide(v[j]).reshape(-1)
                rest = [(u, _dot(g, w)) for u, g in kept.get(j, [])]
                total = _dot(sums[j], w)
                for u, d in rest:
                    dots[u] += d
                    total = total - d
                dots[u0] += total
            return (dots / scale).pow(2).sum()

        return GradStats(
            count=k,
            unit_size=self.micro_batch_size,
            grad_sum=sums,
            sq_norm_sum=sq.sum() / scale**2,
            inner_sq_sum=inner_sq_sum,
            sum_scale=1.0 / scale,
        )
