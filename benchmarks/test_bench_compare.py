"""Side by side: this library's per-sample statistics against Opacus, BackPACK and torch.func.

Every method computes the statistic the norm test needs, :math:`\\sum_i \\lVert g_i\\rVert^2`
over the batch (per-sample gradients of the mean-reduced loss's terms), on the same model and
batch:

* ``suggest_aug`` / ``suggest_norm``: ``VarianceTest(backend="hooks").suggest`` with the
  augmented test (norms and inner products) / the norm test: a separate forward+backward pass;
* ``capture`` / ``capture_norm``: the training step with :class:`~local_opt.StatsCapture` (the
  statistics ride on the step's own backward; its ``.grad`` is the step's), keeping what the
  inner products need / for the norm test alone (``inner_products=False``, what
  ``VarianceTest.capture()`` runs by default);
* ``opacus``: Opacus ``GradSampleModule`` (per-sample gradients in ``p.grad_sample``), then the
  squared norms;
* ``backpack``: BackPACK's ``BatchL2Grad`` and ``Variance`` extensions on an ``extend()``-ed model
  (``use_converter=True``; BackPACK samples are the loss's rows, so language models, whose loss
  rows are tokens, are out of its scope);
* ``vmap``: ``torch.func`` per-sample gradients (this library's ``"vmap"`` backend).

Each is timed as a ratio against a plain training step (forward + backward) of the same model in
the same process, interleaved (medians), and its peak memory is the kernel's high-water mark of
the resident size during one call above the resident size before it (as in
``test_bench_variance.py``). Each ``(model, method)`` runs in a fresh subprocess (Opacus and
BackPACK install hooks on the model). *Agreement*: the relative difference of the statistic from
``vmap``'s on the same batch (in training mode with BatchNorm the methods define the per-sample
gradient differently: this library's hooks use per-sample contributions, vmap differentiates
through the batch statistics).

Models: ``resnet18`` (timm, 224 px, train) and ``resnet18_eval``, ``vit_small`` (timm
ViT-S/16, 224 px), ``gpt`` (``test_bench_variance.GPT``: d 256, 4 layers, context 256),
``hf_gpt2`` and ``hf_llama`` (Hugging Face, from configs: d 256, 4 layers, 4 heads, context 256,
vocabulary 4096; no weights). Full sizes under ``make bench`` (batch ``LOCAL_OPT_BENCH_BATCH``,
default 16; ``LOCAL_OPT_BENCH_REPEATS`` timed calls, default 3, interleaved with the step's;
``vmap`` runs once; one thread); the results
also go, one JSON line per run, to ``runs/compare.jsonl`` and ``python
benchmarks/test_bench_compare.py report runs/compare.jsonl`` prints the markdown table. Under
``--benchmark-disable`` (``make test``) each runs once in-process at tiny sizes and checks the
agreement; Opacus, BackPACK and transformers are skipped when not installed.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _ratio import quick, record
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
import _common  # noqa: E402  (examples/_common.py: the commit, the README block writer)

THREADS = int(os.environ.get("LOCAL_OPT_BENCH_THREADS", "1"))
REPEATS = int(os.environ.get("LOCAL_OPT_BENCH_REPEATS", "3"))
BATCH = int(os.environ.get("LOCAL_OPT_BENCH_BATCH", "16"))
OUT = os.environ.get("LOCAL_OPT_BENCH_COMPARE_OUT", "runs/compare.jsonl")
MODELS = ["resnet18", "resnet18_eval", "vit_small", "gpt", "hf_gpt2", "hf_llama"]
METHODS = ["suggest_aug", "suggest_norm", "capture", "capture_norm", "opacus", "backpack", "vmap"]
#: Models of the tiny run under ``--benchmark-disable``.
QUICK_MODELS = ("resnet18_eval", "gpt", "hf_gpt2")
LMS = ("gpt", "hf_gpt2", "hf_llama")
#: Methods that need a package beyond the test install.
NEEDS = {"opacus": "opacus", "backpack": "backpack"}


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over each sequence, then over the batch."""
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return per_token.view(targets.shape).mean(1).mean()


