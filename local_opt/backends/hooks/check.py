r"""Accounting for the hooks backend: every covered parameter's gradient is explained, or reported.

The rules see a parameter only through the calls of its module that the forward hooks captured.
A parameter can also receive gradient through a path the hooks do not see: a covered ``Linear``
whose weight is used functionally elsewhere (a tied head ``F.linear(h, embed.weight)``),
``nn.MultiheadAttention``'s ``out_proj`` (its weight is used by
``F.multi_head_attention_forward``, its ``forward`` never runs), a module that calls
``F.conv2d(x, self.conv.weight)`` itself, ... Counting such a gradient as zero would be silently
wrong. So the sum of the per-sample contributions the rules computed, :math:`S_p = \sum_i g_{ip}`,
is compared with the batch gradient :math:`G_p` of each covered parameter :math:`p`:

.. math::
    \lVert S_p - G_p\rVert \le \text{rtol}\,\max(\lVert S_p\rVert, \lVert G_p\rVert)
        + \epsilon_{\text{dtype}} \textstyle\sqrt{\sum_q \lVert G_q\rVert^2}

with ``rtol`` = 1e-6 in float64, 1e-3 in float32 and 3e-2 when the layers ran in float16 or
bfloat16 (autocast): a use outside the hooks that carries less than that fraction of a
parameter's gradient is not detected.

* :func:`~local_opt.backends.hooks.hooks_grad_stats` asks autograd for :math:`G_p` on the first
  pass per model and per combination of module modes (``train``/``eval``) — the weight
  gradients the rules otherwise skip: measured 2.4x the unchecked pass on timm resnet18 at
  32x32, b=32, one CPU thread (oneDNN's convolution weight gradient is slow there) — and then
  trusts the model's structure for later passes (a model whose forward takes another path for
  another batch is checked only on the first).
* :class:`~local_opt.backends.hooks.StatsCapture` compares on the first capture per model,
  parameters and module modes, and again every 16th capture: the training step's backward
  computes :math:`G_p` anyway; a hook on each parameter keeps two numbers of it,
  :math:`\lVert G_p\rVert` and :math:`\langle G_p, p\rangle` (a random direction for this
  purpose: a discrepancy that keeps both is of measure zero). Not every step: the hooks and the
  comparison are ~7 small tensor operations per parameter, ~40 % of a step on small models
  (timm test_vit at 32 px, b = 16); the captures in between check only that the step is finite.

A mismatch raises :class:`UnaccountedGradient` naming the parameters; the ``"hooks"`` backend
then warns (:func:`warn_unaccounted`) and hands the model to the exact ``"vmap"`` backend, and
:func:`~local_opt.backends.hooks.plan.unsupported_layers` reports the model from then on.

Non-finite numbers say nothing about unseen uses: when a gradient of a diverging step (or of a
loss scaler's overflowing step) holds an Inf or a NaN, or is so large that its norm overflows,
:math:`\lVert S_p - G_p\rVert` is NaN for every parameter it reaches. The check then raises
:class:`NonFiniteGradient` instead, naming those parameters: the step's statistics are not
usable, the model's coverage is not in question (it stays checked on the next finite step).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["NonFiniteGradient", "UnaccountedGradient", "UnsupportedShapes"]

_LOW_RTOL = 3e-2
_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3}

# Models whose covered parameters were checked: the parameters and the module modes checked.
_CHECKED: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
# Models with a parameter the hooks did not account for, with its names.
UNCOVERED: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()


class UnaccountedGradient(RuntimeError):
    """A parameter received gradient through a path the hooks did not see.

    Attributes:
        names (list[str]): the qualified names of those parameters.
    """

    #: Why, when the caller does not say: the accounting check of :func:`check_sums` failed.
    SUMS = (
        "the per-sample contributions it computed do not add up to the batch gradient (the "
        "parameter is also used outside its module's forward, or its module's forward never ran)"
    )

    def __init__(self, names: Sequence[str], reason: str | None = None) -> None:
        self.names = list(names)
        self.reason = self.SUMS if reason is None else reason
        super().__init__(f"The hooks backend {self.headline}; use the vmap or micro-batch backend")

    @property
    def headline(self) -> str:
        """What went wrong, for the error and for the fallback's warning."""
        return f"did not see every use of {', '.join(self.names)} ({self.reason})"


class UnsupportedShapes(UnaccountedGradient):
    """A covered layer's saved tensors do not have one row per sample (e.g. MobileViT folds
    image patches into the batch dimension before its transformer blocks), so the rule cannot
    split them by sample. Handled like :class:`UnaccountedGradient`: the model goes to ``vmap``.
    """

    @property
    def headline(self) -> str:
        return f"cannot split the rows of {', '.join(self.names)} by sample ({self.reason})"


