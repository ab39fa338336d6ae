"""Every mistake a new user makes gets an early message that names what to change (issue 21)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn
from torch.utils.data import IterableDataset

from local_opt import LocalOptimizer, VarianceTest
from samplers import AdaptiveBatchSampler

BACKENDS = ["auto", "hooks", "vmap", "microbatch"]


def data(n: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_without_trainable_parameters(backend):
    m = model().requires_grad_(False)
    vt = VarianceTest(m, F.cross_entropy, backend=backend)
    with pytest.raises(ValueError, match="Invalid model: Sequential has no trainable parameters"):
        vt.suggest(*data(), 16)
    with pytest.raises(ValueError, match="no trainable parameters"):
        vt.record_micro_batches(4)


def test_the_in_step_path_refuses_a_frozen_model_and_another_models_capture():
    """Found as a new user: suggest_from_capture on a frozen model failed with an IndexError
    deep in the pooling, and a capture of another model was used without a word."""
    x, y = data()
    m = model()
    vt = VarianceTest(m, F.cross_entropy)
    with vt.capture() as cap:  # taken while the model was trainable
        F.cross_entropy(m(x), y).backward()
    m.requires_grad_(False)
    with pytest.raises(ValueError, match="Invalid model: Sequential has no trainable parameters"):
        vt.capture()
    with pytest.raises(ValueError, match="no trainable parameters"):
        vt.suggest_from_capture(cap, 16)
    m.requires_grad_(True)
    other = model()
    with VarianceTest(other, F.cross_entropy).capture() as foreign:
        F.cross_entropy(other(x), y).backward()
    with pytest.raises(ValueError, match=r"Invalid capture: it was taken on a Sequential, not on "
                                         r"this VarianceTest's model"):
        vt.suggest_from_capture(foreign, 16)
    assert 1 <= vt.suggest_from_capture(cap, 16)
    with vt.capture(active=False) as none:
        F.cross_entropy(m(x), y).backward()
    with pytest.raises(TypeError, match=r"got NoneType \(capture\(active=False\) yields None"):
        vt.suggest_from_capture(none, 16)


def test_one_steps_capture_counts_once():
    """Found as a new user: the same capture handed over twice counted its round twice in the
    moving averages. A StatsCapture entered again (a new step) is a new capture."""
    from local_opt import StatsCapture

    x, y = data()
    m = model()
    vt = VarianceTest(m, F.cross_entropy)
    with vt.capture() as cap:
        F.cross_entropy(m(x), y).backward()
    vt.suggest_from_capture(cap, 16)
    calls = vt.state_dict()["calls"]
    with pytest.raises(RuntimeError, match="this capture's step was already used"):
        vt.suggest_from_capture(cap, 16)
    assert vt.state_dict()["calls"] == calls
    reused = StatsCapture(m, inner_products=False)
    for _ in range(2):
        with reused:
            F.cross_entropy(m(x), y).backward()
        vt.suggest_from_capture(reused, 16)
    assert vt.state_dict()["calls"] == calls + 2


def test_captures_smaller_than_batch_size_are_explained_when_they_recur():
    x, y = data(32)
    m = model()
    vt = VarianceTest(m, F.cross_entropy)

    def capture(n):
        with vt.capture() as cap:
            F.cross_entropy(m(x[:n]), y[:n]).backward()
        return cap

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one short batch: an epoch's last batch, no warning
        vt.suggest_from_capture(capture(8), 32)
    with pytest.warns(RuntimeWarning, match="got 8 samples for batch_size=32 on two calls in a "
                                            "row.*Pass the batch the step trained on"):
        vt.suggest_from_capture(capture(8), 32)


def test_one_unit_says_what_to_do():
    """One worker and one micro-batch: no variance to estimate; the warning names the remedies."""
    x, y = data()
    m = model()
    opt = LocalOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), sync_every=1)
    vt = VarianceTest(m, F.cross_entropy)
    acc = vt.accumulate(opt, (x, y), 16)
    for (xs, ys), w in acc:
        (F.cross_entropy(m(xs), ys) * w).backward()
    opt.step()
    with pytest.warns(RuntimeWarning, match=r"fewer than two gradient units pooled \(1\).*use a "
                                            r"micro_batch_size below the batch size"):
        assert acc.suggest(16) == 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_scalar_loss(backend):
    vt = VarianceTest(model(), lambda o, t: F.cross_entropy(o, t, reduction="none"),
                      backend=backend)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar per call.*reduction='mean'"):
        vt.suggest(*data(), 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loss_returning_a_python_float(backend):
    vt = VarianceTest(model(), lambda o, t: float(F.cross_entropy(o, t)), backend=backend)
    with pytest.raises(ValueError, match=r"Invalid loss_fn: it (returned a float|calls .item\(\))"):
        vt.suggest(*data(), 16)


def test_batches_smaller_than_batch_size_are_explained_when_they_recur():
    x, y = data(32)
    vt = VarianceTest(model(), F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one short batch: an epoch's last batch, no warning
        vt.suggest(x[:8], y[:8], batch_size=32)
    with pytest.warns(RuntimeWarning, match="got 8 samples for batch_size=32 on two calls in a "
                                            "row.*Pass the batch the step trained on"):
        vt.suggest(x[:8], y[:8], batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        vt.suggest(x[:8], y[:8], batch_size=32)
    vt = VarianceTest(model(), F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # more samples than the batch: a less noisy estimate
        vt.suggest(x, y, batch_size=8)
        vt.suggest(x, y, batch_size=8)


def test_an_iterable_dataset_is_refused_by_the_sampler():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(10))

    with pytest.raises(TypeError, match="Stream has no len.*map-style dataset"):
        AdaptiveBatchSampler(Stream(), 4)


def test_torchrun_without_init_process_group_warns(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    m = model()
    msg = r"WORLD_SIZE=2 is set .* torch.distributed.init_process_group\("
    with pytest.warns(RuntimeWarning, match="LocalOptimizer: " + msg):
        LocalOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), sync_every=2)
    with pytest.warns(RuntimeWarning, match="VarianceTest: " + msg):
        VarianceTest(m, F.cross_entropy)
    with pytest.warns(RuntimeWarning, match="AdaptiveBatchSampler: WORLD_SIZE=2"):
        AdaptiveBatchSampler(range(10), 2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LocalOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), sync_every=2)


def test_one_worker_with_train_mode_batchnorm_warns_once_with_the_remedies():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = data()
    vt = VarianceTest(m, F.cross_entropy)
    with pytest.warns(RuntimeWarning, match=r"one worker.*overstated that variance 2.4-12x.*"
                                            r"run >= 2 workers.*backend='microbatch'.*"
                                            r"batch_statistics='backend'"):
        vt.suggest(x, y, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vt.suggest(x, y, 16)  # once
        VarianceTest(m, F.cross_entropy, batch_statistics="backend").suggest(x, y, 16)
        VarianceTest(m, F.cross_entropy, backend="microbatch").suggest(x, y, 16)
        VarianceTest(m.eval(), F.cross_entropy).suggest(x, y, 16)


def _diverge(rank: int, world: int, mode: str, compression: str | None = None) -> dict:
    m = model()
    opt = LocalOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), sync_every=1, on_nonfinite=mode,
                         compression=compression)
    x, y = data()
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    if rank == 1:
        with torch.no_grad():
            m[0].weight[0, 0] = float("inf")
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.step()
    except FloatingPointError as e:
        return {"error": str(e)}
    return {"error": None, "warned": [str(i.message) for i in w]}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compression", [None, "int8"])
def test_a_diverged_round_names_the_rank(compression):
    for r in run_distributed(_diverge, 2, "raise", compression):
        assert r["error"] is not None
        assert "worker(s) with rank [1] in the process group diverged" in r["error"]
        assert "on_nonfinite='skip'" in r["error"]
