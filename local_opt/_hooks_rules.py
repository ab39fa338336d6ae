r"""Per-layer closed forms of per-sample gradients for the hooks backend.

Each rule knows one kind of parameterized layer. From what a forward hook saved (the layer's
input ``a``) and what the backward delivered (``δ``, the gradient of ``N·L`` with respect to the
layer's output, so ``δ_i = ∂ℓ_i/∂out_i`` when samples do not interact), it returns for the
layer's parameters

* ``Σ_i g_i`` (the batch gradient times ``N``),
* ``‖g_i‖²`` for every sample ``i`` (a length-``N`` vector, summed over the layer's parameters),
* a function ``V ↦ (⟨g_i, V⟩)_i`` evaluated later, once the pooled mean gradient is known.

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

Normalization layers and layer scales have small diagonal per-sample gradients
(:math:`\sum_t \delta_{it}\odot\hat x_{it}` for the weight, :math:`\sum_t\delta_{it}` for the
bias, with :math:`\hat x` recomputed from the saved input) that are always materialized.
Embeddings scatter :math:`\delta_{it}` into the rows of their token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__: list[str] = []  # private module

# Cost model (in multiply-adds per sample) used to pick a mode for Linear/Conv weights. A pass
# over a materialized per-sample gradient of P elements costs about _MEMORY_COST * P; "keep"
# makes ~4 such passes (write, norm, sum, inner). Calibrated on CPU (one thread) with timm
# resnet18 and vit_tiny at 32x32, b=32.
_MEMORY_COST = 12.0
# Relative cost of a batched matmul of per-sample (T x M) and (T x K) matrices vs one big one.
_BMM_COST = 1.2
# Chunk sizes (elements) for materialized per-sample gradients and Gram matrices, and for the
# chunks of kept per-sample gradients whose sum and norms are taken while they are in cache.
_CHUNK_ELEMENTS = 1 << 24
_CACHE_ELEMENTS = 1 << 19


@dataclass
class Call:
    """One forward call of a covered module: its saved input and, after backward, ``δ``."""

    inputs: Tensor
    version: int
    edge: Any  # torch.autograd.graph.GradientEdge of the output, taken before any in-place op
    delta: Tensor | None = None


@dataclass
class Site:
    """A covered module, the rule that handles it and what the hooks captured."""

    name: str
    module: nn.Module
    rule: Rule
    params: dict[str, nn.Parameter]  # trainable parameters the rule handles, by attribute name
    calls: list[Call] = field(default_factory=list)
    mode: str = ""  # Linear/Conv weights: the mode chosen for the last pass


@dataclass
class LayerStats:
    """A layer's part of the statistics (see the module docstring)."""

    grad_sum: dict[str, Tensor]
    sq_norms: Tensor  # (N,), float64
    inner: Callable[[dict[str, Tensor]], Tensor]  # {name: V} -> (N,) per-sample ⟨g_i, V⟩


class Memory:
    """What a pass may keep until the inner products are asked for.

    ``free`` is the byte budget left for tensors stored only for the inner products;
    :meth:`take` carves per-sample gradients (granted beforehand) out of reused workspaces.
    """

    def __init__(self, free: int, workspaces: dict[tuple[torch.dtype, torch.device], Tensor]):
        self.free = free
        self._workspaces = workspaces
        self._offsets: dict[tuple[torch.dtype, torch.device], int] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        numel = 1
        for s in shape:
            numel *= s
        buf = self._workspaces.get(key)
        start = self._offsets.get(key, 0)
        if buf is None or start + numel > buf.numel():
            return torch.empty(shape, dtype=dtype, device=device)
        self._offsets[key] = start + numel
        return buf[start : start + numel].view(shape)


