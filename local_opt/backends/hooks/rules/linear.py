"""Rule for ``nn.Linear`` (on vectors or sequences) and subclasses keeping its ``forward``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from local_opt.backends.hooks.rules.affine import AffineRule
from local_opt.backends.hooks.rules.base import register

__all__: list[str] = []  # private module


class LinearRule(AffineRule):
    """``nn.Linear`` on ``(N, *, d_in)`` inputs; the middle dimensions are positions."""

    def patches(self, module: nn.Module, a: Tensor) -> Tensor:
        return a.reshape(1, a.shape[0], -1, a.shape[-1])

    def deltas(self, module: nn.Module, d: Tensor) -> Tensor:
        return d.reshape(1, d.shape[0], -1, d.shape[-1])

    def weight_forward(self, module: nn.Module, a: Tensor, v: Tensor) -> Tensor:
        return F.linear(a, v)

    def bias_grads(self, d: Tensor) -> Tensor:
        return d.reshape(d.shape[0], -1, d.shape[-1]).sum(1)


register(LinearRule(), nn.Linear)
