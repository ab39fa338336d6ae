r"""A DataLoader batch sampler whose batch size can change mid-epoch, sharded and resumable."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, Sampler

__all__ = ["AdaptiveBatchSampler"]

_STATE_KEYS = ("epoch", "position", "batch_size", "seed")
# The configuration a state belongs to: a state saved under another one is refused on load.
# (Checked when present, so states written before these keys existed still load.)
_CONFIG_KEYS = ("dataset_len", "num_replicas", "shuffle", "drop_last", "drop_last_batch")


def _is_int(value: Any) -> bool:
    """True for Python and NumPy integers, False for ``bool`` and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _num_samples(dataset_len: int, num_replicas: int, drop_last: bool) -> int:
    """Indices per rank per epoch, as :class:`~torch.utils.data.DistributedSampler` computes it."""
    if drop_last and dataset_len % num_replicas != 0:
        return math.ceil((dataset_len - num_replicas) / num_replicas)
    return math.ceil(dataset_len / num_replicas)


def _shard_indices(
    dataset_len: int,
    num_replicas: int,
    rank: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_last: bool,
) -> list[int]:
    r"""This rank's indices for one epoch: ``list(DistributedSampler(...))`` after ``set_epoch``.

    The same algorithm as :class:`~torch.utils.data.DistributedSampler`: a ``randperm`` from a
    generator seeded with ``seed + epoch`` (or ``arange`` without shuffling), padded to
    ``total_size = num_samples * num_replicas`` by repeating it from the start, or truncated to
    ``total_size`` with ``drop_last``, then every ``num_replicas``-th index from ``rank``. It
    stays in a tensor until this rank's share is taken, so only ``num_samples`` indices become
    Python ints (torch converts the whole permutation).
    """
    total_size = _num_samples(dataset_len, num_replicas, drop_last) * num_replicas
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        indices = torch.randperm(dataset_len, generator=generator)
    else:
        indices = torch.arange(dataset_len)
    padding = total_size - dataset_len
    if padding > 0:
        repeats = math.ceil(padding / dataset_len)
        indices = torch.cat([indices, indices.repeat(repeats)[:padding]])
    return indices[rank:total_size:num_replicas].tolist()


