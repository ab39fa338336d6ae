r"""Save and load a whole training state in one call, one ``state_dict`` per piece.

Every piece of a Local SGD run — the model, the :class:`~local_opt.LocalOptimizer`, the
``AdaptiveBatchSampler``, the :class:`~local_opt.VarianceTest` or batch-size schedule, an LR
scheduler — follows torch's convention of ``state_dict()`` / ``load_state_dict()``. These two
functions save all of them, plus the RNG states that make the continuation bit-for-bit, into one
file per rank.

A checkpoint holds only what ``torch.load(weights_only=True)`` loads (tensors, numbers, strings,
``None``, and lists, tuples, sets and dicts of them), so loading one never runs code from the
file: :func:`save_checkpoint` refuses anything else and names where it is, :func:`load_checkpoint`
loads with ``weights_only=True``. It also records the run's world size and every piece's
``sync_every``; :func:`load_checkpoint` refuses a checkpoint whose values differ from the objects
it loads into.

**A directory or a file.** ``path`` names a checkpoint *directory* when it is an existing
directory, or when it does not exist and its last component has no suffix (``"ckpt"``,
``"runs/step_1000"``, ``"ckpt/"``); then every rank writes its own file ``rank00000.pt``,
``rank00001.pt``, ... into it and rank 0 a ``manifest.json`` (format version, world size, the
pieces' counters and ``sync_every``), and loading picks this rank's file. Anything else
(``"ckpt.pt"``, ``f"ckpt.{rank}.pt"``) is a single file, one per rank as before.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import time
from collections import OrderedDict
from typing import Any, Protocol

import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_checkpoint"]

#: The manifest rank 0 writes into a checkpoint directory, and its format version.
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
#: Counters of the pieces (e.g. a LocalOptimizer's) copied into the manifest, for people and tools.
_COUNTERS = ("steps", "num_syncs", "local_step", "sync_every", "warmup_steps", "epoch")

# Exact types torch.load(weights_only=True) loads: containers to look into, and leaves.
_CONTAINERS = (dict, OrderedDict, list, tuple, set)
_LEAVES = (
    bool, int, float, complex, str, bytes, bytearray, type(None),
    torch.Tensor, torch.nn.Parameter, torch.Size, torch.dtype, torch.device, torch.layout,
)  # fmt: skip


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def _weights_only_loads(obj: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``obj`` back (an in-memory round trip,
    for the rare objects :func:`_check_weights_only` does not know by type)."""
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


def _check_weights_only(obj: Any, path: str) -> None:
    """Raise ``TypeError`` naming the first place in ``obj`` (``path.key.index...``) that
    ``torch.load(weights_only=True)`` would refuse."""
    kind = type(obj)
    if kind in _LEAVES:
        return
    if kind in _CONTAINERS:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if type(key) not in _LEAVES:
                    _check_weights_only(key, f"{path}.<key {key!r}>")
                _check_weights_only(value, f"{path}.{key}")
        else:
            for i, value in enumerate(obj):
                _check_weights_only(value, f"{path}.{i}")
        return
    if not _weights_only_loads(obj):  # e.g. a tensor subclass, or a type the user allowed
        raise TypeError(
            f"Invalid checkpoint content: {path} is a {kind.__module__}.{kind.__qualname__}, "
            "which torch.load(weights_only=True) does not load; store tensors, numbers, "
            "strings, None, and lists, tuples, sets and dicts of them"
        )


def _reason(error: Exception) -> str:
    """The gist of torch's weights_only refusal, e.g. "Unsupported global: GLOBAL exec was not
    an allowed global by default"."""
    for line in str(error).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a checkpoint directory (see the module docstring): an existing
    directory, or a path that does not exist and whose last component has no suffix."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return True
    if os.path.exists(p):
        return False
    return p.endswith(("/", os.sep)) or os.path.splitext(p.rstrip("/" + os.sep))[1] == ""


def rank_file(rank: int) -> str:
    """The name of a rank's file in a checkpoint directory."""
    return f"rank{rank:05d}.pt"


