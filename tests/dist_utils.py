"""Run a function on real gloo ranks, for tests and benchmarks.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes with
``torch.multiprocessing`` (spawn start method), initializes a gloo process group through a
``file://`` init method in a fresh temporary folder, calls ``fn(rank, world_size, *args)`` on
each, and returns the list of the ranks' return values (they must be picklable by ``torch.save``).
A rank that raises fails the call with its traceback; a run that exceeds ``timeout`` seconds is
killed and raises ``TimeoutError`` so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    tmpdir: str,
    pg_timeout: float,
    args: tuple[Any, ...],
    backend: str = "gloo",
) -> None:
    faulthandler.enable()  # a crash in C++ (SIGABRT, SIGSEGV) prints the Python stacks
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        backend,
        init_method=f"file://{os.path.join(tmpdir, 'rendezvous')}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=pg_timeout),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(tmpdir, f"result_{rank}.pt"))
    except BaseException:
        with open(os.path.join(tmpdir, f"error_{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization: now and then (about 1 run in 25 of the sync
    # benchmark here) a gloo background thread aborted the process during it ("terminate called
    # without an active exception", SIGABRT with no Python frame) after the result was saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 60.0,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo unless ``backend`` says
    otherwise, e.g. ``"nccl"``); return their results."""
    tmpdir = tempfile.mkdtemp(prefix="local_opt_dist_")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children at spawn
    try:
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, tmpdir, pg_timeout, args, backend),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"distributed run of {fn.__name__} on {world_size} ranks "
                        f"exceeded {timeout:.0f} s"
                    )
        except mp.ProcessRaisedException as e:
            errors = [
                open(os.path.join(tmpdir, f)).read()
                for f in sorted(os.listdir(tmpdir))
                if f.startswith("error_")
            ]
            raise RuntimeError("\n".join(errors) or str(e)) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [
            torch.load(os.path.join(tmpdir, f"result_{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
        shutil.rmtree(tmpdir, ignore_errors=True)
