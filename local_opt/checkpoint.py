r"""Save and load a whole training state in one call, one ``state_dict`` per piece.

Every piece of a Local SGD run — the model, the :class:`~local_opt.LocalOptimizer`, the
``AdaptiveBatchSampler``, the :class:`~local_opt.VarianceTest` or batch-size schedule, an LR
scheduler — follows torch's convention of ``state_dict()`` / ``load_state_dict()``. These two
functions save all of them, plus the RNG states that make the continuation bit-for-bit, into one
file per rank.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch

__all__ = ["save_checkpoint", "load_checkpoint"]


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def save_checkpoint(path: str | os.PathLike[str], extra: dict[str, Any] | None = None,
                    **pieces: _Stateful) -> None:
    r"""Write ``{name: piece.state_dict()}`` for every keyword, plus the RNG states, to ``path``.

    The file is written to ``path + ".tmp"`` and renamed, so a crash never leaves a torn
    checkpoint. In a distributed run give every rank its own path (e.g. ``f"ckpt.{rank}.pt"``):
    the sampler's position and the local models between rounds differ across ranks.

    Args:
        path: the file to write.
        extra (dict, optional): anything else picklable to keep with it (e.g. the round number).
        **pieces: objects with ``state_dict()``, e.g. ``model=model, optimizer=opt,
            sampler=sampler, batch_size_policy=vt``.

    .. note::
        ``iter(DataLoader(...))`` draws a seed from torch's global RNG (for its workers). A resumed
        run starts a new iterator mid-epoch where the uninterrupted run did not, so give the
        loader its own ``generator=torch.Generator()`` to keep the global RNG (dropout, drop-path)
        on the same sequence.

    Example::

        >>> save_checkpoint(f"ckpt.{rank}.pt", model=model, optimizer=opt, sampler=sampler)
        >>> ...  # a new process, fresh objects built the same way
        >>> load_checkpoint(f"ckpt.{rank}.pt", model=model, optimizer=opt, sampler=sampler)
    """
    for name, piece in pieces.items():
        if not callable(getattr(piece, "state_dict", None)):
            raise TypeError(f"Invalid {name}: {type(piece).__name__} has no state_dict()")
    state = {
        "pieces": {name: piece.state_dict() for name, piece in pieces.items()},
        "rng": {"torch": torch.get_rng_state()},
        "extra": dict(extra or {}),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = None,
                    restore_rng: bool = True, **pieces: _Stateful) -> dict[str, Any]:
    r"""Load what :func:`save_checkpoint` wrote into the given objects; return its ``extra``.

    Args:
        path: the file :func:`save_checkpoint` wrote.
        map_location: as in :func:`torch.load` (default: None).
        restore_rng (bool): also restore torch's (and CUDA's) RNG states (default: True).
        **pieces: the objects to load into, under the names they were saved with. A name that is
            missing from the file raises ``KeyError``; a saved piece not asked for is ignored.
    """
    state = torch.load(path, map_location=map_location, weights_only=False)
    saved = state["pieces"]
    missing = [name for name in pieces if name not in saved]
    if missing:
        raise KeyError(f"checkpoint {os.fspath(path)!r} has no {missing} (it has {sorted(saved)})")
    for name, piece in pieces.items():
        piece.load_state_dict(saved[name])
    if restore_rng:
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["extra"]