class Logits(nn.Module):
    """A Hugging Face causal LM as ``ids -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def _hf(name: str, small: bool) -> nn.Module:
    import transformers as tf

    dim, layers, heads, ctx, vocab = (32, 2, 2, 16, 64) if small else (256, 4, 4, 256, 4096)
    if name == "hf_gpt2":
        cfg = tf.GPT2Config(
            n_layer=layers, n_embd=dim, n_head=heads, vocab_size=vocab, n_positions=ctx,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
        return Logits(tf.GPT2LMHeadModel(cfg))
    cfg = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=ctx,
        bos_token_id=0, eos_token_id=0,
    )
    return Logits(tf.LlamaForCausalLM(cfg))


def make(name: str, batch: int, small: bool):
    """``(model, inputs, targets, loss_fn)``: seeded, the same in every process."""
    from test_bench_variance import make as make_variance

    if name.startswith("hf_"):
        torch.manual_seed(0)
        model = _hf(name, small)
        ctx, vocab = (16, 64) if small else (256, 4096)
        ids = torch.randint(0, vocab, (batch, ctx + 1))
        return model, ids[:, :-1], ids[:, 1:], _lm_loss
    model, x, y, loss_fn = make_variance(name, batch, 32 if small else 224, small)
    return model, x, y, (_lm_loss if name == "gpt" else loss_fn)


# ----------------------------------------------------------------------------------------------
# the methods: each returns Σ_i ‖g_i‖² of the batch
# ----------------------------------------------------------------------------------------------


def step(model: nn.Module, x, y, loss_fn) -> None:
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()


def _suggest(test: str) -> Callable[..., Callable[[], float]]:
    def prepare(model, x, y, loss_fn):
        from local_opt import VarianceTest

        vt = VarianceTest(model, loss_fn, test=test, backend="hooks")

        def run() -> float:
            vt.suggest(x, y, len(x))
            return float(vt.last_stats["sq_norm_sum"])

        return run

    return prepare


def _capture(model, x, y, loss_fn, inner_products: bool = True):
    from local_opt import StatsCapture

    def run() -> float:
        model.zero_grad(set_to_none=True)
        with StatsCapture(model, inner_products=inner_products) as cap:
            loss_fn(model(x), y).backward()
        return float(cap.grad_stats().sq_norm_sum)

    return run


def _capture_norm(model, x, y, loss_fn):
    """What ``VarianceTest.capture()`` runs for the norm test (the quick start's path)."""
    return _capture(model, x, y, loss_fn, inner_products=False)


def _opacus(model, x, y, loss_fn):
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, loss_reduction="mean", strict=False)
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}

    def run() -> float:
        gsm.zero_grad(set_to_none=True)
        for p in params:
            p.grad_sample = None
        loss_fn(gsm(x), y).backward()
        total = torch.zeros((), dtype=torch.float64)
        for p in params:
            gs = p.grad_sample
            if gs is None or gs.shape[0] != len(x):
                got = "none" if gs is None else f"{gs.shape[0]} rows"
                raise RuntimeError(
                    f"Opacus per-sample gradient of {names[id(p)]}: {got} for {len(x)} samples"
                )
            total += gs.reshape(gs.shape[0], -1).double().pow(2).sum()
        return float(total)

    return run


def _backpack(model, x, y, loss_fn):
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad, Variance

    if loss_fn is _lm_loss:
        raise NotImplementedError(
            "BackPACK's samples are the loss's rows (tokens here), not the sequences"
        )
    ext = extend(model, use_converter=True)
    lossf = extend(nn.CrossEntropyLoss())
    params = [p for p in ext.parameters() if p.requires_grad]
    n = len(x)

    def run() -> float:
        ext.zero_grad(set_to_none=True)
        with backpack(BatchL2Grad(), Variance()):
            lossf(ext(x), y).backward()
        # mean reduction: BackPACK's per-sample gradients are g_i / N
        return float(sum(p.batch_l2.double().sum() for p in params)) * n * n

    return run


def _vmap(model, x, y, loss_fn):
    from local_opt.backends.vmap import vmap_stats

    def run() -> float:
        return float(vmap_stats(model, loss_fn, x, y, chunk_size=4, inner_products=False).sq_norm_sum)

    return run


PREPARE = {
    "suggest_aug": _suggest("augmented"),
    "suggest_norm": _suggest("norm"),
    "capture": _capture,
    "capture_norm": _capture_norm,
    "opacus": _opacus,
    "backpack": _backpack,
    "vmap": _vmap,
}


