r"""Coalesced collectives over a process group: the only place local_opt talks to torch.distributed.

Each function here is pure in the sense of torch's
``torch.distributed.algorithms.model_averaging.utils.average_parameters``: it takes tensors and a
process group, runs a few collectives on flat contiguous buffers (one per ``(device, dtype)``),
and writes the result back into the tensors in place with ``copy_``. Nothing is kept between calls.
"""

from __future__ import annotations

import time
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


def _dense_strides(t: Tensor) -> bool:
    """Whether ``t``'s elements fill ``t.numel()`` consecutive slots of memory in some order of
    its dims (contiguous, ``channels_last``, a transpose, ...): a flat buffer can then hold it
    with its strides."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def any_across(
    flags: Sequence[bool],
    process_group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
) -> list[bool]:
    """Element-wise OR of boolean flags over the group (one small all-reduce with MAX)."""
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    if is_distributed(process_group) and t.numel():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=process_group)
    return [bool(v) for v in t.tolist()]


@torch.no_grad()
def _unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    views = []
    for t in tensors:
        n = t.numel()
        views.append(flat[offset : offset + n].view_as(t))
        offset += n
    torch._foreach_copy_([t.detach() for t in tensors], views)


def reduce_mean_packed(
    tensors: Sequence[Tensor], process_group: dist.ProcessGroup | None = None
) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Pack tensors into flat buffers per ``(device, dtype)`` and average them; nothing written back.

    Returns the reduced buffers and the tensor groups they belong to, for :func:`unpack_into`.
    """
    groups = _buckets(tensors)
    flats = [_flatten(g) for g in groups]
    mean_(flats, process_group)
    return flats, groups


#: Test hook (0: off): seconds a round's averaging takes at least, counted from when it starts,
#: to emulate a network's latency on one machine (docs/network.md). ``mean_`` and the means of
#: ``local_opt._compress`` sleep in their wait until that much time has passed since their start;
#: an overlapped round hides it behind the local steps like a real latency.
SIMULATED_LATENCY_S = 0.0


def simulated_wait(t0: float) -> None:
    """Sleep until ``SIMULATED_LATENCY_S`` seconds after ``t0`` (``time.perf_counter``)."""
    if SIMULATED_LATENCY_S > 0:
        left = t0 + SIMULATED_LATENCY_S - time.perf_counter()
        if left > 0:
            time.sleep(left)


def mean_(flats: Sequence[Tensor], process_group: dist.ProcessGroup | None = None) -> int:
    r"""Average contiguous buffers over the group in place: divide by the world size, then SUM.

    The same order of operations as torch's ``average_parameters``, so the result is bit-for-bit
    the same as torch's. Returns the payload bytes this rank sent.
    """
    ws = dist.get_world_size(process_group)
    t0 = time.perf_counter()
    for flat in flats:
        flat /= ws
    for flat in flats:
        dist.all_reduce(flat, group=process_group)
    if flats:
        simulated_wait(t0)
    return sum(f.numel() * f.element_size() for f in flats)


def all_finite(flats: Sequence[Tensor]) -> bool:
    """Whether no buffer holds a NaN or an Inf.

    ``aminmax`` is one reduction that propagates NaN, and an Inf shows in the min or the max; it
    is several times faster than materializing ``isfinite(f)`` for a large buffer.
    """
    for f in flats:
        if f.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(f))).all()):
            return False
    return True


