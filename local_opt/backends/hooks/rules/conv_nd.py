r"""Rules for ``nn.Conv3d`` and the transposed convolutions ``nn.ConvTranspose1d/2d/3d``.

Both reuse the Linear/Conv machinery of :mod:`.affine` (per-sample ``G_i = Σ_t δ_it u_itᵀ`` in
``groups`` blocks) with patches from :func:`unfold_nd`, an im2col for any number of spatial
dimensions (``F.unfold`` is 2-d only).

A transposed convolution is the adjoint of a convolution with the same weight:
:math:`\langle \mathrm{conv\_transpose}(x, W), \delta\rangle = \langle x, \mathrm{conv}(\delta,
W)\rangle`, so its weight gradient is a convolution's weight gradient with the roles swapped:
the patches are those of ``δ`` and the "output gradient" is the input ``x`` (the weight's
``(C_in, C_out/g, k…)`` layout is a convolution's ``(out, in/g, k…)``).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from local_opt.backends.hooks.rules.base import (
    Call,
    LayerStats,
    Memory,
    Site,
    register,
    sq_norms,
)
from local_opt.backends.hooks.rules.conv import ConvRule

__all__: list[str] = []  # private module


def unfold_nd(
    a: Tensor, kernel: tuple, dilation: tuple, padding: tuple, stride: tuple
) -> Tensor:
    """im2col of ``(N, C, *S)``: ``(N, C·Πk, T)``, the kernel offsets in row-major order within
    each channel (the layout of a flattened convolution weight)."""
    d = len(kernel)
    a = F.pad(a, [p for pp in reversed(padding) for p in (pp, pp)])
    out = [
        (a.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(d)
    ]
    cols = []
    for offs in itertools.product(*(range(k) for k in kernel)):
        idx = tuple(
            slice(o * dilation[i], o * dilation[i] + stride[i] * (out[i] - 1) + 1, stride[i])
            for i, o in enumerate(offs)
        )
        cols.append(a[(slice(None), slice(None), *idx)])
    u = torch.stack(cols, 2)  # (N, C, Πk, *out)
    return u.reshape(a.shape[0], -1, u[0, 0, 0].numel())


def _group_patches(u: Tensor, groups: int) -> Tensor:
    u = u.reshape(u.shape[0], groups, u.shape[1] // groups, u.shape[2])  # (N, g, Kg, T)
    return u.transpose(2, 3)  # (N, g, T, Kg), the layout of AffineRule.patches


class Conv3dRule(ConvRule):
    """``nn.Conv3d`` (any stride, padding, padding mode, dilation, groups)."""

    def unsupported(self, module: nn.Module) -> str | None:
        return None if isinstance(module, nn.Conv3d) else "not a Conv3d"

    def patches(self, module: nn.Module, a: Tensor) -> Tensor:
        pad: Any = module.padding
        if module.padding_mode != "zeros" or isinstance(pad, str):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            a = F.pad(a, module._reversed_padding_repeated_twice, mode=mode)
            pad = (0, 0, 0)
        u = unfold_nd(a, module.kernel_size, module.dilation, tuple(pad), module.stride)
        return _group_patches(u, module.groups)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvTransposeRule(ConvRule):
    """``nn.ConvTranspose1d/2d/3d`` (any stride, padding, output padding, dilation, groups):
    a convolution's rule with the patches of ``δ`` and the input as the output gradient."""

    patch_sums = False  # the roles are swapped: keep to weight_sum and weight_forward

    def unsupported(self, module: nn.Module) -> str | None:
        if module.padding_mode != "zeros":
            return "only zero padding"
        return None

    def patches(self, module: nn.Module, a: Tensor) -> Tensor:  # ``a`` is δ here
        u = unfold_nd(a, module.kernel_size, module.dilation, module.padding, module.stride)
        return _group_patches(u, module.groups)

    def weight_forward(self, module: nn.Module, a: Tensor, v: Tensor) -> Tensor:  # conv(δ, V)
        conv = _CONV[a.dim() - 2]
        return conv(a, v, None, module.stride, module.padding, module.dilation, module.groups)

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        calls = [c for c in site.calls if c.delta is not None]
        stats: list[LayerStats] = []
        if "weight" in site.params:
            swapped = [Call(c.delta, c.delta._version, None, c.inputs) for c in calls]
            sub = Site(site.name, site.module, self, {"weight": site.params["weight"]}, swapped)
            sub.mode = site.mode
            stats.append(super().finish(sub, n, memory))
        grad_sum = dict(stats[0].grad_sum) if stats else {}
        sq = stats[0].sq_norms.clone() if stats else None
        bias_g = None
        if "bias" in site.params:
            b = site.params["bias"]
            bias_g = torch.zeros((n, *b.shape), dtype=b.dtype, device=b.device)
            for c in calls:
                bias_g += c.delta.to(b.dtype).reshape(n, b.shape[0], -1).sum(2)
            grad_sum["bias"] = bias_g.sum(0)
            sq = sq_norms(bias_g) if sq is None else sq + sq_norms(bias_g)
        site.calls = []

        def inner(v: dict[str, Tensor]) -> Tensor:
            res = torch.zeros(n, dtype=torch.float64, device=sq.device)
            if stats and "weight" in v:
                res += stats[0].inner({"weight": v["weight"]})
            if bias_g is not None and "bias" in v:
                res += (bias_g @ v["bias"].to(bias_g.dtype)).double()
            return res

        return LayerStats(grad_sum, sq, inner)


register(Conv3dRule(), nn.Conv3d)
register(ConvTransposeRule(), nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
