"""Cost of exact per-sample variance statistics vs one plain training step (forward + backward).

Models (b=32, CPU, float32), as in issue 12:

* ``resnet18`` (timm, 224 px, train mode) and ``resnet18_eval`` (the same in eval mode);
* ``vit_small`` (timm ``vit_small_patch16_224``, 224 px);
* ``convnext_atto`` (timm, 224 px);
* ``gpt``: a GPT-style decoder written here (d=256, 4 layers, 4 heads, context 256, vocabulary
  4096, learned positions, untied head), next-token loss averaged per sequence.

Measurements, each a ratio of medians against the baseline in the same process, interleaved:

* ``suggest``: ``VarianceTest(model, loss, test=..., backend="hooks").suggest(x, y, b)`` — the
  whole cost of a suggestion on one rank — vs ``step``: ``loss.backward()`` on the same batch
  (goal <= 1.5x), for the augmented test (per-sample norms and inner products) and the norm test;
* ``capture``: the training step inside ``VarianceTest.capture()`` plus ``suggest_from_capture``
  (the norm test's statistics computed layer by layer in the step's own backward) vs the step:
  goal <= 1.1x in time and <= 1.25x in peak memory (``LOCAL_OPT_BENCH_NORM_ONLY=1`` skips the
  second measurement: :class:`~local_opt.StatsCapture` with inner products, goal <= 1.2x);
* ``sizes``: resnet18 at 32, 64, 128 and 224 px (the cost model must hold across sizes);
* ``small``: the separate pass at b=16 on small models, where the fixed cost per layer and per
  tensor operation dominates (issue 20): timm's ``test_resnet`` (32 px, train mode), timm's
  ``test_vit`` (32 px, d=64) and ``gpt_d64`` (d=64, 2 layers, context 64, vocabulary 256), one
  ``VarianceTest`` reused across calls as in training, augmented and norm tests (goal <= 1.5x);
* ``vmap``: ``torch.func`` per-sample gradients (32 px models, one round; it is slow).

Under ``make gpu-check`` (``LOCAL_OPT_BENCH_DEVICE=cuda``) models and batches are on the GPU and
peak memory is the CUDA allocator's high-water mark above what was allocated before the call.
Otherwise peak memory is measured per method in a fresh subprocess: the kernel's high-water
mark of the resident size (``VmHWM`` after ``/proc/self/clear_refs``) during a second call, minus
the resident size before it (after ``malloc_trim``). The goal compares the *extra* peak of ``suggest`` over the
step's with the model's own activation memory: the bytes of the tensors autograd saves in one
training forward (``saved_tensors_hooks``, each storage counted once).

Threads: one, unless ``LOCAL_OPT_BENCH_THREADS`` says otherwise (one is far steadier on a shared
2-core machine); ``LOCAL_OPT_BENCH_REPEATS`` sets the interleaved repeats (default 7),
``LOCAL_OPT_BENCH_PEAKS=0`` skips the memory measurements. Under
``--benchmark-disable`` (the test suite) everything runs once at tiny sizes (b=4, 32 px, a small
GPT).
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
from _ratio import device, interleaved_ratio, quick, record
from torch import nn

from local_opt import StatsCapture, VarianceTest
from local_opt.backends.hooks import release_workspaces, unsupported_layers

THREADS = int(os.environ.get("LOCAL_OPT_BENCH_THREADS", "1"))
REPEATS = int(os.environ.get("LOCAL_OPT_BENCH_REPEATS", "7"))
PEAKS = os.environ.get("LOCAL_OPT_BENCH_PEAKS", "1") != "0"  # "0": skip the memory subprocesses
MODELS = ["resnet18", "resnet18_eval", "vit_small", "convnext_atto", "gpt"]
#: The models of the tiny run under ``--benchmark-disable`` (``make test``), by test.
QUICK = {"suggest": ("resnet18", "gpt"), "capture": ("resnet18", "gpt"), "sizes": (), "vmap": ()}


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = (
            z.view(n, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(self.ln1(x)).split(d, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(n, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT-style language model (token + learned position embeddings, untied head)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos[:, : ids.shape[1]])))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over each sequence, then over the batch."""
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return per_token.view(targets.shape).mean(1).mean()


