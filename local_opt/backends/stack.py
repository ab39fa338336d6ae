r"""The statistics pass inside real training stacks: wrapped, compiled and checkpointed models,
``no_grad``/``inference_mode`` callers, autocast.

:func:`compute` is how :class:`~local_opt.VarianceTest` calls a backend:

* **Wrappers.** The statistics come from the inner module: ``DistributedDataParallel`` /
  ``DataParallel`` are replaced by their ``.module`` (no gradient all-reduce of DDP runs during
  the pass; the ranks pool their statistics themselves), a ``torch.compile``'d
  ``OptimizedModule`` by its ``_orig_mod``, and a module compiled in place
  (``model.compile()``) runs its eager ``forward`` for the pass (its compiled callable is set
  aside and put back). The pass never calls the compiled code, so it neither recompiles nor
  changes the user's compiled graph (the forward hooks of the hooks backend are removed before
  the compiled model runs again).
* **Grad mode.** The pass runs with gradients enabled even when :meth:`suggest` is called under
  ``torch.no_grad()`` or ``torch.inference_mode()``; inputs created in inference mode are cloned
  into ordinary tensors (autograd cannot save inference tensors).
* **Activation checkpointing** (:func:`torch.utils.checkpoint.checkpoint`, timm's
  ``set_grad_checkpointing``). The hooks backend keeps non-reentrant checkpoints (the forward
  hooks ignore the recomputation during the backward, so memory stays as the user chose);
  reentrant checkpoints, which hide the parameters from ``torch.autograd.grad``, run as plain
  calls during the pass (:func:`plain_checkpoints`). ``torch.func`` (the ``"vmap"`` backend)
  supports neither kind, so there both run as plain calls: the pass then keeps all activations.
* **Autocast.** The hooks and micro-batch backends run under the caller's autocast and
  accumulate their statistics in float32 (the rules cast inputs and output gradients to the
  parameter's dtype); measured against float32 on the small models of
  ``tests/test_real_stacks.py``, bf16 moves the statistics by about 0.1–0.5 % (the test allows
  2 %). The ``"vmap"`` backend runs with autocast disabled (``torch.func`` fails on mixed-dtype
  backward passes), so its statistics are the float32 ones.
* ``channels_last`` inputs and models need nothing special.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint as _ckpt
from torch import Tensor, nn

__all__: list[str] = []  # private module


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameters the statistics are about: through DDP / DataParallel
    (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, any number deep."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch._dynamo.eval_frame.OptimizedModule
        else:
            return model


class _PlainCheckpointFunction:
    """Stands in for ``torch.utils.checkpoint.CheckpointFunction``: call without checkpointing."""

    @staticmethod
    def apply(function: Callable[..., Any], preserve: bool, *args: Any) -> Any:
        return function(*args)


def _plain_generator(*args: Any, **kwargs: Any) -> Iterator[None]:
    """Stands in for the non-reentrant checkpoint's context generator: no saved-tensor hooks."""
    yield


@contextlib.contextmanager
def plain_checkpoints(reentrant: bool = True, non_reentrant: bool = True) -> Iterator[None]:
    """Within the block, :func:`torch.utils.checkpoint.checkpoint` calls its function plainly
    (reentrant and/or non-reentrant kind), whichever way the model imported it."""
    saved: list[tuple[str, Any]] = []
    if reentrant and hasattr(_ckpt, "CheckpointFunction"):
        saved.append(("CheckpointFunction", _ckpt.CheckpointFunction))
        _ckpt.CheckpointFunction = _PlainCheckpointFunction  # type: ignore[assignment,misc]
    name = "_checkpoint_without_reentrant_generator_impl"
    if non_reentrant and hasattr(_ckpt, name):
        saved.append((name, getattr(_ckpt, name)))
        setattr(_ckpt, name, _plain_generator)
    try:
        yield
    finally:
        for attr, value in saved:
            setattr(_ckpt, attr, value)


def in_backward() -> bool:
    """Whether autograd is running a backward pass now (e.g. a checkpoint's recomputation)."""
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def _eager(model: nn.Module) -> Iterator[None]:
    """Run a module compiled in place (``model.compile()``) eagerly within the block."""
    compiled = getattr(model, "_compiled_call_impl", None)
    if compiled is None:
        yield
        return
    model._compiled_call_impl = None
    try:
        yield
    finally:
        model._compiled_call_impl = compiled


def _grad_ready(x: Any) -> Any:
    """Inputs usable by autograd: inference tensors cloned, containers walked."""
    if isinstance(x, Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_grad_ready(t) for t in x)
    return x


def compute(
    backend: Callable[..., Any],
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Any,
    targets: Any,
    **options: Any,
) -> Any:
    """``backend(unwrap(model), loss_fn, inputs, targets, **options)`` with gradients enabled,
    out of inference mode, and the inner module's in-place compiled call set aside."""
    inner = unwrap(model)
    with torch.inference_mode(False), torch.enable_grad(), _eager(inner):
        return backend(inner, loss_fn, _grad_ready(inputs), _grad_ready(targets), **options)
