"""AdaptiveBatchSampler against torch's DistributedSampler / BatchSampler, and micro_batches."""

from __future__ import annotations

import io
import itertools
import math
from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from samplers.adaptive import AdaptiveBatchSampler
from samplers.micro import micro_batches


class IndexDataset:
    """Map-style dataset whose sample i is i: batches show exactly which indices were drawn."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def reference(n, num_replicas, rank, shuffle=True, seed=0, drop_last=False, epoch=0):
    """This rank's epoch order, straight from torch."""
    ds = DistributedSampler(
        IndexDataset(n),
        num_replicas=num_replicas,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    ds.set_epoch(epoch)
    return list(ds)


def run_epoch(sampler, sizes=()):
    """Iterate one epoch; after batch k call set_batch_size(sizes[k]) while sizes last."""
    batches = []
    for k, batch in enumerate(sampler):
        batches.append(batch)
        if k < len(sizes):
            sampler.set_batch_size(sizes[k])
    return batches


def check_batch_sizes(batches, first, sizes, max_batch_size=None):
    """Every batch has the size in force when it was yielded; only the last may be shorter."""
    cap = max_batch_size or math.inf
    expected = [min(first, cap)] + [min(b, cap) for b in sizes]
    for k, batch in enumerate(batches):
        want = expected[min(k, len(expected) - 1)]
        if k == len(batches) - 1:
            assert 1 <= len(batch) <= want
        else:
            assert len(batch) == want


# --- order and batch sizes against torch ----------------------------------------------------------


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n", [1, 7, 13, 50])
def test_epoch_matches_distributed_sampler(num_replicas, shuffle, drop_last, n):
    sizes = [1, 5, 2, 7, 3]
    counts = []
    for rank in range(num_replicas):
        sampler = AdaptiveBatchSampler(
            IndexDataset(n),
            4,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=17,
            drop_last=drop_last,
        )
        for epoch in (0, 3):
            sampler.set_epoch(epoch)
            sampler.set_batch_size(4)
            batches = run_epoch(sampler, sizes)
            ref = reference(n, num_replicas, rank, shuffle, 17, drop_last, epoch)
            assert list(itertools.chain.from_iterable(batches)) == ref
            check_batch_sizes(batches, 4, sizes)
            counts.append((epoch, [len(b) for b in batches]))
    # every rank yields the same batches sizes, hence the same number of batches
    for epoch in (0, 3):
        per_rank = [c for e, c in counts if e == epoch]
        assert all(c == per_rank[0] for c in per_rank)


@pytest.mark.parametrize("num_replicas,rank", [(1, 0), (3, 2), (4, 1)])
@pytest.mark.parametrize("batch_size", [1, 3, 8, 100])
@pytest.mark.parametrize("drop", [False, True], ids=["keep_tail", "drop_last_batch"])
def test_constant_size_matches_batch_sampler(num_replicas, rank, batch_size, drop):
    """``drop_last_batch`` is ``BatchSampler``'s ``drop_last`` over ``DistributedSampler``."""
    ds = IndexDataset(37)
    torch_sampler = BatchSampler(
        DistributedSampler(ds, num_replicas=num_replicas, rank=rank, seed=5), batch_size, drop
    )
    sampler = AdaptiveBatchSampler(
        ds, batch_size, num_replicas=num_replicas, rank=rank, seed=5, drop_last_batch=drop
    )
    for epoch in range(3):
        torch_sampler.sampler.set_epoch(epoch)
        sampler.set_epoch(epoch)
        assert len(sampler) == len(torch_sampler)
        assert list(sampler) == list(torch_sampler)


def test_shuffle_changes_with_epoch_and_seed():
    ds = IndexDataset(64)
    a = AdaptiveBatchSampler(ds, 64, seed=0)
    first = next(iter(a))
    a.set_epoch(1)
    assert next(iter(a)) != first
    assert next(iter(AdaptiveBatchSampler(ds, 64, seed=1))) != first
    assert next(iter(AdaptiveBatchSampler(ds, 64, shuffle=False))) == list(range(64))


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 200),
    num_replicas=st.integers(1, 5),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**16),
    epoch=st.integers(0, 50),
    first=st.integers(1, 40),
    sizes=st.lists(st.integers(1, 40), max_size=25),
    max_batch_size=st.none() | st.integers(40, 60),
)
def test_property_every_rank_gets_distributed_sampler_order(
    n, num_replicas, shuffle, drop_last, seed, epoch, first, sizes, max_batch_size
):
    if max_batch_size is not None:
        sizes = [s * 2 for s in sizes]  # some sizes exceed the cap and are clamped
    shapes = []
    for rank in range(num_replicas):
        sampler = AdaptiveBatchSampler(
            IndexDataset(n),
            first,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            max_batch_size=max_batch_size,
        )
        sampler.set_epoch(epoch)
        ref = reference(n, num_replicas, rank, shuffle, seed, drop_last, epoch)
        batches, consumed = [], 0
        for k, batch in enumerate(sampler):
            batches.append(batch)
            consumed += len(batch)
            if k < len(sizes):
                sampler.set_batch_size(sizes[k])
            # len() counts the batches left at the current size
            assert len(sampler) == math.ceil((len(ref) - consumed) / sampler.batch_size)
        assert list(itertools.chain.from_iterable(batches)) == ref
        check_batch_sizes(batches, first, sizes, max_batch_size)
        shapes.append([len(b) for b in batches])
    assert all(s == shapes[0] for s in shapes)