def measure(name: str, method: str, batch: int, small: bool, repeats: int, peaks: bool) -> dict:
    """Time (ratio of medians vs a plain step, interleaved), peak memory and the statistic of one
    method. The first call of the method gives the statistic (and initializes lazily); with
    ``peaks`` the next call of each (step, then method) is measured for memory and counts as a
    timed repeat. ``vmap`` at full size runs once: that call is the statistic, the memory and
    the time (it includes torch.func's lazy initialization)."""
    import ctypes
    import gc
    import statistics
    import time

    from test_bench_variance import _status_kib

    torch.set_num_threads(THREADS)
    model, x, y, loss_fn = make(name, batch, small)
    plain = copy.deepcopy(model)
    libc = ctypes.CDLL("libc.so.6")

    def timed(fn: Callable[[], object], peak_key: str | None = None) -> tuple[float, object]:
        if peak_key is not None:
            gc.collect()
            libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _status_kib("VmRSS")
        t0 = time.perf_counter()
        value = fn()
        dt = time.perf_counter() - t0
        if peak_key is not None:
            out[peak_key] = (_status_kib("VmHWM") - before) / 1024
        return dt, value

    out: dict = {"model": name, "method": method, "batch": batch}
    once = method == "vmap" and not small
    base = lambda: step(plain, x, y, loss_fn)  # noqa: E731
    t_new: list[float] = []
    t_base: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = PREPARE[method](model, x, y, loss_fn)
        base()  # warm-up of the step
        if peaks:
            t_base.append(timed(base, "step_peak_mib")[0])
        dt, stat = timed(run, f"{method}_peak_mib" if peaks and once else None)
        out["stat"] = stat
        if once:
            t_new.append(dt)
        elif peaks:
            t_new.append(timed(run, f"{method}_peak_mib")[0])
        for i in range(0 if once else repeats - len(t_new)):
            pair = ((run, t_new), (base, t_base)) if i % 2 else ((base, t_base), (run, t_new))
            for fn, sink in pair:
                sink.append(timed(fn)[0])
        if not t_base:
            t_base.append(timed(base)[0])
    m_new, m_base = statistics.median(t_new), statistics.median(t_base)
    out.update(ratio=m_new / m_base, new_s=m_new, step_s=m_base, repeats=len(t_new))
    return out


