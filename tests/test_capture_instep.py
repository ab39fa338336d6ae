"""Statistics inside the training step (:class:`StatsCapture`, ``VarianceTest.capture``) against
independent float64 references: a per-sample autograd loop, and for BatchNorm in training mode
per-sample copies of every parameter (each sample's contribution)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_backend_hooks import brute_force_contributions
from torch import nn
from torch.utils.checkpoint import checkpoint

from local_opt import StatsCapture, VarianceTest
from local_opt.backends.hooks import hooks_grad_stats

TOL = 1e-10


def per_sample_loop(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows).double()


def flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def rel(a, b) -> float:
    a, b = (torch.as_tensor(t, dtype=torch.float64) for t in (a, b))
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def plain_grads(model, loss_fn, x, y) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    out = flat(p.grad for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return out


def no_hooks_left(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
        for m in model.modules()
    ) and all(not p._backward_hooks for p in model.parameters())


def captured(model, loss_fn, x, y, inner: bool):
    model.zero_grad(set_to_none=True)
    with StatsCapture(model, inner_products=inner) as cap:
        loss_fn(model(x), y).backward()
    grads = flat(p.grad for p in model.parameters())
    return cap.grad_stats(), grads


def check_stats(stats, ref: torch.Tensor, inner: bool, tol: float = TOL) -> None:
    assert rel(flat(stats.grad_sum) * stats.sum_scale, ref.sum(0)) <= tol
    assert rel(stats.sq_norm_sum, (ref * ref).sum()) <= tol
    v = ref.sum(0) / ref.shape[0]
    if inner:
        vs, i = [], 0
        for g in stats.grad_sum:
            vs.append(v[i : i + g.numel()].view_as(g).to(g.dtype))
            i += g.numel()
        assert rel(stats.inner_sq_sum(vs), ((ref @ v) ** 2).sum()) <= tol
    else:
        assert torch.isnan(stats.inner_sq_sum([torch.zeros_like(g) for g in stats.grad_sum]))


class BNCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.flatten(1))


def _bncnn():
    torch.manual_seed(0)
    model = BNCNN().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    return model, x, torch.tensor([0, 1, 2, 3, 1, 0])


@pytest.mark.parametrize("chunks", [False, True])
@pytest.mark.parametrize("inner", [False, True])
def test_cnn_batchnorm_eval_matches_loop(inner, chunks, monkeypatch):
    if chunks:  # per-sample gradients in chunks of 3 and 4 (+2) samples, sized by what they touch
        from local_opt.backends.hooks.rules import affine

        monkeypatch.setattr(affine, "_STREAM_ELEMENTS", 8000)
        monkeypatch.setattr(affine, "_GROUPED_OVERHEAD", 1e9)  # im2col + batched matmul
    model, x, y = _bncnn()
    model.eval()
    ref = per_sample_loop(model, F.cross_entropy, x, y)
    base = plain_grads(model, F.cross_entropy, x, y)
    stats, grads = captured(model, F.cross_entropy, x, y, inner)
    assert rel(grads, base) <= 1e-13  # training is unchanged
    check_stats(stats, ref, inner)
    assert no_hooks_left(model)


@pytest.mark.parametrize("inner", [False, True])
def test_cnn_batchnorm_train_matches_contributions(inner):
    model, x, y = _bncnn()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = brute_force_contributions(model, F.cross_entropy, x, y)
    model.load_state_dict(state)
    base = plain_grads(model, F.cross_entropy, x, y)
    after_plain = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    stats, grads = captured(model, F.cross_entropy, x, y, inner)
    assert rel(grads, base) <= 1e-13
    for k, v in model.state_dict().items():  # running statistics updated as by a plain step
        assert torch.equal(v, after_plain[k]), k
    check_stats(stats, ref, inner)
    assert rel(ref.mean(0), base) <= 1e-12  # the contributions' mean is the batch gradient
    model.load_state_dict(state)  # and the separate pass agrees
    sep = hooks_grad_stats(model, F.cross_entropy, x, y, inner_products=False)
    assert rel(sep.sq_norm_sum, stats.sq_norm_sum) <= TOL
    assert no_hooks_left(model)


class TiedTransformer(nn.Module):
    """Token embedding tied to the head, one encoder layer (MultiheadAttention), a positional
    table used by broadcasting, and a Linear called twice."""

    def __init__(self, vocab=13, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 7, dim))
        self.enc = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.enc(self.emb(ids) + self.pos)
        h = self.mix(torch.tanh(self.mix(h)))
        return self.head(h)


def seq_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1).mean()


@pytest.mark.parametrize("inner", [False, True])
def test_tied_transformer_matches_loop(inner):
    torch.manual_seed(0)
    model = TiedTransformer().double()
    ids, y = torch.randint(0, 13, (5, 7)), torch.randint(0, 13, (5, 7))
    ref = per_sample_loop(model, seq_loss, ids, y)
    base = plain_grads(model, seq_loss, ids, y)
    stats, grads = captured(model, seq_loss, ids, y, inner)
    assert rel(grads, base) <= 1e-13
    check_stats(stats, ref, inner)
    assert no_hooks_left(model) and isinstance(model.pos, nn.Parameter)


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = (z.view(n, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(n, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """The benchmarks' GPT at a tiny size; ``ckpt`` runs the blocks under non-reentrant
    activation checkpointing."""

    def __init__(self, vocab=17, dim=16, layers=2, context=9, ckpt=False):
        super().__init__()
        self.ckpt = ckpt
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, 2) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.tok(ids) + self.pos[:, : ids.shape[1]]
        for b in self.blocks:
            h = checkpoint(b, h, use_reentrant=False) if self.ckpt and torch.is_grad_enabled() else b(h)
        return self.head(self.ln(h))


@pytest.mark.parametrize("ckpt", [False, True])
def test_gpt_matches_loop(ckpt):
    torch.manual_seed(0)
    model = GPT(ckpt=ckpt).double()
    ids = torch.randint(0, 17, (4, 10))
    x, y = ids[:, :-1], ids[:, 1:]
    ref = per_sample_loop(model, seq_loss, x, y)
    base = plain_grads(model, seq_loss, x, y)
    stats, grads = captured(model, seq_loss, x, y, False)
    assert rel(grads, base) <= 1e-13
    check_stats(stats, ref, False)
    assert no_hooks_left(model)


def test_float32_within_1e4():
    torch.manual_seed(0)
    model = GPT(dim=32)
    ids = torch.randint(0, 17, (6, 10))
    x, y = ids[:, :-1], ids[:, 1:]
    ref = per_sample_loop(model.double(), seq_loss, x, y)
    stats, _ = captured(model.float(), seq_loss, x, y, False)
    assert rel(stats.sq_norm_sum, (ref * ref).sum()) <= 1e-4


def test_variance_test_capture_equals_suggest():
    model, x, y = _bncnn()
    model.eval()
    kw = dict(test="norm", min_dof=0, max_batch_size=10**6)
    ref = VarianceTest(model, F.cross_entropy, backend="hooks", **kw)
    b_ref = ref.suggest(x, y, 2)
    vt = VarianceTest(model, F.cross_entropy, **kw)
    with vt.capture(active=False) as cap:
        F.cross_entropy(model(x), y).backward()
    assert cap is None and no_hooks_left(model)
    model.zero_grad(set_to_none=True)
    with vt.capture() as cap:
        F.cross_entropy(model(x), y).backward()
    assert not cap.inner_products and no_hooks_left(model)
    assert vt.suggest_from_capture(cap, 2) == b_ref
    for key in ("mean_sq_norm", "sq_norm_sum", "raw"):
        assert vt.last_stats[key] == pytest.approx(ref.last_stats[key], rel=1e-10), key
    aug = VarianceTest(model, F.cross_entropy, test="augmented")
    with pytest.raises(ValueError, match="kept no inner products"):
        aug.suggest_from_capture(cap, 2)


@pytest.mark.parametrize("test", ["norm", "augmented"])
def test_suggest_after_the_optimizer_step(test):
    """The quick start's order: capture, opt.step(), then suggest_from_capture. The step changes
    the parameters that the accounting check reads; the statistics are those of the block."""
    model, x, y = _bncnn()
    model.eval()
    kw = dict(test=test, min_dof=0, max_batch_size=10**6)
    ref = VarianceTest(model, F.cross_entropy, backend="hooks", **kw)
    b_ref = ref.suggest(x, y, 2)
    vt = VarianceTest(model, F.cross_entropy, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model.zero_grad(set_to_none=True)
    with vt.capture() as cap:
        F.cross_entropy(model(x), y).backward()
    opt.step()  # moves every parameter
    assert vt.suggest_from_capture(cap, 2) == b_ref
    for key in ("mean_sq_norm", "sq_norm_sum", "raw"):
        assert vt.last_stats[key] == pytest.approx(ref.last_stats[key], rel=1e-10), key


def test_rule_error_does_not_break_the_step(monkeypatch):
    """A rule failing inside the backward: .grad as without the capture, the error afterwards."""
    from local_opt.backends.hooks.rules.linear import LinearRule

    def broken(self, site, n, memory):
        raise RuntimeError("boom")

    model, x, y = _bncnn()
    model.eval()
    base = plain_grads(model, F.cross_entropy, x, y)
    monkeypatch.setattr(LinearRule, "finish", broken)
    with StatsCapture(model, inner_products=False) as cap:
        F.cross_entropy(model(x), y).backward()
    assert rel(flat(p.grad for p in model.parameters()), base) <= 1e-13
    with pytest.raises(Exception, match="boom"):
        cap.grad_stats()


def _worker_estimate(rank: int, world: int) -> dict:
    model, x, y = _bncnn()
    model.train()
    x = x + rank  # different batches per rank, same model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(test="norm", min_dof=0, max_batch_size=10**6)
    ref = VarianceTest(model, F.cross_entropy, **kw)
    ref.suggest(x, y, 3)
    model.load_state_dict(state)
    vt = VarianceTest(model, F.cross_entropy, **kw)
    with vt.capture() as cap:
        F.cross_entropy(model(x), y).backward()
    vt.suggest_from_capture(cap, 3)
    return {"ref": ref.last_stats, "got": vt.last_stats}


@pytest.mark.timeout(240)
def test_batchnorm_train_worker_estimate_over_two_ranks():
    """``batch_statistics="worker"``: the in-step path uses each rank's batch gradient as its
    unit, exactly as ``suggest`` does."""
    from dist_utils import run_distributed

    for res in run_distributed(_worker_estimate, 2, timeout=200):
        ref, got = res["ref"], res["got"]
        assert ref["backend"] == got["backend"] == "worker"
        assert got["count"] == 2
        for key in ("mean_sq_norm", "sq_norm_sum", "norm_variance"):
            assert got[key] == pytest.approx(ref[key], rel=1e-10), key


class _OutsideUse(nn.Module):
    """A Linear whose weight is also used outside its forward: the hooks cannot account for it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + x @ self.lin.weight.t()