def test_set_batch_size_takes_effect_at_next_batch():
    sampler = AdaptiveBatchSampler(IndexDataset(100), 2, shuffle=False)
    it = iter(sampler)
    assert next(it) == [0, 1]
    sampler.set_batch_size(5)
    assert sampler.batch_size == 5
    assert next(it) == [2, 3, 4, 5, 6]
    sampler.set_batch_size(1)
    sampler.set_batch_size(3)  # only the last call counts
    assert next(it) == [7, 8, 9]


def test_max_batch_size_clamps():
    sampler = AdaptiveBatchSampler(IndexDataset(100), 4, max_batch_size=10, shuffle=False)
    sampler.set_batch_size(1000)
    assert sampler.batch_size == 10
    assert next(iter(sampler)) == list(range(10))
    sampler.set_batch_size(np.int64(7))  # NumPy integers are integers
    assert sampler.batch_size == 7 and type(sampler.batch_size) is int


def test_batch_size_is_read_only():
    sampler = AdaptiveBatchSampler(IndexDataset(10), 4)
    with pytest.raises(AttributeError):
        sampler.batch_size = 8


def test_len_counts_remaining_batches_at_current_size():
    sampler = AdaptiveBatchSampler(IndexDataset(23), 4, num_replicas=2, rank=1)  # 12 per rank
    loader = DataLoader(IndexDataset(23), batch_sampler=sampler)
    assert len(sampler) == len(loader) == 3
    sampler.set_batch_size(5)
    assert len(sampler) == 3
    it = iter(sampler)
    next(it)  # 5 of 12 yielded
    assert len(sampler) == 2
    sampler.set_batch_size(7)
    assert len(sampler) == 1
    assert len(list(it)) == 1
    assert len(sampler) == math.ceil(12 / 7)  # the epoch starts over


# --- iteration semantics --------------------------------------------------------------------------


def test_iterating_again_repeats_the_epoch_like_distributed_sampler():
    sampler = AdaptiveBatchSampler(IndexDataset(30), 4, num_replicas=2, rank=0, seed=3)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(itertools.chain.from_iterable(sampler)) == reference(30, 2, 0, seed=3, epoch=1)


def test_break_then_iterate_continues_the_epoch():
    sampler = AdaptiveBatchSampler(IndexDataset(40), 3, shuffle=True, seed=9)
    seen = []
    for k, batch in enumerate(sampler):
        seen += batch
        if k == 4:
            break
    for batch in sampler:
        seen += batch
    assert seen == reference(40, 1, 0, seed=9)


def test_set_epoch_restarts_and_ends_live_iterator():
    sampler = AdaptiveBatchSampler(IndexDataset(20), 3, shuffle=False)
    it = iter(sampler)
    next(it)
    sampler.set_epoch(2)
    assert list(it) == []  # ended by set_epoch
    assert list(itertools.chain.from_iterable(sampler)) == list(range(20))
    old, new = iter(sampler), iter(sampler)
    assert next(new) == [0, 1, 2]
    assert list(old) == []  # superseded by the newer iterator
    assert next(new) == [3, 4, 5]


