"""Per-layer rules of the hooks backend, one module per layer family.

:mod:`.base` holds the :class:`Rule` base class, the records a rule reads and returns, and the
registry (:func:`register`, :func:`register_named`, :func:`find_rule`); importing this package
imports every family module, which registers its rules.
"""

from local_opt.backends.hooks.rules import (  # noqa: F401
    activation,
    attention,
    conv,
    conv_nd,
    diagonal,
    embedding,
    hf,
    linear,
    norm,
    recurrent,
    std_conv,
)
from local_opt.backends.hooks.rules.base import (
    Call,
    LayerStats,
    Memory,
    Rule,
    Site,
    find_rule,
    input_of,
    register,
    register_named,
)

__all__ = [
    "Call",
    "LayerStats",
    "Memory",
    "Rule",
    "Site",
    "find_rule",
    "input_of",
    "register",
    "register_named",
]
