r"""VarianceTest: the paper's adaptive batch-size tests, pooled exactly across workers."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from local_opt import _comm, _stats, backends
from local_opt._validate import is_int
from local_opt.backends.hooks import StatsCapture
from local_opt.backends.microbatch import stats_from_micro_batch_grads
from local_opt.backends.recorder import MicroBatchRecorder, Workspace

__all__ = ["VarianceTest"]

_TESTS = ("norm", "inner_product", "augmented")


def _check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (expected a positive finite number)")
    if not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"Invalid {name}: {value}")
    return float(value)


def _check_batch_size(batch_size: Any) -> int:
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r} (expected an int >= 1)")
    return int(batch_size)


class VarianceTest:
    r"""Suggest the next per-worker batch size with the norm, inner-product or augmented test.

    The adaptive batch-size strategies of
    `Lau et al., 2024 <https://arxiv.org/abs/2406.13936>`_ for Local SGD: after a
    synchronization, the :math:`M` workers pool the per-sample gradients of their last batches
    and grow the local batch size :math:`b` until the mini-batch gradient's variance is small
    compared with the gradient itself. With :math:`N = Mb` samples pooled, per-sample gradients
    :math:`g_i` (of ``loss_fn`` on sample :math:`i` alone), their mean :math:`\bar g` and
    unbiased variances (divided by :math:`N-1`):

    .. math::
        b'_{\text{norm}} &= \left\lceil \frac{\sum_j \operatorname{Var}_i(g_{ij})}
            {M \eta^2 \lVert\bar g\rVert^2} \right\rceil \\
        b'_{\text{inner\_product}} &= \left\lceil
            \frac{\operatorname{Var}_i \langle g_i, \bar g\rangle}
            {M \vartheta^2 \lVert\bar g\rVert^4} \right\rceil \\
        b'_{\text{augmented}} &= \max\left(b'_{\text{inner\_product}}, \left\lceil
            \frac{\sum_j \operatorname{Var}_i\big(g_i - \frac{\langle g_i,\bar g\rangle}
            {\lVert\bar g\rVert^2}\bar g\big)_j}{M \nu^2 \lVert\bar g\rVert^2}\right\rceil\right)

    and :meth:`suggest` returns ``min(max_batch_size, max(batch_size, b'))``: the batch never
    shrinks (unless ``batch_size`` already exceeds the cap, which wins).

    **Pooling is exact.** Each rank reduces its batch to the sufficient statistics of
    :mod:`local_opt._stats` (sample count, :math:`\sum g_i`, :math:`\sum\lVert g_i\rVert^2`,
    :math:`\sum\langle g_i,\bar g\rangle^2`); summing them over ranks gives the variances of the
    :math:`N` pooled samples (law of total variance), not an average of per-rank suggestions, so
    every rank computes and returns the same value. Communication per test: one all-reduce of the
    gradient's size plus two all-reduces of 2 and 1 float64 scalars; nothing without
    torch.distributed. With ``every=k`` the test runs only on every :math:`k`-th call of
    :meth:`suggest` (the first call included) and the other calls return the last suggestion
    without computing or communicating anything.

    **Backends** (how a rank gets its statistics):

    * ``"vmap"`` — exact per-sample gradients with ``torch.func`` (``vmap(grad(...))``) in chunks
      of ``chunk_size`` samples: the reference. With a BatchNorm that uses batch statistics
      (training mode), :math:`g_i` is the gradient of sample :math:`i`'s term of the *batch*
      loss (whole batch forwarded in training mode, so the normalization statistics depend on all
      samples): :math:`g_i = \nabla_\theta\,\ell(f_\theta(x_i; B), y_i)`, the rows of the Jacobian
      of the per-sample losses, whose mean is exactly the batch gradient. Costs about one
      vectorized forward/backward of the batch, twice for the inner-product tests when the
      per-sample gradients do not fit a 256 MiB buffer (they need a second pass at the pooled
      mean). With training-mode BatchNorm every per-sample gradient is a backward pass through
      the whole batch (cost quadratic in ``b``): prefer ``"microbatch"`` for large batches there.
      The model must be transformable by ``torch.func`` (no ``.item()``, no data-dependent
      Python control flow, no in-place updates of buffers other than BatchNorm's).
    * ``"microbatch"`` — an unbiased estimate from the mean gradients of ``micro_batches``
      equal micro-batches of the batch (one extra forward/backward of the batch; almost free
      with :meth:`record_micro_batches` when training already accumulates gradients over
      micro-batches). Works for any model; noisier (``micro_batches - 1`` degrees of freedom per
      rank instead of ``b - 1``). Formulas in :mod:`local_opt.backends.microbatch`.
    * ``"hooks"`` — exact per-sample squared norms and inner products from forward/backward
      hooks on the parameterized layers (Linear, also over sequences; Conv1d/2d; Embedding;
      LayerNorm, GroupNorm, BatchNorm; timm's LayerNorm2d, LayerScale and BatchNormAct2d;
      broadcast bare parameters such as a ViT's ``cls_token`` and ``pos_embed``), never
      materializing the model's per-sample gradients: per layer a closed form (Gram-matrix
      "ghost norms") or a per-layer per-sample gradient within a memory budget. About one
      extra forward/backward
      (1.06x a training step on timm resnet18, 1.4x on a ViT-tiny, measured on CPU). With a
      BatchNorm in training mode, :math:`g_i` is sample :math:`i`'s *contribution* to the batch
      gradient — each layer's parameter gradient split by the sample index of that layer's
      input and output, the backpropagated signal including the coupling through the batch
      statistics — whose mean is exactly the batch gradient (this differs from ``"vmap"``'s
      Jacobian rows, which split the gradient by loss term instead). Details in
      :mod:`local_opt.backends.hooks`.
    * ``"auto"`` — ``"hooks"`` when it covers every parameter of the model, else ``"vmap"`` or
      ``"microbatch"`` by estimated cost and memory, with one warning naming the layer and the
      choice (:mod:`local_opt.backends`). Every backend runs on the inner module of DDP and
      ``torch.compile`` wrappers, with gradients enabled (:mod:`local_opt.backends.stack`).

    ``suggest`` leaves the model as it found it: parameters, buffers (BatchNorm running
    statistics), ``.grad``, train/eval mode and ``requires_grad`` flags. Only parameters with
    ``requires_grad=True`` count.

    Args:
        model (nn.Module): the model being trained (each rank's replica).
        loss_fn (callable): ``loss_fn(outputs, targets)``, the *mean-reduced* loss used for
            training, e.g. ``F.cross_entropy``. The per-sample loss is
            ``loss_fn(model(x[None]), y[None])``; a batch's loss must be the mean of its samples'
            losses (true for mean reductions with the same number of elements per sample).
        test (str): ``"norm"``, ``"inner_product"`` or ``"augmented"`` (default: ``"norm"``).
        eta (float): :math:`\eta` of the norm test; smaller asks for larger batches
            (default: 0.1).
        theta (float): :math:`\vartheta` of the (augmented) inner-product test (default: 0.9).
        nu (float): :math:`\nu` of the orthogonality part of the augmented test (default: 5.84).
        max_batch_size (int, optional): cap on the suggested per-worker batch size
            (default: None, no cap).
        backend (str): ``"auto"``, ``"hooks"``, ``"vmap"`` or ``"microbatch"``
            (default: ``"auto"``).
        process_group (ProcessGroup, optional): the workers to pool over (default: None, the
            world group; :math:`M` = its size, 1 without torch.distributed).
        every (int): run the test on every ``every``-th call only (default: 1).
        chunk_size (int, optional): samples per ``vmap`` call of the ``"vmap"`` backend, bounding
            its memory; None for the whole batch at once (default: 32).
        micro_batches (int): micro-batches per batch for the ``"microbatch"`` backend, at
            least 2; a remainder of ``b mod micro_batches`` samples is left out (default: 4).

    Attributes:
        last_stats (dict): the statistics behind the last suggestion, for logging: the pooled
            sums (``count``, ``unit_size``, ``world_size``, ``mean_sq_norm``, ``sq_norm_sum``,
            ``inner_sum``, ``inner_sq_sum``), the three variances, the real-valued
            ``raw_norm``, ``raw_inner_product``, ``raw_orthogonality``, ``raw_augmented`` and the
            chosen test's ``raw`` (NaN for the inner-product statistics when ``test="norm"``
            with the ``"vmap"`` backend, which skips them), plus ``test``, ``backend``,
            ``round``, ``rank``, ``batch_size`` (given), ``suggested`` (returned), ``ran`` (False
            on skipped rounds) and ``reason`` (why the batch size was kept, or None).

    Example::

        >>> vt = VarianceTest(model, F.cross_entropy, test="norm", eta=0.1, max_batch_size=1024)
        >>> opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=8,
        ...                      module=model)
        >>> sampler = AdaptiveBatchSampler(dataset, batch_size=32)
        >>> loader = DataLoader(dataset, batch_sampler=sampler)
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     F.cross_entropy(model(x), y).backward()
        ...     opt.step()
        ...     if opt.synced:  # a round just ended: all ranks hold the same model
        ...         b = vt.suggest(x, y, sampler.batch_size)
        ...         sampler.set_batch_size(b)

    .. note::
        Defaults. :math:`\eta = 0.1` is the default of the first author's reference
        implementation of these tests (`AdAdaGrad <https://github.com/timlautk/AdAdaGrad>`_,
        Lau, Liu and Kolar, 2024), whose experiment scripts use :math:`\eta` from 0.1 to 0.5;
        :math:`\vartheta = 0.9` and :math:`\nu = 5.84` are the values of Bollapragada, Byrd and
        Nocedal, 2018, "Adaptive sampling strategies for stochastic optimization", which
        introduced the augmented inner-product test. Treat them as starting points and tune per
        task: the suggested batch scales as :math:`1/\eta^2` (:math:`1/\vartheta^2`,
        :math:`1/\nu^2`).

    .. warning::
        :meth:`suggest` is a collective call when the group has several ranks: every rank must
        call it at the same rounds (with the same ``every``), right after a synchronization so
        that all ranks hold the same parameters — otherwise the pooled gradients mix different
        models. All ranks must use the same batch size (and micro-batch size).

    .. note::
        When fewer than two samples are pooled, the mean gradient is zero, or a statistic is not
        finite, :meth:`suggest` returns ``batch_size`` unchanged with a ``RuntimeWarning``
        (never NaN), and ``last_stats["reason"]`` says why.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        test: str = "norm",
        eta: float = 0.1,
        theta: float = 0.9,
        nu: float = 5.84,
        max_batch_size: int | None = None,
        backend: str = "auto",
        process_group: dist.ProcessGroup | None = None,
        every: int = 1,
        chunk_size: int | None = 32,
        micro_batches: int = 4,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"Invalid loss_fn: expected a callable, got {type(loss_fn).__name__}")
        if test not in _TESTS:
            raise ValueError(f"Invalid test: {test!r} (expected one of {', '.join(_TESTS)})")
        if backend != "auto":
            backends.get(backend)  # ValueError naming the choices
        if max_batch_size is not None and (not is_int(max_batch_size) or max_batch_size < 1):
            raise ValueError(f"Invalid max_batch_size: {max_batch_size!r} (expected an int >= 1)")
        if not is_int(every) or every < 1:
            raise ValueError(f"Invalid every: {every!r} (expected an int >= 1)")
        if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
            raise ValueError(f"Invalid chunk_size: {chunk_size!r} (expected an int >= 1 or None)")
        if not is_int(micro_batches) or micro_batches < 2:
            raise ValueError(f"Invalid micro_batches: {micro_batches!r} (expected an int >= 2)")
        self.model = model
        self.loss_fn = loss_fn
        self.test = test
        self.eta = _check_positive_float("eta", eta)
        self.theta = _check_positive_float("theta", theta)
        self.nu = _check_positive_float("nu", nu)
        self.max_batch_size = None if max_batch_size is None else int(max_batch_size)
        self.backend = backend
        self.process_group = process_group
        self.every = int(every)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.micro_batches = int(micro_batches)
        self.last_stats: dict[str, Any] = {}
        self._calls = 0  # calls of suggest*, saved in state_dict
        self._last: int | None = None  # last suggestion, saved in state_dict
        self._workspace = Workspace()  # record_micro_batches' buffers, reused between steps

    def __repr__(self) -> str:
        cap = "" if self.max_batch_size is None else f", max_batch_size={self.max_batch_size}"
        params = {"norm": f"eta={self.eta}", "inner_product": f"theta={self.theta}"}
        p = params.get(self.test, f"theta={self.theta}, nu={self.nu}")
        return (
            f"{type(self).__name__}(test={self.test!r}, {p}{cap}, backend={self.backend!r}, "
            f"every={self.every})"
        )

    def suggest(self, inputs: Tensor, targets: Tensor, batch_size: int) -> int:
        """Run the test on this rank's batch pooled with the other ranks'; return the new ``b``.

        Args:
            inputs (Tensor): this rank's batch of inputs (leading dimension = samples), usually
                the last batch of the round.
            targets (Tensor): the matching targets.
            batch_size (int): the current per-worker batch size :math:`b`.

        Returns:
            int: ``min(max_batch_size, max(batch_size, b'))``, the same on every rank.
        """
        batch_size = _check_batch_size(batch_size)
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise TypeError("Invalid inputs/targets: expected tensors")
        if inputs.shape[0] < 1 or targets.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"Invalid inputs/targets: {inputs.shape[0]} inputs and {targets.shape[0]} targets "
                f"(expected the same number, at least 1)"
            )
        skipped = self._skip(batch_size)
        if skipped is not None:
            return skipped
        backend, stats = backends.compute(
            self.backend,
            self.model,
            self.loss_fn,
            inputs,
            targets,
            chunk_size=self.chunk_size,
            micro_batches=self.micro_batches,
            inner_products=self.test != "norm",
        )
        return self._decide(stats, batch_size, backend)

    def suggest_from_micro_batch_grads(
        self, grads: Sequence[Sequence[Tensor]], micro_batch_size: int, batch_size: int
    ) -> int:
        """Like :meth:`suggest` with the ``"microbatch"`` estimate, from gradients already computed.

        For training with gradient accumulation: pass the gradients of the micro-batches of the
        last step and no forward/backward is spent on the test. :meth:`record_micro_batches`
        does the same from ordinary ``backward()`` calls, without copying gradients.

        Args:
            grads: ``grads[l]`` is the list of gradients (one per parameter, the same parameters in
                the same order on every rank) of the *mean* loss over micro-batch ``l`` — not
                divided by the number of accumulation steps.
            micro_batch_size (int): samples per micro-batch.
            batch_size (int): the current per-worker batch size :math:`b`.

        Example::

            >>> params = [p for p in model.parameters() if p.requires_grad]
            >>> grads = []
            >>> for xs, ys in zip(x.chunk(4), y.chunk(4)):  # gradient accumulation, 4 steps
            ...     g = torch.autograd.grad(F.cross_entropy(model(xs), ys), params)
            ...     grads.append(g)
            ...     for p, gi in zip(params, g):
            ...         p.grad = gi / 4 if p.grad is None else p.grad.add_(gi, alpha=1 / 4)
            >>> opt.step()
            >>> if opt.synced:
            ...     sampler.set_batch_size(vt.suggest_from_micro_batch_grads(grads, len(xs), b))
        """
        batch_size = _check_batch_size(batch_size)
        stats = stats_from_micro_batch_grads(grads, micro_batch_size)  # validates; cheap
        skipped = self._skip(batch_size)
        if skipped is not None:
            return skipped
        return self._decide(stats, batch_size, "microbatch_grads")

    def record_micro_batches(
        self, micro_batch_size: int, *, grad_scale: float | None = None
    ) -> MicroBatchRecorder:
        r"""Record the micro-batch statistics of a gradient-accumulation step as it runs.

        The cheapest way to run the test when training accumulates gradients: every
        ``backward()`` inside the ``with`` block is one micro-batch, and hooks on the parameters
        read each micro-batch's gradient on its way into ``.grad`` (nothing is recomputed, the
        training code is unchanged, and ``.grad`` ends up exactly as without the recorder).
        Then :meth:`suggest_from_recorded` runs the test with the ``"microbatch"`` estimate of
        :mod:`local_opt.backends.microbatch`, pooled over the ranks. The norm test keeps no
        gradient (one read of each micro-batch gradient); the inner-product tests also copy the
        gradients of all micro-batches but the first into ``k - 1`` gradient-sized buffers that
        this VarianceTest keeps for the next step. Details and costs:
        :class:`~local_opt.backends.recorder.MicroBatchRecorder`.

        Args:
            micro_batch_size (int): samples per micro-batch (the same for every micro-batch and
                on every rank).
            grad_scale (float, optional): the factor the micro-batch *mean* loss is multiplied
                by before ``backward()`` — with a GradScaler, its scale times that. None (the
                default) means ``1 / k`` for ``k`` recorded micro-batches: the usual
                ``(loss / k).backward()``. The suggested batch size does not depend on a factor
                shared by all ranks; the variances and norms in :attr:`last_stats` do.

        Returns:
            MicroBatchRecorder: a context manager, single-use per step (it can be entered again
            for a later step).

        Example::

            >>> k = 4
            >>> ends_round = opt.local_step + 1 == opt.sync_every
            >>> with vt.record_micro_batches(len(x) // k) if ends_round else nullcontext() as rec:
            ...     for xs, ys in zip(x.chunk(k), y.chunk(k)):
            ...         (F.cross_entropy(model(xs), ys) / k).backward()
            >>> opt.step()
            >>> if opt.synced:
            ...     sampler.set_batch_size(vt.suggest_from_recorded(rec, sampler.batch_size))

        .. warning::
            Ask for the suggestion before anything modifies ``.grad`` in place (gradient
            clipping, ``zero_grad(set_to_none=False)``, ``GradScaler.unscale_``): the sum of
            the micro-batch gradients is read from ``.grad`` itself, and an error is raised if
            it changed. Run no other backward pass inside the block.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        return MicroBatchRecorder(
            params,
            micro_batch_size,
            grad_scale=grad_scale,
            keep_grads=self.test != "norm",
            workspace=self._workspace,
        )

    def suggest_from_recorded(self, recorder: MicroBatchRecorder, batch_size: int) -> int:
        """Like :meth:`suggest`, from a finished :meth:`record_micro_batches` block.

        A collective call, like :meth:`suggest`: every rank calls it at the same steps. The
        gradients are those of the recorded step, taken at each rank's parameters *before* the
        round's averaging (as with :meth:`suggest_from_micro_batch_grads`); with Local SGD the
        ranks' models then differ by up to ``sync_every`` local steps, and that disagreement
        counts as variance (the suggestion errs towards larger batches). :meth:`suggest` after
        the round avoids it, at the price of a forward/backward.

        Args:
            recorder (MicroBatchRecorder): returned by :meth:`record_micro_batches` of this
                test, after its ``with`` block.
            batch_size (int): the current per-worker batch size :math:`b`.
        """
        batch_size = _check_batch_size(batch_size)
        if not isinstance(recorder, MicroBatchRecorder):
            raise TypeError(
                f"Invalid recorder: expected a MicroBatchRecorder, got {type(recorder).__name__}"
            )
        if self.test != "norm" and not recorder.keep_grads:
            raise ValueError(
                f"Invalid recorder: it kept no gradients, which test={self.test!r} needs (make it "
                "with this VarianceTest's record_micro_batches)"
            )
        stats = recorder.grad_stats()  # validates; cheap
        skipped = self._skip(batch_size)
        if skipped is not None:
            return skipped
        return self._decide(stats, batch_size, "microbatch_recorded")

    def suggest_from_capture(self, capture: StatsCapture, batch_size: int) -> int:
        """Like :meth:`suggest`, from the exact statistics a :class:`~local_opt.StatsCapture`
        took from the training step's own forward and backward (no extra pass).

        A collective call, like :meth:`suggest`. As with :meth:`suggest_from_recorded`, the
        statistics are those of each rank's parameters before the round's averaging.

        Args:
            capture (StatsCapture): after its ``with`` block and the ``backward()`` inside it.
            batch_size (int): the current per-worker batch size :math:`b`.
        """
        batch_size = _check_batch_size(batch_size)
        if not isinstance(capture, StatsCapture):
            raise TypeError(
                f"Invalid capture: expected a StatsCapture, got {type(capture).__name__}"
            )
        stats = capture.grad_stats()  # validates; cheap
        skipped = self._skip(batch_size)
        if skipped is not None:
            return skipped
        return self._decide(stats, batch_size, "hooks_capture")

    def _skip(self, batch_size: int) -> int | None:
        """Count the call; on a round without test, the last suggestion (else None)."""
        call = self._calls
        self._calls += 1
        if call % self.every == 0 or self._last is None:
            return None
        out = self._clamp(max(batch_size, self._last))
        self.last_stats = {"round": call, "ran": False, "batch_size": batch_size, "suggested": out}
        self.last_stats.update(test=self.test, reason=f"skipped (every={self.every})")
        return out

    def _clamp(self, b: int) -> int:
        return b if self.max_batch_size is None else min(self.max_batch_size, b)

    def _decide(self, stats: _stats.GradStats, batch_size: int, backend: str) -> int:
        pooled = _stats.pool(stats, self.process_group)
        info: dict[str, Any] = pooled.as_dict()
        info.update(
            test=self.test,
            backend=backend,
            round=self._calls - 1,
            batch_size=batch_size,
            ran=True,
            rank=_comm.rank(self.process_group),
        )
        self.last_stats = info
        g2 = pooled.mean_sq_norm
        if pooled.count < 2:
            return self._keep(batch_size, f"fewer than two gradient units pooled ({pooled.count})")
        if not math.isfinite(g2):
            return self._keep(batch_size, f"non-finite mean gradient norm ({g2})")
        if g2 == 0.0:
            return self._keep(batch_size, "zero mean gradient")
        info.update(_stats.raw_batch_sizes(pooled, self.eta, self.theta, self.nu))
        raw = info[f"raw_{self.test}"]
        info["raw"] = raw
        if not math.isfinite(raw):
            return self._keep(batch_size, f"non-finite statistic (raw {self.test} b' = {raw})")
        out = self._clamp(max(batch_size, math.ceil(raw)))
        info.update(suggested=out, reason=None)
        self._last = out
        return out

    def _keep(self, batch_size: int, reason: str) -> int:
        warnings.warn(
            f"VarianceTest: {reason}; keeping batch_size={batch_size}", RuntimeWarning, stacklevel=3
        )
        self.last_stats.update(suggested=batch_size, reason=reason)
        self._last = max(batch_size, self._last or 0)
        return batch_size

    def state_dict(self) -> dict[str, Any]:
        """The call counter and the last suggestion (plain Python values)."""
        return {"calls": self._calls, "last_suggestion": self._last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s counter and last suggestion."""
        missing = {"calls", "last_suggestion"} - set(state_dict)
        if missing:
            raise ValueError(f"Invalid state_dict: missing keys {sorted(missing)}")
        calls, last = state_dict["calls"], state_dict["last_suggestion"]
        if not is_int(calls) or calls < 0:
            raise ValueError(f"Invalid state_dict: calls={calls!r}")
        if last is not None and (not is_int(last) or last < 1):
            raise ValueError(f"Invalid state_dict: last_suggestion={last!r}")
        self._calls = int(calls)
        self._last = None if last is None else int(last)
