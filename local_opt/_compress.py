r"""Compressed averaging of flat fp32 vectors: bf16 or int8 payloads, fp32 accumulation.

The pieces are pure functions on flat tensors, plus one small class that runs the two
collectives of a compressed mean (so that the first one can run in the background).

**Wire formats.** A vector of :math:`C` elements is sent as

* ``"bf16"``: its bfloat16 rounding (round to nearest even), :math:`2C` bytes;
* ``"int8"``: blocks of :math:`B` = ``INT8_BLOCK`` consecutive elements (the last block may be
  shorter) share one fp32 scale :math:`s = \max_i |x_i| / 127` (absmax; :math:`s = 1` for an
  all-zero block); element :math:`x_i` is sent as :math:`q_i = \mathrm{round}(x_i / s)\in
  [-127, 127]` (``torch.round``: half to even) and decoded as :math:`q_i s`:
  :math:`C + 4\lceil C/B\rceil` bytes.

Every payload is a ``uint8`` buffer (int8 values, then the scales' bytes), so the collectives
move bytes only and never reduce in a low precision.

**The compressed mean** (INTELLECT-1 style: reduce-scatter by ``all_to_all_single``, then
``all_gather``). With :math:`M` ranks and a vector of :math:`N` elements, pad to :math:`MC`,
:math:`C = \lceil N/M \rceil`, cut into :math:`M` chunks; rank :math:`m` owns chunk :math:`m`.

1. Every rank encodes its :math:`M` chunks and sends chunk :math:`j` to rank :math:`j`
   (``all_to_all_single``).
2. The owner decodes the :math:`M` payloads it received and averages them in fp32 (summed in
   rank order, then divided by :math:`M`), adds its *shard residual* :math:`r` (error feedback of
   the re-encoding below), encodes the result :math:`s` and keeps :math:`r \leftarrow s -
   D(E(s))`.
3. ``all_gather`` of the re-encoded shards; every rank decodes all of them, so every rank holds
   the same fp32 mean.

The sender's error feedback (the residual :math:`e_m` added before encoding, :math:`e_m
\leftarrow (x_m + e_m) - D(E(x_m + e_m))` after) is the caller's: :func:`encode_chunks` returns
the decoded values for it.

**Bytes.** A compressed mean counts :math:`M P` bytes, :math:`P` = the payload of one chunk
(:func:`payload_nbytes`): the size of the whole encoded vector, as an fp32 all-reduce of
:math:`N` elements counts :math:`4N` (the buffer it reduces). On the wire, per rank, both send
:math:`2\frac{M-1}{M}` times that: a ring all-reduce is a reduce-scatter plus an all-gather, and
here ``all_to_all_single`` sends :math:`(M-1)P` and ``all_gather`` sends the own shard, :math:`P`,
to :math:`M-1` ranks (or forwards :math:`M-1` shards of :math:`P` bytes in a ring). For int8 the
ratio to fp32 is :math:`4C / (C + 4\lceil C/B\rceil) \approx 3.94` at :math:`B = 256` (less for
vectors of a few hundred elements, where the padding to :math:`MC` and the scales weigh).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from local_opt._comm import simulated_wait

__all__: list[str] = []  # private module

FORMATS = ("bf16", "int8")
INT8_BLOCK = 256  # elements per fp32 scale


def check_format(fmt: object) -> str | None:
    """``None`` or a name of :data:`FORMATS`; raises ``ValueError`` otherwise."""
    if fmt is None or (isinstance(fmt, str) and fmt in FORMATS):
        return fmt  # type: ignore[return-value]
    raise ValueError(f"Invalid compression: {fmt!r} (expected None, 'bf16' or 'int8')")


def chunk_numel(n: int, world: int) -> int:
    """:math:`C = \\lceil N/M \\rceil`, the elements of each rank's chunk."""
    return max(1, -(-n // world))


def payload_nbytes(c: int, fmt: str) -> int:
    """Bytes of one encoded chunk of ``c`` elements."""
    if fmt == "bf16":
        return 2 * c
    return c + 4 * (-(-c // INT8_BLOCK))


def mean_nbytes(n: int, world: int, fmt: str) -> int:
    """Bytes a compressed mean of ``n`` elements over ``world`` ranks counts (:math:`MP`)."""
    return world * payload_nbytes(chunk_numel(n, world), fmt)


def encode_chunks(x: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    r"""Encode the rows of ``x`` (shape ``(k, C)``, float32).

    Returns ``(payload, decoded)``: ``payload`` of shape ``(k, P)``, ``uint8``; ``decoded`` the
    fp32 values the receivers will see, shape ``(k, C)``.
    """
    k, c = x.shape
    if fmt == "bf16":
        low = x.to(torch.bfloat16)
        return low.view(torch.uint8).reshape(k, 2 * c), low.float()
    nb = -(-c // INT8_BLOCK)
    padded = x.new_zeros(k, nb * INT8_BLOCK)
    padded[:, :c] = x
    blocks = padded.view(k, nb, INT8_BLOCK)
    scale = blocks.abs().amax(dim=2) / 127.0
    # an all-zero block gets scale 1; a NaN or Inf keeps its scale, so the receivers decode a
    # non-finite block and the round's finiteness check sees the divergence (never a silent 0)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(blocks / scale.unsqueeze(2)).clamp_(-127, 127)
    decoded = (q * scale.unsqueeze(2)).view(k, nb * INT8_BLOCK)[:, :c]
    q8 = q.to(torch.int8).view(k, nb * INT8_BLOCK)[:, :c]
    payload = torch.cat([q8.view(torch.uint8), scale.contiguous().view(torch.uint8)], dim=1)
    return payload, decoded.contiguous()


def decode_chunks(payload: Tensor, c: int, fmt: str) -> Tensor:
    """Inverse of :func:`encode_chunks`: ``(k, P)`` ``uint8`` to ``(k, C)`` float32."""
    k = payload.shape[0]
    if fmt == "bf16":
        return payload.contiguous().view(torch.bfloat16).float().reshape(k, c)
    nb = -(-c // INT8_BLOCK)
    q = payload.new_zeros(k, nb * INT8_BLOCK, dtype=torch.float32)
    q[:, :c] = payload[:, :c].view(torch.int8)
    scale = payload[:, c:].contiguous().view(torch.float32)  # (k, nb)
    out = q.view(k, nb, INT8_BLOCK).mul_(scale.unsqueeze(2)).view(k, nb * INT8_BLOCK)
    return out[:, :c]


def roundtrip(x: Tensor, fmt: str) -> Tensor:
    """What the receivers decode of ``x`` (1-D) sent as one chunk."""
    return encode_chunks(x.reshape(1, -1), fmt)[1].reshape(x.shape)


def _all_gather(out: Tensor, inp: Tensor, group: dist.ProcessGroup | None) -> None:
    """``all_gather`` into one tensor (``all_gather_single``; ``all_gather_into_tensor`` before
    torch 2.14 renamed it)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


class PlainMean:
    r"""An fp32 mean in flight, with the interface of :class:`CompressedMean`: :meth:`start`
    posts ``all_reduce`` of :math:`x / M` (divide, then sum, as ``LocalOptimizer``'s rounds),
    :meth:`wait` returns the mean. Counts :math:`4N` bytes (the buffer reduced)."""

    def __init__(self, x: Tensor, process_group: dist.ProcessGroup | None = None) -> None:
        self.group = process_group
        self._buf = x / dist.get_world_size(process_group)
        self.sent = x
        self.nbytes = self._buf.numel() * self._buf.element_size()
        self._work: dist.Work | None = None
        self._t0 = 0.0

    def start(self, async_op: bool = True) -> PlainMean:
        self._t0 = time.perf_counter()
        self._work = dist.all_reduce(self._buf, group=self.group, async_op=async_op)
        return self

    def wait(self) -> Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
            simulated_wait(self._t0)
        return self._buf


class Done:
    """A mean already known (restored from a checkpoint), with the interface of the others."""

    def __init__(self, mean: Tensor) -> None:
        self._mean = mean
        self.nbytes = 0

    def wait(self) -> Tensor:
        return self._mean


class CompressedMean:
    r"""One compressed mean in flight: :meth:`start` posts the ``all_to_all_single``
    (asynchronously), :meth:`wait` finishes (fp32 sum, re-encoding with the shard residual,
    ``all_gather``) and returns the mean.

    Args:
        x (Tensor): this rank's 1-D float32 vector, error feedback already added.
        fmt (str): ``"bf16"`` or ``"int8"``.
        shard_residual (Tensor): this rank's re-encoding residual, ``C`` float32 elements,
            updated in place by :meth:`wait`.
        process_group: the group (None: the world).

    After :meth:`start`, ``self.sent`` holds the decoded values of what this rank sent (``N``
    elements), for the caller's error feedback, and ``self.nbytes`` the bytes counted.
    """

    def __init__(
        self,
        x: Tensor,
        fmt: str,
        shard_residual: Tensor,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.fmt = fmt
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.n = x.numel()
        self.c = chunk_numel(self.n, self.world)
        self.shard_residual = shard_residual
        padded = x.new_zeros(self.world * self.c)
        padded[: self.n] = x
        send, decoded = encode_chunks(padded.view(self.world, self.c), fmt)
        self.sent = decoded.reshape(-1)[: self.n]
        self._send = send.contiguous()
        self._recv = torch.empty_like(self._send)
        self.nbytes = self._send.numel()
        self._work: dist.Work | None = None
        self._mean: Tensor | None = None
        self._t0 = 0.0

    def start(self, async_op: bool = True) -> CompressedMean:
        self._t0 = time.perf_counter()
        self._work = dist.all_to_all_single(
            self._recv, self._send, group=self.group, async_op=async_op
        )
        return self

    def wait(self) -> Tensor:
        if self._mean is not None:
            return self._mean
        if self._work is not None:
            self._work.wait()
        vals = decode_chunks(self._recv, self.c, self.fmt)  # (M, C): chunk `rank` of every rank
        total = vals[0].clone()
        for j in range(1, self.world):
            total += vals[j]
        shard = total / self.world + self.shard_residual
        payload, decoded = encode_chunks(shard.view(1, -1), self.fmt)
        self.shard_residual.copy_(shard - decoded.view(-1))
        gathered = torch.empty(
            self.world * payload.shape[1], dtype=torch.uint8, device=payload.device
        )
        _all_gather(gathered, payload.view(-1), self.group)
        mean = decode_chunks(gathered.view(self.world, -1), self.c, self.fmt)
        self._mean = mean.reshape(-1)[: self.n]
        self._send = self._recv = torch.empty(0)
        simulated_wait(self._t0)
        return self._mean
