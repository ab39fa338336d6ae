r"""Learning rates for a batch that grows: the coupling rules and a sample-indexed schedule.

When the per-worker batch grows from :math:`b_0` to :math:`b` (:math:`S = b/b_0`), an optimizer
step at the learning rate tuned for :math:`b_0` no longer makes the progress it was tuned for:
at an equal sample budget a grown batch takes :math:`S` times fewer steps. A *coupling rule*
multiplies the learning rate of each step by a factor :math:`c(S) \ge 1`
(:func:`lr_factor`); :class:`~local_opt.VarianceTest` and the baseline schedules of
:mod:`local_opt.schedules` apply it to an optimizer *during* its steps (``optimizer=...,
lr_coupling=...``), through the optimizer's step pre/post hooks, so that learning-rate schedulers
keep working unchanged and ``group["lr"]`` (and the optimizer's ``state_dict``) always holds the
schedule's value. :class:`SampleLR` indexes a schedule by the samples consumed instead of the
steps taken, so that a cosine or step schedule still ends at the end of the sample budget when
the batch grows.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from local_opt._validate import is_int
from local_opt.policy import adascale_gain

__all__ = ["RULES", "lr_factor", "auto_rule", "SampleLR", "warmup_cosine"]

#: The coupling rules (``"auto"`` is resolved by :func:`auto_rule`).
RULES = ("none", "sqrt", "linear", "adascale", "seesaw")

#: What ``lr_coupling="auto"`` means for each optimizer family (see :func:`auto_rule`).
AUTO_RULES = {"adam": "adascale", "sgd": "linear"}


def lr_factor(
    rule: str,
    scale: float,
    *,
    variance: float | None = None,
    sq_norm: float | None = None,
    decay: float = 1.0,
    power: float = 0.5,
) -> float:
    r"""The learning-rate multiplier of ``rule`` for a batch ``scale`` times the base batch.

    With :math:`S = b/b_0 \ge 1`:

    .. math::
        c_{\text{none}} = 1, \qquad c_{\text{sqrt}} = \sqrt S, \qquad
        c_{\text{linear}} = S, \qquad
        c_{\text{adascale}} = \frac{\operatorname{tr}\Sigma/b_0 + |G|^2}
            {\operatorname{tr}\Sigma/b + |G|^2} \in [1, S], \qquad
        c_{\text{seesaw}} = \min\Big(S^{k},\ \frac{1}{d}\Big)

    * ``"sqrt"``: the square-root rule for Adam-type optimizers (Malladi et al., 2022; the
      :math:`\sqrt 2` per batch doubling of OLMo-core's batch-size warm-up).
    * ``"linear"``: Goyal et al., 2017, for SGD.
    * ``"adascale"``: AdaScale's gain ratio (`Johnson et al., 2020
      <https://arxiv.org/abs/2007.05105>`_), ``variance`` the per-sample
      :math:`\operatorname{tr}\Sigma` and ``sq_norm`` :math:`|G|^2`: linear while the noise
      dominates, 1 once the gradient does. Without estimates (None): 1.
    * ``"seesaw"``: the rule of Seesaw (`Meterez et al., 2025
      <https://arxiv.org/abs/2510.14717>`_) read as a coupling. Seesaw replaces a schedule's
      learning-rate cut by :math:`\alpha < 1` with a cut by :math:`\sqrt\alpha` and a batch
      growth by :math:`1/\alpha`, from the equivalence of the two for normalized SGD (their
      proxy for Adam) in the variance-dominated regime: a batch :math:`S` times larger acts like
      a learning rate :math:`S^{k}` times smaller, :math:`k = 1/2` (for SGD their equivalence is
      :math:`k = 1`: a doubled batch is a halved learning rate). After the schedule has decayed
      the learning rate to :math:`d = \text{lr}/\text{lr}_{\text{peak}}` (``decay``), a batch grown
      by :math:`S` by some other decision (a variance test) has already done :math:`S^{-k}` of
      that decay, so the schedule's learning rate is raised by :math:`S^k`, but never above the
      peak: :math:`\text{lr}_{\text{coupled}} = \min(\text{lr}\cdot S^k,\ \text{lr}_{\text{peak}})`.
      Before the schedule decays (warm-up, peak) the factor is 1; under Seesaw's own schedule
      (:math:`S = 1/d`) it gives Seesaw's :math:`\text{lr}_{\text{peak}}\sqrt d`.
      ``power`` is :math:`k`.

    Every rule gives exactly 1.0 at :math:`S = 1`.

    Args:
        rule (str): one of :data:`RULES`.
        scale (float): :math:`S = b/b_0`, > 0 (a batch below the base gets
            :math:`c(S) \le 1` by the same formulas; AdaScale's gain is then in :math:`[S, 1]`).
        variance (float, optional): ``"adascale"``: per-sample :math:`\operatorname{tr}\Sigma`
            divided by :math:`b_0` (the base batch's gradient variance).
        sq_norm (float, optional): ``"adascale"``: :math:`|G|^2`.
        decay (float): ``"seesaw"``: the schedule's current lr over its peak, in [0, 1]
            (default: 1; 0 means no cap).
        power (float): ``"seesaw"``: :math:`k`, 1/2 for Adam-type optimizers, 1 for SGD
            (default: 0.5).
    """
    if rule not in RULES:
        raise ValueError(f"Invalid rule: {rule!r} (expected one of {', '.join(RULES)})")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0:
        raise ValueError(f"Invalid scale: {scale!r} (expected a positive number)")
    if scale == 1 or rule == "none":
        return 1.0
    if rule == "sqrt":
        return math.sqrt(scale)
    if rule == "linear":
        return float(scale)
    if rule == "adascale":
        if variance is None or sq_norm is None:
            return 1.0
        return adascale_gain(variance, sq_norm, scale)
    if not (0.0 <= decay <= 1.0):
        raise ValueError(f"Invalid decay: {decay!r} (expected 0 <= decay <= 1)")
    if not power > 0:
        raise ValueError(f"Invalid power: {power!r} (expected > 0)")
    grown = math.sqrt(scale) if power == 0.5 else float(scale) ** power
    return grown if decay == 0 else min(grown, 1.0 / decay)


def optimizer_family(optimizer: Any) -> str:
    """``"adam"`` for optimizers with ``betas`` in their defaults (Adam, AdamW, NAdam, RAdam,
    Adamax, timm's Lamb, AdamP, ...), ``"sgd"`` for the others; a wrapper with an ``optimizer``
    attribute (:class:`~local_opt.LocalOptimizer`) is looked through."""
    while isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        optimizer = optimizer.optimizer
    defaults = getattr(optimizer, "defaults", {}) or {}
    return "adam" if "betas" in defaults else "sgd"


def auto_rule(optimizer: Any) -> str:
    r"""The rule ``lr_coupling="auto"`` stands for with ``optimizer``: :data:`AUTO_RULES` of its
    family (:func:`optimizer_family`), ``"adascale"`` for Adam-type optimizers and ``"linear"``
    (:math:`S`, Goyal et al.'s linear scaling rule) for SGD.

    SGD: chosen on the validation split of ``make paper``'s Fashion-MNIST task (4 workers, SGD
    with momentum, seed 0, the policy's default :math:`\eta = 1.4`; ``docs/lr-coupling.md``):
    85.58 % with ``"linear"`` in 25 rounds, 84.88 % with ``"seesaw"`` (22 rounds), 84.92 % with
    ``"adascale"`` (25 rounds); constant small batch 85.46 % in 60 rounds. Seesaw's
    :math:`\min(S, \text{lr}_{\text{peak}}/\text{lr})` leaves the learning rate alone before the
    schedule decays, so a batch grown early takes fewer steps at the same learning rate. On the
    earlier quick tasks (digits, where the rules were within two validation images of each other)
    ``"seesaw"`` had been chosen on a tie. Read afterwards (not used for the choice), the same
    runs tie on the test split (84.74 % for ``"linear"`` and ``"seesaw"``): the SGD choice rests
    on validation differences of one seed.

    Adam-type: chosen on the validation split of the project's two quick tasks (2 workers, equal
    sample budget, seed 0; checked on seed 1; ``docs/lr-coupling.md``): on the byte-level LM with AdamW
    the final validation loss was 1.730 without coupling, 1.673 with ``"sqrt"``, 1.692 with
    ``"seesaw"`` and 1.632 with ``"adascale"`` (constant small batch: 1.607); on digits with SGD
    every rule ended within two validation images of the others (97.8–98.9 %), with the lowest
    validation loss for ``"seesaw"`` (0.0399; ``"sqrt"`` 0.0401, ``"linear"`` 0.0414, none
    0.0419, ``"adascale"`` 0.0487). Seed 1: LM 1.746 without coupling, 1.620 with
    ``"adascale"`` (constant small batch 1.603); digits 0.0464 without, 0.0421 with ``"seesaw"``.
    """
    return AUTO_RULES[optimizer_family(optimizer)]


def resolve_rule(lr_coupling: Any, optimizer: Any) -> str:
    """``lr_coupling`` checked, ``"auto"`` resolved for ``optimizer`` (``"none"`` without one:
    there is nothing to couple)."""
    if lr_coupling == "auto":
        return "none" if optimizer is None else auto_rule(optimizer)
    if lr_coupling not in RULES:
        raise ValueError(
            f"Invalid lr_coupling: {lr_coupling!r} (expected 'auto' or one of {', '.join(RULES)})"
        )
    return str(lr_coupling)


def _scale(batch_sizes: Callable[[], tuple[int | None, int | None]]) -> float:
    """:math:`S = b/b_0` from an owner's ``(b0, b)``; 1 while either is unknown."""
    b0, b = batch_sizes()
    return 1.0 if b0 is None or b is None else b / b0


class _Coupling:
    r"""Applies a rule's factor to ``optimizer``'s learning rates during each ``step()``.

    A step pre-hook multiplies every group's ``lr`` by the factor (nothing is touched when the
    factor is 1) and a post-hook puts the saved values back, so schedulers and ``state_dict``
    see the schedule's learning rate. The owner (a VarianceTest or a schedule) tells the current
    and base batch sizes through ``batch_sizes`` and the noise estimates through ``estimates``.
    """

    def __init__(
        self,
        optimizer: Optimizer | None,
        rule: str,
        batch_sizes: Callable[[], tuple[int | None, int | None]],
        estimates: Callable[[], dict[str, float] | None] | None = None,
    ) -> None:
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"Invalid optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.rule = rule
        self.power = 0.5 if optimizer_family(optimizer) == "adam" else 1.0  # "seesaw"'s k
        self._batch_sizes = batch_sizes
        self._estimates = estimates
        self.peak_lrs: list[float] = []  # per group, the largest schedule lr seen ("seesaw")
        self.last_factors: list[float] = []  # applied at the last step, per group
        self._saved: list[Any] | None = None
        self._handles: list[Any] = []
        if optimizer is not None and rule != "none":
            self._handles = [
                optimizer.register_step_pre_hook(self._pre_hook),
                optimizer.register_step_post_hook(self._post_hook),
            ]

    def scale(self) -> float:
        return _scale(self._batch_sizes)

    def factor(self, group: int = 0, lr: Any = None) -> float:
        """The factor for param group ``group`` at schedule learning rate ``lr`` (default: the
        group's current ``lr``)."""
        s = self.scale()
        if s == 1.0 or self.rule == "none":
            return 1.0
        if self.rule == "adascale":
            b0 = self._batch_sizes()[0]
            est = self._estimates() if self._estimates is not None else None
            if est is None or b0 is None:
                return 1.0
            return lr_factor("adascale", s, variance=est["variance"] / b0, sq_norm=est["sq_norm"])
        if self.rule != "seesaw":
            return lr_factor(self.rule, s)
        if lr is None:
            lr = self.optimizer.param_groups[group]["lr"] if self.optimizer is not None else 1.0
        lr = float(lr)
        peak = max(self.peak_lrs[group] if group < len(self.peak_lrs) else lr, lr)
        decay = 1.0 if peak <= 0 else min(1.0, lr / peak)
        return lr_factor("seesaw", s, decay=decay, power=self.power)

    def _pre_hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._saved is not None:  # the last step raised before the post-hook: restore first
            self._restore(optimizer)
        groups = optimizer.param_groups
        saved, factors = [], []
        for i, group in enumerate(groups):
            lr = group["lr"]
            f = self.factor(i, lr)
            if i < len(self.peak_lrs):
                self.peak_lrs[i] = max(self.peak_lrs[i], float(lr))
            else:
                self.peak_lrs.append(float(lr))
            saved.append(lr)
            factors.append(f)
            if f != 1.0:
                group["lr"] = lr * f
        self._saved, self.last_factors = saved, factors

    def _post_hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._restore(optimizer)

    def _restore(self, optimizer: Optimizer) -> None:
        saved, self._saved = self._saved, None
        for group, lr in zip(optimizer.param_groups, saved or []):
            group["lr"] = lr

    def remove(self) -> None:
        """Remove the hooks (the learning rates are left as the schedule set them)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "peak_lrs": list(self.peak_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        peaks = state.get("peak_lrs", [])
        if not isinstance(peaks, (list, tuple)) or not all(
            isinstance(p, numbers.Real) and not isinstance(p, bool) for p in peaks
        ):
            raise ValueError(f"Invalid state_dict: lr_coupling peak_lrs={peaks!r}")
        if state.get("rule", self.rule) != self.rule:
            warnings.warn(
                f"lr_coupling: the state was saved with rule {state['rule']!r}, this object uses "
                f"{self.rule!r}",
                RuntimeWarning,
                stacklevel=3,
            )
        self.peak_lrs = [float(p) for p in peaks]


#: ``bn_momentum`` values (``"auto"`` is resolved by the owner: VarianceTest, schedules).
BN_MOMENTUM = ("samples", "none")


def resolve_bn_momentum(bn_momentum: Any, default: str = "samples") -> str:
    """``bn_momentum`` checked, ``"auto"`` replaced by ``default``; ``ValueError`` otherwise."""
    if bn_momentum == "auto":
        return default
    if bn_momentum not in BN_MOMENTUM:
        raise ValueError(
            f"Invalid bn_momentum: {bn_momentum!r} (expected 'auto' or one of "
            f"{', '.join(map(repr, BN_MOMENTUM))})"
        )
    return str(bn_momentum)


class _RunningStats:
    r"""Keeps the horizon of the norm layers' running statistics fixed in *samples* as the batch
    grows (``bn_momentum="samples"``).

    A ``BatchNorm``/``InstanceNorm`` layer with ``track_running_stats`` and a ``momentum`` updates
    :math:`r \leftarrow (1 - m)\,r + m\,\hat{r}` once per training forward. At a fixed
    momentum, a batch grown by :math:`S = b/b_0` takes :math:`S` times fewer steps over the same
    samples, so the running statistics average over :math:`S` times more samples and lag the model
    (with ``momentum=0.01``, torchvision's MobileNetV3 default, 80 steps at ``b = 8 b_0`` leave
    them 45 % at their initial values, and eval-mode accuracy at chance). One step at :math:`b`
    stands for :math:`S` steps at :math:`b_0`, whose weight on the older statistics is
    :math:`(1 - m_0)^S`, so each layer gets

    .. math::
        m = 1 - (1 - m_0)^{S}

    (:math:`m_0` the layer's momentum when the owner was built; unchanged at :math:`S = 1`;
    layers with ``momentum=None``, a cumulative average, are left alone). The owner calls
    :meth:`apply` whenever its batch size changes; :meth:`remove` puts the :math:`m_0` back.
    """

    def __init__(
        self, module: nn.Module | None, batch_sizes: Callable[[], tuple[int | None, int | None]]
    ) -> None:
        self._batch_sizes = batch_sizes
        self.layers: list[tuple[nn.Module, float]] = []
        if module is not None:
            self.layers = [
                (m, float(m.momentum))
                for m in module.modules()
                if isinstance(m, nn.modules.batchnorm._NormBase)
                and m.track_running_stats
                and m.momentum is not None
            ]

    def momentum(self, m0: float) -> float:
        s = _scale(self._batch_sizes)
        return m0 if s == 1.0 else 1.0 - (1.0 - m0) ** s

    def apply(self) -> None:
        for layer, m0 in self.layers:
            layer.momentum = self.momentum(m0)

    def remove(self) -> None:
        for layer, m0 in self.layers:
            layer.momentum = m0
        self.layers = []


def warmup_cosine(warmup: float = 0.0, final: float = 0.0) -> Callable[[float], float]:
    r"""A ``lr_lambda`` of the training progress :math:`p \in [0, 1]` for :class:`SampleLR`:
    linear warm-up over the first ``warmup`` of training, then cosine decay to ``final``.

    .. math::
        \lambda(p) = \begin{cases}
            p / w & p < w \\
            f + (1 - f)\,\frac{1 + \cos(\pi\, \frac{p - w}{1 - w})}{2} & p \ge w
        \end{cases}

    Args:
        warmup (float): :math:`w`, the warm-up's fraction of training, in ``[0, 1)``
            (default: 0).
        final (float): :math:`f`, the final factor, in ``[0, 1]`` (default: 0).
    """
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Real) or not 0 <= warmup < 1:
        raise ValueError(f"Invalid warmup: {warmup!r} (expected 0 <= warmup < 1)")
    if isinstance(final, bool) or not isinstance(final, numbers.Real) or not 0 <= final <= 1:
        raise ValueError(f"Invalid final: {final!r} (expected 0 <= final <= 1)")
    w, f = float(warmup), float(final)

    def lr_lambda(p: float) -> float:
        if p < w:
            return p / w
        q = min(1.0, max(0.0, (p - w) / (1.0 - w)))
        return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * q))

    return lr_lambda


class SampleLR(LambdaLR):
    r"""A learning-rate schedule indexed by the samples consumed, not by the steps taken.

    With :math:`s` the samples counted so far by :meth:`step` and :math:`T` =
    ``total_samples``, every param group gets

    .. math::
        \text{lr} = \text{lr}_{\text{base}} \cdot \lambda\big(\min(s/T,\ 1)\big)

    (:math:`\text{lr}_{\text{base}}` the group's ``initial_lr``, as with
    :class:`~torch.optim.lr_scheduler.LambdaLR`). When the batch grows, each step consumes more
    samples and the schedule advances faster, so a cosine or step schedule still ends at the end
    of the sample budget and keeps its meaning ("halve the learning rate after 60 % of the data")
    whatever the batch sizes. Compose it with a learning-rate coupling (``VarianceTest(...,
    optimizer=opt)``): the coupling multiplies the learning rate this schedule sets during each
    step.

    Args:
        optimizer (Optimizer): the optimizer (a :class:`~local_opt.LocalOptimizer` too).
        lr_lambda (callable or list of callables): :math:`\lambda(p)` of the progress
            :math:`p \in [0, 1]`, or one per param group, e.g. :func:`warmup_cosine`.
        total_samples (int): :math:`T`, the sample budget (of all workers together if
            ``step`` counts them).
        last_epoch (int): as in ``LambdaLR`` (default: -1).

    Example::

        >>> sched = SampleLR(opt, warmup_cosine(0.05), total_samples=len(dataset) * epochs)
        >>> for x, y in loader:
        ...     loss_fn(model(x), y).backward()
        ...     opt.step()
        ...     opt.zero_grad()
        ...     sched.step(world_size * len(x))  # the samples this step consumed, all workers

    .. note::
        ``step(n)`` may also be called *before* ``optimizer.step()`` with the samples the coming
        step will consume, so that a step's learning rate is indexed by the samples seen at its
        end (``examples/train.py`` does this; the first step of a warm-up then does not run at
        learning rate 0). torch's warning about that order is not raised for this scheduler.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Callable[[float], float] | Sequence[Callable[[float], float]],
        total_samples: int,
        last_epoch: int = -1,
    ) -> None:
        if not is_int(total_samples) or total_samples < 1:
            raise ValueError(f"Invalid total_samples: {total_samples!r} (expected an int >= 1)")
        lambdas = list(lr_lambda) if isinstance(lr_lambda, (list, tuple)) else [lr_lambda]
        if not all(callable(f) for f in lambdas):
            raise ValueError(f"Invalid lr_lambda: {lr_lambda!r} (expected callables)")
        self.total_samples = int(total_samples)
        self.samples_seen = 0
        super().__init__(optimizer, lr_lambda, last_epoch)  # type: ignore[arg-type]

    @property
    def progress(self) -> float:
        """:math:`\\min(s/T, 1)`."""
        return min(self.samples_seen / self.total_samples, 1.0)

    def step(self, samples: int | None = None) -> None:  # type: ignore[override]
        """Advance the schedule by ``samples`` (None or 0: re-evaluate at the same point)."""
        if samples is not None:
            if not is_int(samples) or samples < 0:
                raise ValueError(f"Invalid samples: {samples!r} (expected an int >= 0)")
            self.samples_seen += int(samples)
        if self._step_count == 1:
            # torch warns once if the schedule steps before the optimizer; either order is fine
            # here. Mark the optimizer as stepped (the flag only feeds that warning) rather than
            # filter the warning: a change of the warning filters resets every "once per
            # location" registry, and the user's warnings would be shown again after each step.
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
        super().step()

    def get_lr(self) -> list[float | Tensor]:  # type: ignore[override]
        p = self.progress
        return [base * f(p) for f, base in zip(self.lr_lambdas, self.base_lrs, strict=True)]

    def __repr__(self) -> str:
        return f"SampleLR(total_samples={self.total_samples}, samples_seen={self.samples_seen})"
