"""Rule for ``nn.Linear`` (on vectors or sequences) and subclasses keeping its ``forward``."""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from local_opt.backends.hooks.rules.affine import AffineRule
from local_opt.backends.hooks.rules.base import (
    GROUP_ELEMENTS,
    GroupStats,
    LayerStats,
    Memory,
    Site,
    layer_dots,
    register,
    register_named,
)

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

    def group_key(self, site: Site, n: int, memory: Memory) -> Any:
        """Plain ``nn.Linear`` layers called once, in ``"ghost"`` or ``"keep"`` mode, with equal
        input and weight shapes (a transformer's blocks) and small tensors."""
        if type(self) is not LinearRule or len(site.calls) != 1 or site.calls[0].delta is None:
            return None
        w = site.params.get("weight")
        if w is None or set(site.params) - {"weight", "bias"}:
            return None
        a, d = site.calls[0].inputs, site.calls[0].delta
        if (
            a.dim() < 2
            or a.shape[0] != n
            or d.shape[:-1] != a.shape[:-1]
            or a.dtype != w.dtype
            or d.dtype != w.dtype
            or (d.shape[-1], a.shape[-1]) != tuple(w.shape)
        ):
            return None
        mode = self.choose_mode(site, memory)
        t = a[0].numel() // a.shape[-1]
        size = n * t * (sum(w.shape) + (t if mode == "ghost" else 0))  # stacked, Gram matrices
        if mode not in ("ghost", "keep") or size > GROUP_ELEMENTS:
            return None
        return (mode, tuple(a.shape), tuple(w.shape), "bias" in site.params, w.dtype, w.device)

    def finish_group(self, sites: list[Site], n: int, memory: Memory) -> GroupStats:
        r"""Layers of equal shapes as batched matmuls over the stacked inputs ``A`` and output
        gradients ``D``: in ``"ghost"`` mode the bias is folded into the Gram matrices,
        :math:`\lVert G_i\rVert^2 + \lVert b_i\rVert^2 = \sum_{t,t'} (u_t\cdot u_{t'} + 1)
        (\delta_t\cdot\delta_{t'})`, and the inner products are one ``baddbmm``,
        :math:`\langle G_i, V\rangle + \langle b_i, v\rangle = \sum_t \delta_t\cdot(V u_t + v)`."""
        ll = len(sites)
        w = sites[0].params["weight"]
        m, k = w.shape
        bias = "bias" in sites[0].params
        mode = self.choose_mode(sites[0], memory)
        for s in sites:
            s.mode = mode
        a = torch.stack([s.calls[0].inputs for s in sites]).view(ll, -1, k)  # (L, N·T, K)
        d = torch.stack([s.calls[0].delta for s in sites]).view(ll, -1, m)  # (L, N·T, M)
        t = a.shape[1] // n
        if mode == "keep":
            kept = memory.take((ll, n, m * k), w.dtype, w.device)
            torch.bmm(
                d.view(ll * n, t, m).transpose(1, 2), a.view(ll * n, t, k),
                out=kept.view(ll * n, m, k),
            )
            weights = kept.sum(1).view(ll, m, k)
            sq = torch.linalg.vector_norm(kept, dim=2).double().square()
            per_bias = d.view(ll, n, t, m).sum(2) if bias else None  # (L, N, M)
            biases = None
            if per_bias is not None:
                biases = per_bias.sum(1)
                sq += torch.linalg.vector_norm(per_bias, dim=2).double().square()

            def inner(vs: list[dict[str, Tensor]]) -> Tensor:
                vw = torch.stack([v["weight"].reshape(-1) for v in vs]).to(kept.dtype)
                res = layer_dots(kept, vw)
                if per_bias is not None:
                    vb = torch.stack([v["bias"] for v in vs]).to(kept.dtype)
                    res += layer_dots(per_bias, vb)
                return res.double().sum(0)

        else:  # ghost
            weights = torch.bmm(d.transpose(1, 2), a)
            biases = d.sum(1) if bias else None
            if t == 1:
                uu = a.square().sum(2)  # (L, N)
                if bias:
                    uu += 1
                sq = (uu * d.square().sum(2)).double()
            else:
                au, du = a.view(ll * n, t, k), d.view(ll * n, t, m)
                gram_u = torch.bmm(au, au.transpose(1, 2))
                if bias:
                    gram_u += 1
                gram_d = torch.bmm(du, du.transpose(1, 2))
                sq = torch.linalg.vecdot(gram_u.view(ll, n, -1), gram_d.view(ll, n, -1)).double()
            if not memory.inner_products:  # keep nothing for them
                a = d = None  # type: ignore[assignment]

            def inner(vs: list[dict[str, Tensor]]) -> Tensor:
                vw = torch.stack([v["weight"] for v in vs]).to(a.dtype).transpose(1, 2)
                if bias:
                    vb = torch.stack([v["bias"] for v in vs]).to(a.dtype).unsqueeze(1)
                    out = torch.baddbmm(vb, a, vw)
                else:
                    out = torch.bmm(a, vw)
                return torch.linalg.vecdot(out.view(ll, n, -1), d.view(ll, n, -1)).double().sum(0)

        sums = [
            {"weight": weights[j]} if biases is None else {"weight": weights[j], "bias": biases[j]}
            for j in range(ll)
        ]
        return GroupStats(sums, sq.sum(0), inner)


register(LinearRule(), nn.Linear)
# timm's Linear overrides forward only to cast the weight under torchscript: still F.linear.
register_named(LinearRule(), "timm.layers.linear.Linear")
