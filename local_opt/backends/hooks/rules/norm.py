"""Rules for normalization layers: LayerNorm, GroupNorm, BatchNorm and timm's variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from local_opt.backends.hooks.rules.base import register, register_named
from local_opt.backends.hooks.rules.diagonal import DiagonalRule

__all__: list[str] = []  # private module


class LayerNormRule(DiagonalRule):
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


register(LayerNormRule(), nn.LayerNorm)
register(GroupNormRule(), nn.GroupNorm)
register(BatchNormRule(), nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
register_named(LayerNormRule(), "timm.layers.norm.LayerNorm")
register_named(LayerNorm2dRule(), "timm.layers.norm.LayerNorm2d")
register_named(GroupNormRule(), "timm.layers.norm.GroupNorm", "timm.layers.norm.GroupNorm1")
register_named(BatchNormActRule(), "timm.layers.norm_act.BatchNormAct2d")