class NonFiniteGradient(FloatingPointError):
    """The gradients of the step are not finite (Inf or NaN) or too large for their dtype, so
    the accounting check cannot compare them: the training diverges, or a loss scaler's step
    overflowed. Not a failure of the hooks backend: every backend's statistics of this step are
    non-finite.

    Attributes:
        names (list[str]): the parameters with a non-finite gradient, sum or fingerprint.
        stats (GradStats | None): the step's statistics, with ``sq_norm_sum`` NaN (set by
            :class:`~local_opt.backends.hooks.StatsCapture` and
            :func:`~local_opt.backends.hooks.hooks_grad_stats`), for a caller that keeps its
            batch size on non-finite statistics as :class:`~local_opt.VarianceTest` does.
    """

    def __init__(self, names: Sequence[str], dtype: torch.dtype) -> None:
        self.names = list(names)
        self.stats: object | None = None
        shown = ", ".join(self.names[:4]) + (
            f" and {len(self.names) - 4} more" if len(self.names) > 4 else ""
        )
        super().__init__(
            f"The gradients of this step are not finite (Inf or NaN, or beyond the range of "
            f"{dtype}) at {shown}: the training diverges (or a loss scaler's step overflowed). "
            "Lower the learning rate, clip the gradients (torch.nn.utils.clip_grad_norm_) or add "
            "a warm-up; the per-sample statistics of such a step are not finite either"
        )


def _key(model: nn.Module, params: Sequence[Tensor], training: tuple | None) -> tuple:
    if training is None:
        training = tuple(m.training for m in model.modules())
    return tuple(map(id, params)), training


def needs_check(
    model: nn.Module, params: Sequence[Tensor], training: tuple | None = None
) -> bool:
    """Whether ``params`` of ``model`` in its current modes have not been checked yet
    (``training``: the modules' ``training`` flags in ``model.modules()`` order, if the caller
    has them)."""
    return bool(params) and _CHECKED.get(model) != _key(model, params, training)


def mark_checked(
    model: nn.Module, params: Sequence[Tensor], training: tuple | None = None
) -> None:
    _CHECKED[model] = _key(model, params, training)


# StatsCapture's checks: per model, the parameters and module modes last checked, and the
# captures since. Every ``CAPTURE_RECHECK_EVERY``-th capture of a model is checked again (every
# one while the parameters or modes change, or after a failed check): the check is two tensor
# ops per parameter inside the backward and five after it, measured ~40 % of a step of timm
# test_vit at 32 px, b = 16 (a fixed cost per parameter, small against a step at 224 px).
_CAPTURE_CHECKED: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()
CAPTURE_RECHECK_EVERY = 16


def capture_check_due(model: nn.Module, params: Sequence[Tensor]) -> tuple | None:
    """The key to pass to :func:`mark_capture_checked` if this capture of ``model`` must run the
    accounting check, else None (and the capture is counted)."""
    key = _key(model, params, None)
    seen = _CAPTURE_CHECKED.get(model)
    if seen is None or seen[0] != key or seen[1] + 1 >= CAPTURE_RECHECK_EVERY:
        return key
    seen[1] += 1
    return None


def mark_capture_checked(model: nn.Module, key: tuple) -> None:
    _CAPTURE_CHECKED[model] = [key, 0]


def _names(model: nn.Module, params: Sequence[Tensor]) -> list[str]:
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), name)
    return [by_id.get(id(p), f"<parameter {tuple(p.shape)}>") for p in params]


def _rtol(dtype: torch.dtype, low: bool) -> float:
    return _LOW_RTOL if low else _RTOL.get(dtype, _LOW_RTOL)


