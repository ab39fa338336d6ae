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
:data:`AUTO_PREFERENCE` whose predicate accepts the model, else ``"vmap"`` with one warning per
model naming the layer the preferred backend lacks. :func:`register` adds a backend.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

from torch import nn

from local_opt._stats import GradStats
from local_opt.backends.hooks import hooks_stats, supports, unsupported_layers
from local_opt.backends.microbatch import microbatch_stats
from local_opt.backends.vmap import vmap_stats

__all__ = ["REGISTRY", "AUTO_PREFERENCE", "Backend", "register", "resolve", "get"]

Backend = Callable[..., GradStats]

#: Backends by name.
REGISTRY: dict[str, Backend] = {
    "hooks": hooks_stats,
    "vmap": vmap_stats,
    "microbatch": microbatch_stats,
}

#: Exact backends that ``"auto"`` prefers over ``"vmap"``, fastest first, each with a predicate
#: ``model -> bool`` telling whether it supports the model as it is now.
AUTO_PREFERENCE: list[tuple[str, Callable[[nn.Module], bool]]] = [("hooks", supports)]

#: Models already warned about falling back from the hooks backend (one warning per model).
_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


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


def resolve(name: str, model: nn.Module) -> str:
    """The backend ``name`` means for ``model``: itself, or for ``"auto"`` the first exact
    backend of :data:`AUTO_PREFERENCE` that supports the model, else ``"vmap"``.

    Falling back to ``"vmap"`` warns once per model, naming the layer the hooks backend lacks.
    """
    if name != "auto":
        get(name)
        return name
    for preferred, check in AUTO_PREFERENCE:
        if check(model):
            return preferred
    missing = unsupported_layers(model)
    if missing and model not in _WARNED:
        _WARNED.add(model)
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        warnings.warn(
            f"VarianceTest(backend='auto'): the hooks backend does not cover {missing[0]}{more}; "
            "using the exact but slower 'vmap' backend (pass backend='microbatch' for a cheap "
            "estimate)",
            RuntimeWarning,
            stacklevel=3,
        )
    return "vmap"