def _atomic_save(obj: Any, path: str, rank: int) -> None:
    """``torch.save`` to a temporary name unique to this rank and process, then rename: ranks
    writing the same path never share a temporary file, and a crash never leaves a torn file."""
    tmp = f"{path}.tmp.{rank}.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree_on_save_id(path: str, timeout: float) -> int:
    """A random id from rank 0, the same on every rank: ties the ranks' files to one save.

    It is the save's first collective, and an all-reduce (rank 0's value plus zeros), which no
    rank completes before every rank joined it. It is waited for at most ``timeout`` seconds, so
    a save called on some ranks only (``if rank == 0: save_checkpoint(...)``) fails with a
    message saying so instead of blocking until the process group's timeout.
    """
    value = int.from_bytes(os.urandom(7), "little")
    if _world_size() == 1:
        return value
    t = torch.tensor([value if _rank() == 0 else 0], dtype=torch.int64,
                     device=_collective_device())
    work = dist.all_reduce(t, async_op=True)
    deadline = time.monotonic() + timeout
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"save_checkpoint({path!r}) on rank {_rank()} waited {timeout:g} s for the other "
                f"{_world_size() - 1} rank(s): saving to a directory is collective, so call it on "
                "every rank at the same point (not under `if rank == 0:`), or give each rank its "
                "own file (f'ckpt.{rank}.pt'). A slow rank needs a larger timeout= (seconds). The "
                "process group cannot be used after this error (a collective is pending).")
        time.sleep(0.005)
    work.wait()
    return int(t.item())


def _barrier() -> None:
    if _world_size() > 1:
        dist.all_reduce(torch.zeros(1, device=_collective_device()))


