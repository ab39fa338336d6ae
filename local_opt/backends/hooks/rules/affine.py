r"""Linear and convolution rules' shared code: per-sample weight gradients ``G_i = Σ_t δ_it u_itᵀ``.

Linear and convolution layers (weight :math:`W`, per-sample gradient
:math:`G_i = \sum_t \delta_{it} u_{it}^\top` over the ``T`` output positions, ``u`` the input or
its im2col patches) never ask autograd for the weight gradient (the backward pass then skips it).
They use one of three modes, chosen per layer by a cost model (:meth:`AffineRule.costs`):

``"keep"``
    materializes :math:`G_i` (Linear: one batched matmul; Conv: one weight gradient of a
    convolution with the samples as groups, no im2col) chunk by chunk into a reused workspace,
    takes :math:`\sum_i G_i` and the norms while a chunk is in cache, and later the inner
    products as one matrix-vector product;
``"stream"``
    materializes :math:`G_i` in chunks of samples for the sum and the norms only; the inner
    products :math:`\langle G_i, V\rangle = \sum_t \delta_{it}\cdot(V u_{it})` are one forward of
    the layer with weight ``V`` on the saved input, when they are asked for;
``"ghost"``
    never forms :math:`G_i`: :math:`\lVert G_i\rVert^2 = \sum_{t,t'} (u_{it}\cdot u_{it'})
    (\delta_{it}\cdot\delta_{it'})` (for ``T = 1``: :math:`\lVert u_i\rVert^2\lVert\delta_i
    \rVert^2`), :math:`\sum_i G_i` is the layer's ordinary weight gradient, the inner products
    as in ``"stream"``.

Large ``T`` with small weights (early convolutions at high resolution, transformer blocks)
favours ``"keep"`` or ``"stream"``; small ``T`` with large weights (late convolutions, Linear on
vectors) favours ``"ghost"`` (Gram matrices cost :math:`T^2(K+M)` against :math:`TKM`).
``"keep"`` saves the inner products' forward at the price of :math:`N\cdot P` stored numbers; the
memory budget grants it to the layers that save the most time per byte.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from local_opt.backends.hooks.rules.base import (
    LayerStats,
    Memory,
    Rule,
    Site,
    add_up,
    sq_norms,
    sum_but_batch,
)

__all__: list[str] = []  # private module

# Cost model, in units of one multiply-add of a large matmul, per sample (see AffineRule.costs).
# Calibrated on CPU (one thread, float32, b=32) from per-layer timings of every mode on the
# convolutions of timm resnet18 at 32, 64 and 224 px (T from 1 to 12544 positions), checked end to
# end on ViT-S/16 (224 px) and a GPT-style LM (context 256) by benchmarks/test_bench_variance.py.
_MEMORY_COST = 12.0  # one pass over one element of a materialized per-sample gradient
_BMM_COST = 1.2  # a batched matmul of per-sample (T x M) and (T x K) matrices vs one big one
_GRAM_COST = 1.0  # the per-sample T x T Gram matrices (skinny batched matmuls)
_UNFOLD_COST = 30.0  # one element of im2col patches (F.unfold is slow: ~10 ns/element)
_GROUPED_COST = 1.1  # a convolution's weight gradient with the samples as groups (oneDNN) ...
_GROUPED_OVERHEAD = 150.0  # ... plus this many per weight element and sample (small T, wide C)
# Chunk sizes (elements) for materialized per-sample gradients and Gram matrices, and for the
# chunks of kept per-sample gradients whose sum and norms are taken while they are in cache.
_CHUNK_ELEMENTS = 1 << 24
_CACHE_ELEMENTS = 1 << 19
# What one chunk of "stream" touches (per-sample gradients, copied patches, inputs and output
# gradients) stays within this many elements (16 MiB in float32, half this CPU's L3): the patches
# are then read by the matmul, and the gradients by the sum and the norms, from the cache, not
# from memory. Measured on timm resnet18 at 224 px, b=32, one thread, against the whole batch as
# one chunk: 3x3 convolutions at 28x28 (128 channels) 238 -> 131-140 ms, at 14x14 (256) 255 ->
# 128-140 ms, grouped at 56x56 (64) 252 -> 190 ms; ViT-S Linear layers 130-162 -> 94-120 ms.
_STREAM_ELEMENTS = 1 << 22


class AffineRule(Rule):
    r"""Shared code of Linear and Conv.

    A subclass maps a call to ``patches`` ``U`` of shape ``(N, g, T, Kg)`` and ``deltas`` ``D``
    of shape ``(N, g, T, Mg)`` (``g`` groups, ``T`` positions; views where possible); per sample
    and group :math:`G_i = D_i^\top U_i`. It may compute per-sample gradients and the weight
    gradient in another way (:meth:`per_sample`, :meth:`weight_sum`).
    """

    #: Whether ``"ghost"`` takes the weight gradient (and, within the memory budget of the
    #: separate pass, the inner products) from the patches it forms for the Gram matrices,
    #: instead of :meth:`weight_sum` and :meth:`weight_forward` on the input: for convolutions,
    #: whose patches are an im2col copy, this saves oneDNN calls that cost far more than their
    #: flops at few positions (measured 1.0 ms for the weight gradient of a 192->96 3x3
    #: convolution on 2x2 inputs, b=16, against 0.15 ms for the matmul on the patches).
    patch_sums = False

    def groups(self, module: nn.Module) -> int:
        return 1

    def patches(self, module: nn.Module, a: Tensor) -> Tensor:
        raise NotImplementedError

    def deltas(self, module: nn.Module, d: Tensor) -> Tensor:
        raise NotImplementedError

    def ghost_patches(self, module: nn.Module, a: Tensor) -> Tensor:
        """:meth:`patches` for ``"ghost"``, in whatever memory layout its Gram matrices and
        patch sum read fastest."""
        return self.patches(module, a)

    def weight_forward(self, module: nn.Module, a: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def bias_grads(self, d: Tensor) -> Tensor:
        """Per-sample bias gradient ``Σ_t δ_it``: ``(N, M)``."""
        raise NotImplementedError

    def per_sample(self, module: nn.Module, a: Tensor, d: Tensor, out: Tensor | None) -> Tensor:
        """Per-sample weight gradients of the samples in ``a``, ``d``, flattened in the weight's
        order: ``(c, P)`` (written into ``out`` when given)."""
        u, dd = self.patches(module, a), self.deltas(module, d)
        c, g, t = u.shape[:3]
        uc = u.reshape(c * g, t, u.shape[-1])
        dc = dd.reshape(c * g, t, dd.shape[-1])
        if out is None:
            return torch.bmm(dc.transpose(1, 2), uc).view(c, -1)
        torch.bmm(dc.transpose(1, 2), uc, out=out.view(c * g, dd.shape[-1], u.shape[-1]))
        return out

    def sample_elements(self, module: nn.Module, a: Tensor, d: Tensor) -> int:
        """Elements :meth:`per_sample` reads or forms per sample besides the gradient: the
        input and the output gradient (a subclass adds copied patches)."""
        return a[0].numel() + d[0].numel()

    def weight_sum(self, module: nn.Module, a: Tensor, d: Tensor) -> Tensor:
        """``Σ_i G_i`` (the weight gradient of ``N·L``), flattened: ``(P,)``."""
        u, dd = self.patches(module, a), self.deltas(module, d)
        return torch.einsum("ngtm,ngtk->gmk", dd, u).reshape(-1)

    def extra_costs(
        self, t: int, p: int, g: int, k: int, module: nn.Module | None = None
    ) -> dict[str, float]:
        """Per-sample costs a subclass adds to (or replaces in) the generic model."""
        return {}

    def costs(self, site: Site, inner: bool = True) -> dict[str, float] | None:
        r"""Estimated per-sample cost of each mode for the weight (``None`` without one).

        With ``T`` positions, ``P`` weight elements in ``g`` groups of ``M x K``: per-sample
        gradients cost :math:`c_b TP` (a batched matmul), the weight gradient and the inner
        products' forward :math:`TP` each, Gram matrices :math:`c_g T^2 g (K + M)`, and a pass
        over a materialized per-sample gradient :math:`c_m P` (``"keep"`` makes four: write,
        norm, sum, inner product; ``"stream"`` three). Without ``inner`` (no inner products
        will be asked for) neither mode pays for them and ``"keep"`` is pointless.
        """
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
        per_sample = _BMM_COST * t * p
        forward = t * p if inner else 0.0  # the inner products' forward with weight V
        costs = {
            "ghost": t * p + forward + _GRAM_COST * t * t * g * (k + m),
            "stream": per_sample + forward + (3.0 if inner else 2.0) * _MEMORY_COST * p,
            "keep": per_sample + 4.0 * _MEMORY_COST * p if inner else float("inf"),
        }
        extra = self.extra_costs(t, p, g, k, site.module)
        if "per_sample" in extra:
            delta = extra.pop("per_sample") - per_sample
            costs["stream"] += delta
            costs["keep"] += delta
        for key, value in extra.items():
            costs[key] += value
        return costs

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

    def choose_mode(self, site: Site, memory: Memory) -> str:
        """The weight's mode for this pass: the caller's (``site.mode``), else the cheaper of
        ``"stream"`` and ``"ghost"`` by :meth:`costs`."""
        if site.mode in ("keep", "stream", "ghost"):
            return site.mode
        costs = self.costs(site, memory.inner_products) or {}
        return "stream" if costs.get("stream", 1) < costs.get("ghost", 0) else "ghost"

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        module = site.module
        calls = [c for c in site.calls if c.delta is not None]
        ref = next(iter(site.params.values()))
        grad_sum: dict[str, Tensor] = {}
        # the per-sample squared norms of the parts, (N,) float64 each, added once at the end
        # (small models pay per tensor operation: no zeros to accumulate into)
        parts: list[Tensor] = []
        bias_g = None
        if "bias" in site.params:
            b = site.params["bias"]
            bias_g = (
                add_up([self.bias_grads(c.delta.to(b.dtype)) for c in calls])
                if calls
                else torch.zeros((n, *b.shape), dtype=b.dtype, device=b.device)
            )
            grad_sum["bias"] = bias_g.sum(0)
            parts.append(sq_norms(bias_g))
        kept = None  # materialized per-sample weight gradients, (N, P)
        patched = None  # the patches and output gradients of "ghost" (N, g, T, K), (N, g, T, M)
        if "weight" in site.params:
            w = site.params["weight"]
            if not calls:
                grad_sum["weight"] = torch.zeros_like(w)
            else:
                # (under autocast the inputs and output gradients may be in a lower precision)
                pairs = [(c.inputs.to(w.dtype), c.delta.to(w.dtype)) for c in calls]
                mode = site.mode = self.choose_mode(site, memory)
                if mode == "ghost":
                    us = [self.ghost_patches(module, a) for a, _ in pairs]
                    ds = [self.deltas(module, d) for _, d in pairs]
                    if self.patch_sums:  # from the patches formed for the Gram matrices anyway
                        sums = [_patch_sum(u, d) for u, d in zip(us, ds)]
                    else:
                        sums = [self.weight_sum(module, a, d) for a, d in pairs]
                    total = add_up(sums)
                    u = us[0] if len(us) == 1 else torch.cat(us, dim=2)
                    d = ds[0] if len(ds) == 1 else torch.cat(ds, dim=2)
                    del us, ds, sums
                    parts.append(_ghost_norms(u, d))
                    nbytes = u.numel() * u.element_size()
                    if (
                        self.patch_sums
                        and memory.inner_products
                        and memory.keep_patches
                        and nbytes <= memory.free
                    ):  # the inner products from the patches too, within the memory budget
                        memory.free -= nbytes
                        patched = (u, d)
                    del u, d
                else:
                    p = w.numel()
                    if mode == "keep":
                        kept = memory.take((n, p), w.dtype, w.device)
                    if kept is not None:
                        step = max(1, _CACHE_ELEMENTS // p)
                    else:
                        touched = p + sum(self.sample_elements(module, a, d) for a, d in pairs)
                        step = max(1, min(_CHUNK_ELEMENTS // p, _STREAM_ELEMENTS // touched))
                    totals, norms = [], []
                    for lo in range(0, n, step):
                        hi = min(n, lo + step)
                        out = None if kept is None else kept[lo:hi]
                        (a, d), rest = pairs[0], pairs[1:]
                        chunk = self.per_sample(module, a[lo:hi], d[lo:hi], out)
                        for a, d in rest:  # a module called more than once
                            chunk += self.per_sample(module, a[lo:hi], d[lo:hi], None)
                        totals.append(chunk.sum(0))
                        norms.append(sq_norms(chunk))
                    total = add_up(totals)
                    parts.append(norms[0] if len(norms) == 1 else torch.cat(norms))
                grad_sum["weight"] = total.view(w.shape)
        sq = add_up(parts) if parts else torch.zeros(n, dtype=torch.float64, device=ref.device)

        # Keep the saved inputs and output gradients only when the inner products need them.
        needed = calls if kept is None and patched is None and memory.inner_products else []

        def inner(v: dict[str, Tensor]) -> Tensor:
            res = torch.zeros(n, dtype=torch.float64, device=sq.device)
            if bias_g is not None:
                res += (bias_g @ v["bias"].to(bias_g.dtype)).double()
            if "weight" in v and "weight" in grad_sum:
                vw = v["weight"].to(site.params["weight"].dtype)
                if kept is not None:
                    res += (kept @ vw.reshape(-1)).double()
                elif patched is not None:  # Σ_t δ_t·(V u_t) per sample and group
                    u, d = patched
                    g = u.shape[1]
                    out = torch.einsum("ngtk,gmk->ngtm", u, vw.reshape(g, d.shape[-1], -1))
                    res += torch.linalg.vecdot(out.reshape(n, -1), d.reshape(n, -1)).double()
                else:
                    for c in needed:
                        out = self.weight_forward(module, c.inputs.to(vw.dtype), vw)
                        res += sum_but_batch(out * c.delta.to(vw.dtype)).double()
            return res

        return LayerStats(grad_sum, sq, inner)


def _patch_sum(u: Tensor, d: Tensor) -> Tensor:
    """``Σ_i D_iᵀ U_i`` from patches ``(N, g, T, K)`` and output gradients ``(N, g, T, M)``,
    flattened in the weight's order: ``(P,)``."""
    return torch.einsum("ngtm,ngtk->gmk", d, u).reshape(-1)