def make(name: str, batch: int, px: int = 224, small: bool = False):
    """``(model, inputs, targets, loss_fn)`` for a benchmark model."""
    import timm

    torch.manual_seed(0)
    if name == "gpt":
        vocab, dim, layers, context = (64, 32, 2, 16) if small else (4096, 256, 4, 256)
        model = GPT(vocab, dim, layers, 4, context).to(device())
        ids = torch.randint(0, vocab, (batch, context + 1)).to(device())
        return model, ids[:, :-1], ids[:, 1:], lm_loss
    if name.startswith("resnet18"):
        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    elif name == "vit_small":
        model = timm.create_model(
            "vit_small_patch16_224", pretrained=False, num_classes=10, img_size=px
        )
    else:
        model = timm.create_model(name, pretrained=False, num_classes=10)
    model.train(not name.endswith("_eval"))
    x, y = torch.randn(batch, 3, px, px), torch.randint(0, 10, (batch,))
    return model.to(device()), x.to(device()), y.to(device()), F.cross_entropy


def step(model: nn.Module, x, y, loss_fn) -> None:
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()


def suggest(model: nn.Module, x, y, loss_fn, test: str = "augmented") -> int:
    vt = VarianceTest(model, loss_fn, test=test, backend="hooks")
    return vt.suggest(x, y, len(x))


def suggest_norm(model: nn.Module, x, y, loss_fn) -> int:
    return suggest(model, x, y, loss_fn, "norm")


def step_with_capture(model: nn.Module, x, y, loss_fn) -> float:
    """The training step with the statistics riding on its backward (:class:`StatsCapture`),
    inner products included (what the augmented test needs)."""
    model.zero_grad(set_to_none=True)
    with StatsCapture(model) as cap:
        loss_fn(model(x), y).backward()
    stats = cap.grad_stats()
    return float(stats.inner_sq_sum([g / len(x) for g in stats.grad_sum]))


def step_with_norm_test(model: nn.Module, x, y, loss_fn) -> int:
    """The default in-step path: the training step inside ``VarianceTest.capture()`` (norm test:
    per-sample squared norms only), then the suggestion (pooling, test, policy)."""
    model.zero_grad(set_to_none=True)
    vt = VarianceTest(model, loss_fn, min_dof=0)
    with vt.capture() as cap:
        loss_fn(model(x), y).backward()
    return vt.suggest_from_capture(cap, len(x))


METHODS = {
    "step": step,
    "suggest": suggest,
    "suggest_norm": suggest_norm,
    "capture": step_with_capture,
    "capture_norm": step_with_norm_test,
}


