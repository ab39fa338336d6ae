"""Early checks with messages that say what to change: the launch, the model, the loss function."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

__all__: list[str] = []  # private module


class InvalidLoss(ValueError):
    """A ``loss_fn`` that does not return a scalar loss tensor: the caller's error, so no backend
    falls back on it (every backend would meet it)."""


def warn_if_not_initialized(who: str, process_group: Any = None) -> None:
    """Warn when ``WORLD_SIZE > 1`` (torchrun launched several processes) but torch.distributed
    is not initialized: every process would then train alone on its own copy of the data."""
    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        return
    world = os.environ.get("WORLD_SIZE", "")
    if not world.isdigit() or int(world) <= 1:
        return
    warnings.warn(
        f"{who}: WORLD_SIZE={world} is set (torchrun started {world} processes) but "
        "torch.distributed is not initialized, so every process would train alone, without "
        "averaging. Call torch.distributed.init_process_group('nccl' if "
        f"torch.cuda.is_available() else 'gloo') before building the {who}.",
        RuntimeWarning,
        stacklevel=3,
    )


def check_trainable(model: nn.Module) -> None:
    """Refuse a model without any parameter that requires a gradient."""
    if not any(p.requires_grad for p in model.parameters()):
        n = sum(1 for _ in model.parameters())
        raise ValueError(
            f"Invalid model: {type(model).__name__} has no trainable parameters ({n} parameters, "
            "none with requires_grad=True); VarianceTest measures the gradient of the trainable "
            "ones. Unfreeze some (p.requires_grad_(True)) before calling suggest"
        )


class CheckedLoss:
    """``loss_fn`` with its result checked: a scalar tensor per call, nothing else."""

    def __init__(self, loss_fn: Callable[..., Any]) -> None:
        self.loss_fn = loss_fn

    def __call__(self, outputs: Any, targets: Any) -> Tensor:
        try:
            loss = self.loss_fn(outputs, targets)
        except RuntimeError as e:  # torch.func.vmap refuses .item() / float() inside loss_fn
            if "vmap" in str(e) and ".item()" in str(e):
                raise InvalidLoss(
                    "Invalid loss_fn: it calls .item() or float() on a tensor; return the loss "
                    "tensor itself, e.g. F.cross_entropy(outputs, targets)"
                ) from e
            raise
        if not isinstance(loss, Tensor):
            raise InvalidLoss(
                f"Invalid loss_fn: it returned a {type(loss).__name__}, not a tensor; return the "
                "loss tensor itself (no .item() or float()), e.g. F.cross_entropy(outputs, targets)"
            )
        if loss.dim() != 0:
            raise InvalidLoss(
                f"Invalid loss_fn: it returned a tensor of shape {tuple(loss.shape)}; loss_fn must "
                "return a scalar per call, the mean over the samples it is given (e.g. "
                "reduction='mean', the default of F.cross_entropy)"
            )
        return loss