def _ghost_norms(u: Tensor, d: Tensor) -> Tensor:
    """Per-sample ``‖D_iᵀ U_i‖² = Σ_{t,t'} (u_t·u_t')(δ_t·δ_t')`` (summed over the groups) without
    forming ``D_iᵀ U_i``; ``u``: ``(N, g, T, K)``, ``d``: ``(N, g, T, M)``."""
    n, g, t = u.shape[:3]
    if t == 1:
        uu = torch.linalg.vector_norm(u, dim=(-1, -2)).square()  # (N, g)
        dd = torch.linalg.vector_norm(d, dim=(-1, -2)).square()
        return (uu * dd).sum(1).double()
    out = torch.zeros(n, dtype=torch.float64, device=u.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, g * t * t))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        uc = u[lo:hi].reshape(-1, t, u.shape[-1])
        dc = d[lo:hi].reshape(-1, t, d.shape[-1])
        gram_u = torch.bmm(uc, uc.transpose(1, 2)).view(hi - lo, -1)  # (c, g·T·T)
        gram_d = torch.bmm(dc, dc.transpose(1, 2)).view(hi - lo, -1)
        out[lo:hi] = torch.linalg.vecdot(gram_u, gram_d).double()
    return out


# A weight used as a plain affine map on sequences (MultiheadAttention's projections, an RNN's
# gates), one group: inputs ``u`` of shape ``(N, T, K)`` and output gradients ``d`` ``(N, T, M)``.


