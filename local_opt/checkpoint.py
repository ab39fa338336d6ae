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
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from typing import Any, Protocol

import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_checkpoint"]

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


def _config(pieces: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must be loaded under: the world size and each piece's ``sync_every``."""
    config: dict[str, Any] = {"world_size": _world_size()}
    for name, piece in pieces.items():
        sync_every = getattr(piece, "sync_every", None)
        if isinstance(sync_every, int) and not isinstance(sync_every, bool):
            config[f"{name}.sync_every"] = sync_every
    return config


def save_checkpoint(path: str | os.PathLike[str], extra: dict[str, Any] | None = None,
                    **pieces: _Stateful) -> None:
    r"""Write ``{name: piece.state_dict()}`` for every keyword, plus the RNG states, to ``path``.

    The file is written to ``path + ".tmp"`` and renamed, so a crash never leaves a torn
    checkpoint. In a distributed run give every rank its own path (e.g. ``f"ckpt.{rank}.pt"``):
    the sampler's position and the local models between rounds differ across ranks. The world
    size and every piece's ``sync_every`` (e.g. the :class:`~local_opt.LocalOptimizer`'s) are
    saved with it, for :func:`load_checkpoint` to check.

    Args:
        path: the file to write.
        extra (dict, optional): anything else to keep with it (e.g. the epoch, the round
            number), made of what the pieces may hold (see below).
        **pieces: objects with ``state_dict()``, e.g. ``model=model, optimizer=opt,
            sampler=sampler, batch_size_policy=vt``.

    Raises:
        TypeError: if a piece has no ``state_dict()``, or if a piece's state or ``extra`` holds
            something ``torch.load(weights_only=True)`` cannot load — anything but tensors,
            numbers, strings, bytes, ``None``, ``torch.Size`` / ``dtype`` / ``device``, and
            lists, tuples, sets and dicts of them. The message names where it is, e.g.
            ``optimizer.state.3.foo``. Nothing is written then.

    .. note::
        ``iter(DataLoader(...))`` draws a seed from torch's global RNG (for its workers). A resumed
        run starts a new iterator mid-epoch where the uninterrupted run did not, so give the
        loader its own ``generator=torch.Generator()`` to keep the global RNG (dropout, drop-path)
        on the same sequence.

    Example::

        >>> save_checkpoint(f"ckpt.{rank}.pt", extra={"epoch": epoch},
        ...                 model=model, optimizer=opt, sampler=sampler)
        >>> ...  # a new process, fresh objects built the same way
        >>> start_epoch = load_checkpoint(f"ckpt.{rank}.pt", model=model, optimizer=opt,
        ...                               sampler=sampler)["epoch"]
    """
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
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = None,
                    restore_rng: bool = True, weights_only: bool = True,
                    **pieces: _Stateful) -> dict[str, Any]:
    r"""Load what :func:`save_checkpoint` wrote into the given objects; return its ``extra``.

    The checks come first, so a refused checkpoint leaves the objects and the RNG as they were
    (except that a piece that refuses its own state, such as a sampler built with another
    configuration, does so after the pieces before it were loaded).

    Args:
        path: the file :func:`save_checkpoint` wrote.
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
            ``sync_every`` than the given pieces have; the message names the value, the saved
            one and the current one. A piece's own ``load_state_dict`` may refuse its state in
            the same way (the ``AdaptiveBatchSampler`` does for another dataset length,
            ``num_replicas``, ``shuffle``, ``drop_last`` or ``seed``).
        KeyError: if a piece is missing from the file.

    .. note::
        To read just the weights elsewhere (another world size, an evaluation script), load the
        file yourself: ``torch.load(path, weights_only=True)["pieces"]["model"]``.
    """
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