def test_empty_dataset():
    sampler = AdaptiveBatchSampler(IndexDataset(0), 4)
    assert len(sampler) == 0 and list(sampler) == []


# --- state_dict / resume --------------------------------------------------------------------------


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 150),
    num_replicas=st.integers(1, 4),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=30),
    stop=st.integers(0, 40),
    epoch=st.integers(0, 9),
)
def test_resume_at_any_position_yields_the_remaining_batches(
    n, num_replicas, shuffle, drop_last, sizes, stop, epoch
):
    kwargs = dict(num_replicas=num_replicas, shuffle=shuffle, seed=11, drop_last=drop_last)
    states, rests = [], []
    for rank in range(num_replicas):
        original = AdaptiveBatchSampler(IndexDataset(n), sizes[0], rank=rank, **kwargs)
        original.set_epoch(epoch)
        it = iter(original)
        for k in range(stop):  # yield `stop` batches (or the whole epoch), changing sizes
            if next(it, None) is None:  # epoch over: the next iteration starts it again
                it = iter(original)
                break
            original.set_batch_size(sizes[(k + 1) % len(sizes)])
        state = roundtrip(original.state_dict())
        states.append(state)
        left = len(original)
        resumed = AdaptiveBatchSampler(IndexDataset(n), 1, rank=rank, **kwargs)  # other size
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state and len(resumed) == left
        # both go on in lock step with the same set_batch_size calls
        rest_original, rest_resumed = [], []
        for k, (a, b) in enumerate(itertools.zip_longest(it, resumed)):
            rest_original.append(a)
            rest_resumed.append(b)
            original.set_batch_size(sizes[k % len(sizes)])
            resumed.set_batch_size(sizes[k % len(sizes)])
        assert rest_resumed == rest_original
        rests.append([len(b) for b in rest_resumed])
    assert all(s == states[0] for s in states)  # the state is the same on every rank
    assert all(r == rests[0] for r in rests)


def test_state_dict_contents_and_batch_size_clamped():
    a = AdaptiveBatchSampler(IndexDataset(50), 4, seed=123, max_batch_size=64)
    a.set_epoch(5)
    it = iter(a)
    next(it)
    next(it)
    a.set_batch_size(6)
    assert a.state_dict() == {
        "epoch": 5, "position": 8, "batch_size": 6, "seed": 123,
        "dataset_len": 50, "num_replicas": 1, "shuffle": True, "drop_last": False,
        "drop_last_batch": False,
    }  # fmt: skip
    b = AdaptiveBatchSampler(IndexDataset(50), 4, seed=123, max_batch_size=5)
    b.load_state_dict(a.state_dict())
    assert b.epoch == 5 and b.batch_size == 5  # clamped to max_batch_size
    assert list(itertools.chain.from_iterable(b)) == reference(50, 1, 0, seed=123, epoch=5)[8:]


def test_state_of_another_rank_loads():
    """The state is the same on every rank: rank 1 resumes from rank 0's."""
    a = AdaptiveBatchSampler(IndexDataset(31), 3, num_replicas=2, rank=0, seed=5)
    next(iter(a))
    b = AdaptiveBatchSampler(IndexDataset(31), 3, num_replicas=2, rank=1, seed=5)
    b.load_state_dict(a.state_dict())
    assert list(itertools.chain.from_iterable(b)) == reference(31, 2, 1, seed=5)[3:]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(n=41), "dataset_len=40"),
        (dict(num_replicas=4), "num_replicas=2"),
        (dict(shuffle=False), "shuffle=True"),
        (dict(drop_last=True), "drop_last=False"),
        (dict(seed=8), "seed=7"),
    ],
)
def test_load_state_dict_refuses_another_configuration(kwargs, field):
    config = dict(n=40, num_replicas=2, shuffle=True, drop_last=False, seed=7)
    a = AdaptiveBatchSampler(IndexDataset(config.pop("n")), 3, rank=1, **config)
    next(iter(a))
    state = roundtrip(a.state_dict())
    config.update(kwargs)
    b = AdaptiveBatchSampler(IndexDataset(config.pop("n", 40)), 3, rank=1, **config)
    before = b.state_dict()
    name, saved = field.split("=")
    current = repr(b.state_dict()[name])
    with pytest.raises(ValueError, match=f"saved with {field}, but this sampler has {name}={current}"):
        b.load_state_dict(state)
    assert b.state_dict() == before