def seq_weight_sum(u: Tensor, d: Tensor) -> Tensor:
    """``Σ_i D_iᵀ U_i`` as one matmul over all ``N·T`` rows: ``(M, K)``."""
    return d.reshape(-1, d.shape[-1]).t() @ u.reshape(-1, u.shape[-1])


def seq_sq_norms(u: Tensor, d: Tensor) -> Tensor:
    """Per-sample ``‖D_iᵀ U_i‖²`` (float64 ``(N,)``): Gram matrices when ``T²(K+M) ≤ 2TKM``,
    else the per-sample gradients in chunks of samples."""
    n, t, k = u.shape
    m = d.shape[-1]
    if t * t * (k + m) <= 2 * t * k * m:
        return _ghost_norms(u.unsqueeze(1), d.unsqueeze(1))
    out = torch.zeros(n, dtype=torch.float64, device=u.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, k * m))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        out[lo:hi] = sq_norms(torch.bmm(d[lo:hi].transpose(1, 2), u[lo:hi]))
    return out


def seq_inner(u: Tensor, d: Tensor, v: Tensor) -> Tensor:
    """Per-sample ``⟨D_iᵀ U_i, V⟩ = Σ_t δ_it · (V u_it)`` (float64 ``(N,)``)."""
    n = u.shape[0]
    return torch.linalg.vecdot((u @ v.t()).reshape(n, -1), d.reshape(n, -1)).double()
