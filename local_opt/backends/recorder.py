r"""The micro-batch recorder: the micro-batch statistics of gradient accumulation, read from its
own backward passes (:meth:`local_opt.VarianceTest.record_micro_batches`).

The estimate is the ``"microbatch"`` backend's (:mod:`local_opt.backends.microbatch`); only the
way the micro-batch gradients are obtained differs: hooks on the parameters read each one on its
way into ``.grad`` instead of a separate forward/backward per micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from local_opt._stats import GradStats, reduce_units
from local_opt.backends.microbatch import _check_micro_batch_size, _dot, _wide

__all__: list[str] = []  # private module


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
        if sq.shape[0] < k:  # passes that reached no parameter
            sq = torch.cat([sq, sq.new_zeros(k - sq.shape[0])])
        keep, first, kept = self.keep_grads, dict(self._first), self._kept

        def dots(v: Sequence[Tensor]) -> Tensor:
            out = torch.zeros(k, dtype=torch.float64, device=v[0].device)
            for j, u0 in first.items():
                w = _wide(v[j]).reshape(-1)
                rest = [(u, _dot(g, w)) for u, g in kept.get(j, [])]
                total = _dot(sums[j], w)
                for u, d in rest:
                    out[u] += d
                    total = total - d
                out[u0] += total
            return out / scale

        return reduce_units(
            sums,
            sq / scale**2,
            dots if keep else None,
            unit_size=self.micro_batch_size,
            sum_scale=1.0 / scale,
        )
