r"""Backends: how one rank turns its batch into :class:`~local_opt._stats.GradStats`.

A backend is a function ``(model, loss_fn, inputs, targets, **options) -> GradStats`` for this
rank's batch. :class:`~local_opt.VarianceTest` passes the options ``chunk_size`` (int or None),
``micro_batches`` (int) and ``inner_products`` (bool, False when the test does not need
``inner_sq_sum``, which may then return NaN); a backend takes them as keywords and ignores the
ones it does not use. Every backend reduces its per-unit statistics with the one reducer,
:func:`local_opt._stats.reduce_units`.

=================  ===========================================================================
``"hooks"``        exact; per-layer closed forms from forward/backward hooks
                   (:mod:`local_opt.backends.hooks`: planning, capture, per-layer-family rules)
``"vmap"``         exact; ``torch.func`` per-sample gradients (:mod:`local_opt.backends.vmap`)
``"microbatch"``   unbiased estimate from micro-batch gradients
                   (:mod:`local_opt.backends.microbatch`; the recorder for gradient
                   accumulation is :mod:`local_opt.backends.recorder`)
=================  ===========================================================================

:func:`resolve` maps ``"auto"`` to a backend for a model: the first exact backend of
:data:`AUTO_PREFERENCE` whose predicate accepts the model (the hooks backend when its rules cover
every trainable parameter). Otherwise it weighs the exact ``"vmap"`` against the
``"microbatch"`` estimate by an estimated cost (in forward+backward passes of the batch) and
memory (:func:`fallback_choice`):

* ``"vmap"`` costs about :data:`VMAP_COST` forward+backward passes and holds
  ``chunk_size × P`` per-sample gradient entries (``P`` trainable parameters); with a
  BatchNorm that normalizes with batch statistics (training mode) every per-sample gradient is
  a backward pass through the whole batch, so the cost grows to about ``b`` passes (``O(b²)``).
* ``"microbatch"`` costs about one forward+backward and ``micro_batches × P`` entries, but is
  an estimate (``K - 1`` degrees of freedom instead of ``N - 1``).

``"vmap"`` is chosen when its cost is at most :data:`MAX_EXACT_COST` passes and its memory at
most :data:`MEMORY_BUDGET` bytes, else ``"microbatch"``. One ``RuntimeWarning`` per model and
choice names the layer the hooks backend lacks, the choice and why (and says so when the choice
is the ``O(b²)`` BatchNorm path). Any exception inside the hooks pass under ``"auto"`` is a
fallback too, with a warning naming the layer (:func:`compute`). :func:`register` adds a backend; :func:`compute` runs one the
way :class:`~local_opt.VarianceTest` does (:mod:`local_opt.backends.stack`: wrapped, compiled,
checkpointed models, ``no_grad``, autocast).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from local_opt._checks import InvalidLoss
from local_opt._stats import GradStats
from local_opt.backends import stack
from local_opt.backends.hooks import hooks_stats, supports, unsupported_layers
from local_opt.backends.hooks.check import UNCOVERED
from local_opt.backends.hooks.failure import HooksBackendError, contained, describe, failing_layer
from local_opt.backends.microbatch import microbatch_stats
from local_opt.backends.vmap import uses_batch_statistics, vmap_stats

__all__ = [
    "REGISTRY",
    "AUTO_PREFERENCE",
    "Backend",
    "register",
    "resolve",
    "get",
    "compute",
    "fallback_choice",
    "HooksBackendError",
]

Backend = Callable[..., GradStats]

#: Backends by name.
REGISTRY: dict[str, Backend] = {
    "hooks": hooks_stats,
    "vmap": vmap_stats,
    "microbatch": microbatch_stats,
}

#: Exact backends that ``"auto"`` prefers over the fallback choice, fastest first, each with a
#: predicate ``model -> bool`` telling whether it supports the model as it is now.
AUTO_PREFERENCE: list[tuple[str, Callable[[nn.Module], bool]]] = [("hooks", supports)]

#: Estimated cost of the ``"vmap"`` backend on independent samples, in forward+backward passes
#: of the batch (2.3–6.8 measured on CPU at b=16 for the models of issue 12).
VMAP_COST = 4.0
#: ``"auto"`` takes the exact ``"vmap"`` fallback up to this many forward+backward passes ...
MAX_EXACT_COST = 8.0
#: ... and up to this many bytes of per-sample gradients held at once.
MEMORY_BUDGET = 2**30

#: Models the hooks backend failed on (an exception inside its pass), with the layer and why:
#: ``"auto"`` no longer tries the hooks backend for them.
FAILED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
#: Out-of-memory errors are re-raised as they are (torch.OutOfMemoryError is torch >= 2.5).
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

#: Choices already warned about, per model (one warning per model and choice).
_WARNED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def register(
    name: str, backend: Backend, *, supports: Callable[[nn.Module], bool] | None = None
) -> None:
    """Register ``backend`` under ``name``; with ``supports``, ``"auto"`` prefers it (first) for
    the models the predicate accepts."""
    if name == "auto":
        raise ValueError("Invalid name: 'auto' is reserved")
    REGISTRY[name] = backend
    if supports is not None:
        AUTO_PREFERENCE.insert(0, (name, supports))


def get(name: str) -> Backend:
    """The backend registered as ``name`` (ValueError naming the choices otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        names = ", ".join(["auto", *REGISTRY])
        raise ValueError(f"Invalid backend: {name!r} (expected one of {names})") from None


def fallback_choice(
    model: nn.Module, batch_size: int, chunk_size: int | None = 32, micro_batches: int = 4
) -> tuple[str, str]:
    """``(backend, reason)``: ``"vmap"`` or ``"microbatch"`` for a model the hooks backend does
    not cover, by the estimates of the module docstring."""
    params = [p for p in model.parameters() if p.requires_grad]
    entries = sum(p.numel() for p in params)
    item = max((p.element_size() for p in params), default=4)
    chunk = min(batch_size, chunk_size or batch_size)
    coupled = uses_batch_statistics(model)
    cost = float(batch_size) if coupled else VMAP_COST
    memory = chunk * entries * item
    why = (
        f"~{cost:.0f}x a forward+backward"
        + (" (BatchNorm with batch statistics couples the samples: O(b^2))" if coupled else "")
        + f", {memory / 2**20:.0f} MiB of per-sample gradients"
    )
    if cost <= MAX_EXACT_COST and memory <= MEMORY_BUDGET:
        return "vmap", f"exact; {why}"
    return "microbatch", (
        f"an unbiased estimate from {micro_batches} micro-batches, about one forward+backward; "
        f"the exact 'vmap' would cost {why}"
    )


def resolve(
    name: str,
    model: nn.Module,
    batch_size: int = 32,
    *,
    chunk_size: int | None = 32,
    micro_batches: int = 4,
) -> str:
    """The backend ``name`` means for ``model`` (unwrapped, see :func:`stack.unwrap`): itself,
    or for ``"auto"`` the first exact backend of :data:`AUTO_PREFERENCE` that supports the model,
    else :func:`fallback_choice` for a batch of ``batch_size`` samples.

    The fallback warns once per model and choice, naming the layer the hooks backend lacks, the
    choice and why.
    """
    if name != "auto":
        get(name)
        return name
    model = stack.unwrap(model)
    for preferred, check in AUTO_PREFERENCE:
        if not (preferred == "hooks" and model in FAILED) and check(model):
            return preferred
    choice, why = fallback_choice(model, batch_size, chunk_size, micro_batches)
    warned = _WARNED.setdefault(model, set())
    if choice not in warned:
        warned.add(choice)
        missing = [FAILED[model]] if model in FAILED else unsupported_layers(model)
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        what = f"does not cover {missing[0]}{more}" if missing else "does not cover this model"
        warnings.warn(
            f"VarianceTest(backend='auto'): the hooks backend {what}; using {choice!r} ({why})",
            RuntimeWarning,
            stacklevel=4,
        )
    return choice


def compute(
    name: str,
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Any,
    targets: Any,
    **options: Any,
) -> tuple[str, GradStats]:
    """``(backend, stats)``: resolve ``name`` for ``model`` and this batch, and run the backend on
    the unwrapped model as :func:`stack.compute` does. When the hooks backend finds a gradient
    it did not see, it hands the model to ``"vmap"`` and that is the name returned.

    Any other exception inside the hooks backend's pass (a forward it cannot follow, a rule that
    fails; out-of-memory errors excepted) is, for ``name="auto"``, a fallback: one
    ``RuntimeWarning`` naming the layer and the exception, then :func:`fallback_choice`'s
    backend for this and every later call on the model. For ``name="hooks"`` it raises
    :class:`~local_opt.backends.hooks.failure.HooksBackendError` naming the layer.
    """
    inner = stack.unwrap(model)
    first = inputs if isinstance(inputs, Tensor) else next(iter(inputs))
    batch = int(first.shape[0])
    chunk, micro = options.get("chunk_size", 32), options.get("micro_batches", 4)
    backend = resolve(name, inner, batch, chunk_size=chunk, micro_batches=micro)
    was_uncovered = inner in UNCOVERED
    try:
        with contained():
            stats = stack.compute(get(backend), inner, loss_fn, inputs, targets, **options)
    except (_OOM, InvalidLoss):  # out of memory; the caller's loss_fn: no backend would do
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the hooks pass is a fallback
        if backend != "hooks":
            raise
        layer = failing_layer(inner, e)
        if name != "auto":
            raise HooksBackendError(layer, e) from e
        FAILED[inner] = f"{layer} (the hooks pass failed there: {describe(e)})"
        backend, why = fallback_choice(inner, batch, chunk, micro)
        _WARNED.setdefault(inner, set()).add(backend)
        warnings.warn(
            f"VarianceTest(backend='auto'): the hooks backend failed on layer {layer!r} "
            f"({describe(e)}); using {backend!r} for this model ({why})",
            RuntimeWarning,
            stacklevel=3,
        )
        stats = stack.compute(get(backend), inner, loss_fn, inputs, targets, **options)
        return backend, stats
    if backend == "hooks" and inner in UNCOVERED:
        if not was_uncovered:  # hooks_stats warned and used vmap; no second warning for it
            _WARNED.setdefault(inner, set()).add("vmap")
        backend = "vmap"
    return backend, stats
