r"""Run a function on every rank: self-spawned gloo processes, torchrun, or this process alone.

Shared by ``train.py``, ``compare.py`` and ``paper.py``:

* ``nproc > 1``: ``nproc`` processes spawned with ``torch.multiprocessing`` (``spawn``), joined in
  a process group through a ``file://`` rendezvous in a fresh temporary folder (gloo on CPU, nccl
  on CUDA); each sets ``LOCAL_RANK`` and its CPU threads (``cpu_count // nproc`` unless given).
* otherwise, under torchrun (``WORLD_SIZE > 1`` in the environment): this process joins torchrun's
  group.
* otherwise: the function runs here, without torch.distributed.
"""

from __future__ import annotations

import multiprocessing.util
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def device_of(kind: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` (GPU ``LOCAL_RANK``) or ``"auto"`` (cuda when available)."""
    use_cuda = kind == "cuda" or (kind == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def exit_worker() -> None:
    """End a spawned rank that finished cleanly without interpreter finalization.

    A gloo background thread occasionally aborts the process during finalization ("terminate
    called without an active exception", SIGABRT, after all the work is done); seen about once in
    25 short runs of this repository's 2-rank tests. The outputs are written and closed by now.
    ``multiprocessing``'s exit finalizers still run first: they unlink the named semaphores the
    rank created (tqdm's write lock is one), which the parent's resource tracker otherwise reports
    as "leaked semaphore objects" when the run ends.
    """
    multiprocessing.util._run_finalizers(0)  # what a normal exit runs (exit priority >= 0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawned(
    rank: int,
    fn: Callable[..., Any],
    fn_args: tuple,
    world: int,
    init_method: str,
    device: str,
    threads: int,
    timeout: float,
) -> None:
    """Entry point of a self-spawned rank."""
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    dev = device_of(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        "nccl" if dev.type == "cuda" else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout),
    )
    try:
        fn(*fn_args)
    finally:
        dist.destroy_process_group()
    exit_worker()


def launch(
    fn: Callable[..., Any],
    fn_args: tuple = (),
    nproc: int = 0,
    device: str = "cpu",
    threads: int = 0,
    timeout: float = 300.0,
) -> Any:
    """Call ``fn(*fn_args)`` on every rank as described in the module docstring.

    Returns ``fn``'s result when it ran in this process (alone or under torchrun), None when it
    ran in spawned processes (which write their results to files). ``fn`` and its arguments must
    be picklable for ``nproc > 1``; a failing rank raises here
    (``torch.multiprocessing.ProcessRaisedException``).
    """
    if nproc > 1:
        with tempfile.TemporaryDirectory(prefix="local_opt_launch_") as d:
            mp.start_processes(
                _spawned,
                args=(fn, fn_args, nproc, f"file://{os.path.join(d, 'rendezvous')}", device,
                      threads, timeout),
                nprocs=nproc,
                start_method="spawn",
            )
        return None
    if threads:
        torch.set_num_threads(threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        dev = device_of(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout)
        )
        try:
            return fn(*fn_args)
        finally:
            dist.destroy_process_group()
    return fn(*fn_args)
