r"""Exact per-sample gradient statistics from layer hooks (the ``"hooks"`` backend).

The variance tests of `Lau et al. (2024) <https://arxiv.org/abs/2406.13936>`_ need only two
per-sample quantities, :math:`\lVert g_i\rVert^2` and :math:`\langle g_i, v\rangle` for one vector
:math:`v` (the pooled mean gradient :math:`\bar g`):

.. math::
    \sum_i \lVert g_i - \bar g\rVert^2 = \sum_i \lVert g_i\rVert^2 - N\lVert\bar g\rVert^2, \qquad
    \sum_i \langle g_i, \bar g\rangle^2, \qquad
    \lVert g_i\rVert^2 - \frac{\langle g_i, \bar g\rangle^2}{\lVert\bar g\rVert^2}.

:func:`hooks_grad_stats` gets both from one forward and one backward pass, without materializing
the whole model's per-sample gradients: forward hooks on the parameterized layers save each
layer's input and the autograd edge of its output; ``torch.autograd.grad`` of ``N·L`` (``L`` the
mean-reduced batch loss) at those edges gives every layer's output gradient
:math:`\delta_i = \partial\ell_i/\partial\,\mathrm{out}_i`; per-layer closed forms
(:mod:`.rules`, one module per layer family) turn ``(input, δ)`` into :math:`\sum_i g_i`,
the per-sample squared norms and, later, the per-sample inner products. Per-sample squared
norms are summed over layers; inner products are summed over layers *before* they are squared.

The package: :mod:`.plan` (which modules and parameters are covered), :mod:`.capture` (the
hooks, :func:`hooks_grad_stats` and :class:`StatsCapture`), :mod:`.assemble` (rules to
statistics, memory budget) and :mod:`.rules` (one module per layer family).

Covered layers: ``nn.Linear`` (on vectors or on sequences, as in attention blocks),
``nn.Conv1d``/``nn.Conv2d`` (any stride, padding, dilation and groups), ``nn.Embedding``,
``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` and timm's ``LayerNorm``,
``LayerNorm2d``, ``GroupNorm``, ``LayerScale``, ``BatchNormAct2d``; subclasses that do not
override ``forward`` too.
A *bare* parameter (owned by a module without a rule, like timm ViT's ``cls_token`` and
``pos_embed``) is covered when its first dimension is 1 and it has at least 2 dimensions: such a
parameter is broadcast along the batch dimension, so the pass uses ``N`` copies of it (one per
sample, via :func:`torch.func.functional_call`) and autograd returns its per-sample gradients
directly. That this substitution leaves the model's output unchanged is checked once per model.

.. note::
    **BatchNorm in training mode** couples the samples of a batch, so a per-sample gradient
    :math:`\partial\ell_i/\partial\theta` is not defined by the batch pass. This backend then
    defines :math:`g_i` as sample ``i``'s *contribution*: each layer's parameter gradient is
    split by the sample index of that layer's input and output, with ``δ`` the backpropagated
    gradient of ``N·L`` (which includes the coupling through the batch statistics). Their mean
    is exactly the batch gradient, :math:`\frac1N\sum_i g_i = \nabla L`. Without BatchNorm in
    training mode the :math:`g_i` are the ordinary per-sample gradients (those of the
    ``"vmap"`` backend).

:class:`StatsCapture` collects the same statistics from the training step's own forward and
backward instead of a separate pass. :func:`unsupported_layers` names what is not covered (the
``"auto"`` backend choice falls back to vmap or micro-batches for such models).

Assumptions: ``loss_fn`` is mean-reduced over the batch; a covered module's parameters are used
only through that module's ``forward``; a parameter is not shared between two modules.
"""

from local_opt.backends.hooks.assemble import release_workspaces
from local_opt.backends.hooks.capture import StatsCapture, hooks_grad_stats, hooks_stats
from local_opt.backends.hooks.plan import supports, unsupported_layers

__all__ = [
    "StatsCapture",
    "hooks_grad_stats",
    "hooks_stats",
    "release_workspaces",
    "supports",
    "unsupported_layers",
]
