r"""Gradient accumulation that records the variance test's statistics on the right step."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from local_opt._validate import is_int

if TYPE_CHECKING:
    from local_opt._stats import PooledStats
    from local_opt.variance import VarianceTest

__all__ = ["Accumulation"]


def _leaves(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _leaves(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _leaves(v)]
    raise TypeError(
        f"Invalid batch: a {type(batch).__name__}; expected a tensor, or a tuple, list or dict "
        "of tensors with the samples along dim 0"
    )


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, start, stop) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_slice(v, start, stop) for v in batch))
    return type(batch)(_slice(v, start, stop) for v in batch)


def split(batch: Any, micro_batch_size: int) -> tuple[list[Any], list[int]]:
    """Consecutive micro-batches of at most ``micro_batch_size`` samples, and their sizes."""
    if not is_int(micro_batch_size) or micro_batch_size < 1:
        raise ValueError(f"Invalid micro_batch_size: {micro_batch_size!r} (expected an int >= 1)")
    sizes = {int(t.shape[0]) if t.dim() else -1 for t in _leaves(batch)}
    if len(sizes) != 1 or -1 in sizes or 0 in sizes:
        raise ValueError(
            f"Invalid batch: its tensors have {sorted(sizes)} samples along dim 0 (expected one "
            "number, at least 1)"
        )
    n = sizes.pop()
    starts = range(0, n, int(micro_batch_size))
    chunks = [_slice(batch, s, min(s + micro_batch_size, n)) for s in starts]
    return chunks, [min(s + micro_batch_size, n) - s for s in starts]


class Accumulation:
    r"""One step of gradient accumulation; made by :meth:`VarianceTest.accumulate`.

    Iterating yields ``(micro_batch, weight)`` with ``weight = len(micro_batch) / len(batch)``,
    so that ``(loss * weight).backward()`` over all micro-batches leaves in ``.grad`` the gradient
    of the batch's mean loss. When the optimizer's coming step ends a round
    (``optimizer.will_sync``), the micro-batch gradients are recorded on their way into ``.grad``
    (:meth:`VarianceTest.record_micro_batches`), and when the last micro-batch is done the
    statistics are pooled over the ranks at once — before anything can change ``.grad`` in place,
    so gradient clipping, ``GradScaler.unscale_`` and ``opt.step()`` may follow. Other steps
    record nothing and communicate nothing. After the step, :meth:`suggest` returns the next
    batch size.
    """

    def __init__(
        self,
        test: VarianceTest,
        optimizer: Any,
        batch: Any,
        micro_batch_size: int,
        grad_scale: float | None = None,
    ) -> None:
        if not isinstance(getattr(optimizer, "will_sync", None), bool):
            raise TypeError(
                f"Invalid optimizer: {type(optimizer).__name__} has no will_sync; pass the "
                "LocalOptimizer whose step follows the accumulation"
            )
        self.test = test
        self.optimizer = optimizer
        self.micro_batches, self.sizes = split(batch, micro_batch_size)
        self.grad_scale = grad_scale
        self.recorded: bool | None = None  # None until iterated to the end
        self._pooled: PooledStats | None = None

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[tuple[Any, float]]:
        if self.recorded is not None:
            raise RuntimeError("Accumulation: already iterated; make a new one for the next step")
        n = sum(self.sizes)
        record = self.optimizer.will_sync
        if not record:
            for chunk, size in zip(self.micro_batches, self.sizes):
                yield chunk, size / n
            self.recorded = False
            return
        recorder = self.test.record_micro_batches(self.sizes, grad_scale=self.grad_scale)
        with recorder:
            for chunk, size in zip(self.micro_batches, self.sizes):
                yield chunk, size / n
        self._pooled = self.test._pool_recorded(recorder)  # collective, before any clipping
        self.recorded = True

    def suggest(self, batch_size: int) -> int:
        """The next per-worker batch size: the test's suggestion after a recorded step (the same
        on every rank), else ``batch_size`` unchanged (nothing is communicated)."""
        if self.recorded is None:
            raise RuntimeError(
                "Accumulation.suggest: iterate over all micro-batches first (for ... in acc)"
            )
        if not self.recorded:
            return batch_size
        return self.test._suggest_from_pooled(self._pooled, batch_size)