def test_set_epoch_after_load_keeps_the_restored_position_once():
    a = AdaptiveBatchSampler(IndexDataset(30), 4, seed=1)
    a.set_epoch(2)
    it = iter(a)
    next(it)
    next(it)
    state = a.state_dict()
    order = reference(30, 1, 0, seed=1, epoch=2)

    b = AdaptiveBatchSampler(IndexDataset(30), 4, seed=1)
    b.load_state_dict(state)
    b.set_epoch(2)  # the epoch it was saved in: keep the position
    assert list(itertools.chain.from_iterable(b)) == order[8:]
    b.set_epoch(2)  # the sampler has iterated since: start of the epoch, as always
    assert list(itertools.chain.from_iterable(b)) == order

    b.load_state_dict(state)
    b.set_epoch(2)
    b.set_epoch(2)  # a second call: start of the epoch
    assert list(itertools.chain.from_iterable(b)) == order

    b.load_state_dict(state)
    b.set_epoch(3)  # another epoch: its start
    assert list(itertools.chain.from_iterable(b)) == reference(30, 1, 0, seed=1, epoch=3)

    b.load_state_dict(state)
    next(iter(b))  # started iterating (e.g. a DataLoader iterator was made): set_epoch resets
    b.set_epoch(2)
    assert list(itertools.chain.from_iterable(b)) == order

    # the usual loop, resumed from the state: the rest of epoch 2, then epoch 3 whole
    b = AdaptiveBatchSampler(IndexDataset(30), 4, seed=1)
    b.load_state_dict(state)
    seen = []
    for epoch in range(2, 4):
        b.set_epoch(epoch)
        seen.append(list(itertools.chain.from_iterable(b)))
    assert seen == [order[8:], reference(30, 1, 0, seed=1, epoch=3)]


