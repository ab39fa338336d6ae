r"""Failures of the hooks backend: which layer failed, and leaving no hook state behind.

The hooks backend runs third-party forwards under forward hooks and
:class:`~torch.overrides.TorchFunctionMode`\ s (loose parameters, ``nn.MultiheadAttention``,
LSTM/GRU). A model can do something no rule foresaw and raise from inside that machinery. The
backends' registry (:func:`local_opt.backends.compute`) then never lets the exception reach the
training loop when the user asked for ``backend="auto"``: it falls back to an exact or estimated
backend with a warning naming the layer and the exception. With ``backend="hooks"`` requested
explicitly it raises :class:`HooksBackendError`, which names the layer.

:func:`failing_layer` names the layer: the innermost frame of the traceback that runs a rule on
a covered site (its ``site.name``) or the forward of one of the model's modules (its qualified
name). :func:`contained` exits any torch-function mode a failed forward left entered (a forward
pre-hook entered it; the post-hook that exits it never ran).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType

from torch import nn
from torch.overrides import _get_current_function_mode_stack

from local_opt.backends.hooks.check import UnaccountedGradient

__all__ = ["HooksBackendError"]


class HooksBackendError(RuntimeError):
    """The hooks backend failed on a layer of the model.

    Attributes:
        layer (str): the layer's qualified name (``"<model>"`` when no layer could be named).
        error (BaseException): the exception raised inside the hooks backend.
    """

    def __init__(self, layer: str, error: BaseException) -> None:
        self.layer, self.error = layer, error
        super().__init__(
            f"The hooks backend failed on layer {layer!r}: {describe(error)}; use "
            "backend='vmap' or 'microbatch' for this model (backend='auto' falls back by itself)"
        )


def describe(error: BaseException) -> str:
    """``"TypeName: first line of the message"`` (at most 300 characters)."""
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 300 else line[:297] + "..."
    return f"{type(error).__name__}: {line}"


def failing_layer(model: nn.Module, error: BaseException) -> str:
    """The qualified name of the layer of ``model`` where ``error`` was raised (see the module
    docstring), or ``"<model>"``."""
    if isinstance(error, UnaccountedGradient) and error.names:
        return ", ".join(error.names)
    names = {id(m): (n or "<model>") for n, m in model.named_modules()}
    found = "<model>"
    seen: set[int] = set()
    err: BaseException | None = error
    while err is not None and id(err) not in seen:  # the chain too (raise ... from e)
        seen.add(id(err))
        tb: TracebackType | None = err.__traceback__
        while tb is not None:  # outermost to innermost: keep the last match
            local = tb.tb_frame.f_locals
            site = local.get("site")
            name = getattr(site, "name", None)
            if isinstance(name, str) and getattr(site, "rule", None) is not None:
                found = name
            else:
                for key in ("self", "module", "mod"):
                    m = local.get(key)
                    if isinstance(m, nn.Module) and id(m) in names and names[id(m)] != "<model>":
                        found = names[id(m)]
                        break
            tb = tb.tb_next
        if found != "<model>":
            return found
        err = err.__cause__ or err.__context__
    return found


@contextlib.contextmanager
def contained() -> Iterator[None]:
    """Exit the torch-function modes entered inside the block and left entered by an exception."""
    depth = len(_get_current_function_mode_stack())
    try:
        yield
    except BaseException:
        while len(_get_current_function_mode_stack()) > depth:
            _get_current_function_mode_stack()[-1].__exit__(None, None, None)
        raise
