r"""Diagonal rules: ``y = h(x) * weight + bias`` with ``h`` parameter-free.

Normalization layers and layer scales have small diagonal per-sample gradients
(:math:`\sum_t \delta_{it}\odot\hat x_{it}` for the weight, :math:`\sum_t\delta_{it}` for the
bias, with :math:`\hat x = h(x)` recomputed from the saved input) that are always materialized.
:class:`DiagonalRule` is the shared code (the normalizations are in :mod:`.norm`); timm's
``LayerScale`` and ``LayerScale2d`` (``h`` the identity) are here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from local_opt.backends.hooks.rules.base import (
    GROUP_ELEMENTS,
    Call,
    GroupStats,
    LayerStats,
    Memory,
    Rule,
    Site,
    add_up,
    group_stats,
    register_named,
    sq_norms,
)
from local_opt.backends.hooks.rules.linear import FOLDABLE

__all__: list[str] = []  # private module


class DiagonalRule(Rule):
    """Per-sample ``weight`` gradient ``Σ_pos δ ⊙ h(x)``, ``bias`` gradient ``Σ_pos δ``."""

    #: Whether ``normalized`` acts on the trailing dimensions (the parameters' shape, the
    #: module's ``normalized_shape``) whatever the leading ones, and ``weight_grads`` is the
    #: default: then layers of equal shapes may be finished together (:meth:`finish_group`).
    trailing = False

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def to_param(self, module: nn.Module, t: Tensor, shape: torch.Size) -> Tensor:
        """Sum ``(N, ...)`` over the positions that share a parameter entry: ``(N, *shape)``."""
        # Default: parameters along dim 1 (channels first).
        return t.reshape(t.shape[0], t.shape[1], -1).sum(2).reshape(t.shape[0], *shape)

    def weight_grads(
        self, module: nn.Module, x: Tensor, delta: Tensor, shape: torch.Size, call: Call | None = None
    ) -> Tensor:
        """Per-sample weight gradients ``Σ_pos δ ⊙ h(x)`` of one call: ``(N, *shape)``."""
        return self.to_param(module, delta * self.normalized(module, x), shape)

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        params = site.params
        ref = next(iter(params.values()))
        # per-sample gradients by parameter, summed over the calls (no zeros to add into)
        found: dict[str, Tensor | None] = dict.fromkeys(params)
        for c in site.calls:
            if c.delta is None:
                continue
            delta = c.delta.to(ref.dtype)
            rows = delta.shape[0] if delta.dim() else n
            if rows != n and (site.module not in FOLDABLE or rows % n):
                raise RuntimeError(
                    f"The hooks backend cannot tell which of {n} samples each of the {rows} "
                    f"input rows of {site.name} belongs to"
                )

            def fold(t: Tensor, rows: int = rows) -> Tensor:  # k·N sample-major rows -> N
                return t if rows == n else t.reshape(n, rows // n, *t.shape[1:]).sum(1)

            parts = {}
            if "weight" in found:
                x = c.inputs.to(ref.dtype)
                shape = params["weight"].shape
                parts["weight"] = fold(self.weight_grads(site.module, x, delta, shape, c))
            if "bias" in found:
                shape = params["bias"].shape
                parts["bias"] = fold(self.to_param(site.module, delta, shape))
            for name, g in parts.items():
                g, old = g.to(params[name].dtype), found[name]
                found[name] = g if old is None else old + g
        per: dict[str, Tensor] = {
            name: torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
            if found[name] is None
            else found[name]  # type: ignore[misc]
            for name, p in params.items()
        }
        norms = [sq_norms(g) for g in per.values()]
        sq = add_up(norms)
        grad_sum = {name: g.sum(0) for name, g in per.items()}

        def inner(v: dict[str, Tensor]) -> Tensor:
            res = torch.zeros(n, dtype=torch.float64, device=sq.device)
            for name, g in per.items():
                res += (g.reshape(n, -1) @ v[name].reshape(-1).to(g.dtype)).double()
            return res

        return LayerStats(grad_sum, sq, inner)


    def group_key(self, site: Site, n: int, memory: Memory) -> Any:
        if not self.trailing or len(site.calls) != 1 or site.calls[0].delta is None:
            return None
        if not site.params or set(site.params) - {"weight", "bias"}:
            return None
        shape = tuple(getattr(site.module, "normalized_shape", ()))
        ref = next(iter(site.params.values()))
        x, d = site.calls[0].inputs, site.calls[0].delta
        if (
            not shape
            or any(tuple(p.shape) != shape or p.dtype != ref.dtype for p in site.params.values())
            or x.shape != d.shape
            or x.dim() <= len(shape)
            or x.shape[0] != n
            or tuple(x.shape[x.dim() - len(shape) :]) != shape
            or x.dtype != ref.dtype
            or d.dtype != ref.dtype
            or 2 * x.numel() > GROUP_ELEMENTS
        ):
            return None
        eps = getattr(site.module, "eps", None)
        return (type(self), tuple(x.shape), shape, eps, tuple(site.params), ref.dtype, ref.device)

    def finish_group(self, sites: list[Site], n: int, memory: Memory) -> GroupStats:
        """Layers of equal shapes on the stacked inputs and output gradients: ``normalized``
        once over all of them, the per-sample gradients as ``(L, N, P)`` tensors."""
        ll = len(sites)
        module = sites[0].module
        names = list(sites[0].params)
        p = next(iter(sites[0].params.values())).numel()
        x = torch.stack([s.calls[0].inputs for s in sites])
        d = torch.stack([s.calls[0].delta for s in sites])
        per: dict[str, Tensor] = {}
        if "weight" in names:
            xhat = self.normalized(module, x.view(ll * n, *x.shape[2:])).view(x.shape)
            per["weight"] = (d * xhat).view(ll, n, -1, p).sum(2)  # (L, N, P)
        if "bias" in names:
            per["bias"] = d.view(ll, n, -1, p).sum(2)
        return group_stats(per, sites[0].params)


class LayerScaleRule(DiagonalRule):
    """timm's ``LayerScale`` (``x * gamma`` over the last dim), not in place."""

    param_names = ("gamma",)

    def unsupported(self, module: nn.Module) -> str | None:
        return "in-place layer scale" if getattr(module, "inplace", False) else None

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return x

    def to_param(self, module: nn.Module, t: Tensor, shape: torch.Size) -> Tensor:
        return t.reshape(t.shape[0], -1, *shape).sum(1)

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        # Reuse the diagonal code with "gamma" playing the role of "weight".
        renamed = Site(site.name, site.module, self, {"weight": site.params["gamma"]}, site.calls)
        st = super().finish(renamed, n, memory)
        return LayerStats(
            {"gamma": st.grad_sum["weight"]},
            st.sq_norms,
            lambda v: st.inner({"weight": v["gamma"]}),
        )


class LayerScale2dRule(LayerScaleRule):
    """timm's ``LayerScale2d`` (``x * gamma`` over the channels of NCHW), not in place."""

    def to_param(self, module: nn.Module, t: Tensor, shape: torch.Size) -> Tensor:
        return DiagonalRule.to_param(self, module, t, shape)


register_named(LayerScaleRule(), "timm.layers.layer_scale.LayerScale")
register_named(LayerScale2dRule(), "timm.layers.layer_scale.LayerScale2d")