def test_load_state_dict_ends_live_iterator():
    sampler = AdaptiveBatchSampler(IndexDataset(20), 2, shuffle=False)
    it = iter(sampler)
    next(it)
    sampler.load_state_dict({"epoch": 0, "position": 10, "batch_size": 5, "seed": 0})  # no config
    assert list(it) == []
    assert list(sampler) == [[10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]


# --- DataLoader -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers,prefetch_factor,lag", [(0, None, 0), (2, 2, 4), (2, 1, 2)])
def test_dataloader_set_batch_size_mid_epoch(num_workers, prefetch_factor, lag):
    """No sample lost or repeated; the new size arrives prefetch_factor * num_workers late."""
    ds = IndexDataset(101)
    sampler = AdaptiveBatchSampler(ds, 3, num_replicas=2, rank=1, seed=4)
    loader = DataLoader(
        ds, batch_sampler=sampler, num_workers=num_workers, prefetch_factor=prefetch_factor
    )
    for epoch in range(2):
        sampler.set_epoch(epoch)
        sampler.set_batch_size(3)
        sizes, seen = [], []
        for k, batch in enumerate(loader):
            sizes.append(len(batch))
            seen += batch.tolist()
            if k == 1:
                sampler.set_batch_size(5)
        assert seen == reference(101, 2, 1, seed=4, epoch=epoch)
        switch = 2 + lag  # first batch the loop receives at the new size
        assert sizes[:switch] == [3] * switch
        assert all(s == 5 for s in sizes[switch:-1]) and 1 <= sizes[-1] <= 5


def _dist_defaults(rank: int, world_size: int) -> tuple:
    ds = IndexDataset(23)
    sampler = AdaptiveBatchSampler(ds, 4, seed=2)
    torch_sampler = DistributedSampler(ds, seed=2)  # also takes the group's defaults
    sampler.set_epoch(1)
    torch_sampler.set_epoch(1)
    batches = list(sampler)
    return (sampler.num_replicas, sampler.rank, batches, list(torch_sampler))


@pytest.mark.timeout(120)
def test_defaults_from_process_group():
    from dist_utils import run_distributed

    results = run_distributed(_dist_defaults, 2)
    for rank, (num_replicas, got_rank, batches, ref) in enumerate(results):
        assert (num_replicas, got_rank) == (2, rank)
        assert (
            list(itertools.chain.from_iterable(batches))
            == ref
            == reference(23, 2, rank, seed=2, epoch=1)
        )
    assert len(results[0][2]) == len(results[1][2])


def test_defaults_without_process_group():
    sampler = AdaptiveBatchSampler(IndexDataset(10), 4)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    sampler = AdaptiveBatchSampler(IndexDataset(10), 4, num_replicas=3)
    assert (sampler.num_replicas, sampler.rank) == (3, 0)


# --- torchdata StatefulDataLoader -----------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")
def test_stateful_dataloader_checkpoint_resumes_remaining_batches(num_workers):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    ds = IndexDataset(97)

    def make():
        sampler = AdaptiveBatchSampler(ds, 2, num_replicas=2, rank=0, seed=6)
        sampler.set_epoch(3)
        loader = sdl.StatefulDataLoader(ds, batch_sampler=sampler, num_workers=num_workers)
        return sampler, loader

    # sizes change before the checkpoint (more than the prefetch window earlier when workers
    # prefetch) and, with num_workers=0, after it too: the resumed run repeats those calls.
    changes = {0: 4, 2: 3} if num_workers else {0: 4, 2: 3, 9: 6, 11: 1}
    sampler, loader = make()
    batches, state = [], None
    for k, batch in enumerate(loader):
        batches.append(batch.tolist())
        if k in changes:
            sampler.set_batch_size(changes[k])
        if k == 8:
            state = loader.state_dict()
    assert list(itertools.chain.from_iterable(batches)) == reference(97, 2, 0, seed=6, epoch=3)

    sampler, loader = make()
    loader.load_state_dict(state)
    resumed = []
    for k, batch in enumerate(loader, start=9):
        resumed.append(batch.tolist())
        if k in changes:
            sampler.set_batch_size(changes[k])
    assert resumed == batches[9:]


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-2), "batch_size"),
        (dict(batch_size=2.0), "batch_size"),
        (dict(batch_size=True), "batch_size"),
        (dict(batch_size="4"), "batch_size"),
        (dict(batch_size=None), "batch_size"),
        (dict(max_batch_size=0), "max_batch_size"),
        (dict(max_batch_size=8.5), "max_batch_size"),
        (dict(max_batch_size=True), "max_batch_size"),
        (dict(batch_size=9, max_batch_size=8), "batch_size: 9"),
        (dict(num_replicas=0), "num_replicas"),
        (dict(num_replicas=2.0), "num_replicas"),
        (dict(num_replicas=4, rank=4), "rank"),
        (dict(rank=-1), "rank"),
        (dict(rank=1), "rank"),  # num_replicas defaults to 1 without a process group
        (dict(shuffle=1), "shuffle"),
        (dict(drop_last="no"), "drop_last"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    kwargs = {"batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        AdaptiveBatchSampler(IndexDataset(10), **kwargs)


@pytest.mark.parametrize("value", [0, -1, 3.0, 2.5, True, False, None, "8", torch.tensor(4)])
def test_bad_set_batch_size(value):
    sampler = AdaptiveBatchSampler(IndexDataset(10), 4)
    with pytest.raises(ValueError, match="Invalid batch_size"):
        sampler.set_batch_size(value)
    assert sampler.batch_size == 4


@pytest.mark.parametrize("value", [1.0, None, "1"])
def test_bad_set_epoch(value):
    with pytest.raises(ValueError, match="Invalid epoch"):
        AdaptiveBatchSampler(IndexDataset(10), 4).set_epoch(value)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"position": 6}, "position"),  # 5 samples per rank
        ({"position": -1}, "position"),
        ({"batch_size": 0}, "batch_size"),
        ({"epoch": 1.5}, "epoch"),
        ({"seed": None}, "seed"),
        ({"seed": "missing"}, "missing"),
    ],
)
def test_bad_load_state_dict(change, match):
    sampler = AdaptiveBatchSampler(IndexDataset(10), 4, num_replicas=2, rank=0)
    state = {**sampler.state_dict(), **change}
    if change.get("seed") == "missing":
        del state["seed"]
    before = sampler.state_dict()
    with pytest.raises(ValueError, match=match):
        sampler.load_state_dict(state)
    assert sampler.state_dict() == before


