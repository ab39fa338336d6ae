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

Covered layers (one rule module each in :mod:`.rules`): ``nn.Linear`` (on vectors or on
sequences) and timm's ``Linear``; ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (any
stride, padding, dilation and groups); ``nn.Embedding``; ``nn.LayerNorm``, ``nn.GroupNorm``,
``nn.BatchNorm1d/2d/3d``, ``nn.RMSNorm``, ``nn.InstanceNorm*`` (affine), global response norm
and timm's ``LayerNorm``, ``LayerNorm2d``, ``GroupNorm``, ``RmsNorm``, ``BatchNormAct2d``,
``LayerScale``; ``nn.PReLU``; ``nn.MultiheadAttention`` (so ``nn.TransformerEncoder`` and
``DecoderLayer``) and ``nn.LSTM``/``nn.GRU``, whose functional uses of their parameters are
computed in visible pieces while they run (:mod:`.rules.attention`, :mod:`.rules.recurrent`);
weights tied between ``nn.Linear``/``nn.Embedding`` modules, with the cross terms
(:mod:`.rules.tied`); subclasses that do not override ``forward``.
A *bare* parameter (owned by a module without a rule: ViT's ``cls_token`` and ``pos_embed``,
ConvNeXt's ``gamma``, a positional table used as ``self.pos[:T]``, Swin's relative-position
tables) is covered when it meets the batch by broadcasting, slicing, indexing or reshaping
(:mod:`.rules.bare`); a parameter broadcast along the batch dimension is replaced by ``N``
copies (one per sample) and autograd returns its per-sample gradients directly. That these
substitutions leave the model's output unchanged is checked once per model. The README's
"Model coverage" section lists which timm models are covered.

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

Assumptions: ``loss_fn`` is mean-reduced over the batch. A covered parameter that also gets
gradient outside what the rules saw is detected by comparing the hooks' gradient sum with the
batch gradient, never counted as zero (:mod:`.check`); the backends' registry then falls back to
``vmap`` with a warning naming the parameter.
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
