"""VarianceTest.record_micro_batches: the micro-batch test read from gradient accumulation's hooks.

References: micro-batch gradients from explicit ``torch.autograd.grad`` calls (one per
micro-batch), stacked and reduced with ``torch.var`` by ``test_variance.reference``; and the
``.grad`` of the same accumulation loop run without the recorder.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dist_utils import run_distributed
from test_variance import TESTS, make_data, make_net, reference

from local_opt import VarianceTest

K, M = 3, 4  # micro-batches per step, samples per micro-batch
ONES = {"eta": 1.0, "theta": 1.0, "nu": 1.0, "policy": "paper"}  # the published formulas
KEYS = (
    "mean_sq_norm",
    "norm_variance",
    "inner_product_variance",
    "orthogonal_variance",
    "raw_norm",
    "raw_inner_product",
    "raw_orthogonality",
    "raw_augmented",
)


def explicit_units(model, x, y, k=K, m=M, fwd=None) -> torch.Tensor:
    """One row per micro-batch: the flattened gradient of its mean loss, by autograd.grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(k):
        sl = slice(i * m, (i + 1) * m)
        out = model(x[sl], **(fwd or {}).get(i, {}))
        g = torch.autograd.grad(F.cross_entropy(out, y[sl]), params, allow_unused=True)
        rows.append(torch.cat([
            (torch.zeros_like(p) if t is None else t).reshape(-1) for p, t in zip(params, g)
        ]))
    return torch.stack(rows).double()


def accumulate(model, x, y, k=K, m=M, scale=None, fwd=None) -> None:
    """The usual accumulation loop: backward of ``scale`` (default 1/k) times each mean loss."""
    s = 1.0 / k if scale is None else scale
    for i in range(k):
        sl = slice(i * m, (i + 1) * m)
        (F.cross_entropy(model(x[sl], **(fwd or {}).get(i, {})), y[sl]) * s).backward()


