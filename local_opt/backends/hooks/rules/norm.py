"""Rules for normalization layers: LayerNorm, GroupNorm, BatchNorm, RMSNorm, InstanceNorm,
GlobalResponseNorm and timm's variants (with their fused ``drop``/``act`` submodules)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from local_opt.backends.hooks.rules.base import (
    GROUP_ELEMENTS,
    Call,
    GroupStats,
    Memory,
    Site,
    group_stats,
    register,
    register_named,
)
from local_opt.backends.hooks.rules.diagonal import DiagonalRule

__all__: list[str] = []  # private module


class LayerNormRule(DiagonalRule):
    trailing = True

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def to_param(self, module: nn.Module, t: Tensor, shape: torch.Size) -> Tensor:
        return t.reshape(t.shape[0], -1, *shape).sum(1)


class LayerNorm2dRule(DiagonalRule):
    """timm's ``LayerNorm2d``: LayerNorm over the channels of an NCHW tensor."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        xp = x.permute(0, 2, 3, 1)
        return F.layer_norm(xp, module.normalized_shape, None, None, module.eps).permute(0, 3, 1, 2)


class GroupNormRule(DiagonalRule):
    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class BatchNormRule(DiagonalRule):
    r"""BatchNorm1d/2d/3d. In training mode (or without running statistics) :math:`\hat x` uses the
    batch statistics, and ``δ`` includes the coupling through them: the per-sample gradients are
    then the per-sample *contributions* whose mean is the batch gradient."""

    def _batch_stats(self, module: nn.Module) -> bool:
        return module.training or (module.running_mean is None and module.running_var is None)

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        if self._batch_stats(module):
            return F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
        return F.batch_norm(
            x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps
        )

    def on_output(self, call: Call, y: Tensor) -> None:
        node = y.grad_fn  # the batch statistics the forward computed (CPU and CUDA kernels)
        if type(node).__name__ == "NativeBatchNormBackward0" and node._saved_training:
            mean, invstd = node._saved_result1, node._saved_result2
            if mean.dim() == 1 and invstd.dim() == 1:
                call.bn_stats = (mean, invstd)  # type: ignore[attr-defined]

    def weight_grads(
        self, module: nn.Module, x: Tensor, delta: Tensor, shape: torch.Size, call: Call | None = None
    ) -> Tensor:
        r"""Without forming :math:`\hat x`: :math:`\sum_t \delta_t \hat x_t = r\,(\sum_t
        \delta_t x_t - \mu \sum_t \delta_t)` per sample and channel (mean :math:`\mu`, inverse
        standard deviation :math:`r`: the running ones in eval mode, else those the forward
        computed, read from its autograd node, or recomputed), combined in float64."""
        n = x.shape[0]
        c = shape.numel()
        if x.dim() < 2 or x.shape[1] != c or not (x.is_contiguous() and delta.is_contiguous()):
            return super().weight_grads(module, x, delta, shape, call)
        xv, dv = x.view(n, c, -1), delta.view(n, c, -1)
        sdx = torch.linalg.vecdot(dv, xv).double()  # half bmm's time on (N·C, 1, T) x (N·C, T, 1)
        sd = dv.sum(2).double()
        mean, rstd = self._mean_rstd(module, x, c, call)
        return ((sdx - mean * sd) * rstd).to(delta.dtype).reshape(n, *shape)

    def _mean_rstd(
        self, module: nn.Module, x: Tensor, c: int, call: Call | None
    ) -> tuple[Tensor, Tensor]:
        """The mean and inverse standard deviation ``x`` was normalized with (float64)."""
        stats = getattr(call, "bn_stats", None)
        if not self._batch_stats(module):
            mean = module.running_mean.double()
            return mean, torch.rsqrt(module.running_var.double() + module.eps)
        if stats is not None and stats[0].shape == (c,):
            return stats[0].double(), stats[1].double()
        var, mean = torch.var_mean(x, dim=(0, *range(2, x.dim())), correction=0)
        return mean.double(), torch.rsqrt(var.double() + module.eps)

    def group_key(self, site: Site, n: int, memory: Memory) -> Any:
        """BatchNorm layers called once on inputs of equal small shapes."""
        if len(site.calls) != 1 or site.calls[0].delta is None:
            return None
        if not site.params or set(site.params) - {"weight", "bias"}:
            return None
        ref = next(iter(site.params.values()))
        c = ref.numel()
        x, d = site.calls[0].inputs, site.calls[0].delta
        if (
            x.shape != d.shape
            or x.dim() < 2
            or x.shape[0] != n
            or x.shape[1] != c
            or any(p.shape != (c,) or p.dtype != ref.dtype for p in site.params.values())
            or x.dtype != ref.dtype
            or d.dtype != ref.dtype
            or 2 * x.numel() > GROUP_ELEMENTS
        ):
            return None
        return (type(self), tuple(x.shape), tuple(site.params), ref.dtype, ref.device)

    def finish_group(self, sites: list[Site], n: int, memory: Memory) -> GroupStats:
        """:meth:`weight_grads` for the stacked inputs and output gradients of ``L`` layers."""
        ll = len(sites)
        c = next(iter(sites[0].params.values())).numel()
        x = torch.stack([s.calls[0].inputs for s in sites]).view(ll, n, c, -1)
        d = torch.stack([s.calls[0].delta for s in sites]).view(ll, n, c, -1)
        sd = d.sum(3)  # (L, N, C): the per-sample bias gradients
        per: dict[str, Tensor] = {}
        if "weight" in sites[0].params:
            stats = [
                self._mean_rstd(s.module, s.calls[0].inputs, c, s.calls[0]) for s in sites
            ]
            mean = torch.stack([m for m, _ in stats]).unsqueeze(1)  # (L, 1, C)
            rstd = torch.stack([r for _, r in stats]).unsqueeze(1)
            sdx = torch.linalg.vecdot(d, x).double()
            per["weight"] = ((sdx - mean * sd.double()) * rstd).to(d.dtype)
        if "bias" in sites[0].params:
            per["bias"] = sd
        return group_stats(per, sites[0].params)