def unaccounted(
    model: nn.Module,
    params: Sequence[Tensor],
    sums: Sequence[Tensor],
    reference: Sequence[Tensor | None],
    low: bool = False,
) -> list[str]:
    """Names of the parameters whose contribution sums ``sums`` miss part of ``reference`` (the
    batch gradients, None for unused parameters), with the tolerance of the module docstring.
    One host synchronization for all parameters."""
    if not params:
        return []
    diffs, scales, refs = [], [], []
    for s, g in zip(sums, reference):
        s = s.detach()
        g = torch.zeros_like(s) if g is None else g.detach().to(s.dtype)
        g = g.to_dense() if g.is_sparse else g
        diffs.append(torch.linalg.vector_norm(s - g, dtype=torch.float64))
        scales.append(
            torch.maximum(
                torch.linalg.vector_norm(s, dtype=torch.float64),
                torch.linalg.vector_norm(g, dtype=torch.float64),
            )
        )
        refs.append(torch.linalg.vector_norm(g, dtype=torch.float64))
    dev = diffs[0].device
    d, sc, rf = torch.stack([torch.stack([t.to(dev) for t in x]) for x in (diffs, scales, refs)])
    d, sc = d.tolist(), sc.tolist()
    _raise_nonfinite(model, params, [(di, si) for di, si in zip(d, sc)])
    total = math.sqrt(sum(r**2 for r in rf.tolist()))
    bad = []
    for p, di, si in zip(params, d, sc):
        eps = torch.finfo(p.dtype).eps if p.dtype.is_floating_point else 0.0
        if not di <= _rtol(p.dtype, low) * si + eps * total:
            bad.append(p)
    return _names(model, bad)


def _raise_nonfinite(
    model: nn.Module, params: Sequence[Tensor], rows: Sequence[Sequence[float]]
) -> None:
    """Raise :class:`NonFiniteGradient` naming the parameters whose row of the check's numbers
    holds an Inf or a NaN."""
    bad = [p for p, row in zip(params, rows) if not all(map(math.isfinite, row))]
    if bad:
        raise NonFiniteGradient(_names(model, bad), bad[0].dtype)


class GradFingerprints:
    """Two numbers per parameter of the batch gradient of one backward, ``‖G_p‖`` and
    ``⟨G_p, p⟩``, read by hooks on the parameters (used by :class:`StatsCapture`)."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.seen: dict[int, tuple[Tensor, Tensor]] = {}
        self._handles = [p.register_hook(self._hook(j)) for j, p in enumerate(self.params)]

    def _hook(self, j: int):
        def hook(g: Tensor) -> None:
            g = g.detach().to_dense() if g.is_sparse else g.detach()
            p = self.params[j].detach()
            self.seen[j] = (  # in the gradient's dtype: the tolerance is far above its error
                torch.linalg.vector_norm(g).double(),
                torch.dot(g.reshape(-1), p.reshape(-1).to(g.dtype)).double(),
            )

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def unaccounted(self, model: nn.Module, sums: Sequence[Tensor], low: bool) -> list[str]:
        """Names of the parameters whose contribution sums ``sums`` disagree with the batch
        gradient's fingerprints (a parameter the backward never reached has gradient 0)."""
        if not self.params:
            return []
        rows = []
        dev = sums[0].device
        for j, (p, s) in enumerate(zip(self.params, sums)):
            s = s.detach()
            pd = p.detach()
            zero = torch.zeros((), dtype=torch.float64, device=s.device)
            gn, gd = self.seen.get(j, (zero, zero))
            rows.append(
                torch.stack(
                    [
                        torch.linalg.vector_norm(s).double(),
                        torch.dot(s.reshape(-1), pd.reshape(-1).to(s.dtype)).double(),
                        gn.to(s.device),
                        gd.to(s.device),
                        torch.linalg.vector_norm(pd).double(),
                    ]
                ).to(dev)
            )
        table = torch.stack(rows).tolist()
        _raise_nonfinite(model, self.params, table)
        total = math.sqrt(sum(r[2] ** 2 for r in table))
        bad = []
        for p, (sn, sd, gn, gd, pn) in zip(self.params, table):
            rtol = _rtol(p.dtype, low)
            eps = torch.finfo(p.dtype).eps
            scale = max(sn, gn)
            if not (
                abs(sn - gn) <= rtol * scale + eps * total
                and abs(sd - gd) <= rtol * scale * pn + eps * total * pn
            ):
                bad.append(p)
        return _names(model, bad)


def warn_unaccounted(model: nn.Module, error: UnaccountedGradient) -> None:
    """Warn once per model that the hooks backend hands it to ``"vmap"``; remember the model as
    not covered."""
    from torch.nn.modules.batchnorm import _BatchNorm

    first = model not in UNCOVERED
    UNCOVERED[model] = error.names
    if first:
        coupled = any(
            isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)
            for m in model.modules()
        )
        cost = (
            " (its BatchNorm-with-batch-statistics path costs O(b^2): about b forward+backward "
            "passes; backend='microbatch' is the cheap estimate)"
            if coupled
            else ""
        )
        warnings.warn(
            f"The hooks backend {error.headline}; using the exact 'vmap' backend for this "
            f"model instead{cost}",
            RuntimeWarning,
            stacklevel=4,
        )
