"""Rule for ``nn.Conv1d`` / ``nn.Conv2d``.

Per-sample weight gradients are, for many positions, one weight gradient of the same convolution
with the ``c`` samples of a chunk stacked as ``c·groups`` groups (oneDNN's kernel, no im2col),
and for few positions and wide channels (where that kernel has a large per-group overhead) one
batched matmul on im2col patches; the Gram matrices of ``"ghost"`` use im2col patches (viewed,
not copied, in the layout the rules expect).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from local_opt.backends.hooks.rules import affine
from local_opt.backends.hooks.rules.affine import AffineRule
from local_opt.backends.hooks.rules.base import register

__all__: list[str] = []  # private module


def _geometry(module: nn.Module, a: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The input padded as the convolution pads it when that is not plain zero padding, and the
    zero padding left to apply."""
    pad: Any = module.padding
    if module.padding_mode != "zeros" or isinstance(pad, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        a = F.pad(a, module._reversed_padding_repeated_twice, mode=mode)
        pad = (0,) * (a.dim() - 2)
    return a, tuple(pad)


def im2col(
    a: Tensor,
    k: tuple[int, int],
    dil: tuple[int, int],
    pad: tuple[int, int],
    stride: tuple[int, int],
    positions_major: bool = False,
) -> Tensor:
    r"""``F.unfold(a, k, dilation=dil, padding=pad, stride=stride)``, the same values, ``(N, C·kk,
    T)``: a view for 1x1 kernels at stride 1, one permuting copy for non-overlapping patches
    (kernel = stride; 0.02 ms against 0.18 ms for a ViT's patch embedding at 32 px, b=16), else
    for outputs at least 8 positions wide or of one position a strided view (``Tensor.unfold``)
    copied once. ``F.unfold``'s CPU kernel
    costs ~2 ns a patch element whatever the shape (1.1 ms for 16 samples of 16 channels at
    16x16, 0.15 ms for the copy), while the copy is slow for narrow outputs (inner loops of a
    few elements), where ``F.unfold`` is kept.

    With ``positions_major`` the copy is laid out ``(C·kk, N, T)`` (the result a transposed
    view): the sum over samples and positions :math:`\sum_{i,t}\delta_{it}u_{it}^\top` is
    then one matmul that reads the patches in place (in the ``(N, C·kk, T)`` layout the matmul
    needs a transposed copy of them: 45 ms of 184 for a 512-channel 3x3 convolution at 7x7,
    b=32), and this copy is also faster than ``F.unfold`` on narrow outputs (14 ms against 18
    there)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = k, dil, pad, stride
    n, c = a.shape[:2]
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        return a.reshape(n, c, -1)
    ho = (a.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (a.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw) == (sh, sw) and (ph, pw, dh, dw) == (0, 0, 1, 1) and ho >= 1 and wo >= 1:
        # non-overlapping patches (a ViT's patch embedding): one copy, patch-major (the
        # Gram matrices and the weight gradient read rows of the patch, contiguous here)
        v = a[:, :, : ho * kh, : wo * kw].reshape(n, c, ho, kh, wo, kw)
        return v.permute(0, 2, 4, 1, 3, 5).reshape(n, ho * wo, c * kh * kw).transpose(1, 2)
    positions_major = positions_major and ho * wo >= _POSITIONS_MAJOR_MIN
    if ho < 1 or wo < 1 or (wo < 8 and ho * wo != 1 and not positions_major):
        return F.unfold(a, k, dilation=dil, padding=pad, stride=stride)
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph))
    v = a.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # (N, C, Ho, Wo, ., .)
    if dh > 1 or dw > 1:
        v = v[..., ::dh, ::dw]
    if positions_major:
        return v.permute(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n, ho * wo).transpose(0, 1)
    return v.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


#: Fewer output positions than this: :func:`im2col` ignores ``positions_major`` (the permuting copy
#: has inner loops of a few elements: 0.46 ms against ``F.unfold``'s 0.16 ms for 16 samples of 48
#: channels at 2x2, 3x3 kernel; at 7x7 and more the layout pays, see :func:`im2col`).
_POSITIONS_MAJOR_MIN = 49

#: One element of the patches :func:`im2col` copies from a strided view (~0.4 ns against
#: ``F.unfold``'s ~2 ns at b=16 on 8-16 px outputs, one thread): the unit of ``affine``'s model.
_STRIDED_COST = 6.0


class ConvRule(AffineRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding, padding mode, dilation, groups)."""

    patch_sums = True

    def unsupported(self, module: nn.Module) -> str | None:
        if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
            return "only Conv1d and Conv2d are supported"
        return None

    def groups(self, module: nn.Module) -> int:
        return module.groups

    def patches(self, module: nn.Module, a: Tensor) -> Tensor:
        return self._patches(module, a, False)

    def _patches(self, module: nn.Module, a: Tensor, positions_major: bool) -> Tensor:
        a, pad = _geometry(module, a)
        k, dil, stride = module.kernel_size, module.dilation, module.stride
        if isinstance(module, nn.Conv1d):
            a = a.unsqueeze(-2)
            k, dil, pad, stride = (1, k[0]), (1, dil[0]), (0, pad[0]), (1, stride[0])
        u = im2col(a, k, dil, pad, stride, positions_major)  # (N, C*kk, T)
        g = module.groups
        return u.view(u.shape[0], g, u.shape[1] // g, u.shape[2]).transpose(2, 3)

    def ghost_patches(self, module: nn.Module, a: Tensor) -> Tensor:
        """One group: patches laid out positions-major (see :func:`im2col`), so that the
        patch sum reads them in place; several groups, or a subclass with patches of its own:
        :meth:`patches`."""
        if module.groups != 1 or type(self).patches is not ConvRule.patches:
            return self.patches(module, a)
        return self._patches(module, a, True)

    def deltas(self, module: nn.Module, d: Tensor) -> Tensor:
        g = module.groups
        return d.reshape(d.shape[0], g, d.shape[1] // g, -1).transpose(2, 3)  # (N, g, T, Mg)

    def _weight_grad(self, module: nn.Module, a: Tensor, d: Tensor, groups: int) -> Tensor:
        """The weight gradient of the convolution of ``a`` (``(1 or N, C, ...)``) with
        ``groups`` groups at output gradient ``d``."""
        a, pad = _geometry(module, a)
        w = module.weight
        shape = (d.shape[1], a.shape[1] // groups, *w.shape[2:])
        dummy = w.new_zeros(()).expand(shape)  # only its shape is read
        return torch.ops.aten.convolution_backward(
            d, a, dummy, None, module.stride, pad, module.dilation,
            False, (0,) * len(pad), groups, (False, True, False),
        )[1]

    def unfold_cost(self, module: nn.Module, t: int) -> float:
        """Cost of one patch element at ``T = t`` positions (see :func:`im2col`): none for 1x1
        kernels at stride 1 (a view), :data:`_STRIDED_COST` where :func:`im2col` copies a
        strided view (taken as ``T >= 64`` or ``T = 1``; square outputs at least 8 wide), else
        ``F.unfold``'s. Subclasses with patches of their own pay ``F.unfold``'s."""
        if type(self).patches is not ConvRule.patches:
            return affine._UNFOLD_COST
        if (
            all(v == 1 for v in module.kernel_size)
            and all(v == 1 for v in module.stride)
            and module.padding in (0, (0,) * len(module.kernel_size), "valid")
        ):
            return 0.0
        return _STRIDED_COST if t >= 64 or t == 1 else affine._UNFOLD_COST

    def _grouped(self, module: nn.Module, t: int) -> bool:
        """Whether the grouped-convolution kernel beats im2col + batched matmul at ``T = t``."""
        w = module.weight
        p, k = w.numel(), w[0].numel()
        grouped = affine._GROUPED_COST * t * p + affine._GROUPED_OVERHEAD * p
        unfold = self.unfold_cost(module, t) * t * module.groups * k
        return grouped < affine._BMM_COST * t * p + unfold

    def per_sample(self, module: nn.Module, a: Tensor, d: Tensor, out: Tensor | None) -> Tensor:
        if not self._grouped(module, d[0, 0].numel()):
            return super().per_sample(module, a, d, out)
        c = a.shape[0]
        gw = self._weight_grad(
            module,
            a.reshape(1, -1, *a.shape[2:]),
            d.reshape(1, -1, *d.shape[2:]),
            c * module.groups,
        ).view(c, -1)
        return gw if out is None else out.copy_(gw)

    def sample_elements(self, module: nn.Module, a: Tensor, d: Tensor) -> int:
        """The input and output gradient, and the im2col patches :meth:`per_sample` copies
        when it takes the batched matmul."""
        t = d[0, 0].numel()
        copied = self.unfold_cost(module, t) > 0 and not self._grouped(module, t)
        k = module.weight[0].numel() * module.groups
        return a[0].numel() + d[0].numel() + (t * k if copied else 0)

    def weight_sum(self, module: nn.Module, a: Tensor, d: Tensor) -> Tensor:
        return self._weight_grad(module, a, d, module.groups).reshape(-1)

    def extra_costs(
        self, t: int, p: int, g: int, k: int, module: nn.Module | None = None
    ) -> dict[str, float]:
        cost = affine._UNFOLD_COST if module is None else self.unfold_cost(module, t)
        unfold = cost * t * g * k
        grouped = affine._GROUPED_COST * t * p + affine._GROUPED_OVERHEAD * p
        return {"per_sample": min(grouped, affine._BMM_COST * t * p + unfold), "ghost": unfold}

    def weight_forward(self, module: nn.Module, a: Tensor, v: Tensor) -> Tensor:
        return module._conv_forward(a, v, None)

    def bias_grads(self, d: Tensor) -> Tensor:
        return d.reshape(d.shape[0], d.shape[1], -1).sum(2)


register(ConvRule(), nn.Conv1d, nn.Conv2d)
