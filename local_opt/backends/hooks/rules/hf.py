r"""Rule for Hugging Face ``transformers.pytorch_utils.Conv1D`` (the GPT-2 family's projections).

``Conv1D`` is a Linear layer with the weight stored transposed, ``W`` of shape ``(d_in, d_out)``:
:math:`y = x W + b`. A sample's weight gradient is :math:`G_i = \sum_t u_{it}\,\delta_{it}^\top`,
the transpose of :class:`~.linear.LinearRule`'s, so squared norms are the Linear rule's and only
the layout of the sums, the kept per-sample gradients and the inner products' forward changes.
The class is matched by name (:func:`~.base.register_named`), so ``transformers`` is not imported.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from local_opt.backends.hooks.rules.base import Site, register_named
from local_opt.backends.hooks.rules.linear import LinearRule

__all__: list[str] = []  # private module


class Conv1DRule(LinearRule):
    """``Conv1D``: ``y = x @ W + b`` with ``W`` of shape ``(d_in, d_out)``."""

    def per_sample(self, module: nn.Module, a: Tensor, d: Tensor, out: Tensor | None) -> Tensor:
        c = a.shape[0]
        u = a.reshape(c, -1, a.shape[-1])
        dd = d.reshape(c, -1, d.shape[-1])
        if out is None:
            return torch.bmm(u.transpose(1, 2), dd).view(c, -1)
        torch.bmm(u.transpose(1, 2), dd, out=out.view(c, u.shape[-1], dd.shape[-1]))
        return out

    def weight_sum(self, module: nn.Module, a: Tensor, d: Tensor) -> Tensor:
        return (a.reshape(-1, a.shape[-1]).T @ d.reshape(-1, d.shape[-1])).reshape(-1)

    def weight_forward(self, module: nn.Module, a: Tensor, v: Tensor) -> Tensor:
        return a @ v

    def costs(self, site: Site, inner: bool = True) -> dict[str, float] | None:
        w = site.params.get("weight")
        if w is None:
            return None
        # the generic cost model reads the weight as (d_out, d_in): a transposed view
        proxy = Site(site.name, site.module, self, {**site.params, "weight": w.t()}, site.calls)
        return super().costs(proxy, inner)


register_named(Conv1DRule(), "transformers.pytorch_utils.Conv1D")
