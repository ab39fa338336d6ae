r"""Coalesced collectives over a process group: the only place local_opt talks to torch.distributed.

Each function here is pure in the sense of torch's
``torch.distributed.algorithms.model_averaging.utils.average_parameters``: it takes tensors and a
process group, runs a few collectives on flat contiguous buffers (one per ``(device, dtype)``),
and writes the result back into the tensors in place with ``copy_``. Nothing is kept between calls.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__: list[str] = []  # private module


def is_distributed(process_group: dist.ProcessGroup | None = None) -> bool:
    """True when torch.distributed is initialized and the group has more than one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if process_group is not None and dist._rank_not_in_group(process_group):
        return False
    return dist.get_world_size(process_group) > 1


def world_size(process_group: dist.ProcessGroup | None = None) -> int:
    """Size of the group, 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def rank(process_group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in the group, 0 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(process_group)


def _buckets(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    """Group tensors by (device, dtype), keeping their order within each group."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return list(groups.values())


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@torch.no_grad()
def _unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    views = []
    for t in tensors:
        n = t.numel()
        views.append(flat[offset : offset + n].view_as(t))
        offset += n
    torch._foreach_copy_([t.detach() for t in tensors], views)


def all_reduce_mean(
    tensors: Sequence[Tensor],
    process_group: dist.ProcessGroup | None = None,
    *,
    check_finite: bool = False,
) -> tuple[int, bool]:
    r"""Replace every tensor by its mean over the process group, in place.

    The tensors are packed into one flat buffer per ``(device, dtype)``, divided by the world size
    and summed with one ``all_reduce`` per buffer — the same order of operations as torch's
    ``average_parameters`` (divide, then SUM), so the result is bit-for-bit the same as torch's.

    Args:
        tensors: floating-point tensors (parameters, buffers, optimizer state).
        process_group: the group to average over (default: the world group).
        check_finite: when True, the reduced buffers are checked for NaN/Inf *before* anything is
            written back. Every rank sees the same reduced values, so every rank takes the same
            decision and nobody deadlocks.

    Returns:
        ``(bytes, finite)``: the payload each rank sent (sum of buffer sizes in bytes), and whether
        the averages were finite. When ``check_finite`` and an average is not finite, nothing is
        written back.
    """
    if not tensors:
        return 0, True
    ws = dist.get_world_size(process_group)
    flats: list[Tensor] = []
    groups = _buckets(tensors)
    for group in groups:
        flat = _flatten(group)
        flat /= ws
        flats.append(flat)
    for flat in flats:
        dist.all_reduce(flat, group=process_group)
    nbytes = sum(f.numel() * f.element_size() for f in flats)
    if check_finite and not all(bool(torch.isfinite(f).all()) for f in flats):
        return nbytes, False
    for flat, group in zip(flats, groups):
        _unflatten_into(flat, group)
    return nbytes, True


def broadcast(
    tensors: Sequence[Tensor], src: int = 0, process_group: dist.ProcessGroup | None = None
) -> int:
    """Overwrite every tensor with its value on group rank ``src`` (in place). Returns bytes sent."""
    if not tensors:
        return 0
    global_src = src if process_group is None else dist.get_global_rank(process_group, src)
    nbytes = 0
    for group in _buckets(tensors):
        flat = _flatten(group)
        dist.broadcast(flat, src=global_src, group=process_group)
        nbytes += flat.numel() * flat.element_size()
        _unflatten_into(flat, group)
    return nbytes


def all_reduce_sum_(flat: Tensor, process_group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum one tensor over the group in place (no-op without torch.distributed); returns it."""
    if is_distributed(process_group):
        dist.all_reduce(flat, group=process_group)
    return flat
