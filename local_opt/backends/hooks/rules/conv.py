"""Rule for ``nn.Conv1d`` / ``nn.Conv2d`` (im2col patches)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from local_opt.backends.hooks.rules.affine import AffineRule
from local_opt.backends.hooks.rules.base import register

__all__: list[str] = []  # private module


class ConvRule(AffineRule):
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


register(ConvRule(), nn.Conv1d, nn.Conv2d)