# --- micro_batches --------------------------------------------------------------------------------


def test_micro_batches_structures():
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    chunks = micro_batches((x, y), 4)
    assert [len(c[1]) for c in chunks] == [4, 4, 2]
    assert all(isinstance(c, tuple) for c in chunks)
    assert torch.equal(torch.cat([c[0] for c in chunks]), x)
    assert chunks[1][0].data_ptr() == x[4].data_ptr()  # views, not copies

    assert [c.tolist() for c in micro_batches(y, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert len(micro_batches(y, 10)) == 1 and len(micro_batches(y, 11)) == 1
    assert micro_batches(torch.empty(0, 3), 2) == []

    Pair = namedtuple("Pair", "x y")
    nested = OrderedDict(inp=Pair(x, y), extra=[y, {"w": x}])
    chunks = micro_batches(nested, 6)
    assert len(chunks) == 2 and type(chunks[0]) is OrderedDict
    assert type(chunks[1]["inp"]) is Pair and torch.equal(chunks[1]["inp"].y, y[6:])
    assert isinstance(chunks[1]["extra"], list)
    assert torch.equal(chunks[1]["extra"][1]["w"], x[6:])


@pytest.mark.parametrize(
    "batch,size,error,match",
    [
        (torch.zeros(4), 0, ValueError, "micro_batch_size"),
        (torch.zeros(4), 2.0, ValueError, "micro_batch_size"),
        (torch.zeros(4), True, ValueError, "micro_batch_size"),
        ((torch.zeros(4), torch.zeros(5)), 2, ValueError, "differ"),
        (torch.tensor(1.0), 2, ValueError, "0-dim"),
        ((), 2, ValueError, "no tensor"),
        ((torch.zeros(4), ["a", "b", "c", "d"]), 2, TypeError, "str"),
    ],
)
def test_micro_batches_bad_input(batch, size, error, match):
    with pytest.raises(error, match=match):
        micro_batches(batch, size)


@pytest.mark.parametrize("micro_batch_size", [1, 3, 7, 13, 100])
def test_micro_batch_accumulation_equals_full_batch_gradient(micro_batch_size):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.double()
    x, y = torch.randn(29, 5, dtype=torch.float64), torch.randint(0, 3, (29,))

    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    full = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    for xb, yb in micro_batches((x, y), micro_batch_size):
        (F.cross_entropy(model(xb), yb) * (len(yb) / len(y))).backward()
    for p, g in zip(model.parameters(), full):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_drop_last_batch_with_a_growing_batch_and_resume():
    """The tail is judged against the batch size in force; every rank drops alike; a state
    saved with it refuses a sampler without it."""
    ds = IndexDataset(50)
    batches = []
    for rank in range(2):
        s = AdaptiveBatchSampler(ds, 4, num_replicas=2, rank=rank, shuffle=False,
                                 drop_last_batch=True)
        got = []
        for b in s:
            got.append(b)
            s.set_batch_size(len(got) * 4 + 4)  # 4, 8, 12, 16: 25 indices per rank -> 4+8+12 = 24
        batches.append(got)
        assert [len(b) for b in got] == [4, 8, 12]  # the last, 1 index < 16, is dropped
        assert got[0] == list(range(rank, 8, 2))
        assert len(s) == 25 // 16  # a new epoch at the batch size in force
    state = s.state_dict()
    assert state["drop_last_batch"] is True
    other = AdaptiveBatchSampler(ds, 4, num_replicas=2, rank=1, shuffle=False)
    with pytest.raises(ValueError, match="drop_last_batch"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="drop_last_batch"):
        AdaptiveBatchSampler(ds, 4, drop_last_batch=1)