def _counters(pieces: dict[str, Any]) -> dict[str, int]:
    out = {}
    for name, piece in pieces.items():
        for attr in _COUNTERS:
            value = getattr(piece, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                out[f"{name}.{attr}"] = value
    return out


def _json_or_none(obj: Any) -> Any:
    try:
        json.dumps(obj)
    except (TypeError, ValueError):
        return None
    return obj


def _config(pieces: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must be loaded under: the world size and each piece's ``sync_every``."""
    config: dict[str, Any] = {"world_size": _world_size()}
    for name, piece in pieces.items():
        sync_every = getattr(piece, "sync_every", None)
        if isinstance(sync_every, int) and not isinstance(sync_every, bool):
            config[f"{name}.sync_every"] = sync_every
    return config


def save_checkpoint(path: str | os.PathLike[str], extra: dict[str, Any] | None = None,
                    *, timeout: float = 600.0, **pieces: _Stateful) -> None:
    r"""Write ``{name: piece.state_dict()}`` for every keyword, plus the RNG states, to ``path``.

    Every rank saves its own state: the sampler's position and the local models between rounds
    differ across ranks. With a **directory** (``save_checkpoint("ckpt", ...)``, see the module
    docstring for the rule) each rank writes ``ckpt/rank0000<r>.pt`` and rank 0 writes
    ``ckpt/manifest.json`` after every rank's file is in place; the call is then *collective*
    (three small collectives: call it on every rank at the same point, like a round) and returns
    on every rank once the directory is complete. With a **file** path give every rank its own
    (``f"ckpt.{rank}.pt"``); no collective. Each file is written to a temporary name unique to the
    rank and process and renamed, so a crash never leaves a torn file and ranks never race on a
    temporary file. The rank, the world size and every piece's ``sync_every`` (e.g. the
    :class:`~local_opt.LocalOptimizer`'s) are saved with it, for :func:`load_checkpoint` to check.

    Args:
        path: the checkpoint directory, or the file to write.
        extra (dict, optional): anything else to keep with it (e.g. the epoch, the round
            number), made of what the pieces may hold (see below).
        timeout (float): with a directory, how many seconds a rank waits for the others to
            join the save before it raises ``RuntimeError`` (default: 600).
        **pieces: objects with ``state_dict()``, e.g. ``model=model, optimizer=opt,
            sampler=sampler, batch_size_policy=vt``.

    Raises:
        TypeError: if a piece has no ``state_dict()``, or if a piece's state or ``extra`` holds
            something ``torch.load(weights_only=True)`` cannot load — anything but tensors,
            numbers, strings, bytes, ``None``, ``torch.Size`` / ``dtype`` / ``device``, and
            lists, tuples, sets and dicts of them. The message names where it is, e.g.
            ``optimizer.state.3.foo``. Nothing is written then.
        ValueError: if ``timeout`` is not a positive number.
        RuntimeError: with a directory, if the other ranks did not join within ``timeout``.

    .. note::
        ``iter(DataLoader(...))`` draws a seed from torch's global RNG (for its workers). A resumed
        run starts a new iterator mid-epoch where the uninterrupted run did not, so give the
        loader its own ``generator=torch.Generator()`` to keep the global RNG (dropout, drop-path)
        on the same sequence.

    Example::

        >>> save_checkpoint("ckpt", extra={"epoch": epoch},  # on every rank
        ...                 model=model, optimizer=opt, sampler=sampler)
        >>> ...  # a new process, fresh objects built the same way
        >>> start_epoch = load_checkpoint("ckpt", model=model, optimizer=opt,
        ...                               sampler=sampler)["epoch"]

    .. warning::
        Calling it on rank 0 alone (``if rank == 0: save_checkpoint(...)``, as for a DDP model)
        loses the other ranks' state: with a directory it raises ``RuntimeError`` after
        ``timeout`` seconds, saying to call it on every rank; with a file the other ranks cannot
        load it (refused, naming the rank that saved it).
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"Invalid timeout: {timeout!r} (expected a number of seconds > 0)")
    for name, piece in pieces.items():
        if not callable(getattr(piece, "state_dict", None)):
            raise TypeError(f"Invalid {name}: {type(piece).__name__} has no state_dict()")
    saved = {name: piece.state_dict() for name, piece in pieces.items()}
    extra = dict(extra or {})
    for name, piece_state in saved.items():
        _check_weights_only(piece_state, name)
    _check_weights_only(extra, "extra")
    state = {
        "pieces": saved,
        "rng": {"torch": torch.get_rng_state()},
        "config": _config(pieces),
        "extra": extra,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    rank = _rank()
    state["rank"] = rank
    if not is_checkpoint_dir(path):
        _atomic_save(state, os.fspath(path), rank)
        return
    directory = os.fspath(path)
    os.makedirs(directory, exist_ok=True)
    state["save_id"] = save_id = _agree_on_save_id(directory, timeout)
    _atomic_save(state, os.path.join(directory, rank_file(rank)), rank)
    _barrier()  # every rank's file is in place before the manifest says the save is complete
    if rank == 0:
        world = _world_size()
        manifest = {
            "format": "local-opt checkpoint",
            "version": FORMAT_VERSION,
            "world_size": world,
            "save_id": save_id,
            "files": [rank_file(r) for r in range(world)],
            "pieces": sorted(pieces),
            "config": state["config"],
            "counters": _counters(pieces),
            "extra": _json_or_none(extra),
        }
        tmp = os.path.join(directory, f"{MANIFEST}.tmp.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(directory, MANIFEST))
    _barrier()  # the directory is complete when save_checkpoint returns, on every rank


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = None,
                    restore_rng: bool = True, weights_only: bool = True,
                    **pieces: _Stateful) -> dict[str, Any]:
    r"""Load what :func:`save_checkpoint` wrote into the given objects; return its ``extra``.

    The checks come first, so a refused checkpoint leaves the objects and the RNG as they were
    (except that a piece that refuses its own state, such as a sampler built with another
    configuration, does so after the pieces before it were loaded).

    Args:
        path: the directory or file :func:`save_checkpoint` wrote (the same rule tells them
            apart); from a directory, this rank's file.
        map_location: as in :func:`torch.load` (default: None).
        restore_rng (bool): also restore torch's (and CUDA's) RNG states (default: True).
        weights_only (bool): as in :func:`torch.load`: unpickle only tensors, numbers, strings
            and containers of them, never arbitrary objects, so a tampered file cannot run
            code. ``False`` loads any pickle: only for files you trust (default: True).
        **pieces: the objects to load into, under the names they were saved with. A name that is
            missing from the file raises ``KeyError``; a saved piece not asked for is ignored.

    Raises:
        pickle.UnpicklingError: if the file holds objects ``weights_only=True`` does not load.
        ValueError: if the checkpoint was saved with another world size or another
            ``sync_every`` than the given pieces have (the message names the value, the saved
            one and the current one), by another rank, or (in a directory) by another save than
            the manifest's. A piece's own ``load_state_dict`` may refuse its state in
            the same way (the ``AdaptiveBatchSampler`` does for another dataset length,
            ``num_replicas``, ``shuffle``, ``drop_last`` or ``seed``).
        KeyError: if a piece is missing from the file.
        FileNotFoundError: if there is no checkpoint, or a directory lacks its manifest or this
            rank's file (the message says that ``save_checkpoint`` must run on every rank).

    .. note::
        To read just the weights elsewhere (another world size, an evaluation script), load the
        file yourself: ``torch.load(path, weights_only=True)["pieces"]["model"]``.
    """
    expect: dict[str, Any] = {}
    if is_checkpoint_dir(path):
        path, expect = _rank_file_of(os.fspath(path))
    elif not os.path.exists(path) and _world_size() > 1:
        raise FileNotFoundError(
            f"No checkpoint file {os.fspath(path)!r} on rank {_rank()} of {_world_size()}: "
            "save_checkpoint must be called on every rank, each with its own path (e.g. "
            "f'ckpt.{rank}.pt'), or with a directory (one file per rank)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if not weights_only:
            raise
        raise pickle.UnpicklingError(
            f"Refusing to load checkpoint {os.fspath(path)!r}: it holds objects that "
            f"torch.load(weights_only=True) does not load ({_reason(e)}). save_checkpoint never "
            "writes such objects; pass weights_only=False only for a file you trust."
        ) from e
    saved = state["pieces"]
    missing = [name for name in pieces if name not in saved]
    if missing:
        raise KeyError(f"checkpoint {os.fspath(path)!r} has no {missing} (it has {sorted(saved)})")
    saved_config = state.get("config", {})  # absent from checkpoints of earlier versions
    for key, value in _config(pieces).items():
        if key in saved_config and saved_config[key] != value:
            raise ValueError(
                f"Invalid checkpoint {os.fspath(path)!r}: saved with {key}={saved_config[key]!r}, "
                f"but this run has {key}={value!r}"
            )
    _check_rank(os.fspath(path), state, expect)
    for name, piece in pieces.items():
        try:
            piece.load_state_dict(saved[name])
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"(loading piece {name!r} of checkpoint {os.fspath(path)!r})")
            raise
    if restore_rng:
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["extra"]


def _rank_file_of(directory: str) -> tuple[str, dict[str, Any]]:
    """This rank's file in a checkpoint directory, and what it must hold (rank, save id)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No checkpoint directory {directory!r}")
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(
            f"Checkpoint directory {directory!r} has no {MANIFEST}: the save did not finish "
            "(save_checkpoint on a directory is collective: call it on every rank)"
        )
    with open(manifest_path) as f:
        manifest = json.load(f)
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"Invalid checkpoint {directory!r}: format version {version!r}, this local-opt reads "
            f"versions up to {FORMAT_VERSION}"
        )
    world, rank = _world_size(), _rank()
    if manifest["world_size"] != world:
        raise ValueError(
            f"Invalid checkpoint {directory!r}: saved with world_size={manifest['world_size']}, "
            f"but this run has world_size={world}"
        )
    path = os.path.join(directory, rank_file(rank))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Checkpoint directory {directory!r} has no file for rank {rank} ({rank_file(rank)}): "
            "save_checkpoint must be called on every rank (each writes its own file), into a "
            "directory every rank can see"
        )
    return path, {"rank": rank, "save_id": manifest["save_id"]}


def _check_rank(path: str, state: dict[str, Any], expect: dict[str, Any]) -> None:
    """Refuse another rank's state, or a rank file from another save than the manifest's."""
    rank = expect.get("rank", _rank())
    saved = state.get("rank")  # absent from checkpoints of earlier versions
    if saved is not None and saved != rank:
        raise ValueError(
            f"Invalid checkpoint {path!r}: saved by rank {saved}, but this is rank {rank}. Every "
            "rank saves and loads its own state (its sampler position, its model between rounds): "
            "save_checkpoint must be called on every rank, each with its own path (e.g. "
            "f'ckpt.{rank}.pt'), or with a directory (one file per rank)"
        )
    if "save_id" in expect and state.get("save_id") != expect["save_id"]:
        raise ValueError(
            f"Invalid checkpoint {path!r}: this rank's file is from another save than the "
            f"directory's {MANIFEST} (a save that did not finish on every rank?)"
        )
