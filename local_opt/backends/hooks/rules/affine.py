r"""Linear and convolution rules' shared code: per-sample weight gradients ``G_i = Σ_t δ_it u_itᵀ``.

Linear and convolution layers (weight :math:`W`, per-sample gradient
:math:`G_i = \sum_t \delta_{it} u_{it}^\top` over the ``T`` output positions, ``u`` the input or
its im2col patches) never ask autograd for the weight gradient (the backward pass then skips it);
:math:`\sum_i G_i` is one matmul over all ``N·T`` rows (or the sum of kept :math:`G_i`). They use
one of three modes, chosen per layer by a flop/memory cost model:

``"ghost"``
    never forms :math:`G_i`: :math:`\lVert G_i\rVert^2 = \sum_{t,t'} (u_{it}\cdot u_{it'})
    (\delta_{it}\cdot\delta_{it'})` (for ``T = 1``: :math:`\lVert u_i\rVert^2\lVert\delta_i
    \rVert^2`), and :math:`\langle G_i, V\rangle = \sum_t \delta_{it}\cdot(V u_{it})` is one
    more matmul (a forward of the layer with weight ``V``) when the inner products are asked for;
``"keep"``
    materializes :math:`G_i` with one batched matmul (the weight gradient's flops) into a reused
    workspace, takes the sum and the norms chunk by chunk while they are in cache, and later the
    inner products as one matrix-vector product;
``"stream"``
    materializes :math:`G_i` in chunks of samples for the norms only, and computes the inner
    products as ``"ghost"`` does.

Small ``T`` (late convolutions at low resolution, Linear on vectors) favours ``"ghost"``; large
``T`` with small weights (early convolutions) and transformer blocks favour ``"keep"`` within the
memory budget. The im2col matmuls are also much faster than oneDNN's weight gradient for the
1x1 and 2x2 feature maps of a 32x32 resnet.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from local_opt.backends.hooks.rules.base import (
    LayerStats,
    Memory,
    Rule,
    Site,
    sq_norms,
    sum_but_batch,
)

__all__: list[str] = []  # private module

# makes ~4 such passes (write, norm, sum, inner). Calibrated on CPU (one thread) with timm
# resnet18 and vit_tiny at 32x32, b=32.
_MEMORY_COST = 12.0
# Relative cost of a batched matmul of per-sample (T x M) and (T x K) matrices vs one big one.
_BMM_COST = 1.2
# Chunk sizes (elements) for materialized per-sample gradients and Gram matrices, and for the
# chunks of kept per-sample gradients whose sum and norms are taken while they are in cache.
_CHUNK_ELEMENTS = 1 << 24
_CACHE_ELEMENTS = 1 << 19


class AffineRule(Rule):
    r"""Shared code of Linear and Conv.

    A subclass maps a call to ``patches`` ``U`` of shape ``(g, N, T, Kg)`` and ``deltas`` ``D`` of
    shape ``(g, N, T, Mg)`` (``g`` groups, ``T`` positions); then per group
    :math:`G_i = D_i^\top U_i` and :math:`\sum_i G_i = D^\top U` over all ``N·T`` rows.
    """

    copies_patches = False  # whether ``patches`` allocates (im2col) rather than views the input

    def groups(self, module: nn.Module) -> int:
        return 1

    def patches(self, module: nn.Module, a: Tensor) -> Tensor:
        raise NotImplementedError

    def deltas(self, module: nn.Module, d: Tensor) -> Tensor:
        raise NotImplementedError

    def weight_forward(self, module: nn.Module, a: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def bias_grads(self, d: Tensor) -> Tensor:
        """Per-sample bias gradient ``Σ_t δ_it``: ``(N, M)``."""
        raise NotImplementedError

    def costs(self, site: Site) -> dict[str, float] | None:
        """Estimated per-sample cost of each mode for the weight (``None`` without one)."""
        w = site.params.get("weight")
        calls = [c for c in site.calls if c.delta is not None]
        if w is None or not calls:
            return None
        t = sum(c.delta[0].numel() for c in calls) // w.shape[0]
        p = w.numel()
        g = self.groups(site.module)
        m = w.shape[0] // g
        k = p // (g * m)
        if t <= 1:  # outer products: the norm is a product of two norms
            return {"ghost": 2.0 * p, "stream": 2.0 * p + _BMM_COST * p, "keep": float("inf")}
        return {
            "ghost": 2.0 * t * p + t * t * g * (k + m),
            "stream": (_BMM_COST + 2.0) * t * p + 2.0 * _MEMORY_COST * p,
            "keep": _BMM_COST * t * p + 4.0 * _MEMORY_COST * p,
        }

    def keep_request(self, site: Site, n: int) -> tuple[float, int] | None:
        """``(saving, bytes)`` if keeping the per-sample weight gradients is the cheapest mode."""
        costs = self.costs(site)
        if costs is None:
            return None
        other = min(costs["ghost"], costs["stream"])
        if costs["keep"] >= other:
            return None
        w = site.params["weight"]
        return (other - costs["keep"]) * n, n * w.numel() * w.element_size()

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        module = site.module
        calls = [c for c in site.calls if c.delta is not None]
        ref = next(iter(site.params.values()))
        grad_sum: dict[str, Tensor] = {}
        sq = torch.zeros(n, dtype=torch.float64, device=ref.device)
        bias_g = None
        if "bias" in site.params:
            b = site.params["bias"]
            bias_g = torch.zeros((n, *b.shape), dtype=b.dtype, device=b.device)
            for c in calls:
                bias_g += self.bias_grads(c.delta)
            grad_sum["bias"] = bias_g.sum(0)
            sq += sq_norms(bias_g)
        kept = None  # materialized per-sample weight gradients, (N, P)
        stored: tuple[Tensor, Tensor] | None = None  # (U, D) for the inner products
        if "weight" in site.params:
            w = site.params["weight"]
            if not calls:
                grad_sum["weight"] = torch.zeros_like(w)
            else:
                # (under autocast the inputs and output gradients may be in a lower precision)
                us = [self.patches(module, c.inputs.to(w.dtype)) for c in calls]
                ds = [self.deltas(module, c.delta.to(w.dtype)) for c in calls]
                u = us[0] if len(us) == 1 else torch.cat(us, dim=2)
                d = ds[0] if len(ds) == 1 else torch.cat(ds, dim=2)
                del us, ds
                mode = site.mode
                if mode not in ("keep", "stream", "ghost"):
                    costs = self.costs(site) or {}
                    mode = "stream" if costs.get("stream", 1) < costs.get("ghost", 0) else "ghost"
                site.mode = mode
                if mode == "keep":
                    kept = memory.take((n, w.numel()), w.dtype, w.device)
                    total = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
                    step = max(1, _CACHE_ELEMENTS // w.numel())
                    for lo in range(0, n, step):
                        hi = min(n, lo + step)
                        chunk = _per_sample(u, d, lo, hi, out=kept[lo:hi])
                        total += chunk.sum(0)
                        sq[lo:hi] += sq_norms(chunk)
                    grad_sum["weight"] = total.view(w.shape)
                else:
                    grad_sum["weight"] = _gemm_sum(u, d).reshape(w.shape)
                    sq += _ghost_norms(u, d) if mode == "ghost" else _stream_norms(u, d)
                    # Linear's U and D are views of tensors the fallback keeps anyway.
                    extra = (u.numel() + d.numel()) * w.element_size() if self.copies_patches else 0
                    if extra <= memory.free:
                        memory.free -= extra
                        stored = (u, d)

        # Keep the saved inputs and output gradients only when the fallback needs them.
        needed = calls if kept is None and stored is None else []

        def inner(v: dict[str, Tensor]) -> Tensor:
            res = torch.zeros(n, dtype=torch.float64, device=sq.device)
            if bias_g is not None:
                res += (bias_g @ v["bias"].to(bias_g.dtype)).double()
            if "weight" in v and "weight" in grad_sum:
                vw = v["weight"].to(site.params["weight"].dtype)
                if kept is not None:
                    res += (kept @ vw.reshape(-1)).double()
                elif stored is not None:
                    res += _gemm_inner(*stored, vw).double()
                else:
                    for c in needed:
                        out = self.weight_forward(module, c.inputs, vw)
                        res += sum_but_batch(out * c.delta).double()
            return res

        return LayerStats(grad_sum, sq, inner)


def _per_sample(u: Tensor, d: Tensor, lo: int, hi: int, out: Tensor | None = None) -> Tensor:
    """Per-sample weight gradients ``D_iᵀ U_i`` of samples ``lo:hi``, flattened in the weight's
    order: ``(hi - lo, g·Mg·Kg)`` (written into ``out`` when given)."""
    g, t, c = u.shape[0], u.shape[2], hi - lo
    uc, dc = u[:, lo:hi], d[:, lo:hi]
    if g > 1:  # sample-major batches, so that each sample's groups are contiguous
        uc, dc = uc.transpose(0, 1), dc.transpose(0, 1)
    uc = uc.reshape(c * g, t, u.shape[-1])
    dc = dc.reshape(c * g, t, d.shape[-1])
    if out is None:
        return torch.bmm(dc.transpose(1, 2), uc).view(c, -1)
    torch.bmm(dc.transpose(1, 2), uc, out=out.view(c * g, d.shape[-1], u.shape[-1]))
    return out


def _gemm_sum(u: Tensor, d: Tensor) -> Tensor:
    """``Σ_i D_iᵀ U_i`` as one matmul over all ``N·T`` rows: ``(g, Mg, Kg)``."""
    g = u.shape[0]
    return torch.bmm(d.reshape(g, -1, d.shape[-1]).transpose(1, 2), u.reshape(g, -1, u.shape[-1]))


def _gemm_inner(u: Tensor, d: Tensor, v: Tensor) -> Tensor:
    """Per-sample ``⟨D_iᵀ U_i, V⟩ = Σ_t δ_it · (V u_it)`` through one matmul: ``(N,)``."""
    g, n = u.shape[0], u.shape[1]
    vg = v.reshape(g, -1, u.shape[-1])  # (g, Mg, Kg)
    proj = torch.bmm(u.reshape(g, -1, u.shape[-1]), vg.transpose(1, 2))  # (g, N·T, Mg)
    return torch.linalg.vecdot(proj.view(g * n, -1), d.reshape(g * n, -1)).view(g, n).sum(0)


def _ghost_norms(u: Tensor, d: Tensor) -> Tensor:
    """Per-sample ``‖D_iᵀ U_i‖² = Σ_{t,t'} (u_t·u_t')(δ_t·δ_t')`` without forming ``D_iᵀ U_i``."""
    g, n, t = u.shape[0], u.shape[1], u.shape[2]
    if t == 1:
        uu = torch.linalg.vector_norm(u, dim=(-1, -2)).square()  # (g, N)
        dd = torch.linalg.vector_norm(d, dim=(-1, -2)).square()
        return (uu * dd).sum(0).double()
    out = torch.zeros(n, dtype=torch.float64, device=u.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, g * t * t))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        uc = u[:, lo:hi].reshape(-1, t, u.shape[-1])
        dc = d[:, lo:hi].reshape(-1, t, d.shape[-1])
        gram_u = torch.bmm(uc, uc.transpose(1, 2)).view(g * (hi - lo), -1)  # (g·n, T·T)
        gram_d = torch.bmm(dc, dc.transpose(1, 2)).view(g * (hi - lo), -1)
        out[lo:hi] = torch.linalg.vecdot(gram_u, gram_d).view(g, hi - lo).sum(0)
    return out


def _stream_norms(u: Tensor, d: Tensor) -> Tensor:
    """Per-sample ``‖D_iᵀ U_i‖²`` by materializing ``D_iᵀ U_i`` in chunks of samples."""
    g, n = u.shape[0], u.shape[1]
    per = g * d.shape[-1] * u.shape[-1]
    out = torch.zeros(n, dtype=torch.float64, device=u.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, per))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        out[lo:hi] = sq_norms(_per_sample(u, d, lo, hi))
    return out