def _sum_but_batch(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def _sq_norms(t: Tensor) -> Tensor:
    """``(N, ...) -> (N,)`` squared norms, returned in float64."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).double().square()


class Rule:
    """A per-layer rule; subclasses implement :meth:`finish` and may refine the others."""

    param_names: tuple[str, ...] = ("weight", "bias")

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this module cannot be handled (``None`` if it can)."""
        return None

    def output_child(self, module: nn.Module) -> nn.Module | None:
        """The submodule whose input is this rule's output, when the module's own output comes
        after more computation (None: the module's output)."""
        return None

    def keep_request(self, site: Site, n: int) -> tuple[float, int] | None:
        """``(saving, bytes)`` if keeping per-sample gradients is this site's cheapest option."""
        return None

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        """The layer's statistics, from ``site.calls`` (inputs and output gradients).

        ``site.mode`` may carry a decision taken by the caller (``"keep"`` when memory for the
        per-sample gradients was granted, or a mode forced for every layer).
        """
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Linear and convolutions: per-sample weight gradient G_i = Σ_t δ_it u_itᵀ, in `groups` blocks.
# --------------------------------------------------------------------------------------------


class _Affine(Rule):
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
            sq += _sq_norms(bias_g)
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
                        sq[lo:hi] += _sq_norms(chunk)
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
                        res += _sum_but_batch(out * c.delta).double()
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
        out[lo:hi] = _sq_norms(_per_sample(u, d, lo, hi))
    return out


class LinearRule(_Affine):
    """``nn.Linear`` on ``(N, *, d_in)`` inputs; the middle dimensions are positions."""

    def patches(self, module: nn.Module, a: Tensor) -> Tensor:
        return a.reshape(1, a.shape[0], -1, a.shape[-1])

    def deltas(self, module: nn.Module, d: Tensor) -> Tensor:
        return d.reshape(1, d.shape[0], -1, d.shape[-1])

    def weight_forward(self, module: nn.Module, a: Tensor, v: Tensor) -> Tensor:
        return F.linear(a, v)

    def bias_grads(self, d: Tensor) -> Tensor:
        return d.reshape(d.shape[0], -1, d.shape[-1]).sum(1)


class ConvRule(_Affine):
    """``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding, padding mode, dilation, groups)."""

    copies_patches = True

    def unsupported(self, module: nn.Module) -> str | None:
        if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
            return "only Conv1d and Conv2d are supported"
        return None

    def groups(self, module: nn.Module) -> int:
        return module.groups

    def patches(self, module: nn.Module, a: Tensor) -> Tensor:
        one_d = isinstance(module, nn.Conv1d)
        pad: Any = module.padding
        if module.padding_mode != "zeros" or isinstance(pad, str):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            a = F.pad(a, module._reversed_padding_repeated_twice, mode=mode)
            pad = (0,) * (1 if one_d else 2)
        if one_d:
            a = a.unsqueeze(-2)
            k, dil, pad, stride = (
                (1, module.kernel_size[0]),
                (1, module.dilation[0]),
                (0, pad[0]),
                (1, module.stride[0]),
            )
        else:
            k, dil, pad, stride = module.kernel_size, module.dilation, tuple(pad), module.stride
        u = F.unfold(a, k, dilation=dil, padding=pad, stride=stride)  # (N, C*kk, T)
        g = module.groups
        u = u.reshape(u.shape[0], g, u.shape[1] // g, u.shape[2])  # (N, g, Kg, T)
        return u.permute(1, 0, 3, 2).contiguous()  # (g, N, T, Kg)

    def deltas(self, module: nn.Module, d: Tensor) -> Tensor:
        g = module.groups
        d = d.reshape(d.shape[0], g, d.shape[1] // g, -1)  # (N, g, Mg, T)
        return d.permute(1, 0, 3, 2).contiguous()  # (g, N, T, Mg)

    def weight_forward(self, module: nn.Module, a: Tensor, v: Tensor) -> Tensor:
        return module._conv_forward(a, v, None)

    def bias_grads(self, d: Tensor) -> Tensor:
        return d.reshape(d.shape[0], d.shape[1], -1).sum(2)


# --------------------------------------------------------------------------------------------
# Diagonal rules: y = h(x) * weight + bias with h parameter-free (normalizations, layer scale).
# --------------------------------------------------------------------------------------------


class _Diagonal(Rule):
    """Per-sample ``weight`` gradient ``Σ_pos δ ⊙ h(x)``, ``bias`` gradient ``Σ_pos δ``."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def to_param(self, module: nn.Module, t: Tensor, shape: torch.Size) -> Tensor:
        """Sum ``(N, ...)`` over the positions that share a parameter entry: ``(N, *shape)``."""
        # Default: parameters along dim 1 (channels first).
        return t.reshape(t.shape[0], t.shape[1], -1).sum(2).reshape(t.shape[0], *shape)

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        per: dict[str, Tensor] = {}
        for name, p in site.params.items():
            per[name] = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
        for c in site.calls:
            if c.delta is None:
                continue
            ref = next(iter(per.values()))
            delta = c.delta.to(ref.dtype)
            if "weight" in per:
                xh = self.normalized(site.module, c.inputs.to(ref.dtype))
                per["weight"] += self.to_param(site.module, delta * xh, per["weight"].shape[1:])
            if "bias" in per:
                per["bias"] += self.to_param(site.module, delta, per["bias"].shape[1:])
        sq = sum(_sq_norms(g) for g in per.values())
        grad_sum = {name: g.sum(0) for name, g in per.items()}

        def inner(v: dict[str, Tensor]) -> Tensor:
            res = torch.zeros(n, dtype=torch.float64, device=sq.device)
            for name, g in per.items():
                res += (g.reshape(n, -1) @ v[name].reshape(-1).to(g.dtype)).double()
            return res

        return LayerStats(grad_sum, sq, inner)


class LayerNormRule(_Diagonal):
    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def to_param(self, module: nn.Module, t: Tensor, shape: torch.Size) -> Tensor:
        return t.reshape(t.shape[0], -1, *shape).sum(1)


class LayerNorm2dRule(_Diagonal):
    """timm's ``LayerNorm2d``: LayerNorm over the channels of an NCHW tensor."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        xp = x.permute(0, 2, 3, 1)
        return F.layer_norm(xp, module.normalized_shape, None, None, module.eps).permute(0, 3, 1, 2)


class GroupNormRule(_Diagonal):
    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class BatchNormRule(_Diagonal):
    r"""BatchNorm1d/2d/3d. In training mode (or without running statistics) :math:`\hat x` uses the
    batch statistics, and ``δ`` includes the coupling through them: the per-sample gradients are
    then the per-sample *contributions* whose mean is the batch gradient."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        batch_stats = module.training or (
            module.running_mean is None and module.running_var is None
        )
        if batch_stats:
            return F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
        return F.batch_norm(
            x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps
        )


class BatchNormActRule(BatchNormRule):
    """timm's ``BatchNormAct2d``: BatchNorm2d, then its ``drop`` and ``act`` submodules. ``δ`` is
    taken at the BatchNorm output, which is the input of ``drop`` (before an in-place
    activation overwrites it)."""

    def unsupported(self, module: nn.Module) -> str | None:
        for name in ("drop", "act"):
            if not isinstance(getattr(module, name, None), nn.Module):
                return f"no {name} submodule"
        return None

    def output_child(self, module: nn.Module) -> nn.Module | None:
        return module.drop


class LayerScaleRule(_Diagonal):
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
        return _Diagonal.to_param(self, module, t, shape)


# --------------------------------------------------------------------------------------------
# Embedding: per-sample gradient rows are sums of δ over the positions holding each token id.
# --------------------------------------------------------------------------------------------


class EmbeddingRule(Rule):
    param_names = ("weight",)

    def unsupported(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalizes the weight in place"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq couples samples"
        return None

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        w = site.params["weight"]
        vocab, dim = w.shape
        calls = [c for c in site.calls if c.delta is not None]
        sq = torch.zeros(n, dtype=torch.float64, device=w.device)
        grad_sum = {"weight": torch.zeros_like(w)}
        if not calls:
            return LayerStats(grad_sum, sq, lambda v: torch.zeros_like(sq))
        ids = torch.cat([c.inputs.reshape(n, -1) for c in calls], dim=1)  # (N, T)
        delta = torch.cat([c.delta.reshape(n, -1, dim).to(w.dtype) for c in calls], dim=1)
        if site.module.padding_idx is not None:
            keep = (ids != site.module.padding_idx).unsqueeze(-1)
            delta = delta * keep
        flat_ids = ids.reshape(-1)
        flat_delta = delta.reshape(-1, dim)
        grad_sum["weight"].index_add_(0, flat_ids, flat_delta)
        sample = torch.arange(n, device=ids.device).repeat_interleave(ids.shape[1])
        uniq, inv = torch.unique(sample * vocab + flat_ids, return_inverse=True)
        rows = torch.zeros(uniq.shape[0], dim, dtype=delta.dtype, device=delta.device)
        rows.index_add_(0, inv, flat_delta)
        sq.index_add_(0, uniq // vocab, rows.double().pow(2).sum(1))

        def inner(v: dict[str, Tensor]) -> Tensor:
            picked = v["weight"].to(delta.dtype)[ids]  # (N, T, D)
            return _sum_but_batch(picked * delta).double()

        return LayerStats(grad_sum, sq, inner)


# Exact classes (subclasses that do not override ``forward`` are accepted too) and third-party
# classes known to compute the same function as a rule, by "module.qualname".
RULES: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.BatchNorm1d: BatchNormRule(),
    nn.BatchNorm2d: BatchNormRule(),
    nn.BatchNorm3d: BatchNormRule(),
}
NAMED_RULES: dict[str, Rule] = {
    "timm.layers.norm.LayerNorm": LayerNormRule(),
    "timm.layers.norm.LayerNorm2d": LayerNorm2dRule(),
    "timm.layers.norm.GroupNorm": GroupNormRule(),
    "timm.layers.norm.GroupNorm1": GroupNormRule(),
    "timm.layers.norm_act.BatchNormAct2d": BatchNormActRule(),
    "timm.layers.layer_scale.LayerScale": LayerScaleRule(),
    "timm.layers.layer_scale.LayerScale2d": LayerScale2dRule(),
}


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s class, or ``None``."""
    cls = type(module)
    named = NAMED_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
    if named is not None:
        return named
    for base in cls.__mro__:
        rule = RULES.get(base)
        if rule is not None:
            # A subclass that overrides forward may compute something else.
            return rule if cls.forward is base.forward else None
    return None


def input_of(args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor | None:
    if args:
        return args[0]
    return kwargs.get("input", kwargs.get("x"))
