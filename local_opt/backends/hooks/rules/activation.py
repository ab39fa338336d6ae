"""Rules for parameterized activations: ``nn.PReLU``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from local_opt.backends.hooks.rules.base import register
from local_opt.backends.hooks.rules.diagonal import DiagonalRule

__all__: list[str] = []  # private module


class PReLURule(DiagonalRule):
    """``nn.PReLU``: ``max(0, x) + a·min(0, x)``, so the per-sample gradient of ``a`` is
    ``Σ δ ⊙ min(0, x)`` over the positions of each channel (dimension 1), or over everything
    for a single ``a``."""

    param_names = ("weight",)

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return x.clamp(max=0)

    def to_param(self, module: nn.Module, t: Tensor, shape: torch.Size) -> Tensor:
        if module.num_parameters == 1:
            return t.reshape(t.shape[0], -1).sum(1).reshape(t.shape[0], *shape)
        return DiagonalRule.to_param(self, module, t, shape)


register(PReLURule(), nn.PReLU)
