"""Cost of exact per-sample variance statistics vs one plain training step (forward + backward).

For timm resnet18 (train mode) and vit_tiny (img 32, patch 4), b=32, 3x32x32, on CPU:

* ``step``: ``loss.backward()`` on the batch, the baseline;
* ``hooks``: :func:`hooks_grad_stats` plus one ``inner_sq_sum`` at the mean gradient, the whole
  cost of a suggestion minus pooling and communication (goal <= 1.5x the step);
* ``vmap``: ``torch.func`` per-sample gradients of the same batch (resnet18 in eval mode: vmap
  cannot run BatchNorm in training mode on single samples); one round, it is slow.

``capture`` is the training step with :class:`StatsCapture` (the statistics ride on its own
backward), against the step followed by the separate pass.

Peak memory above the model and batch is measured per method in a fresh subprocess (the
high-water mark of the resident size during a second call minus the resident size before it). Threads: one, unless
``LOCAL_OPT_BENCH_THREADS`` says otherwise (one is far steadier on a shared 2-core machine).
Under ``--benchmark-disable`` (the test suite) everything runs once on b=4 (vmap b=2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from _ratio import interleaved_ratio, quick, record
from torch import nn

from local_opt.backends.hooks import StatsCapture, hooks_grad_stats

MODELS = ["resnet18", "vit_tiny"]
THREADS = int(os.environ.get("LOCAL_OPT_BENCH_THREADS", "1"))


def make(name: str, batch: int, train: bool = True) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    if name == "resnet18":
        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    else:
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10
        )
    model.train(train)
    return model, torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def hooks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    stats = hooks_grad_stats(model, F.cross_entropy, x, y)
    return float(stats.inner_sq_sum([g / len(x) for g in stats.grad_sum]))


def vmap_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_loss(pr, xi, yi):
        return F.cross_entropy(functional_call(model, (pr, buffers), (xi[None],)), yi[None])

    g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    return sum(t.pow(2).sum() for t in g.values())


def step_with_capture(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The training step with the statistics riding on its backward (:class:`StatsCapture`)."""
    model.zero_grad(set_to_none=True)
    with StatsCapture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    stats = cap.grad_stats()
    return float(stats.inner_sq_sum([g / len(x) for g in stats.grad_sum]))


def step_then_hooks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The training step followed by the separate statistics pass."""
    step(model, x, y)
    return hooks(model, x, y)


METHODS = {"step": step, "hooks": hooks, "vmap": vmap_grads, "capture": step_with_capture}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_child(name: str, method: str, batch: int) -> None:
    """Subprocess body: print the peak memory (MiB) that one call of ``method`` adds.

    The method runs once first (libraries' lazy initialization, kernel caches), then freed memory
    is handed back to the system (``malloc_trim``), the kernel's high-water mark is reset
    (``/proc/self/clear_refs``), and the second call's peak above the resident size is reported.
    """
    import ctypes
    import gc

    from local_opt.backends.hooks import release_workspaces

    torch.set_num_threads(THREADS)
    model, x, y = make(name, batch, train=method != "vmap" or name != "resnet18")
    METHODS[method](model, x, y)
    release_workspaces()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    METHODS[method](model, x, y)
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_mib(name: str, method: str, batch: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, name, method, str(batch)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


@pytest.mark.timeout(1800)
@pytest.mark.benchmark(group="variance-hooks")
@pytest.mark.parametrize("name", MODELS)
def test_bench_hooks_vs_step(benchmark, request, name):
    pytest.importorskip("timm")
    small = quick(request)
    batch = 4 if small else 32
    torch.set_num_threads(THREADS)
    model, x, y = make(name, batch)
    res = interleaved_ratio(
        lambda: hooks(model, x, y), lambda: step(model, x, y), repeats=1 if small else 15
    )
    record(benchmark, f"{name}_hooks_vs_step", res, goal=1.5)
    benchmark.extra_info["threads"] = THREADS
    if not small:
        for method in ("step", "hooks"):
            benchmark.extra_info[f"{name}_{method}_peak_mib"] = round(
                peak_mib(name, method, batch), 1
            )
    q = benchmark.pedantic(lambda: hooks(model, x, y), rounds=1 if small else 5, warmup_rounds=1)
    assert q > 0


@pytest.mark.timeout(1800)
@pytest.mark.benchmark(group="variance-capture")
@pytest.mark.parametrize("name", MODELS)
def test_bench_capture_vs_separate_pass(benchmark, request, name):
    pytest.importorskip("timm")
    small = quick(request)
    batch = 4 if small else 32
    torch.set_num_threads(THREADS)
    model, x, y = make(name, batch)
    repeats = 1 if small else 15
    res = interleaved_ratio(
        lambda: step_with_capture(model, x, y), lambda: step(model, x, y), repeats
    )
    record(benchmark, f"{name}_step_with_capture_vs_step", res)
    res = interleaved_ratio(
        lambda: step_then_hooks(model, x, y), lambda: step(model, x, y), repeats
    )
    record(benchmark, f"{name}_step_then_separate_pass_vs_step", res)
    benchmark.extra_info["threads"] = THREADS
    if not small:
        benchmark.extra_info[f"{name}_capture_peak_mib"] = round(
            peak_mib(name, "capture", batch), 1
        )
    q = benchmark.pedantic(
        lambda: step_with_capture(model, x, y), rounds=1 if small else 5, warmup_rounds=1
    )
    assert q > 0


@pytest.mark.timeout(3600)
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.benchmark(group="variance-vmap")
@pytest.mark.parametrize("name", MODELS)
def test_bench_vmap_vs_step(benchmark, request, name):
    pytest.importorskip("timm")
    small = quick(request)
    batch = 2 if small else 32
    torch.set_num_threads(THREADS)
    model, x, y = make(name, batch)
    base = min(_timed(lambda: step(model, x, y)) for _ in range(3 if small else 7))
    model.train(name != "resnet18")
    t0 = time.perf_counter()
    total = benchmark.pedantic(lambda: vmap_grads(model, x, y), rounds=1, warmup_rounds=0)
    res = {
        "ratio": (time.perf_counter() - t0) / base,
        "new_s": time.perf_counter() - t0,
        "base_s": base,
    }
    record(benchmark, f"{name}_vmap_vs_step", res)
    benchmark.extra_info["threads"] = THREADS
    if not small:
        benchmark.extra_info[f"{name}_vmap_peak_mib"] = round(peak_mib(name, "vmap", batch), 1)
    assert total > 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":  # the subprocess of peak_mib
    peak_child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
