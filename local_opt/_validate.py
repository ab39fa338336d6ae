"""Argument checks shared by the public classes of local_opt."""

from __future__ import annotations

import numbers
from typing import Any


def is_int(value: Any) -> bool:
    """True for Python and NumPy integers, False for ``bool`` and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