def activation_bytes(model: nn.Module, x, y, loss_fn) -> int:
    """Bytes of the tensors autograd saves in one training forward (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
    del loss
    return sum(b for ptr, b in seen.items() if ptr not in params and ptr != x.data_ptr())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_child(name: str, method: str, batch: int, px: int) -> None:
    """Subprocess body: print the peak memory (MiB) that one call of ``method`` adds.

    The method runs once first (libraries' lazy initialization, kernel caches), then freed memory
    is handed back to the system (``malloc_trim``), the kernel's high-water mark is reset
    (``/proc/self/clear_refs``), and the second call's peak above the resident size is reported.
    """
    import ctypes
    import gc

    torch.set_num_threads(THREADS)
    model, x, y, loss_fn = make(name, batch, px)
    if method == "activations":
        print(json.dumps({"peak_mib": activation_bytes(model, x, y, loss_fn) / 2**20}))
        return
    METHODS[method](model, x, y, loss_fn)
    release_workspaces()
    gc.collect()
    if x.is_cuda:  # the allocator's own high-water mark (make gpu-check)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        METHODS[method](model, x, y, loss_fn)
        torch.cuda.synchronize()
        print(json.dumps({"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}))
        return
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    METHODS[method](model, x, y, loss_fn)
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_mib(name: str, method: str, batch: int, px: int = 224) -> float:
    out = subprocess.run(
        [sys.executable, __file__, name, method, str(batch), str(px)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def _setup(request, name: str, px: int = 224, test: str = "suggest"):
    pytest.importorskip("timm")
    small = quick(request)
    if small and (px if test == "sizes" else name) not in QUICK[test]:
        pytest.skip(f"full size only (the tiny run covers {QUICK[test]})")
    batch, px = (4, 32) if small else (32, px)
    torch.set_num_threads(THREADS)
    model, x, y, loss_fn = make(name, batch, px, small)
    missing = unsupported_layers(model)
    if missing:
        pytest.skip(f"the hooks backend does not cover {name} yet: {missing[0]}")
    return small, batch, px, model, x, y, loss_fn


@pytest.mark.timeout(7200)
@pytest.mark.benchmark(group="variance-suggest")
@pytest.mark.parametrize("name", MODELS)
def test_bench_suggest_vs_step(benchmark, request, name):
    small, batch, px, model, x, y, loss_fn = _setup(request, name)
    repeats = 1 if small else REPEATS

    def base():
        step(model, x, y, loss_fn)

    res = interleaved_ratio(lambda: suggest(model, x, y, loss_fn), base, repeats, warmup=1)
    record(benchmark, f"{name}_suggest_augmented_vs_step", res, goal=1.5)
    res = interleaved_ratio(lambda: suggest_norm(model, x, y, loss_fn), base, repeats, warmup=1)
    record(benchmark, f"{name}_suggest_norm_vs_step", res, goal=1.5)
    benchmark.extra_info["threads"] = THREADS
    if not small and PEAKS:
        act = peak_mib(name, "activations", batch, px)
        benchmark.extra_info[f"{name}_activation_mib"] = round(act, 1)
        peaks = {m: peak_mib(name, m, batch, px) for m in ("step", "suggest", "suggest_norm")}
        for m, v in peaks.items():
            benchmark.extra_info[f"{name}_{m}_peak_mib"] = round(v, 1)
        for m in ("suggest", "suggest_norm"):
            extra = peaks[m] - peaks["step"]
            benchmark.extra_info[f"{name}_{m}_extra_peak_over_activations"] = round(extra / act, 3)
            print(f"{name} {m}: extra peak {extra:.0f} MiB, activations {act:.0f} MiB")
    out = benchmark.pedantic(lambda: suggest(model, x, y, loss_fn), rounds=1, warmup_rounds=0)
    assert 1 <= out


@pytest.mark.timeout(7200)
@pytest.mark.benchmark(group="variance-capture")
@pytest.mark.parametrize("name", MODELS)
def test_bench_capture_vs_step(benchmark, request, name):
    small, batch, px, model, x, y, loss_fn = _setup(request, name, test="capture")
    repeats = 1 if small else REPEATS
    res = interleaved_ratio(
        lambda: step_with_norm_test(model, x, y, loss_fn),
        lambda: step(model, x, y, loss_fn),
        repeats,
        warmup=1,
    )
    record(benchmark, f"{name}_step_with_norm_test_vs_step", res, goal=1.1)
    if not os.environ.get("LOCAL_OPT_BENCH_NORM_ONLY"):
        res = interleaved_ratio(
            lambda: step_with_capture(model, x, y, loss_fn),
            lambda: step(model, x, y, loss_fn),
            repeats,
            warmup=1,
        )
        record(benchmark, f"{name}_step_with_capture_vs_step", res, goal=1.2)
    benchmark.extra_info["threads"] = THREADS
    if not small and PEAKS:
        peaks = {m: peak_mib(name, m, batch, px) for m in ("step", "capture_norm")}
        for m, v in peaks.items():
            benchmark.extra_info[f"{name}_{m}_peak_mib"] = round(v, 1)
        ratio = peaks["capture_norm"] / peaks["step"]
        benchmark.extra_info[f"{name}_capture_norm_peak_ratio"] = round(ratio, 3)
        print(f"{name} peak: step {peaks['step']:.0f} MiB, step with the norm test "
              f"{peaks['capture_norm']:.0f} MiB ({ratio:.3f}x, goal <= 1.25x)")
    q = benchmark.pedantic(
        lambda: step_with_capture(model, x, y, loss_fn), rounds=1, warmup_rounds=0
    )
    assert q > 0


@pytest.mark.timeout(7200)
@pytest.mark.benchmark(group="variance-sizes")
@pytest.mark.parametrize("px", [32, 64, 128, 224])
def test_bench_suggest_sizes(benchmark, request, px):
    """resnet18 (train mode) across input sizes: the per-layer choice must hold at each."""
    small, batch, px, model, x, y, loss_fn = _setup(request, "resnet18", px, "sizes")
    res = interleaved_ratio(
        lambda: suggest(model, x, y, loss_fn),
        lambda: step(model, x, y, loss_fn),
        1 if small else REPEATS,
        warmup=1,
    )
    record(benchmark, f"resnet18_{px}px_suggest_augmented_vs_step", res, goal=1.5)
    benchmark.extra_info["threads"] = THREADS
    out = benchmark.pedantic(lambda: suggest(model, x, y, loss_fn), rounds=1, warmup_rounds=0)
    assert 1 <= out


SMALL = ["test_resnet", "test_vit", "gpt_d64"]


def make_small(name: str, batch: int):
    """``(model, inputs, targets, loss_fn)`` for a small model of the ``small`` benchmark."""
    import timm

    torch.manual_seed(0)
    if name == "gpt_d64":
        model = GPT(256, 64, 2, 4, 64).to(device())
        ids = torch.randint(0, 256, (batch, 65)).to(device())
        return model, ids[:, :-1], ids[:, 1:], lm_loss
    extra = {"img_size": 32} if name == "test_vit" else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **extra).train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return model.to(device()), x.to(device()), y.to(device()), F.cross_entropy


@pytest.mark.timeout(3600)
@pytest.mark.benchmark(group="variance-small")
@pytest.mark.parametrize("name", SMALL)
def test_bench_small_suggest_vs_step(benchmark, request, name):
    """``VarianceTest(backend="hooks").suggest`` at b=16 on small models vs one training step."""
    pytest.importorskip("timm")
    small = quick(request)
    batch = 4 if small else 16
    torch.set_num_threads(THREADS)
    model, x, y, loss_fn = make_small(name, batch)
    repeats = 1 if small else 3 * REPEATS  # a pass takes milliseconds: more repeats

    def base():
        step(model, x, y, loss_fn)

    for test in ("augmented", "norm"):
        vt = VarianceTest(model, loss_fn, test=test, backend="hooks", batch_statistics="backend")
        res = interleaved_ratio(lambda vt=vt: vt.suggest(x, y, batch), base, repeats, warmup=2)
        record(benchmark, f"{name}_b{batch}_suggest_{test}_vs_step", res, goal=1.5)
    benchmark.extra_info["threads"] = THREADS
    out = benchmark.pedantic(lambda: vt.suggest(x, y, batch), rounds=1, warmup_rounds=0)
    assert 1 <= out


def vmap_sq_norms(model: nn.Module, x, y, loss_fn) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_loss(pr, xi, yi):
        return loss_fn(functional_call(model, (pr, buffers), (xi[None],)), yi[None])

    g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    return sum(t.pow(2).sum() for t in g.values())


@pytest.mark.timeout(3600)
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.benchmark(group="variance-vmap")
@pytest.mark.parametrize("name", ["resnet18_eval", "vit_small"])
def test_bench_vmap_vs_step(benchmark, request, name):
    """``torch.func`` per-sample gradients at 32 px (vit_small: 4 tokens), one round."""
    pytest.importorskip("timm")
    small = quick(request)
    if small:
        pytest.skip("full size only (one vmap round is slow)")
    batch = 32
    torch.set_num_threads(THREADS)
    model, x, y, loss_fn = make(name, batch, 32)
    base = min(_timed(lambda: step(model, x, y, loss_fn)) for _ in range(3 if small else 5))
    t0 = time.perf_counter()
    total = benchmark.pedantic(
        lambda: vmap_sq_norms(model, x, y, loss_fn), rounds=1, warmup_rounds=0
    )
    new = time.perf_counter() - t0
    record(benchmark, f"{name}_32px_vmap_vs_step", {"ratio": new / base, "new_s": new, "base_s": base})
    benchmark.extra_info["threads"] = THREADS
    assert total > 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":  # the subprocess of peak_mib
    peak_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