class AdaptiveBatchSampler(Sampler[list[int]]):
    r"""Batch sampler for ``DataLoader(batch_sampler=...)`` whose batch size can grow mid-training.

    A :class:`~torch.utils.data.DataLoader` fixes its ``batch_size`` at construction, so adaptive
    batch-size methods (Local SGD with a growing batch, the norm / inner-product / orthogonality
    tests) need the batch sampler to own it. This sampler replaces
    ``BatchSampler(DistributedSampler(dataset, ...), batch_size)`` and adds
    :meth:`set_batch_size`, which takes effect at the next batch the sampler yields.

    **Order.** Each epoch, rank :math:`r` gets exactly the indices
    ``list(DistributedSampler(dataset, num_replicas, rank, shuffle, seed, drop_last))`` after
    ``set_epoch(epoch)`` (computed by the same algorithm, checked against torch in the tests),
    and the batches are consecutive slices of that list. With :math:`N` the number of indices per
    rank (``num_samples``), :math:`p_k` the position before batch :math:`k` and :math:`b_k` the
    batch size in force when batch :math:`k` is yielded,

    .. math::
        \text{batch}_k = \text{indices}[p_k : p_{k+1}], \qquad
        p_0 = 0, \quad p_{k+1} = \min(p_k + b_k, N),

    so the concatenation of an epoch's batches is the DistributedSampler list for *any* sequence of
    :meth:`set_batch_size` calls, and every batch has exactly :math:`b_k` samples except possibly
    the last one of the epoch. Every rank has the same :math:`N`, so ranks that make the same
    :meth:`set_batch_size` calls yield the same number of batches, of the same sizes: Local SGD
    ranks that synchronise every :math:`H` steps never wait for a rank that ran out of data.
    ``len(sampler)`` is the number of batches left in the epoch at the current size,
    :math:`\lceil (N - p) / b \rceil`.

    **Epochs and iteration.** One iteration of the sampler runs from the current position to the
    end of the epoch, then resets the position to the start of the same epoch (as with
    :class:`DistributedSampler`, iterating again without :meth:`set_epoch` repeats the epoch's
    order). :meth:`set_epoch` moves to the start of another epoch. Breaking out of a loop
    mid-epoch leaves the position where the sampler stopped, so the next iteration continues the
    epoch; that is also how a sampler loaded from a mid-epoch :meth:`state_dict` resumes. Only the
    most recent iterator is live: calling ``iter()`` again, :meth:`set_epoch` or
    :meth:`load_state_dict` ends the previous one.

    **Checkpoints.** :meth:`state_dict` holds the epoch, the position in the epoch, the batch size
    and the seed, and the configuration they belong to (dataset length, ``num_replicas``,
    ``shuffle``, ``drop_last``), as plain ints and bools. A new sampler built with the same
    configuration and loaded from it yields exactly the remaining batches; a sampler with another
    configuration (or another ``seed``) refuses the state with a ``ValueError`` that names the
    field, instead of resuming at a position that means something else. The state is the same on
    every rank, so saving rank 0's suffices. torchdata's ``StatefulDataLoader`` calls
    :meth:`state_dict` and :meth:`load_state_dict` itself and accounts for prefetching, so with it
    ``loader.state_dict()`` is the complete data-order checkpoint (see the warning below for
    batch sizes with ``num_workers > 0``).

    **Resuming in the usual loop.** :meth:`set_epoch` called right after :meth:`load_state_dict`
    with the epoch the state was saved in keeps the restored position, so the loop PyTorch users
    write resumes mid-epoch::

        start_epoch = load_checkpoint(path, sampler=sampler, ...)["epoch"]
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)  # the first call keeps the restored position
            for x, y in loader:
                ...

    Any other :meth:`set_epoch` call moves to the start of its epoch as usual: one with another
    epoch, a second one, or one after the sampler has started iterating.

    Args:
        dataset (Sized): dataset to sample from; only its ``len`` is used.
        batch_size (int): initial number of samples per batch on each rank (per Local SGD
            worker, not global).
        num_replicas (int, optional): number of ranks sharing the data (default: the world size
            of the default process group when torch.distributed is initialized, else 1).
        rank (int, optional): rank of this process among ``num_replicas`` (default: the rank in
            the default process group when torch.distributed is initialized, else 0).
        shuffle (bool, optional): shuffle the indices each epoch with seed ``seed + epoch``, as
            :class:`DistributedSampler` does (default: ``True``).
        seed (int, optional): shuffling seed; must be the same on all ranks (default: ``0``).
        drop_last (bool, optional): :class:`DistributedSampler`'s ``drop_last``: drop the tail of
            the dataset so that it divides evenly among ranks, instead of padding it by repeating
            indices. It does *not* drop a short last batch: the last batch of an epoch may be
            smaller than ``batch_size`` on every rank alike (default: ``False``).
        drop_last_batch (bool, optional): :class:`BatchSampler`'s ``drop_last``: skip an epoch's
            last batch when it is shorter than the batch size in force, on every rank alike (so
            the ranks' step counts still agree). With a growing batch the tail's size changes
            from epoch to epoch, and a tail of one sample breaks BatchNorm in training mode
            ("Expected more than 1 value per channel") late in a run (default: ``False``).
        max_batch_size (int, optional): upper bound of the batch size; larger values passed to
            :meth:`set_batch_size` or loaded by :meth:`load_state_dict` are clamped to it, for
            instance to stay within device memory (default: ``None``, no bound).

    Raises:
        TypeError: if ``dataset`` has no ``len()`` (an ``IterableDataset``): the sampler shards
            the indices of a map-style dataset.
        ValueError: if ``batch_size``, ``max_batch_size``, ``num_replicas``, ``rank`` or ``seed``
            is not an integer (``bool`` is not) or out of range, if ``shuffle``, ``drop_last`` or
            ``drop_last_batch`` is not a ``bool``, or if ``batch_size > max_batch_size`` at
            construction.

    Example::

        >>> sampler = AdaptiveBatchSampler(dataset, batch_size=32, max_batch_size=1024)
        >>> loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, prefetch_factor=1)
        >>> for epoch in range(epochs):
        ...     sampler.set_epoch(epoch)
        ...     for x, y in loader:
        ...         loss = F.cross_entropy(model(x), y)
        ...         loss.backward()
        ...         optimizer.step()
        ...         optimizer.zero_grad()
        ...         if should_grow(model):  # e.g. a variance test
        ...             sampler.set_batch_size(2 * sampler.batch_size)
        >>> # a mid-epoch checkpoint (exact with num_workers=0 or torchdata's StatefulDataLoader)
        >>> state = sampler.state_dict()
        >>> resumed = AdaptiveBatchSampler(dataset, batch_size=32, max_batch_size=1024)
        >>> resumed.load_state_dict(state)  # iterating it yields the batches that remained

    .. warning::
        With ``num_workers > 0`` the DataLoader draws batches of indices from the sampler ahead of
        the training loop: when the loop receives batch :math:`k`, the sampler has already
        yielded batches up to :math:`k + \text{prefetch\_factor} \cdot \text{num\_workers}`. A
        :meth:`set_batch_size` call therefore reaches the loop after those prefetched batches
        (``2 * num_workers`` batches with the default ``prefetch_factor=2``); no sample is lost or
        repeated, the data order is unchanged, only the switch comes later. To shorten the lag
        use ``prefetch_factor=1`` (lag ``num_workers``) or ``num_workers=0`` (no lag). Ranks with
        the same ``num_workers`` and ``prefetch_factor`` have the same lag, so their batch counts
        still agree. For the same reason the
        sampler's own :meth:`state_dict` taken mid-epoch under a multi-worker DataLoader counts
        the prefetched batches as consumed: checkpoint through torchdata's
        ``StatefulDataLoader`` instead, which resumes at the right sample. The resume is exact,
        batch sizes included, with ``num_workers=0``. With workers the sample order still is,
        but a :meth:`set_batch_size` call made within the prefetch window before the checkpoint
        may reach the resumed run at another batch than it reached the uninterrupted one (the
        prefetched batches are drawn again, at the size in force when the loader resumes).

    .. note::
        For batches that outgrow memory, :func:`samplers.micro_batches` splits a collated batch
        into micro-batches for gradient accumulation.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        max_batch_size: int | None = None,
        drop_last_batch: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"Invalid dataset: {type(dataset).__name__} has no len() (an IterableDataset or a "
                "stream); AdaptiveBatchSampler shards indices of a map-style dataset (with "
                "__len__ and __getitem__), as DistributedSampler does. Materialize the data into "
                "a map-style dataset (e.g. TensorDataset, or a list), or shard the stream per "
                "rank yourself and batch it in your loop"
            )
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size!r}")
        if max_batch_size is not None and (not _is_int(max_batch_size) or max_batch_size < 1):
            raise ValueError(f"Invalid max_batch_size: {max_batch_size!r}")
        if max_batch_size is not None and batch_size > max_batch_size:
            raise ValueError(
                f"Invalid batch_size: {batch_size} (greater than max_batch_size={max_batch_size})"
            )
        initialized = dist.is_available() and dist.is_initialized()
        world = os.environ.get("WORLD_SIZE", "")
        if num_replicas is None and not initialized and world.isdigit() and int(world) > 1:
            warnings.warn(
                f"AdaptiveBatchSampler: WORLD_SIZE={world} is set (torchrun) but torch.distributed "
                "is not initialized, so this rank takes the whole dataset (num_replicas=1). Call "
                "torch.distributed.init_process_group(...) before building the sampler",
                RuntimeWarning,
                stacklevel=2,
            )
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialized else 1
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        if not _is_int(num_replicas) or num_replicas < 1:
            raise ValueError(f"Invalid num_replicas: {num_replicas!r}")
        if not _is_int(rank) or not 0 <= rank < num_replicas:
            raise ValueError(f"Invalid rank: {rank!r} (num_replicas={num_replicas})")
        if not isinstance(shuffle, bool):
            raise ValueError(f"Invalid shuffle: {shuffle!r}")
        if not _is_int(seed):
            raise ValueError(f"Invalid seed: {seed!r}")
        if not isinstance(drop_last, bool):
            raise ValueError(f"Invalid drop_last: {drop_last!r}")
        if not isinstance(drop_last_batch, bool):
            raise ValueError(f"Invalid drop_last_batch: {drop_last_batch!r}")

        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.drop_last_batch = drop_last_batch
        self.max_batch_size = None if max_batch_size is None else int(max_batch_size)
        self._seed = int(seed)
        self._dataset_len = len(dataset)
        #: number of indices this rank gets per epoch (the same on every rank)
        self.num_samples: int = _num_samples(self._dataset_len, self.num_replicas, drop_last)
        self._batch_size = int(batch_size)
        self._epoch = 0
        self._position = 0  # indices of this epoch already yielded on this rank
        self._generation = 0  # bumped by iter(), set_epoch and load_state_dict
        self._cache_key: tuple[int, int] | None = None
        self._cache: list[int] = []
        # The epoch of a state just loaded: set_epoch(it) keeps the restored position once.
        self._loaded_epoch: int | None = None

    @property
    def batch_size(self) -> int:
        """Number of samples in the next batch the sampler yields (read-only: use
        :meth:`set_batch_size`)."""
        return self._batch_size

    @property
    def epoch(self) -> int:
        """The current epoch (read-only: use :meth:`set_epoch`)."""
        return self._epoch

    @property
    def seed(self) -> int:
        """The shuffling seed (read-only)."""
        return self._seed

    def set_batch_size(self, batch_size: int) -> None:
        """Set the size of the batches yielded from now on.

        It takes effect at the next batch the sampler yields, including in an iteration already
        under way (see the warning about DataLoader prefetching in the class docstring).

        Args:
            batch_size (int): new per-rank batch size, clamped to ``max_batch_size``.

        Raises:
            ValueError: if ``batch_size`` is not an integer (``bool`` is not) or is < 1.
        """
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size!r}")
        if self.max_batch_size is not None:
            batch_size = min(batch_size, self.max_batch_size)
        self._batch_size = int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``: the next iteration yields that epoch's batches.

        As for :class:`DistributedSampler`, call it at the start of every epoch with
        ``shuffle=True``, otherwise each epoch repeats the same order. It ends a live iterator.

        The first call after :meth:`load_state_dict`, before the sampler is iterated, with the
        epoch the state was saved in keeps the restored position instead: the loop that calls
        ``set_epoch(epoch)`` at the top of every epoch resumes mid-epoch (see the class docstring).

        Args:
            epoch (int): epoch number; the shuffling seed is ``seed + epoch``.

        Raises:
            ValueError: if ``epoch`` is not an integer.
        """
        if not _is_int(epoch):
            raise ValueError(f"Invalid epoch: {epoch!r}")
        keep_position = self._loaded_epoch is not None and int(epoch) == self._loaded_epoch
        self._loaded_epoch = None
        self._epoch = int(epoch)
        if not keep_position:
            self._position = 0
        self._generation += 1

    def _epoch_indices(self) -> list[int]:
        """This rank's indices for the current epoch, computed once per (epoch, seed)."""
        key = (self._epoch, self._seed)
        if self._cache_key != key:
            self._cache = _shard_indices(
                self._dataset_len,
                self.num_replicas,
                self.rank,
                self.shuffle,
                self._seed,
                self._epoch,
                self.drop_last,
            )
            self._cache_key = key
        return self._cache

    def __iter__(self) -> Iterator[list[int]]:
        self._loaded_epoch = None  # from now on set_epoch moves to the start of its epoch
        self._generation += 1
        return self._batches(self._generation)

    def _batches(self, generation: int) -> Iterator[list[int]]:
        indices = self._epoch_indices()
        end_of_epoch = len(indices)
        while self._generation == generation and self._position < end_of_epoch:
            start = self._position
            stop = min(start + self._batch_size, end_of_epoch)
            if self.drop_last_batch and stop - start < self._batch_size:
                self._position = end_of_epoch  # the short tail is skipped
                break
            self._position = stop
            yield indices[start:stop]
        if self._generation == generation:  # epoch done: the next iteration starts it over
            self._position = 0

    def __len__(self) -> int:
        r"""Number of batches left in the current epoch if the batch size stays as it is.

        At the start of an epoch that is :math:`\lceil N / b \rceil`; mid-epoch it counts only
        the batches after the current position, so ``len(DataLoader(...))`` shrinks after a
        :meth:`set_batch_size` call that grows the batch. With ``drop_last_batch``:
        :math:`\lfloor N / b \rfloor`.
        """
        left = self.num_samples - self._position
        if self.drop_last_batch:
            return left // self._batch_size
        return -(-left // self._batch_size)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's progress: ``epoch``, ``position`` (indices of this epoch already yielded
        on each rank), ``batch_size`` and ``seed``, and the configuration it belongs to:
        ``dataset_len``, ``num_replicas``, ``shuffle``, ``drop_last`` and ``drop_last_batch``
        (plain ints and bools, the same on every rank)."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "batch_size": self._batch_size,
            "seed": self.seed,
            "dataset_len": self._dataset_len,
            "num_replicas": self.num_replicas,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "drop_last_batch": self.drop_last_batch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the progress saved by :meth:`state_dict`; the next iteration yields exactly
        the batches that remained, and a :meth:`set_epoch` call with the saved epoch right after
        keeps that position. It ends a live iterator.

        Args:
            state_dict (dict): a state returned by :meth:`state_dict` of a sampler with the same
                configuration: a dataset of the same length, the same ``num_replicas``,
                ``shuffle``, ``drop_last`` and ``seed`` (``rank`` may differ: the state is the
                same on every rank). Its ``batch_size`` is clamped to ``max_batch_size``.

        Raises:
            ValueError: if the state was saved under another configuration (the message names
                the field, the saved value and this sampler's), if a key is missing or if a value
                is invalid, e.g. a position past the end of this sampler's epoch. The sampler is
                left unchanged.
        """
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        if missing:
            raise ValueError(f"Invalid state_dict: missing {missing}")
        current = self.state_dict()
        for key in ("seed", *_CONFIG_KEYS):
            if key in state_dict and state_dict[key] != current[key]:
                raise ValueError(
                    f"Invalid state_dict: saved with {key}={state_dict[key]!r}, but this sampler "
                    f"has {key}={current[key]!r}"
                )
        epoch, position = state_dict["epoch"], state_dict["position"]
        batch_size, seed = state_dict["batch_size"], state_dict["seed"]
        if not _is_int(epoch):
            raise ValueError(f"Invalid state_dict epoch: {epoch!r}")
        if not _is_int(position) or not 0 <= position <= self.num_samples:
            raise ValueError(
                f"Invalid state_dict position: {position!r} (num_samples={self.num_samples})"
            )
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"Invalid state_dict batch_size: {batch_size!r}")
        if not _is_int(seed):
            raise ValueError(f"Invalid state_dict seed: {seed!r}")
        self.set_epoch(epoch)
        self.set_batch_size(batch_size)
        self._position = int(position)
        self._loaded_epoch = int(epoch)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, batch_size={self._batch_size}, "
            f"max_batch_size={self.max_batch_size}, num_replicas={self.num_replicas}, "
            f"rank={self.rank}, shuffle={self.shuffle}, seed={self.seed}, "
            f"drop_last={self.drop_last}, drop_last_batch={self.drop_last_batch}, "
            f"epoch={self._epoch}, position={self._position})"
        )
