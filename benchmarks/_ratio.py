"""Ratios against a baseline measured in the same run, for the pytest-benchmark suite.

``interleaved_ratio(new, base)`` calls the two functions alternately (so drift in machine load hits
both alike) and returns ``median(new) / median(base)`` with the medians. Under
``--benchmark-disable`` (how ``make test`` runs this folder) callers pass tiny sizes and few repeats,
so the benchmarks run as quick smoke tests and cannot rot.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import torch


def quick(request: Any) -> bool:
    """True when benchmarks are disabled (the test suite): use tiny sizes."""
    return bool(request.config.getoption("benchmark_disable", False))


def device() -> torch.device:
    """Where benchmarks put their tensors: ``LOCAL_OPT_BENCH_DEVICE`` (``make gpu-check`` sets
    ``cuda``), the CPU by default."""
    return torch.device(os.environ.get("LOCAL_OPT_BENCH_DEVICE", "cpu"))


def _sync() -> None:
    """Wait for queued CUDA kernels, so a timing covers the work and not just its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_ratio(
    new: Callable[[], Any], base: Callable[[], Any], repeats: int = 20, warmup: int = 2
) -> dict[str, float]:
    for _ in range(warmup):
        new()
        base()
    t_new, t_base = [], []
    for i in range(repeats):
        pair = ((new, t_new), (base, t_base)) if i % 2 == 0 else ((base, t_base), (new, t_new))
        for fn, sink in pair:
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            sink.append(time.perf_counter() - t0)
    m_new, m_base = statistics.median(t_new), statistics.median(t_base)
    return {"ratio": m_new / m_base, "new_s": m_new, "base_s": m_base}


def record(benchmark: Any, name: str, result: dict[str, float], goal: float | None = None) -> None:
    """Put a measured ratio in the benchmark's extra_info (saved in the JSON) and print it."""
    benchmark.extra_info[f"{name}_ratio"] = round(result["ratio"], 4)
    benchmark.extra_info[f"{name}_new_s"] = result["new_s"]
    benchmark.extra_info[f"{name}_base_s"] = result["base_s"]
    if goal is not None:
        benchmark.extra_info[f"{name}_goal"] = goal
    print(f"\n{name}: {result['ratio']:.3f}x ({result['new_s'] * 1e3:.3f} ms vs "
          f"{result['base_s'] * 1e3:.3f} ms)" + (f", goal <= {goal}x" if goal else ""))