def _child(name: str, method: str, batch: int) -> dict:
    """Run :func:`measure` in a fresh subprocess; ``{"error": ...}`` when the method fails."""
    proc = subprocess.run(
        [sys.executable, __file__, "child", name, method, str(batch)],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()
        return {"model": name, "method": method, "batch": batch,
                "error": err[-1] if err else f"exit {proc.returncode}"}
    return json.loads(lines[-1])


@functools.cache
def _quick_reference(name: str) -> float:
    """vmap's statistic at the tiny size (once per model)."""
    return measure(name, "vmap", 4, True, 1, peaks=False)["stat"]


def _skip_missing(method: str, name: str) -> None:
    if method in NEEDS:
        pytest.importorskip(NEEDS[method])
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    pytest.importorskip("timm")


@pytest.mark.timeout(7200)
@pytest.mark.benchmark(group="compare")
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_bench_compare(benchmark, request, name, method):
    _skip_missing(method, name)
    small = quick(request)
    if small:
        if name not in QUICK_MODELS:
            pytest.skip(f"full size only (the tiny run covers {QUICK_MODELS})")
        if method == "backpack" and name in LMS:
            pytest.skip("BackPACK's samples are the loss's rows (tokens), not sequences")
        try:
            got = measure(name, method, 4, True, 1, peaks=False)
        except Exception as e:  # noqa: BLE001 - third-party methods: what they do not support
            if method not in NEEDS:
                raise
            pytest.skip(f"{method} does not support {name}: {type(e).__name__}: {e}")
        ref = _quick_reference(name)
        # tiny models in eval mode: every method defines the same per-sample gradients
        assert abs(got["stat"] - ref) <= 1e-3 * ref, (got["stat"], ref)
        benchmark.extra_info.update(got)
        benchmark.pedantic(lambda: None, rounds=1, warmup_rounds=0)
        return
    got = _child(name, method, BATCH)
    got["threads"] = THREADS
    got["commit"] = _common.git_commit(short=True)
    os.makedirs(os.path.dirname(OUT) or ".", exist_ok=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(got) + "\n")
    benchmark.extra_info.update(got)
    if "error" in got:
        pytest.skip(f"{method} on {name}: {got['error']}")
    record(benchmark, f"{name}_{method}_vs_step",
           {"ratio": got["ratio"], "new_s": got["new_s"], "base_s": got["step_s"]})
    benchmark.pedantic(lambda: None, rounds=1, warmup_rounds=0)


# ----------------------------------------------------------------------------------------------
# the markdown table from runs/compare.jsonl
# ----------------------------------------------------------------------------------------------

LABELS = {
    "suggest_aug": "hooks, separate pass (augmented test)",
    "suggest_norm": "hooks, separate pass (norm test)",
    "capture": "hooks, in the step (inner products too)",
    "capture_norm": "hooks, in the step (norm test)",
    "opacus": "Opacus GradSampleModule",
    "backpack": "BackPACK BatchL2Grad+Variance",
    "vmap": "torch.func vmap",
}


def _last_runs(path: str) -> dict[tuple[str, str], dict]:
    runs: dict[tuple[str, str], dict] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            runs[(r["model"], r["method"])] = r
    return runs


README_BLOCK = "make bench: compare"


def readme_table(path: str) -> list[str]:
    """The README's summary: time / step per model and method, with the commits and set-up."""
    runs = _last_runs(path)
    methods = [m for m in METHODS if any(k[1] == m for k in runs)]
    models = [n for n in MODELS if any(k[0] == n for k in runs)]
    commits = sorted({r.get("commit", "unknown") for r in runs.values()})
    batches = sorted({str(r.get("batch", BATCH)) for r in runs.values()})
    threads = sorted({str(r.get("threads", "?")) for r in runs.values()})
    rows = [
        f"Time per call / a plain training step (CPU, {', '.join(threads)} thread, batch "
        f"{', '.join(batches)}; `make bench` at commit {', '.join(f'`{c}`' for c in commits)}; "
        "memory and agreement: [docs/benchmarks.md](docs/benchmarks.md)):",
        "",
        "| model | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for name in models:
        cells = []
        for m in methods:
            r = runs.get((name, m))
            cells.append("—" if r is None else "n/a" if "error" in r else f"{r['ratio']:.2f}x")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def write_readme(path: str, readme: str) -> None:
    """Replace README's generated block ``make bench: compare`` with :func:`readme_table`."""
    _common.replace_block(readme, README_BLOCK, readme_table(path))


def report(path: str) -> str:
    """The comparison table (markdown) from the JSON lines of full-size runs (the last run of
    each ``(model, method)`` counts)."""
    runs = _last_runs(path)
    rows = [
        "| model | method | time / step | peak memory MiB (step) | Σ‖g_i‖² vs vmap |",
        "|---|---|---|---|---|",
    ]
    for name in MODELS:
        ref = runs.get((name, "vmap"), {}).get("stat")
        for method in METHODS:
            r = runs.get((name, method))
            if r is None:
                continue
            if "error" in r:
                rows.append(f"| {name} | {LABELS[method]} | not supported: {r['error'][:140]} | | |")
                continue
            peak = r.get(f"{method}_peak_mib")
            mem = f"{peak:.0f} ({r['step_peak_mib']:.0f})" if peak is not None else ""
            agree = "reference" if method == "vmap" else (
                f"{abs(r['stat'] - ref) / ref:.1e}" if ref else "")
            rows.append(
                f"| {name} | {LABELS[method]} | {r['ratio']:.2f}x ({r['new_s']:.2f} s vs "
                f"{r['step_s']:.2f} s) | {mem} | {agree} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1] == "child":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        result = measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), False, REPEATS, True)
        print(json.dumps(result))
    elif sys.argv[1] == "report":  # report RUNS.jsonl [--readme README.md]
        print(report(sys.argv[2]))
        if "--readme" in sys.argv:
            write_readme(sys.argv[2], sys.argv[sys.argv.index("--readme") + 1])


def test_readme_block_from_the_runs(tmp_path):
    """``report --readme`` rewrites only the marked block: one row per model, the last run of each
    (model, method), n/a for a method that does not support the model, and the commits."""
    lines = [
        {"model": "gpt", "method": "capture", "batch": 16, "threads": 1, "commit": "aaa",
         "ratio": 9.0},
        {"model": "gpt", "method": "capture", "batch": 16, "threads": 1, "commit": "bbb",
         "ratio": 1.06},
        {"model": "gpt", "method": "backpack", "batch": 16, "threads": 1, "commit": "bbb",
         "error": "tokens"},
        {"model": "resnet18", "method": "vmap", "batch": 16, "threads": 1, "commit": "bbb",
         "ratio": 3.5},
    ]  # fmt: skip
    runs = tmp_path / "compare.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in lines))
    readme = tmp_path / "README.md"
    begin, end = _common.marker(README_BLOCK)
    readme.write_text(f"top\n{begin}\nstale\n{end}\nbottom\n")
    write_readme(str(runs), str(readme))
    text = readme.read_text()
    assert text.startswith(f"top\n{begin}\n") and text.endswith(f"{end}\nbottom\n")
    assert "stale" not in text and "at commit `bbb`" in text and "`aaa`" not in text
    assert "| resnet18 | — | — | 3.50x |" in text  # columns: capture, backpack, vmap
    assert "| gpt | 1.06x | n/a | — |" in text
    readme.write_text("no block\n")
    with pytest.raises(SystemExit, match="has no generated block 'make bench: compare'"):
        write_readme(str(runs), str(readme))