def test_a_model_the_in_step_path_cannot_follow_says_what_to_do():
    torch.manual_seed(0)
    model = _OutsideUse()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    vt = VarianceTest(model, F.cross_entropy, max_batch_size=64)
    with vt.capture() as cap:
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"in-step path has no fallback; use test\.suggest"):
        vt.suggest_from_capture(cap, 8)


class _LateExtraUse(nn.Module):
    """A Linear whose weight is also used outside the layer once ``extra`` is set."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.extra = False

    def forward(self, x):
        out = self.fc(x)
        return out + self.fc.weight.sum(1) if self.extra else out  # per class: not a no-op


def test_capture_checks_the_first_step_and_every_16th_and_finiteness_on_all():
    """The accounting check runs on the first capture per model and modes and on every 16th
    after it (GradFingerprints installed), not in between; a use of a parameter the hooks do not
    see that starts later is caught at the next re-check; a diverging step is reported on a
    capture without the check too, with NaN statistics."""
    from local_opt.backends.hooks.check import CAPTURE_RECHECK_EVERY as _RECHECK_EVERY
    from local_opt.backends.hooks.check import NonFiniteGradient, UnaccountedGradient

    torch.manual_seed(0)
    model = _LateExtraUse()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))

    def capture(loss_scale=1.0):
        model.zero_grad(set_to_none=True)
        with StatsCapture(model, inner_products=False) as cap:
            (F.cross_entropy(model(x), y) * loss_scale).backward()
        return cap

    checked = []
    for _ in range(_RECHECK_EVERY + 1):
        cap = capture()
        checked.append(cap._fingerprints is not None)
        cap.grad_stats()
    assert checked == [True] + [False] * (_RECHECK_EVERY - 1) + [True]
    # exact on an unchecked capture
    cap = capture()
    assert cap._fingerprints is None
    ref = per_sample_loop(model, F.cross_entropy, x, y)
    assert rel(cap.grad_stats().sq_norm_sum, (ref * ref).sum()) <= 1e-5
    # divergence without the check: Inf, and a finite gradient whose norm overflows float32
    for scale in (float("inf"), 1e30):
        cap = capture(scale)
        assert cap._fingerprints is None
        with pytest.raises(NonFiniteGradient, match="not finite") as err:
            cap.grad_stats()
        assert "fc.weight" in err.value.names and torch.isnan(err.value.stats.sq_norm_sum)
    # an unseen use that starts later: unnoticed until the next re-check, which names it; from
    # then on every capture is checked (and raises) until one passes
    model.extra = True
    raised = []
    for _ in range(_RECHECK_EVERY):
        cap = capture()
        try:
            cap.grad_stats()
            raised.append(False)
        except UnaccountedGradient as e:
            raised.append(True)
            assert cap._fingerprints is not None and "fc.weight" in e.names
    first = raised.index(True)  # 3 captures since the last check above: 12 more to go
    assert first == _RECHECK_EVERY - 4 and all(raised[first:])
