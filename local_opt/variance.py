r"""VarianceTest: the paper's adaptive batch-size tests, pooled exactly across workers."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from local_opt import _checks, _comm, _stats, backends
from local_opt._validate import is_int
from local_opt.accumulation import Accumulation
from local_opt.backends.hooks import StatsCapture
from local_opt.backends.hooks.check import NonFiniteGradient, UnaccountedGradient
from local_opt.backends.microbatch import stats_from_micro_batch_grads
from local_opt.backends.recorder import MicroBatchRecorder, Workspace
from local_opt.backends.vmap import uses_batch_statistics
from local_opt.lr import _Coupling, _RunningStats, resolve_bn_momentum, resolve_rule
from local_opt.policy import EMA, debiased_sq_norm, next_batch_size, robust_sq_norm

__all__ = ["VarianceTest"]

_TESTS = ("norm", "inner_product", "augmented")

#: Defaults of each policy (see VarianceTest's docstring for where each value comes from).
_POLICY_DEFAULTS: dict[str, dict[str, Any]] = {
    "smoothed": {
        "eta": 1.4,
        "theta": 0.9,
        "nu": 5.84,
        "smoothing": 0.9,
        "growth": 2.0,
        "hysteresis": 0.05,
        "outlier_ratio": 4.0,
        "min_dof": 8,
        "batch_statistics": "worker",
    },
    "paper": {
        "eta": 0.1,
        "theta": 0.9,
        "nu": 5.84,
        "smoothing": 0.0,
        "growth": None,
        "hysteresis": 0.0,
        "outlier_ratio": None,
        "min_dof": 0,
        "batch_statistics": "backend",
    },
}

#: The moving averages kept by VarianceTest: per-sample variances (trace of the covariance, the
#: variance along the mean gradient's direction, the orthogonal rest) and the de-biased |G|^2.
_EMA_KEYS = ("variance", "direction_variance", "orthogonal_variance", "sq_norm")

#: Floor of the de-biased |G|^2 as a fraction of the observed ||g_bar||^2 (policy.debiased_sq_norm):
#: 1 % keeps one noise-dominated round from asking for more than 100x the pooled batch.
_SQ_NORM_FLOOR = 0.01
# Why a statistic is not finite, nearly always: said with the reason to keep the batch size.
_DIVERGES = (
    ": the gradients hold an Inf or a NaN or overflow. With fp16 and a GradScaler this is an "
    "overflow the scaler skips (it lowers the scale; nothing to do); otherwise the training "
    "diverges (lower the learning rate, clip the gradients or add a warm-up)"
)


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

    With ``policy="paper"`` these are computed from the last round alone and :meth:`suggest`
    returns ``min(max_batch_size, max(batch_size, b'))``: the published tests, bit for bit.

    **The default policy, ``"smoothed"``**, asks the same questions of better estimates
    (:mod:`local_opt.policy`): :math:`\lVert\bar g\rVert^2` is inflated by the noise
    (:math:`\mathbb E\lVert\bar g\rVert^2 = |G|^2 + \operatorname{tr}\Sigma/N`), so it is
    replaced by the unbiased :math:`\widehat{|G|^2} = \lVert\bar g\rVert^2 -
    \operatorname{tr}\Sigma/N` (floored at 1 % of :math:`\lVert\bar g\rVert^2`); each numerator
    and this denominator enter their own bias-corrected moving average over the rounds, with an
    observation more than ``outlier_ratio`` times away from its average clipped; the test asks
    for the ratio of the averages. Until the variance estimates rest on ``min_dof`` degrees of
    freedom (8: per-sample statistics have them in the first round, :math:`M` workers' batch
    gradients give :math:`M - 1` a round) nothing is clipped and the batch does not grow. With
    :math:`\eta = 1` the norm test then asks for a *global* batch :math:`Mb` equal to the
    simple gradient noise scale :math:`B_{\text{simple}} = \operatorname{tr}\Sigma/|G|^2` of
    McCandlish et al., 2018 — the batch size beyond which larger batches stop reducing the number
    of steps proportionally.
    The batch moves only when the test asks for more than ``1 + hysteresis`` times it, by at
    most ``growth`` times per round, rounded to ``multiple_of``, never above the cap (the cap
    always wins, also on kept and skipped rounds) and never down.

    **Learning-rate coupling, on by default.** Given ``optimizer=...`` (a
    :class:`~local_opt.LocalOptimizer` or any ``torch.optim.Optimizer``), the test multiplies
    every param group's learning rate *during* each ``optimizer.step()`` by a factor
    :math:`c(S)` for the batch size it last returned, :math:`b`, relative to :math:`b_0`
    (``base_batch_size``, or the first ``batch_size`` given to a suggest method),
    :math:`S = b/b_0` (:func:`local_opt.lr.lr_factor`). ``lr_coupling="auto"`` (the default)
    chooses by the optimizer's family, from measurements on the project's tasks
    (``docs/lr-coupling.md``; :data:`local_opt.lr.AUTO_RULES`):

    .. math::
        \text{Adam-type:}\quad c(S) = \frac{\overline{V}/b_0 + \overline{|G|^2}}
            {\overline{V}/b + \overline{|G|^2}} \in [1, S], \qquad
        \text{SGD:}\quad c(S) = S

    The first is AdaScale's gain ratio (Johnson et al., 2020) from the test's own moving
    averages of the per-sample variance :math:`\overline V = \operatorname{tr}\Sigma` and of the
    de-biased :math:`\overline{|G|^2}` (:meth:`noise_estimates`): :math:`S` while the noise
    dominates the mini-batch gradient, 1 once the gradient does. The second is the linear
    scaling rule of SGD (Goyal et al., 2017): :math:`S` times the batch, :math:`S` times the
    learning rate, so that a step on the grown batch does the work of :math:`S` steps on
    :math:`b_0` while the noise dominates (the test grows the batch only then). On Fashion-MNIST's
    validation split (seed 0) it ended 0.7 points above Seesaw's :math:`\min(S,
    \text{lr}_{\text{peak}}/\text{lr})`, which does not raise the learning rate before the
    schedule decays; on the test split the two runs tie (docs/lr-coupling.md). ``"adascale"``, ``"seesaw"``
    (Meterez et al., 2025; :math:`\min(S^k,
    \text{lr}_{\text{peak}}/\text{lr})`, :math:`k = 1/2` for Adam-type optimizers, 1 for SGD),
    ``"sqrt"`` (:math:`\sqrt S`) and ``"linear"`` (:math:`S`) can be chosen for any optimizer;
    ``"none"`` opts out. A step pre-hook multiplies and a post-hook restores, so learning-rate
    schedulers (``LambdaLR``, ``OneCycleLR``, ``CosineAnnealingLR``, ``ReduceLROnPlateau``,
    :class:`~local_opt.SampleLR`) work unchanged, ``group["lr"]`` and the optimizer's
    ``state_dict`` hold the schedule's value, and a step at :math:`b = b_0` is bit for bit the
    uncoupled one. :math:`b_0`, :math:`b` and the coupling's state (the peak learning rates) are
    in this test's ``state_dict``. Index the schedule by samples (:class:`~local_opt.SampleLR`)
    so that it keeps its meaning when the batch grows. With ``policy="paper"``, ``"auto"`` means
    ``"none"`` (the published method runs at the user's learning rate); an explicit rule still
    applies. The coupling does not enter the test's decision (the same statistics give the same
    batch size). Apply every suggestion (``sampler.set_batch_size(vt.suggest(...))``): the factor
    is for the batch size the test returned.

    **Running statistics follow the batch too** (``bn_momentum="auto"``, with or without
    ``optimizer=``): the model's ``BatchNorm``/``InstanceNorm`` layers that track running
    statistics with a ``momentum`` get :math:`m = 1 - (1 - m_0)^{S}` for the batch size the
    test returned, so that their running averages span as many samples as at :math:`b_0`
    (fewer, larger steps would otherwise leave them behind the model: eval-mode accuracy at
    chance on torchvision's MobileNetV3, momentum 0.01, after 80 steps at :math:`8 b_0`).
    ``"auto"`` means ``"samples"``, and ``"none"`` with ``policy="paper"``; ``"none"`` leaves
    the momenta alone. :math:`m_0` is each layer's momentum when the test is built.

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
        eta (float, optional): :math:`\eta` of the norm test; smaller asks for larger batches.
            With ``policy="smoothed"`` the global batch :math:`Mb` follows
            :math:`B_{\text{simple}}/\eta^2`, :math:`B_{\text{simple}} =
            \operatorname{tr}\Sigma/|G|^2` (McCandlish et al., 2018): :math:`\eta = 1` trains at
            the noise scale, where their model predicts twice the minimal number of samples;
            the default :math:`\eta = 1.4 \approx \sqrt 2` at half of it, predicted 1.5 times
            the minimal samples for 3 times the minimal steps. Chosen on the validation split
            of ``make paper``'s Fashion-MNIST (SGD, 4 workers) and Shakespeare (AdamW, 2 workers)
            tasks, seed 0: :math:`\eta = 1` cost Fashion-MNIST 2.1 points of accuracy,
            :math:`\eta = 2` saved Shakespeare only 15 % of the rounds (docs/design.md,
            "Choice of η"). 0.1 with ``policy="paper"``, the reference implementation's default
            (see the note below).
        theta (float, optional): :math:`\vartheta` of the (augmented) inner-product test
            (default: 0.9, Bollapragada et al., 2018, for both policies; not tuned here. In
            ``make paper`` it asks for far smaller batches than the norm test with
            :math:`\eta = 2`: on the LM the batch stays near :math:`b_0`; docs/history.md, "Also").
        nu (float, optional): :math:`\nu` of the orthogonality part of the augmented test
            (default: 5.84, Bollapragada et al., 2018, for both policies).
        max_batch_size (int, optional): cap on the suggested per-worker batch size
            (default: None, no cap). Always wins.
        policy (str): ``"smoothed"`` (default) or ``"paper"``, the published tests exactly as
            published (one round, :math:`\lVert\bar g\rVert^2` as is, ceil, no limits).
        smoothing (float, optional): :math:`\beta` of the bias-corrected moving averages, per
            round (default: 0.9, an average over about the last 10 rounds: the value the
            project's earlier LM measurements of the noise-scale policy used, kept because it
            followed the noise scale smoothly on both tasks; AdaptDL's ``GradientNoiseScale``
            uses the same correction with 0.999 per step). ``0`` uses the last round only.
        growth (float, optional): largest factor by which the batch grows in one round
            (default: 2, the doubling of stagewise schedules; a single noisy round cannot
            send the batch to the cap). ``math.inf`` for no limit.
        hysteresis (float, optional): move only when the test asks for more than
            ``(1 + hysteresis) * b`` (default: 0.05, AdaptDL's rule of re-configuring only for
            a gain of at least 5 %).
        outlier_ratio (float, optional): a round's :math:`|G|^2` estimate is adjusted so that
            its noise scale is within this factor of the averaged one before it is averaged in
            (default: 4, about the largest round-to-round jump of the smoothed noise scale
            measured on the LM, 27 to 104; ``math.inf`` turns the clip off).
        min_dof (int, optional): degrees of freedom the variance estimates must rest on before
            the batch may grow and before a round is clipped against the averages (default: 8:
            a variance from :math:`D` degrees of freedom has a relative standard error of
            :math:`\sqrt{2/D}`, 0.5 at 8; per-sample statistics of :math:`N` samples give
            :math:`N - 1` at once, :math:`M` workers' batch gradients :math:`M - 1` a round, so
            2 workers wait 8 rounds. Chosen after measuring digits with :math:`M = 2`: the first
            round's single-degree estimate was 15–30 times the later ones and, with the clip
            anchored to it, sent the batch to the cap within 3 rounds on 2 of 3 seeds). ``0``
            decides from the first round.
        multiple_of (int): round a new batch size to a multiple of this, e.g. 8 for hardware
            friendly sizes (default: 1).
        batch_statistics (str, optional): what the variance is of when the model's BatchNorm
            normalizes with batch statistics (training mode). ``"worker"`` (the default with
            ``policy="smoothed"``): the variance of the mini-batch gradient training really
            uses, estimated from the :math:`M \ge 2` workers' batch gradients (each with
            BatchNorm over its whole batch, as in training; unbiased, :math:`M - 1` degrees of
            freedom per round, hence the smoothing), whatever ``backend`` says; with one worker
            the backend's own definition, with a ``RuntimeWarning`` (once) that says what to do
            instead (none for ``backend="microbatch"``). ``"backend"`` (the default with ``policy="paper"``):
            each backend's own per-sample definition (below). Chosen from measurements on digits
            (docs/design.md, "Choice of η"): the hooks backend's per-sample contributions overstate the
            batch gradient's variance 2.4–12×.
        backend (str): ``"auto"``, ``"hooks"``, ``"vmap"`` or ``"microbatch"``
            (default: ``"auto"``).
        process_group (ProcessGroup, optional): the workers to pool over (default: None, the
            world group; :math:`M` = its size, 1 without torch.distributed).
        every (int): run the test on every ``every``-th call only (default: 1).
        chunk_size (int, optional): samples per ``vmap`` call of the ``"vmap"`` backend, bounding
            its memory; None for the whole batch at once (default: 32).
        micro_batches (int): micro-batches per batch for the ``"microbatch"`` backend, at
            least 2; a remainder of ``b mod micro_batches`` samples is left out (default: 4).
        optimizer (Optimizer, optional): the optimizer whose learning rate is coupled to the
            batch size during each step (default: None: nothing is coupled, ``"auto"`` means
            ``"none"``; with an explicit rule :meth:`lr_factor` gives the factor to apply by
            hand).
        lr_coupling (str): ``"auto"``, ``"none"``, ``"adascale"``, ``"sqrt"``, ``"linear"`` or
            ``"seesaw"`` (default: ``"auto"``; see above).
        base_batch_size (int, optional): :math:`b_0`, the per-worker batch size the learning
            rate was tuned for (default: None, the first ``batch_size`` given to a suggest
            method).
        bn_momentum (str): ``"auto"``, ``"samples"`` (the norm layers' running statistics keep
            their horizon in samples, see above) or ``"none"`` (default: ``"auto"``:
            ``"samples"``, ``"none"`` with ``policy="paper"``).

    Attributes:
        last_stats (dict): the statistics behind the last suggestion, for logging: the pooled
            sums (``count``, ``unit_size``, ``world_size``, ``mean_sq_norm``, ``sq_norm_sum``,
            ``inner_sum``, ``inner_sq_sum``), the three variances, the real-valued
            ``raw_norm``, ``raw_inner_product``, ``raw_orthogonality``, ``raw_augmented`` and the
            chosen test's ``raw`` (NaN for the inner-product statistics when ``test="norm"``:
            the ``"vmap"`` and ``"hooks"`` backends and the capture skip them), plus ``test``,
            ``backend``, ``round``, ``rank``, ``batch_size`` (given), ``suggested`` (returned),
            ``ran`` (False on skipped rounds) and ``reason`` (why the batch size was kept, or None). The raw
            ``raw_*`` are the published one-round formulas with either policy; ``raw`` is what
            the decision used: with ``policy="smoothed"`` the test's ``smoothed_*`` value, next
            to ``sq_norm_debiased`` (this round), ``smoothed_variance``, ``smoothed_sq_norm``,
            ``noise_scale`` (their ratio, the global :math:`B_{\text{simple}}`) and ``dof``
            (degrees of freedom so far; ``reason`` says "warming up" below ``min_dof``).

    Example::

        >>> vt = VarianceTest(model, F.cross_entropy, max_batch_size=1024)  # untuned defaults
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

    With the learning rate coupled (the default once ``optimizer`` is given) and a schedule
    indexed by samples::

        >>> vt = VarianceTest(model, F.cross_entropy, optimizer=opt)  # lr_coupling="auto"
        >>> sched = SampleLR(opt, warmup_cosine(0.05), total_samples=budget)
        >>> # in the loop: opt.step(); sched.step(world_size * len(x)); after a round as above

    .. note::
        ``policy="paper"`` defaults. :math:`\eta = 0.1` is the default of the first author's reference
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
        finite, :meth:`suggest` returns ``batch_size`` (capped) with a ``RuntimeWarning``
        (never NaN), and ``last_stats["reason"]`` says why.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        test: str = "norm",
        eta: float | None = None,
        theta: float | None = None,
        nu: float | None = None,
        max_batch_size: int | None = None,
        policy: str = "smoothed",
        smoothing: float | None = None,
        growth: float | None = None,
        hysteresis: float | None = None,
        outlier_ratio: float | None = None,
        min_dof: int | None = None,
        multiple_of: int = 1,
        batch_statistics: str | None = None,
        backend: str = "auto",
        process_group: dist.ProcessGroup | None = None,
        every: int = 1,
        chunk_size: int | None = 32,
        micro_batches: int = 4,
        optimizer: Optimizer | None = None,
        lr_coupling: str = "auto",
        base_batch_size: int | None = None,
        bn_momentum: str = "auto",
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
        if policy not in _POLICY_DEFAULTS:
            names = ", ".join(_POLICY_DEFAULTS)
            raise ValueError(f"Invalid policy: {policy!r} (expected one of {names})")
        knobs = {
            "smoothing": smoothing,
            "growth": growth,
            "hysteresis": hysteresis,
            "outlier_ratio": outlier_ratio,
            "min_dof": min_dof,
        }
        if policy == "paper":
            given = [k for k, v in knobs.items() if v is not None]
            if given:
                raise RuntimeError(
                    f"VarianceTest(policy='paper') uses the published formulas; {given[0]}= "
                    "belongs to policy='smoothed'"
                )
        if not is_int(multiple_of) or multiple_of < 1:
            raise ValueError(f"Invalid multiple_of: {multiple_of!r} (expected an int >= 1)")
        defaults = _POLICY_DEFAULTS[policy]
        if batch_statistics is None:
            batch_statistics = defaults["batch_statistics"]
        if batch_statistics not in ("worker", "backend"):
            raise ValueError(
                f"Invalid batch_statistics: {batch_statistics!r} (expected 'worker' or 'backend')"
            )
        self.batch_statistics = batch_statistics
        self.model = model
        self.loss_fn = loss_fn
        self.test = test
        self.policy = policy
        self.eta = _check_positive_float("eta", defaults["eta"] if eta is None else eta)
        self.theta = _check_positive_float("theta", defaults["theta"] if theta is None else theta)
        self.nu = _check_positive_float("nu", defaults["nu"] if nu is None else nu)
        self.max_batch_size = None if max_batch_size is None else int(max_batch_size)
        self.multiple_of = int(multiple_of)
        self.smoothing = float(defaults["smoothing"] if smoothing is None else smoothing)
        if isinstance(smoothing, bool) or not (0.0 <= self.smoothing < 1.0):
            raise ValueError(f"Invalid smoothing: {smoothing!r} (expected 0 <= smoothing < 1)")
        g = defaults["growth"] if growth is None else growth
        self.growth = None if g is None or g == math.inf else _check_positive_float("growth", g)
        if self.growth is not None and self.growth <= 1.0:
            raise ValueError(f"Invalid growth: {growth!r} (expected a number > 1, or inf)")
        h = defaults["hysteresis"] if hysteresis is None else hysteresis
        if isinstance(h, bool) or not isinstance(h, numbers.Real) or not 0.0 <= h < math.inf:
            raise ValueError(f"Invalid hysteresis: {hysteresis!r} (expected a number >= 0)")
        self.hysteresis = float(h)
        r = defaults["outlier_ratio"] if outlier_ratio is None else outlier_ratio
        self.outlier_ratio = (
            None if r is None or r == math.inf else _check_positive_float("outlier_ratio", r)
        )
        if self.outlier_ratio is not None and self.outlier_ratio <= 1.0:
            raise ValueError(f"Invalid outlier_ratio: {outlier_ratio!r} (expected > 1, or inf)")
        d = defaults["min_dof"] if min_dof is None else min_dof
        if not is_int(d) or d < 0:
            raise ValueError(f"Invalid min_dof: {min_dof!r} (expected an int >= 0)")
        self.min_dof = int(d)
        # Moving averages of the per-sample variances and of the de-biased |G|^2 (policy.py).
        self._ema = {k: EMA(self.smoothing) for k in _EMA_KEYS}
        self._dof = 0  # degrees of freedom of the variance estimates so far, saved in state_dict
        self.backend = backend
        self.process_group = process_group
        self.every = int(every)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.micro_batches = int(micro_batches)
        self.last_stats: dict[str, Any] = {}
        self._calls = 0  # calls of suggest*, saved in state_dict
        self._last: int | None = None  # last suggestion, saved in state_dict
        self._workspace = Workspace()  # record_micro_batches' buffers, reused between steps
        self._warned: set[str] = set()  # one-time warnings already given
        self._short_calls = 0  # suggest calls in a row with fewer samples than batch_size
        # the capture last suggested from, and its block: one step's statistics count once
        self._used_capture: tuple[weakref.ref, int] | None = None
        _checks.warn_if_not_initialized("VarianceTest", process_group)
        # Learning-rate coupling (local_opt/lr.py): b0 and the batch size last returned.
        if base_batch_size is not None and (not is_int(base_batch_size) or base_batch_size < 1):
            raise ValueError(f"Invalid base_batch_size: {base_batch_size!r} (expected an int >= 1)")
        paper_auto = lr_coupling == "auto" and policy == "paper"
        self.lr_coupling = "none" if paper_auto else resolve_rule(lr_coupling, optimizer)
        self._base_batch: int | None = None if base_batch_size is None else int(base_batch_size)
        self._batch: int | None = None
        self._coupling = _Coupling(
            optimizer, self.lr_coupling, self._coupled_batch_sizes, self.noise_estimates
        )
        self.bn_momentum = resolve_bn_momentum(
            bn_momentum, "none" if policy == "paper" else "samples"
        )
        self._running = _RunningStats(
            model if self.bn_momentum == "samples" else None, self._coupled_batch_sizes
        )

    def __repr__(self) -> str:
        cap = "" if self.max_batch_size is None else f", max_batch_size={self.max_batch_size}"
        params = {"norm": f"eta={self.eta}", "inner_product": f"theta={self.theta}"}
        p = params.get(self.test, f"theta={self.theta}, nu={self.nu}")
        return (
            f"{type(self).__name__}(test={self.test!r}, {p}{cap}, policy={self.policy!r}, "
            f"backend={self.backend!r}, every={self.every})"
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

        Raises:
            ValueError: for a model without trainable parameters, or a ``loss_fn`` that does not
                return a scalar tensor. A batch smaller than ``batch_size`` (an epoch's short
                last batch) is used as given; on two calls in a row a ``RuntimeWarning`` (once)
                says to pass the batch the step trained on.
        """
        batch_size = _check_batch_size(batch_size)
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise TypeError("Invalid inputs/targets: expected tensors")
        if inputs.shape[0] < 1 or targets.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"Invalid inputs/targets: {inputs.shape[0]} inputs and {targets.shape[0]} targets "
                f"(expected the same number, at least 1)"
            )
        self._check_batch(inputs.shape[0], batch_size)
        _checks.check_trainable(self.model)
        skipped = self._skip(batch_size)
        if skipped is not None:
            return self._track(batch_size, skipped)
        name, micro_batches = self._estimator()
        backend, stats = backends.compute(
            name,
            self.model,
            _checks.CheckedLoss(self.loss_fn),
            inputs,
            targets,
            chunk_size=self.chunk_size,
            micro_batches=micro_batches,
            inner_products=self.test != "norm",
        )
        out = self._decide(stats, batch_size, "worker" if micro_batches == 1 else backend)
        return self._track(batch_size, out)

    def _estimator(self) -> tuple[str, int]:
        """The backend name and micro-batch count this round uses (``micro_batches=1``: per worker).

        With ``batch_statistics="worker"``, a model whose BatchNorm normalizes with batch
        statistics and at least two workers, every backend gives way to the per-worker estimate:
        the units are the workers' batch gradients, BatchNorm as in training.
        """
        if self.batch_statistics == "worker" and uses_batch_statistics(self.model):
            if _comm.world_size(self.process_group) >= 2:
                return "microbatch", 1
            if self.backend != "microbatch":
                self._warn_once(
                    "single_worker_batchnorm",
                    "VarianceTest: the model's BatchNorm uses batch statistics (training mode) "
                    "and there is one worker, so the variance of the batch gradient cannot come "
                    "from the workers' batch gradients (batch_statistics='worker'); using the "
                    f"{self.backend!r} backend's per-sample definition instead (the hooks "
                    "backend's per-sample contributions overstated that variance 2.4-12x on "
                    "digits, so the batch grows too fast). To "
                    "avoid it: run >= 2 workers; or use backend='microbatch' (micro-batch "
                    "gradients, BatchNorm as in training), or record_micro_batches / accumulate "
                    "with gradient accumulation; or pass batch_statistics='backend' to accept "
                    "the per-sample definition (and silence this warning)",
                )
        return self.backend, self.micro_batches

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _check_batch(self, samples: int, batch_size: int) -> None:
        """Explain (once) batches that keep being smaller than ``batch_size``.

        An epoch's last batch may be short, and so may a batch prefetched before a size change;
        fewer samples than ``batch_size`` on two calls in a row is a habit (e.g. ``x[:8]``). More
        samples than the batch (a less noisy estimate) are fine.
        """
        self._short_calls = self._short_calls + 1 if samples < batch_size else 0
        if self._short_calls >= 2:
            self._warn_once(
                "batch_mismatch",
                f"VarianceTest: got {samples} samples for batch_size={batch_size} on two "
                "calls in a row. The variance is estimated from the samples given (with "
                "BatchNorm in training mode: the variance of a batch of that size), while "
                "batch_size is the per-worker batch size the suggestion starts from "
                "(sampler.batch_size). Pass the batch the step trained on (an epoch's shorter "
                "last batch is fine). Warned once",
            )

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
            return self._track(batch_size, skipped)
        return self._track(batch_size, self._decide(stats, batch_size, "microbatch_grads"))

    def record_micro_batches(
        self, micro_batch_size: int | Sequence[int], *, grad_scale: float | None = None
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
            micro_batch_size (int or list of int): the samples in each micro-batch, in the order
                of the backward passes, e.g. ``[len(xs) for xs, _ in chunks]``: micro-batches of
                unequal sizes (``x.chunk(k)`` or :func:`samplers.micro_batches` when
                :math:`k \nmid b`) are weighted by their sizes (``last_stats["unit_size"]`` is
                then 1 and ``"weight_sum"`` the batch size). An int means every micro-batch has
                that size; if the model's inputs show micro-batches of different sizes along dim
                0, :meth:`suggest_from_recorded` raises a ``ValueError`` rather than weight them
                wrongly. A list whose length is not the number of backward passes is refused too.
            grad_scale (float, optional): with an int ``micro_batch_size``: the factor the
                micro-batch *mean* loss is multiplied by before ``backward()``, None (the
                default) meaning ``1 / k`` for ``k`` recorded micro-batches, the usual
                ``(loss / k).backward()``. With a list of sizes :math:`n_l` (:math:`N = \sum n_l`):
                the factor on top of :math:`n_l / N`, i.e. micro-batch :math:`l` backpropagates
                ``mean_loss * grad_scale * n_l / N`` (None: 1, so ``.grad`` is the gradient of
                the batch's mean loss). With a GradScaler, multiply by its scale. The suggested
                batch size does not depend on a factor shared by all ranks; the variances and
                norms in :attr:`last_stats` do.

        Returns:
            MicroBatchRecorder: a context manager, single-use per step (it can be entered again
            for a later step).

        Example::

            >>> chunks = micro_batches((x, y), 32)  # the last one may be shorter
            >>> sizes = [len(xs) for xs, _ in chunks]
            >>> with vt.record_micro_batches(sizes) if opt.will_sync else nullcontext() as rec:
            ...     for xs, ys in chunks:
            ...         (F.cross_entropy(model(xs), ys) * len(xs) / len(x)).backward()
            >>> opt.step()
            >>> if opt.synced:
            ...     sampler.set_batch_size(vt.suggest_from_recorded(rec, sampler.batch_size))

        .. warning::
            Ask for the suggestion before anything modifies ``.grad`` in place (gradient
            clipping, ``zero_grad(set_to_none=False)``, ``GradScaler.unscale_``): the sum of
            the micro-batch gradients is read from ``.grad`` itself, and an error is raised if
            it changed. Run no other backward pass inside the block.
        """
        _checks.check_trainable(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        return MicroBatchRecorder(
            params,
            micro_batch_size,
            grad_scale=grad_scale,
            keep_grads=self.test != "norm",
            workspace=self._workspace,
            model=self.model,
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
            return self._track(batch_size, skipped)
        return self._track(batch_size, self._decide(stats, batch_size, "microbatch_recorded"))

    def accumulate(
        self,
        optimizer: Any,
        batch: Any,
        micro_batch_size: int,
        *,
        grad_scale: float | None = None,
    ) -> Accumulation:
        r"""Gradient accumulation with the test's statistics recorded on the right step.

        Splits ``batch`` (a tensor, or a tuple, list or dict of tensors, samples along dim 0) into
        micro-batches of at most ``micro_batch_size`` samples and yields ``(micro_batch,
        weight)``; ``(loss * weight).backward()`` for each leaves the batch's mean gradient in
        ``.grad``. Only the step that ends a round (``optimizer.will_sync``) is recorded
        (:meth:`record_micro_batches`, weighted by the micro-batch sizes); its statistics are
        pooled over the ranks as soon as the last micro-batch is done, so clipping,
        ``GradScaler.unscale_`` and ``optimizer.step()`` may follow. Then
        :meth:`Accumulation.suggest` gives the next batch size (``batch_size`` unchanged after a
        step that was not recorded). Every rank must iterate to the end.

        Args:
            optimizer (LocalOptimizer): the optimizer whose ``step()`` follows.
            batch: this rank's batch.
            micro_batch_size (int): samples per micro-batch (the last one may be shorter).
            grad_scale (float, optional): as in :meth:`record_micro_batches`: a factor on every
                ``loss * weight`` (e.g. a ``GradScaler``'s scale) (default: None, 1).

        Example::

            >>> opt.zero_grad()
            >>> acc = vt.accumulate(opt, (x, y), micro_batch_size=16)
            >>> for (xs, ys), weight in acc:
            ...     (F.cross_entropy(model(xs), ys) * weight).backward()
            >>> torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            >>> opt.step()
            >>> if opt.synced:
            ...     sampler.set_batch_size(acc.suggest(sampler.batch_size))
        """
        return Accumulation(self, optimizer, batch, micro_batch_size, grad_scale)

    def _pool_recorded(self, recorder: MicroBatchRecorder) -> _stats.PooledStats | None:
        """A finished recording's statistics pooled over the ranks (collective), or None when the
        next suggestion will not run the test (``every``)."""
        stats = recorder.grad_stats()  # validates; reads .grad now, before any clipping
        if self._calls % self.every == 0 or self._last is None:
            return _stats.pool(stats, self.process_group)
        return None

    def _suggest_from_pooled(self, pooled: _stats.PooledStats | None, batch_size: int) -> int:
        batch_size = _check_batch_size(batch_size)
        skipped = self._skip(batch_size)
        if skipped is not None:
            return self._track(batch_size, skipped)
        if pooled is None:
            raise RuntimeError("VarianceTest: suggest was called between recording and this one")
        return self._track(
            batch_size, self._decide(None, batch_size, "microbatch_recorded", pooled=pooled)
        )

    def capture(
        self, active: bool = True, *, grad_scale: float = 1.0
    ) -> contextlib.AbstractContextManager[StatsCapture | None]:
        r"""Take this test's statistics from the training step itself: no extra pass.

        A :class:`~local_opt.StatsCapture` of :attr:`model` that keeps what this test needs
        (the norm test: only the per-sample squared norms, computed layer by layer inside the
        backward), or, when ``active`` is False, a context that does nothing and yields None.
        Run the step's forward *and* backward inside the block, then hand the capture to
        :meth:`suggest_from_capture` after ``opt.step()``.

        Args:
            active (bool): whether to capture, e.g. ``opt.will_sync`` (default: True).
            grad_scale (float): the factor the mean batch loss is multiplied by before
                ``backward()`` (default: 1.0), as in :class:`~local_opt.StatsCapture`.

        Example::

            >>> with vt.capture(active=opt.will_sync) as cap:
            ...     F.cross_entropy(model(x), y).backward()
            >>> opt.step()
            >>> if opt.synced:
            ...     sampler.set_batch_size(vt.suggest_from_capture(cap, sampler.batch_size))
        """
        if not active:
            return contextlib.nullcontext()
        _checks.check_trainable(self.model)
        return StatsCapture(
            backends.stack.unwrap(self.model),
            grad_scale=grad_scale,
            inner_products=self.test != "norm",
        )

    def suggest_from_capture(self, capture: StatsCapture, batch_size: int) -> int:
        """Like :meth:`suggest`, from the exact statistics a :class:`~local_opt.StatsCapture`
        took from the training step's own forward and backward (no extra pass).

        A collective call, like :meth:`suggest`. As with :meth:`suggest_from_recorded`, the
        statistics are those of each rank's parameters before the round's averaging. With
        ``batch_statistics="worker"``, at least two workers and a BatchNorm using batch
        statistics, the units are the workers' batch gradients (as in :meth:`suggest`), here
        the captured step's.

        Args:
            capture (StatsCapture): after its ``with`` block and the ``backward()`` inside it.
            batch_size (int): the current per-worker batch size :math:`b`.
        """
        batch_size = _check_batch_size(batch_size)
        if not isinstance(capture, StatsCapture):
            why = (
                " (capture(active=False) yields None: ask for a suggestion only after a step "
                "whose capture was active, e.g. when opt.synced)"
                if capture is None
                else ""
            )
            raise TypeError(
                f"Invalid capture: expected a StatsCapture, got {type(capture).__name__}{why}"
            )
        if backends.stack.unwrap(capture.model) is not backends.stack.unwrap(self.model):
            raise ValueError(
                f"Invalid capture: it was taken on a {type(capture.model).__name__}, not on this "
                "VarianceTest's model (make it with this test's capture())"
            )
        _checks.check_trainable(self.model)
        used = self._used_capture
        if used is not None and used[0]() is capture and used[1] == capture._blocks:
            raise RuntimeError(
                "VarianceTest.suggest_from_capture: this capture's step was already used for a "
                "suggestion (its round would count twice in the moving averages); take a new "
                "capture on the next round's last step"
            )
        if self.test != "norm" and not capture.inner_products:
            raise ValueError(
                f"Invalid capture: it kept no inner products, which test={self.test!r} needs "
                "(make it with this VarianceTest's capture())"
            )
        try:
            stats = capture.grad_stats()  # validates; cheap
        except NonFiniteGradient as e:  # a diverging step: keep b with a warning (after pooling)
            assert e.stats is not None
            stats = e.stats  # type: ignore[assignment]
        except UnaccountedGradient as e:  # no batch here to fall back with: say what to do
            raise RuntimeError(
                f"VarianceTest.suggest_from_capture: the in-step statistics cannot be taken on "
                f"this model ({e}). The in-step path has no fallback; use "
                "test.suggest(x, y, batch_size) after opt.step() instead: it probes the model "
                "and falls back to an exact backend with a warning"
            ) from e
        self._used_capture = (weakref.ref(capture), capture._blocks)
        self._check_batch(stats.count, batch_size)
        skipped = self._skip(batch_size)
        if skipped is not None:
            return self._track(batch_size, skipped)
        name, micro_batches = self._estimator()
        if micro_batches == 1:  # per worker: this rank's batch gradient is the one unit
            n = stats.count
            mean = [g * (stats.sum_scale / n) for g in stats.grad_sum]
            stats = stats_from_micro_batch_grads([mean], n)
            return self._track(batch_size, self._decide(stats, batch_size, "worker"))
        return self._track(batch_size, self._decide(stats, batch_size, "hooks_capture"))

    def _track(self, batch_size: int, out: int) -> int:
        """Remember the batch size returned (the coupling's :math:`b`); the first given is b0."""
        if self._base_batch is None:
            self._base_batch = batch_size
        self._batch = out
        self._running.apply()
        return out

    def _coupled_batch_sizes(self) -> tuple[int | None, int | None]:
        return self._base_batch, self._batch

    def lr_factor(self, group: int = 0) -> float:
        r"""The factor the learning rate of param group ``group`` is multiplied by in the coming
        ``optimizer.step()`` (1 before the first suggestion and with ``lr_coupling="none"``)."""
        return self._coupling.factor(group)

    @property
    def last_lr_factors(self) -> list[float]:
        """The factors applied in the last ``optimizer.step()``, one per param group (empty
        before the first step, or without ``optimizer``)."""
        return list(self._coupling.last_factors)

    @property
    def base_batch_size(self) -> int | None:
        """:math:`b_0` of the coupling: given, or the first ``batch_size`` passed to a suggest
        method (None before)."""
        return self._base_batch

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

    def _decide(
        self,
        stats: _stats.GradStats | None,
        batch_size: int,
        backend: str,
        pooled: _stats.PooledStats | None = None,
    ) -> int:
        if pooled is None:
            assert stats is not None
            pooled = _stats.pool(stats, self.process_group)
        info: dict[str, Any] = pooled.as_dict()
        info.update(
            test=self.test,
            policy=self.policy,
            backend=backend,
            round=self._calls - 1,
            batch_size=batch_size,
            ran=True,
            rank=_comm.rank(self.process_group),
        )
        self.last_stats = info
        g2 = pooled.mean_sq_norm
        if pooled.count < 2:
            return self._keep(
                batch_size,
                f"fewer than two gradient units pooled ({pooled.count}): a variance needs two "
                "or more (samples, micro-batches or workers). With accumulate() on one worker, "
                "use a micro_batch_size below the batch size, or take the statistics with "
                "capture() or suggest()",
            )
        if not math.isfinite(g2):
            return self._keep(batch_size, f"non-finite mean gradient norm ({g2}){_DIVERGES}")
        if g2 == 0.0:
            return self._keep(batch_size, "zero mean gradient")
        info.update(_stats.raw_batch_sizes(pooled, self.eta, self.theta, self.nu))
        observed = self._observe(pooled, info)
        if observed is not None:
            return self._keep(batch_size, observed)
        if self._dof < self.min_dof:  # too little evidence to grow yet: expected, no warning
            return self._keep(
                batch_size, f"warming up ({self._dof} of {self.min_dof} dof)", warn=False
            )
        if self.policy == "paper":
            raw = info[f"raw_{self.test}"]
        else:
            raw = info[f"smoothed_{self.test}"]
        info["raw"] = raw
        if not math.isfinite(raw):
            return self._keep(batch_size, f"non-finite statistic (raw {self.test} b' = {raw})")
        out = next_batch_size(
            batch_size,
            raw,
            cap=self.max_batch_size,
            growth=self.growth,
            hysteresis=self.hysteresis,
            multiple_of=self.multiple_of,
        )
        info.update(suggested=out, reason=None)
        self._last = out
        return out

    def _observe(self, pooled: _stats.PooledStats, info: dict[str, Any]) -> str | None:
        r"""Feed this round's estimates to the moving averages; the reason if they are unusable.

        Adds to ``info``: the de-biased ``sq_norm_debiased`` of this round, the averages
        ``smoothed_variance``, ``smoothed_sq_norm``, the global noise scale ``noise_scale``
        (:math:`\operatorname{tr}\Sigma/|G|^2` from the averages) and ``smoothed_<test>``, the
        batch sizes the tests ask for from the averages.
        """
        v = max(info["norm_variance"], 0.0)
        g2 = pooled.mean_sq_norm
        samples = pooled.count * pooled.unit_size
        obs = {"variance": v, "sq_norm": debiased_sq_norm(g2, v, samples, _SQ_NORM_FLOOR)}
        if self.test != "norm":
            obs["direction_variance"] = max(info["inner_product_variance"], 0.0) / g2
            obs["orthogonal_variance"] = max(info["orthogonal_variance"], 0.0)
        bad = [k for k, x in obs.items() if not math.isfinite(x)]
        if bad:
            return f"non-finite statistic ({bad[0]} = {obs[bad[0]]}){_DIVERGES}"
        info["sq_norm_debiased"] = obs["sq_norm"]
        if self._dof >= self.min_dof and self._ema["variance"].steps:  # an average to trust
            ref = self._ema["variance"].value / self._ema["sq_norm"].value
            obs["sq_norm"] = robust_sq_norm(v, obs["sq_norm"], ref, self.outlier_ratio)
        for key, x in obs.items():
            self._ema[key].update(x)
        self._dof += pooled.count - 1
        info["dof"] = self._dof
        m = pooled.world_size
        sv, sg = self._ema["variance"].value, self._ema["sq_norm"].value
        info.update(smoothed_variance=sv, smoothed_sq_norm=sg, noise_scale=sv / sg)
        info["smoothed_norm"] = sv / (m * self.eta**2 * sg)
        if self.test != "norm":
            ip = self._ema["direction_variance"].value / (m * self.theta**2 * sg)
            orth = self._ema["orthogonal_variance"].value / (m * self.nu**2 * sg)
            info.update(smoothed_inner_product=ip, smoothed_orthogonality=orth)
            info["smoothed_augmented"] = max(ip, orth)
        return None

    def noise_estimates(self) -> dict[str, float] | None:
        r"""The moving averages of the per-sample variance and of :math:`|G|^2`, or None.

        ``{"variance": tr Σ, "sq_norm": |G|², "noise_scale": tr Σ / |G|²}`` (per-sample
        :math:`\operatorname{tr}\Sigma`, de-biased :math:`|G|^2`, the global simple noise scale),
        from every round the test has run so far (with ``policy="paper"``: the last round only).
        None before the first round with usable statistics. Used by
        :class:`~local_opt.schedules.LRCoupling` for AdaScale's gain ratio.
        """
        v, g = self._ema["variance"], self._ema["sq_norm"]
        if v.steps == 0 or g.steps == 0:
            return None
        return {"variance": v.value, "sq_norm": g.value, "noise_scale": v.value / g.value}

    def _keep(self, batch_size: int, reason: str, warn: bool = True) -> int:
        out = self._clamp(batch_size)  # the cap wins here too
        if warn:
            warnings.warn(
                f"VarianceTest: {reason}; keeping batch_size={out}", RuntimeWarning, stacklevel=3
            )
        self.last_stats.update(suggested=out, reason=reason)
        self._last = self._clamp(max(batch_size, self._last or 0))
        return out

    def state_dict(self) -> dict[str, Any]:
        """The call counter, the last suggestion and the moving averages (plain Python values)."""
        return {
            "calls": self._calls,
            "last_suggestion": self._last,
            "dof": self._dof,
            "ema": {k: e.state_dict() for k, e in self._ema.items()},
            "lr_coupling": {
                "base_batch_size": self._base_batch,
                "batch_size": self._batch,
                **self._coupling.state_dict(),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s counter, last suggestion and moving averages.

        A state saved before the moving averages existed (no ``"ema"`` key) starts them empty.
        """
        missing = {"calls", "last_suggestion"} - set(state_dict)
        if missing:
            raise ValueError(f"Invalid state_dict: missing keys {sorted(missing)}")
        calls, last = state_dict["calls"], state_dict["last_suggestion"]
        if not is_int(calls) or calls < 0:
            raise ValueError(f"Invalid state_dict: calls={calls!r}")
        if last is not None and (not is_int(last) or last < 1):
            raise ValueError(f"Invalid state_dict: last_suggestion={last!r}")
        emas = {k: EMA(self.smoothing) for k in _EMA_KEYS}
        saved = state_dict.get("ema", {})
        if not isinstance(saved, dict) or set(saved) - set(_EMA_KEYS):
            raise ValueError(f"Invalid state_dict: ema={saved!r}")
        for k, state in saved.items():
            try:
                emas[k].load_state_dict(state)
            except (KeyError, TypeError) as e:
                raise ValueError(f"Invalid state_dict: ema[{k!r}]={state!r}") from e
        dof = state_dict.get("dof", 0)
        if not is_int(dof) or dof < 0:
            raise ValueError(f"Invalid state_dict: dof={dof!r}")
        coupling = state_dict.get("lr_coupling", {})  # absent in states saved before it existed
        if not isinstance(coupling, dict):
            raise ValueError(f"Invalid state_dict: lr_coupling={coupling!r}")
        base, current = coupling.get("base_batch_size"), coupling.get("batch_size")
        if any(b is not None and (not is_int(b) or b < 1) for b in (base, current)):
            raise ValueError(f"Invalid state_dict: lr_coupling={coupling!r}")
        self._coupling.load_state_dict(coupling)
        if base is not None:
            self._base_batch = int(base)
        self._batch = None if current is None else int(current)
        self._running.apply()
        self._calls = int(calls)
        self._last = None if last is None else int(last)
        self._ema = emas
        self._dof = int(dof)