def finite_flag(flats: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor: no buffer holds a NaN or an Inf (no host sync, unlike all_finite)."""
    flags = [torch.isfinite(torch.stack(torch.aminmax(f))).all() for f in flats if f.numel()]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def nonfinite_ranks(
    local_finite: bool, process_group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"
) -> list[int]:
    """The ranks (in the group) whose ``local_finite`` is False: one all-reduce of world-size flags."""
    flags = [False] * world_size(process_group)
    flags[rank(process_group)] = not local_finite
    return [r for r, bad in enumerate(any_across(flags, process_group, device)) if bad]


@torch.no_grad()
def unpack_into(flats: Sequence[Tensor], groups: Sequence[Sequence[Tensor]]) -> None:
    for flat, group in zip(flats, groups):
        _unflatten_into(flat, group)


class FlatParams:
    r"""Parameters re-homed as views of one contiguous buffer per ``(device, dtype)``.

    torch's ``average_parameters`` packs the parameters into a new flat buffer at every call
    (``torch.cat``) and leaves them as views of it. Keeping that layout between rounds lets a round
    all-reduce the buffers in place with no packing and no copy back. If anything moved a
    parameter's storage since (``module.to(...)``, ``p.data = ...``), :meth:`buffers` packs again.

    Each parameter keeps its strides, so its memory format (``channels_last``): the flat buffer
    holds its elements in memory order. (torch's ``average_parameters`` makes them contiguous.)
    A parameter whose elements are not dense in memory (a strided slice) becomes contiguous.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self._flats: list[Tensor] = []
        # (param, flat, element offset, strides)
        self._layout: list[tuple[Tensor, Tensor, int, tuple[int, ...]]] = []

    def _valid(self) -> bool:
        if not self._flats:
            return False
        for p, flat, offset, stride in self._layout:
            if (
                p.device != flat.device
                or p.dtype != flat.dtype
                or p.stride() != stride
                or p.data_ptr() != flat.data_ptr() + offset * flat.element_size()
            ):
                return False
        return True

    @torch.no_grad()
    def _pack(self) -> None:
        self._flats, self._layout = [], []
        for group in _buckets(self.params):
            flat = torch.empty(
                sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device
            )
            offset = 0
            for p in group:
                if _dense_strides(p):  # the same strides: channels_last stays channels_last
                    view = flat.as_strided(p.shape, p.stride(), offset)
                else:
                    view = flat[offset : offset + p.numel()].view(p.shape)
                view.copy_(p.detach())
                p.data = view
                self._layout.append((p, flat, offset, tuple(view.stride())))
                offset += p.numel()
            self._flats.append(flat)

    def buffers(self) -> list[Tensor]:
        """The flat buffers the parameters live in (packing them first when needed)."""
        if not self._valid():
            self._pack()
        return self._flats

    def views_of(self, others: Sequence[Tensor]) -> list[Tensor]:
        """Per-parameter views of tensors shaped like :meth:`buffers` (one per buffer), with
        each parameter's shape, strides and offset: e.g. a flat mean as per-parameter grads."""
        flats = self.buffers()
        index = {id(f): i for i, f in enumerate(flats)}
        out = []
        for p, flat, offset, stride in self._layout:
            o = others[index[id(flat)]]
            out.append(o.as_strided(p.shape, stride, o.storage_offset() + offset))
        return out


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


def all_reduce_sum(
    tensors: Sequence[Tensor], process_group: dist.ProcessGroup | None = None, scale: float = 1.0
) -> list[Tensor]:
    """Sums of ``scale`` times the tensors over the group, as views of one flat buffer per
    ``(device, dtype)`` (``scale`` may differ between ranks).

    The inputs are not modified. Without torch.distributed (or with one rank) the inputs are
    returned as they are, not scaled.
    """
    if not is_distributed(process_group):
        return list(tensors)
    index = {id(t): i for i, t in enumerate(tensors)}
    out: list[Tensor] = list(tensors)
    for group in _buckets(tensors):
        flat = _flatten(group)
        if scale != 1.0:
            flat.mul_(scale)
        dist.all_reduce(flat, group=process_group)
        offset = 0
        for t in group:
            out[index[id(t)]] = flat[offset : offset + t.numel()].view_as(t)
            offset += t.numel()
    return out


def all_reduce_sum_(flat: Tensor, process_group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum one tensor over the group in place (no-op without torch.distributed); returns it."""
    if is_distributed(process_group):
        dist.all_reduce(flat, group=process_group)
    return flat


def all_reduce_sum_packed(
    tensors: Sequence[Tensor],
    scalars: Tensor,
    process_group: dist.ProcessGroup | None = None,
    scale: float = 1.0,
) -> tuple[list[Tensor], Tensor]:
    """:func:`all_reduce_sum` of ``scale`` times the tensors, with the float64 vector ``scalars``
    summed in the same collective: one all-reduce per ``(device, dtype)`` of the tensors.

    The scalars ride in the float64 buffer when there is one, else in the float32 buffer (summed
    in float32, which is the precision of those tensors' own sum), else (only half-precision
    tensors) in a buffer of their own. Returns the summed tensors (views of the flat buffers) and
    the summed scalars (float64). Without torch.distributed (or with one rank) nothing is copied
    or communicated.
    """
    if not is_distributed(process_group):
        return list(tensors), scalars
    index = {id(t): i for i, t in enumerate(tensors)}
    out: list[Tensor] = list(tensors)
    groups = _buckets(tensors)
    dtypes = [g[0].dtype for g in groups]
    host = next((i for i, d in enumerate(dtypes) if d == torch.float64), None)
    if host is None:
        host = next((i for i, d in enumerate(dtypes) if d == torch.float32), None)
    summed = scalars
    for i, group in enumerate(groups):
        parts = [t.detach().reshape(-1) for t in group]
        if i == host:
            parts.append(scalars.to(group[0].device, group[0].dtype))
        flat = torch.cat(parts)
        if scale != 1.0:
            flat[: flat.numel() - (scalars.numel() if i == host else 0)].mul_(scale)
        dist.all_reduce(flat, group=process_group)
        offset = 0
        for t in group:
            out[index[id(t)]] = flat[offset : offset + t.numel()].view_as(t)
            offset += t.numel()
        if i == host:
            summed = flat[offset:].double()
    if host is None:
        summed = scalars.clone()
        dist.all_reduce(summed, group=process_group)
    return out, summed
