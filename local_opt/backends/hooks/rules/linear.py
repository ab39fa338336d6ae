"""Rule for ``nn.Linear`` (on vectors or sequences) and subclasses keeping its ``forward``."""

from __future__ import annotations

import weakref

import torch.nn.functional as F
from torch import Tensor, nn

from local_opt.backends.hooks.rules.affine import AffineRule
from local_opt.backends.hooks.rules.base import LayerStats, Memory, Site, register, register_named

# Linear layers whose inputs have k·N rows in sample-major order (attention windows, MobileViT
# patches), as checked by the probe of :mod:`.bare`: their rows are folded into the positions.
FOLDABLE: weakref.WeakSet[nn.Module] = weakref.WeakSet()

__all__: list[str] = []  # private module


class LinearRule(AffineRule):
    """``nn.Linear`` on ``(N, *, d_in)`` inputs; the middle dimensions are positions."""

    def patches(self, module: nn.Module, a: Tensor) -> Tensor:
        return a.reshape(a.shape[0], 1, -1, a.shape[-1])

    def deltas(self, module: nn.Module, d: Tensor) -> Tensor:
        return d.reshape(d.shape[0], 1, -1, d.shape[-1])

    def weight_sum(self, module: nn.Module, a: Tensor, d: Tensor) -> Tensor:
        return (d.reshape(-1, d.shape[-1]).T @ a.reshape(-1, a.shape[-1])).reshape(-1)

    def weight_forward(self, module: nn.Module, a: Tensor, v: Tensor) -> Tensor:
        return F.linear(a, v)

    def bias_grads(self, d: Tensor) -> Tensor:
        return d.reshape(d.shape[0], -1, d.shape[-1]).sum(1)

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        for c in site.calls:
            rows = c.delta.shape[0] if c.delta is not None else n
            if rows != n:
                if site.module not in FOLDABLE or rows % n:
                    raise RuntimeError(
                        f"The hooks backend cannot tell which of {n} samples each of the {rows} "
                        f"input rows of {site.name} belongs to"
                    )
                c.inputs = c.inputs.reshape(n, -1, c.inputs.shape[-1])
                c.delta = c.delta.reshape(n, -1, c.delta.shape[-1])
        return super().finish(site, n, memory)


register(LinearRule(), nn.Linear)
# timm's Linear overrides forward only to cast the weight under torchscript: still F.linear.
register_named(LinearRule(), "timm.layers.linear.Linear")
