r"""Rule for weight-standardized convolutions (timm's ``StdConv2d``, ``ScaledStdConv2d`` and
their ``Same``-padded variants, as in NFNets and BiT).

The convolution uses :math:`\hat W = f(W, \gamma)`, each output channel's filter standardized
(and, for the scaled kind, multiplied by a learned gain :math:`\gamma` and
:math:`1/\sqrt{\text{fan-in}}`):

.. math::
    \hat W_o = \gamma_o\, s\, \frac{W_o - \mu(W_o)}{\sqrt{\sigma^2(W_o) + \epsilon}} .

:math:`f` is nonlinear, but it does not depend on the sample: a sample's gradient is the
pull-back of its gradient at :math:`\hat W` (the convolution rule's :math:`\hat G_i`) through
the one Jacobian :math:`J` of :math:`f`, :math:`g_i = J^\top \hat G_i`. The rule materializes
:math:`\hat G_i` in chunks of samples and applies :math:`J^\top` to a chunk with one batched
vector-Jacobian product of ``f`` (autograd), exact; the inner products
:math:`\langle g_i, V\rangle = \langle \hat G_i, J V\rangle` need one Jacobian-vector product
of ``f`` and one forward of the convolution with weight :math:`J V` on the saved inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from local_opt.backends.hooks.rules import affine
from local_opt.backends.hooks.rules.base import (
    LayerStats,
    Memory,
    Site,
    register_named,
    sq_norms,
    sum_but_batch,
)
from local_opt.backends.hooks.rules.conv import ConvRule

__all__: list[str] = []  # private module


def standardized(module: nn.Module, weight: Tensor, gain: Tensor | None) -> Tensor:
    """The weight the module's forward convolves with (timm's ``std_conv`` formula)."""
    scale = getattr(module, "scale", None)
    return F.batch_norm(
        weight.reshape(1, module.out_channels, -1),
        None,
        None,
        weight=None if gain is None else (gain * scale).view(-1),
        training=True,
        momentum=0.0,
        eps=module.eps,
    ).reshape_as(weight)


class StdConvRule(ConvRule):
    """timm's weight-standardized ``Conv2d`` variants: see the module docstring."""

    param_names = ("weight", "bias", "gain")

    def unsupported(self, module: nn.Module) -> str | None:
        return None if isinstance(module, nn.Conv2d) else "not a Conv2d"

    def keep_request(self, site: Site, n: int) -> tuple[float, int] | None:
        return None

    def _inputs(self, module: nn.Module, a: Tensor) -> Tensor:
        if getattr(module, "same_pad", False):
            from timm.layers.padding import pad_same  # the module is timm's

            a = pad_same(a, module.kernel_size, module.stride, module.dilation)
        return a

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        module, params = site.module, site.params
        calls = [c for c in site.calls if c.delta is not None]
        site.calls = []
        w, gain, bias = module.weight, params.get("gain"), params.get("bias")
        gain_t = getattr(module, "gain", None)
        pairs = [(self._inputs(module, c.inputs.to(w.dtype)), c.delta.to(w.dtype)) for c in calls]
        sq = torch.zeros(n, dtype=torch.float64, device=w.device)
        grad_sum: dict[str, Tensor] = {}
        bias_g = None
        if bias is not None:
            bias_g = torch.zeros((n, *bias.shape), dtype=bias.dtype, device=bias.device)
            for _, d in pairs:
                bias_g += self.bias_grads(d)
            grad_sum["bias"] = bias_g.sum(0)
            sq += sq_norms(bias_g)
        wanted = [(k, t) for k, t in (("weight", params.get("weight")), ("gain", gain)) if t is not None]
        sums = {k: torch.zeros_like(t) for k, t in wanted}
        if wanted and pairs:
            with torch.enable_grad():
                w_ = w.detach().requires_grad_("weight" in params)
                g_ = None if gain_t is None else gain_t.detach().requires_grad_(gain is not None)
                what = standardized(module, w_, g_)
                leaves = [w_ if k == "weight" else g_ for k, _ in wanted]
                step = max(1, affine._CHUNK_ELEMENTS // max(1, w.numel()))
                for lo in range(0, n, step):
                    hi = min(n, lo + step)
                    chunk = sum(self.per_sample(module, a[lo:hi], d[lo:hi], None) for a, d in pairs)
                    got = torch.autograd.grad(
                        what, leaves, chunk.view(hi - lo, *w.shape), retain_graph=True,
                        is_grads_batched=True,
                    )
                    for (k, _), gk in zip(wanted, got):
                        sums[k] += gk.sum(0)
                        sq[lo:hi] += sq_norms(gk)
        grad_sum.update(sums)

        def inner(v: dict[str, Tensor]) -> Tensor:
            res = torch.zeros(n, dtype=torch.float64, device=sq.device)
            if bias_g is not None and "bias" in v:
                res += (bias_g @ v["bias"].to(bias_g.dtype)).double()
            tangents = {k: v[k].to(w.dtype) for k, _ in wanted if k in v}
            if not tangents or not pairs:
                return res
            primal_w = w.detach()
            primal_g = None if gain_t is None else gain_t.detach()
            tw = tangents.get("weight", torch.zeros_like(primal_w))
            if primal_g is None:
                _, jv = torch.func.jvp(lambda a: standardized(module, a, None), (primal_w,), (tw,))
            else:
                tg = tangents.get("gain", torch.zeros_like(primal_g))
                _, jv = torch.func.jvp(
                    lambda a, b: standardized(module, a, b), (primal_w, primal_g), (tw, tg)
                )
            for a, d in pairs:
                out = module._conv_forward(a, jv, None)  # ``a`` already padded for "same"
                res += sum_but_batch(out * d).double()
            return res

        return LayerStats(grad_sum, sq, inner)


register_named(
    StdConvRule(),
    "timm.layers.std_conv.StdConv2d",
    "timm.layers.std_conv.StdConv2dSame",
    "timm.layers.std_conv.ScaledStdConv2d",
    "timm.layers.std_conv.ScaledStdConv2dSame",
)
