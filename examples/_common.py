r"""Small helpers shared by the example scripts (not part of the library).

The learning-rate schedule, ``key=value`` model arguments, rank/world and a summed all-reduce that
also work without torch.distributed, the data-order hash, targets in a run's records, JSON files.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``["patch_size=4", "drop_rate=0.1", "act_layer=gelu"]`` -> a dict (Python literals, else
    strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"Invalid model kwarg: {item!r} (expected key=value)")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


# ----------------------------------------------------------------------------- learning rate


def lr_at(
    samples: float, budget: float, base_lr: float, warmup: float = 0.05, min_lr: float = 0.0
) -> float:
    r"""Linear warm-up then cosine decay, indexed by the samples seen over all workers.

    With :math:`s` the samples seen after the step about to be taken, :math:`S` the budget,
    :math:`w = \texttt{warmup} \cdot S` and :math:`p = \frac{s - w}{S - w}` clipped to
    :math:`[0, 1]`:

    .. math::
        \mathrm{lr}(s) = \begin{cases}
            \mathrm{lr}_0\, s / w & s < w \\
            \mathrm{lr}_{\min} + (\mathrm{lr}_0 - \mathrm{lr}_{\min}) \frac{1 + \cos \pi p}{2}
                & s \ge w
        \end{cases}

    with :math:`\mathrm{lr}_{\min} = \texttt{min\_lr} \cdot \mathrm{lr}_0`: the schedule
    ``train.py`` runs as ``local_opt.SampleLR(opt, local_opt.warmup_cosine(warmup, min_lr),
    budget)``, kept here as its closed form; the batch-size policy multiplies it during each step
    by its learning-rate coupling factor.
    """
    w = warmup * budget
    if samples < w:
        return base_lr * samples / w
    p = min(1.0, max(0.0, (samples - w) / max(budget - w, 1e-12)))
    lo = min_lr * base_lr
    return lo + (base_lr - lo) * 0.5 * (1.0 + math.cos(math.pi * p))


# -------------------------------------------------------------------------- distributed utils


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``, ``(0, 1)`` without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over the ranks in place (nothing without torch.distributed); return it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def collate_batch(batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``collate_fn`` for datasets whose ``__getitems__`` already made the batch."""
    return batch


def order_hash(indices: Tensor, previous: int = 0) -> int:
    """CRC-32 of a batch's sample indices, chained onto ``previous`` (the round's hash so far)."""
    return zlib.crc32(indices.to(torch.int64).cpu().numpy().tobytes(), previous)


# --------------------------------------------------------------------------------- summaries


def rounds_to_target(
    records: list[dict[str, Any]],
    target: float | None,
    key: str = "val_acc",
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """Round, samples, bytes and wall time of the first record whose ``key`` reaches ``target``
    (``>=`` when ``higher_is_better``, else ``<=``); None entries if none does."""
    for r in records:
        v = r.get(key)
        if target is None or v is None:
            continue
        if v >= target if higher_is_better else v <= target:
            return {
                "rounds_to_target": r["round"],
                "samples_to_target": r["samples"],
                "bytes_to_target": r["bytes_communicated"],
                "wall_time_to_target": r["wall_time"],
            }
    return dict.fromkeys(
        ("rounds_to_target", "samples_to_target", "bytes_to_target", "wall_time_to_target")
    )


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def marker(name: str) -> tuple[str, str]:
    """The comment lines that enclose a generated block ``name`` in a Markdown file."""
    return f"<!-- generated: {name} -->", f"<!-- /generated: {name} -->"


def replace_block(path: str, name: str, lines: Sequence[str]) -> None:
    """Replace the text between :func:`marker`'s two lines in ``path`` with ``lines``: numbers in
    a hand-written README come from the program that measured them, never from a copy."""
    begin, end = marker(name)
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no generated block {name!r} (the lines {begin} and {end})")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)


def git_commit(short: bool = False) -> str:
    """HEAD of the repository holding this file, ``+dirty`` if tracked files changed, or
    ``"unknown"`` outside a git checkout: the code a generated table or run came from."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rev = ["git", "-C", root, "rev-parse", *(["--short"] if short else []), "HEAD"]
    status = ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"]
    try:
        head = subprocess.run(rev, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(status, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