class _WithAct:
    """timm's fused norm + ``drop`` + ``act`` layers: ``δ`` at the normalization's output, the
    input of ``drop`` (before an in-place activation overwrites it)."""

    def unsupported(self, module: nn.Module) -> str | None:
        for name in ("drop", "act"):
            if not isinstance(getattr(module, name, None), nn.Module):
                return f"no {name} submodule"
        return None

    def output_child(self, module: nn.Module) -> nn.Module | None:
        return module.drop


class BatchNormActRule(_WithAct, BatchNormRule):
    """timm's ``BatchNormAct2d``: BatchNorm2d, then its ``drop`` and ``act`` submodules."""


register(LayerNormRule(), nn.LayerNorm)
register(GroupNormRule(), nn.GroupNorm)
register(BatchNormRule(), nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
register_named(LayerNormRule(), "timm.layers.norm.LayerNorm")
register_named(
    LayerNorm2dRule(), "timm.layers.norm.LayerNorm2d", "torchvision.models.convnext.LayerNorm2d"
)
register_named(GroupNormRule(), "timm.layers.norm.GroupNorm", "timm.layers.norm.GroupNorm1")
register_named(BatchNormActRule(), "timm.layers.norm_act.BatchNormAct2d")


class RMSNormRule(DiagonalRule):
    """``nn.RMSNorm`` and timm's ``RmsNorm``: ``x / rms(x)`` over the trailing dimensions."""

    param_names = ("weight",)
    trailing = True

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.rms_norm(x, module.normalized_shape, None, module.eps)

    def to_param(self, module: nn.Module, t: Tensor, shape: torch.Size) -> Tensor:
        return t.reshape(t.shape[0], -1, *shape).sum(1)


class RMSNorm2dRule(DiagonalRule):
    """timm's ``RmsNorm2d``: RMS over the channels of an NCHW tensor."""

    param_names = ("weight",)

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + module.eps)


class InstanceNormRule(DiagonalRule):
    """``nn.InstanceNorm1d/2d/3d`` with ``affine=True`` (statistics per sample and channel; the
    running statistics in eval mode when tracked)."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        own = module.training or not module.track_running_stats
        mean = None if own else module.running_mean
        var = None if own else module.running_var
        return F.instance_norm(x, mean, var, None, None, own, 0.0, module.eps)


class GlobalResponseNormRule(DiagonalRule):
    """timm's ``GlobalResponseNorm`` (ConvNeXt-V2): ``x + bias + weight ⊙ (x ⊙ N(x))`` with
    ``N(x)`` the spatial L2 norm over its channel mean; ``δ`` is the output's gradient."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        x_g = x.norm(p=2, dim=module.spatial_dim, keepdim=True)
        return x * (x_g / (x_g.mean(dim=module.channel_dim, keepdim=True) + module.eps))

    def to_param(self, module: nn.Module, t: Tensor, shape: torch.Size) -> Tensor:
        if module.channel_dim == 1:
            return DiagonalRule.to_param(self, module, t, shape)
        return t.reshape(t.shape[0], -1, *shape).sum(1)


class GroupNormActRule(_WithAct, GroupNormRule):
    pass


class LayerNormActRule(_WithAct, LayerNormRule):
    pass


class LayerNormAct2dRule(_WithAct, LayerNorm2dRule):
    pass


register(RMSNormRule(), nn.RMSNorm)
register(InstanceNormRule(), nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
register_named(RMSNormRule(), "timm.layers.norm.RmsNorm")
register_named(RMSNorm2dRule(), "timm.layers.norm.RmsNorm2d")
register_named(GlobalResponseNormRule(), "timm.layers.grn.GlobalResponseNorm")
register_named(
    GroupNormActRule(), "timm.layers.norm_act.GroupNormAct", "timm.layers.norm_act.GroupNorm1Act"
)
register_named(LayerNormActRule(), "timm.layers.norm_act.LayerNormAct")
register_named(LayerNormAct2dRule(), "timm.layers.norm_act.LayerNormAct2d")