def grads_of(model) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("scale", [None, 0.5])
@pytest.mark.parametrize("test", TESTS)
def test_recorded_matches_explicit_micro_batch_gradients(test, scale):
    model = make_net().train()  # BatchNorm normalizes each micro-batch, as in accumulation
    x, y = make_data(0)
    ref = reference(explicit_units(make_net().train(), x, y), 1, unit_size=M)

    plain = make_net().train()
    accumulate(plain, x, y, scale=scale)
    vt = VarianceTest(model, F.cross_entropy, test=test, **ONES)
    with vt.record_micro_batches(M, grad_scale=scale) as rec:
        accumulate(model, x, y, scale=scale)
    assert rec.micro_batches == K
    # The training step is untouched: same .grad and BatchNorm statistics, bit for bit.
    assert all(torch.equal(a, b) for a, b in zip(grads_of(model), grads_of(plain)))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), plain.buffers()))
    assert all(not p._backward_hooks for p in model.parameters())  # hooks removed

    b = vt.suggest_from_recorded(rec, 2)
    s = vt.last_stats
    assert (s["count"], s["unit_size"], s["backend"]) == (K, M, "microbatch_recorded")
    for key in KEYS:
        if test == "norm" and "norm" not in key and key != "mean_sq_norm":
            assert s[key] != s[key], key  # NaN: the norm test keeps no gradients
            continue
        assert s[key] == pytest.approx(ref[key], rel=1e-10), key
    assert b == max(2, -(-ref[f"raw_{test}"] // 1))


def test_norm_test_keeps_no_gradients_and_inner_tests_keep_all_but_the_first():
    model = make_net()
    x, y = make_data(0)
    n_params = len(list(model.parameters()))
    with VarianceTest(model, F.cross_entropy).record_micro_batches(M) as rec:
        accumulate(model, x, y)
    assert rec._kept == {}
    model.zero_grad()
    with VarianceTest(model, F.cross_entropy, test="augmented").record_micro_batches(M) as rec:
        accumulate(model, x, y)
    assert sum(len(v) for v in rec._kept.values()) == (K - 1) * n_params
    # Copies in the test's workspace, none of them a .grad; the next step reuses the buffers
    # and the superseded recorder refuses to answer.
    grads = {p.grad.data_ptr() for p in model.parameters()}
    ptrs = {g.data_ptr() for v in rec._kept.values() for _, g in v}
    assert len(ptrs) == (K - 1) * n_params and not ptrs & grads
    old = rec
    model.zero_grad()
    with VarianceTest(model, F.cross_entropy, test="augmented").record_micro_batches(M) as rec:
        accumulate(model, x, y)
    assert {g.data_ptr() for v in rec._kept.values() for _, g in v} != ptrs  # another test
    vt = VarianceTest(model, F.cross_entropy, test="augmented", **ONES)
    model.zero_grad()
    with vt.record_micro_batches(M) as first:
        accumulate(model, x, y)
    b = vt.suggest_from_recorded(first, 2)
    model.zero_grad()
    with vt.record_micro_batches(M) as second:
        accumulate(model, x, y)
    assert {g.data_ptr() for v in first._kept.values() for _, g in v} == {
        g.data_ptr() for v in second._kept.values() for _, g in v
    }
    assert vt.suggest_from_recorded(second, 2) == b  # same data, same answer
    with pytest.raises(RuntimeError, match="newer recording"):
        vt.suggest_from_recorded(first, 2)
    assert old.grad_stats().count == K  # its own workspace: still valid


class Branchy(nn.Module):
    """A parameter used only in some micro-batches (``extra=True``), one never used."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.extra = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, extra: bool = False) -> torch.Tensor:
        h = self.body(x)
        return h + self.extra(h) if extra else h


@pytest.mark.parametrize("used_in", [(0,), (1, 2), (2,)])
def test_parameters_used_in_some_micro_batches(used_in):
    torch.manual_seed(0)
    model = Branchy().double()
    x = torch.randn(K * M, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (K * M,))
    fwd = {i: {"extra": True} for i in used_in}
    ref = reference(explicit_units(model, x, y, fwd=fwd), 1, unit_size=M)
    vt = VarianceTest(model, F.cross_entropy, test="augmented", **ONES)
    with vt.record_micro_batches(M) as rec:
        accumulate(model, x, y, fwd=fwd)
    assert model.unused.weight.grad is None
    vt.suggest_from_recorded(rec, 2)
    for key in KEYS:
        assert vt.last_stats[key] == pytest.approx(ref[key], rel=1e-10), key


@pytest.mark.parametrize("stale", ["zeros", "values"])
def test_gradients_present_before_the_block_are_not_counted(stale):
    model = make_net()
    x, y = make_data(0)
    ref = reference(explicit_units(model, x, y), 1, unit_size=M)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if stale == "zeros" else torch.randn_like(p)
    vt = VarianceTest(model, F.cross_entropy, test="augmented", **ONES)
    with vt.record_micro_batches(M) as rec:
        accumulate(model, x, y)
    vt.suggest_from_recorded(rec, 2)
    for key in KEYS:
        assert vt.last_stats[key] == pytest.approx(ref[key], rel=1e-10), key


def test_grad_changed_in_place_after_the_block_is_an_error():
    model = make_net()
    x, y = make_data(0)
    vt = VarianceTest(model, F.cross_entropy, test="augmented", **ONES)
    with vt.record_micro_batches(M) as rec:
        accumulate(model, x, y)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.raises(RuntimeError, match="modified in place"):
        vt.suggest_from_recorded(rec, 2)
    # zero_grad(set_to_none=True) after the block is fine: the recorder holds the tensors.
    ref = reference(explicit_units(model, x, y), 1, unit_size=M)
    model.zero_grad()
    with vt.record_micro_batches(M) as rec:
        accumulate(model, x, y)
    model.zero_grad(set_to_none=True)
    vt.suggest_from_recorded(rec, 2)
    assert vt.last_stats["raw_augmented"] == pytest.approx(ref["raw_augmented"], rel=1e-10)


def test_optimizer_step_between_block_and_suggestion():
    """SGD and AdamW read .grad without writing it: suggest after opt.step() works."""
    x, y = make_data(0)
    ref = reference(explicit_units(make_net(), x, y), 1, unit_size=M)
    for opt_cls in (torch.optim.SGD, torch.optim.AdamW):
        model = make_net()
        opt = opt_cls(model.parameters(), lr=0.1)
        vt = VarianceTest(model, F.cross_entropy, test="augmented", **ONES)
        with vt.record_micro_batches(M) as rec:
            accumulate(model, x, y)
        opt.step()
        vt.suggest_from_recorded(rec, 2)
        assert vt.last_stats["raw_augmented"] == pytest.approx(ref["raw_augmented"], rel=1e-10)


def test_loss_scaler_scale_is_the_grad_scale():
    """With a GradScaler, grad_scale = scale / k; suggest before scaler.step (it unscales)."""
    x, y = make_data(0)
    x = x.float()
    results = []
    for use_scaler in (False, True):
        model = make_net(dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=use_scaler)
        vt = VarianceTest(model, F.cross_entropy, test="augmented", **ONES)
        with vt.record_micro_batches(M, grad_scale=scaler.get_scale() / K) as rec:
            for i in range(K):
                sl = slice(i * M, (i + 1) * M)
                scaler.scale(F.cross_entropy(model(x[sl]), y[sl]) / K).backward()
        b = vt.suggest_from_recorded(rec, 2)
        results.append((b, {k: vt.last_stats[k] for k in KEYS}))
        scaler.step(opt)
        scaler.update()
    (b0, s0), (b1, s1) = results
    assert b0 == b1
    for key in KEYS:  # the variances and norms too, which a wrong scale would change
        assert s1[key] == pytest.approx(s0[key], rel=1e-5), key


def test_every_skips_and_recorder_misuse():
    model = make_net()
    x, y = make_data(0)
    vt = VarianceTest(model, F.cross_entropy, every=2, **ONES)
    for call in range(3):
        with vt.record_micro_batches(M) as rec:
            accumulate(model, x, y)
        vt.suggest_from_recorded(rec, 2)
        assert vt.last_stats["ran"] is (call % 2 == 0)
        model.zero_grad()
    rec = vt.record_micro_batches(M)
    with pytest.raises(RuntimeError, match="no backward"):
        with rec:
            pass
        vt.suggest_from_recorded(rec, 2)
    with rec:
        accumulate(model, x, y)
        with pytest.raises(RuntimeError, match="leave the with block"):
            rec.grad_stats()
        with pytest.raises(RuntimeError, match="already recording"):
            rec.__enter__()
    # An error inside the block propagates unchanged and leaves no hook behind.
    with pytest.raises(KeyError, match="in the block"):
        with vt.record_micro_batches(M) as rec:
            F.cross_entropy(model(x[:M]), y[:M]).backward()
            raise KeyError("in the block")
    assert all(not p._backward_hooks for p in model.parameters())
    with pytest.raises(RuntimeError, match="no backward"):
        vt.suggest_from_recorded(rec, 2)
    norm_rec = VarianceTest(model, F.cross_entropy).record_micro_batches(M)
    with pytest.raises(ValueError, match="kept no gradients"):
        VarianceTest(model, F.cross_entropy, test="inner_product").suggest_from_recorded(norm_rec, 2)
    with pytest.raises(TypeError, match="Invalid recorder"):
        vt.suggest_from_recorded([[torch.zeros(2)]], 2)
    with pytest.raises(ValueError, match="Invalid batch_size"):
        vt.suggest_from_recorded(rec, 0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"micro_batch_size": 0}, ValueError, "Invalid micro_batch_size"),
        ({"micro_batch_size": 2.0}, TypeError, "Invalid micro_batch_size"),
        ({"micro_batch_size": True}, TypeError, "Invalid micro_batch_size"),
        ({"micro_batch_size": 2, "grad_scale": 0.0}, ValueError, "Invalid grad_scale"),
        ({"micro_batch_size": 2, "grad_scale": -1}, ValueError, "Invalid grad_scale"),
        ({"micro_batch_size": 2, "grad_scale": float("nan")}, ValueError, "Invalid grad_scale"),
        ({"micro_batch_size": 2, "grad_scale": "1"}, ValueError, "Invalid grad_scale"),
    ],
)
def test_bad_recorder_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        VarianceTest(nn.Linear(2, 2), F.mse_loss).record_micro_batches(**kwargs)


# --------------------------------------------------------------------------- pooled over ranks


def _recorded_worker(rank: int, world: int, ks: list[int]) -> tuple[int, dict]:
    torch.set_num_threads(1)
    model = make_net()
    x, y = make_data(rank)
    vt = VarianceTest(model, F.cross_entropy, test="augmented", **ONES)
    with vt.record_micro_batches(M) as rec:
        accumulate(model, x, y, k=ks[rank])  # (loss / k).backward(): the scale differs by rank
    return vt.suggest_from_recorded(rec, 2), vt.last_stats


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ks", [[3, 3], [3, 2]])
def test_recorded_pooled_over_two_ranks(ks):
    world = 2
    model = make_net()
    units = torch.cat([explicit_units(model, *make_data(r), k=ks[r]) for r in range(world)])
    ref = reference(units, world, unit_size=M)
    results = run_distributed(_recorded_worker, world, ks, timeout=120)
    assert len({b for b, _ in results}) == 1
    for _, s in results:
        assert (s["count"], s["world_size"]) == (sum(ks), world)
        for key in KEYS:
            assert s[key] == pytest.approx(ref[key], rel=1e-10), key


def test_half_precision_model():
    """float16 gradients whose sum's norm exceeds float16's range: norms, dots and the pooled
    sum are taken in float32 or scaled to the mean first, so the statistics stay finite."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x = 300 * torch.randn(K * 64, 6)
    y = torch.randint(0, 3, (K * 64,))
    ref = reference(explicit_units(model.double(), x.double(), y, m=64), 1, unit_size=64)
    model = model.half()
    vt = VarianceTest(model, F.cross_entropy, test="augmented", **ONES)
    with vt.record_micro_batches(64, grad_scale=128.0) as rec:  # like a loss scaler's scale
        for i in range(K):
            sl = slice(i * 64, (i + 1) * 64)
            (128 * F.cross_entropy(model(x[sl].half()).float(), y[sl])).backward()
    grad_norm = torch.linalg.vector_norm(torch.cat([p.grad.float().reshape(-1)
                                                    for p in model.parameters()]))
    assert grad_norm > 65504  # the sum's norm does not fit in float16
    vt.suggest_from_recorded(rec, 2)
    # The model's float16 gradients are rounded: 1e-2 for the norms; the inner-product variance
    # (Q - N|g|^4, a difference of near-equal terms) came out 21 % high. Without the float32
    # norms and dots, the statistics overflow and the test keeps the batch size instead.
    for key in KEYS:
        tol = 0.3 if "inner_product" in key else 1e-2
        assert vt.last_stats[key] == pytest.approx(ref[key], rel=tol), key
