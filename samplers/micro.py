r"""Split a collated batch into micro-batches, for gradient accumulation over large batches."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import Tensor

__all__ = ["micro_batches"]

_Batch = TypeVar("_Batch")


def _leaf_sizes(obj: Any, sizes: list[int]) -> None:
    """Append the dim-0 size of every tensor in a nested tuple / list / dict."""
    if isinstance(obj, Tensor):
        if obj.dim() == 0:
            raise ValueError("Invalid batch: holds a 0-dim tensor, which has no batch dimension")
        sizes.append(obj.shape[0])
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _leaf_sizes(value, sizes)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            _leaf_sizes(value, sizes)
    else:
        raise TypeError(
            f"Invalid batch: element of type {type(obj).__name__}; expected tensors in "
            "nested tuples, lists and dicts"
        )


def _slice(obj: Any, start: int, stop: int) -> Any:
    """The rows ``start:stop`` of every tensor of ``obj``, in a container of the same type."""
    if isinstance(obj, Tensor):
        return obj[start:stop]
    if isinstance(obj, Mapping):
        items = [(key, _slice(value, start, stop)) for key, value in obj.items()]
        try:
            return type(obj)(items)
        except TypeError:  # a Mapping type that cannot be built from pairs
            return dict(items)
    values = [_slice(value, start, stop) for value in obj]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*values)
    return type(obj)(values) if isinstance(obj, tuple) else values


def micro_batches(batch: _Batch, micro_batch_size: int) -> list[_Batch]:
    r"""Split a collated batch along dim 0 into consecutive micro-batches of at most
    ``micro_batch_size`` samples.

    ``batch`` is a tensor, or tensors nested in tuples (namedtuples included), lists and dicts, as
    :func:`~torch.utils.data.default_collate` makes them; every tensor must have the same size
    :math:`n` along dim 0. Each micro-batch has the same structure and holds views
    (``tensor[start:stop]``, no copy) of rows :math:`[jm, \min((j+1)m, n))`, so there are
    :math:`\lceil n / m \rceil` of them and only the last can be shorter. An empty batch
    (:math:`n = 0`) gives no micro-batch.

    For gradient accumulation, weight the mean loss of micro-batch :math:`j` (with :math:`n_j`
    samples) by :math:`n_j / n`; the accumulated gradient is then the gradient of the full batch's
    mean loss, up to floating-point rounding:

    .. math::
        \nabla \frac{1}{n} \sum_{i=1}^{n} \ell_i
        = \sum_j \frac{n_j}{n} \, \nabla \Big( \frac{1}{n_j} \sum_{i \in B_j} \ell_i \Big).

    To record the micro-batch statistics of such a step, pass the sizes along:
    ``VarianceTest.record_micro_batches([len(xs) for xs, _ in chunks])`` weights the shorter last
    micro-batch by its size (an int ``micro_batch_size`` would be refused when the sizes differ).

    Layers that mix samples within a batch (batch norm in training mode) see smaller batches, so
    their outputs, and the gradient, differ from the full-batch ones.

    Args:
        batch (Tensor | tuple | list | dict): the collated batch.
        micro_batch_size (int): the largest number of samples in a micro-batch, e.g. the largest
            batch that fits in device memory.

    Returns:
        list: the micro-batches, in order; their concatenation along dim 0 is ``batch``.

    Raises:
        ValueError: if ``micro_batch_size`` is not a positive integer (``bool`` is not), if the
            tensors of ``batch`` differ in size along dim 0, if one is 0-dim, or if ``batch``
            holds no tensor.
        TypeError: if ``batch`` holds something other than tensors, tuples, lists and dicts.

    Example::

        >>> for x, y in loader:  # batches of sampler.batch_size samples, maybe too many for memory
        ...     optimizer.zero_grad()
        ...     for xb, yb in micro_batches((x, y), 256):
        ...         loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
        ...         (loss * (len(yb) / len(y))).backward()
        ...     optimizer.step()
    """
    if (
        not isinstance(micro_batch_size, numbers.Integral)
        or isinstance(micro_batch_size, bool)
        or micro_batch_size < 1
    ):
        raise ValueError(f"Invalid micro_batch_size: {micro_batch_size!r}")
    sizes: list[int] = []
    _leaf_sizes(batch, sizes)
    if not sizes:
        raise ValueError("Invalid batch: holds no tensor")
    if any(size != sizes[0] for size in sizes):
        raise ValueError(f"Invalid batch: tensors differ in size along dim 0: {sizes}")
    n, m = sizes[0], int(micro_batch_size)
    return [_slice(batch, start, min(start + m, n)) for start in range(0, n, m)]
