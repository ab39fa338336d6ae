"""Compressed (bf16, int8 with error feedback) and overlapped (one-round-delayed) rounds.

The oracles are written here from the definitions in LocalOptimizer's notes, in plain tensors,
on every rank's known values (each round's local models are all-gathered by a test hook):
block-wise absmax int8 / bf16 rounding with the sender's and the shard owner's residuals; the
delayed average A_prev + (x_now - x_at_send); the outer Nesterov step written out by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn

from local_opt import LocalOptimizer, _compress

BLOCK = 256  # int8 elements per scale (the documented format)


# ------------------------------------------------------------------- the formats, by hand
def ref_decode(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """What a receiver decodes of the 1-D chunk ``v``: bf16 rounding, or int8 with one absmax
    scale per block of 256 (the last block shorter), round half to even."""
    if fmt == "bf16":
        return v.to(torch.bfloat16).float()
    out = torch.empty_like(v)
    for b in range(0, v.numel(), BLOCK):
        blk = v[b : b + BLOCK]
        s = blk.abs().max() / 127.0
        s = s if s > 0 else torch.ones_like(s)
        out[b : b + BLOCK] = torch.round(blk / s).clamp(-127, 127) * s
    return out


def ref_compressed_mean(us: list[torch.Tensor], r: list[torch.Tensor], fmt: str):
    """Mean of the ranks' vectors ``us`` as sent: chunk m of every rank to its owner m, fp32 mean,
    re-encoded with the owner's residual r[m] (updated in place). Returns (mean, decoded sends)."""
    M, N = len(us), us[0].numel()
    C = -(-N // M)
    dec = []
    for u in us:
        p = torch.zeros(M * C)
        p[:N] = u
        dec.append(torch.cat([ref_decode(p[j * C : (j + 1) * C], fmt) for j in range(M)]))
    mean = torch.empty(M * C)
    for j in range(M):
        s = dec[0][j * C : (j + 1) * C].clone()
        for k in range(1, M):
            s += dec[k][j * C : (j + 1) * C]
        s = s / M + r[j]
        d = ref_decode(s, fmt)
        r[j].copy_(s - d)
        mean[j * C : (j + 1) * C] = d
    return mean[:N], [d[:N] for d in dec]


class Reference:
    """The round of LocalOptimizer's notes on all M ranks at once."""

    def __init__(self, theta0, M, fmt, overlap, outer):
        self.theta, self.M, self.fmt, self.overlap, self.outer = (
            theta0.clone(),
            M,
            fmt,
            overlap,
            outer,
        )
        N = theta0.numel()
        self.e = [torch.zeros(N) for _ in range(M)]
        self.r = [torch.zeros(-(-N // M)) for _ in range(M)]
        self.sent = [theta0.clone() for _ in range(M)]  # models at the last send (overlap)
        self.pending = None
        self.buf = None  # outer momentum

    def mean(self, deltas):
        if self.fmt is None:
            return sum(d / self.M for d in deltas)
        us = [d + e for d, e in zip(deltas, self.e)]
        mean, dec = ref_compressed_mean(us, self.r, self.fmt)
        self.e = [u - d for u, d in zip(us, dec)]
        return mean

    def apply(self, mean):
        if not self.outer:
            self.theta = self.theta - mean
            return
        self.buf = mean.clone() if self.buf is None else 0.9 * self.buf + mean
        self.theta = self.theta - 0.7 * (mean + 0.9 * self.buf)

    def round(self, xs, flush=False):
        if not self.overlap:
            self.apply(self.mean([self.theta - x for x in xs]))
            return [self.theta.clone() for _ in xs]
        if self.fmt is None and not self.outer:  # the plain definition, in models
            new = [x.clone() for x in xs]
            if self.pending is not None:
                new = [self.pending + (x - s) for x, s in zip(xs, self.sent)]
            self.pending, self.sent = sum(x / self.M for x in new), new
            if flush:
                new = [self.pending.clone() for _ in xs]
                self.pending, self.sent = None, [x.clone() for x in new]
            return new
        deltas = [s - x for s, x in zip(self.sent, xs)]
        if self.pending is not None:
            self.apply(self.pending)
        new = [self.theta - d for d in deltas]
        self.pending, self.sent = self.mean(deltas), [x.clone() for x in new]
        if flush:
            self.apply(self.pending)
            new = [self.theta.clone() for _ in xs]
            self.pending, self.sent = None, [x.clone() for x in new]
        return new


# --------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("fmt", ["int8", "bf16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_decodes_non_finite(fmt, bad):
    """A diverged rank's NaN/Inf must reach the receivers as non-finite (the round's finiteness
    check then names the rank), never as a silently finite block."""
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    x[1, 5] = bad
    payload, dec = _compress.encode_chunks(x, fmt)
    out = _compress.decode_chunks(payload, 300, fmt)
    assert not torch.isfinite(out[1]).all() and not torch.isfinite(dec[1]).all()
    assert torch.isfinite(out[0]).all()  # the other rows are untouched


def test_formats_roundtrip_and_sizes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 700, generator=g) * torch.exp(torch.randn(3, 700, generator=g))
    x[1, 256:512] = 0.0  # an all-zero block
    payload, dec = _compress.encode_chunks(x, "int8")
    assert payload.dtype == torch.uint8 and payload.shape == (3, 700 + 4 * 3)
    assert _compress.payload_nbytes(700, "int8") == 712
    torch.testing.assert_close(_compress.decode_chunks(payload, 700, "int8"), dec, rtol=0, atol=0)
    for row in range(3):
        torch.testing.assert_close(dec[row], ref_decode(x[row], "int8"), rtol=0, atol=0)
    assert (dec[1, 256:512] == 0).all()
    # absmax: every element within half a quantum of its block's scale
    for b in range(0, 700, BLOCK):
        s = x[:, b : b + BLOCK].abs().amax(dim=1, keepdim=True) / 127
        assert ((dec[:, b : b + BLOCK] - x[:, b : b + BLOCK]).abs() <= s / 2 + 1e-7).all()
    payload, dec = _compress.encode_chunks(x, "bf16")
    assert payload.shape == (3, 1400)
    assert torch.equal(dec, x.bfloat16().float())
    assert torch.equal(_compress.decode_chunks(payload, 700, "bf16"), dec)
    assert _compress.mean_nbytes(1003, 4, "int8") == 4 * (251 + 4)
    assert _compress.mean_nbytes(1003, 2, "bf16") == 2 * 2 * 502


# ------------------------------------------------------------------------------ distributed
def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 100), nn.Tanh(), nn.Linear(100, 3))  # N = 1003


def batch(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def gathered(model: nn.Module, world: int) -> list[torch.Tensor]:
    x = flat(model)
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    return out


def train_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


NESTEROV = lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True)  # noqa: E731


def _rounds(rank: int, world: int, fmt, overlap: bool, outer: bool) -> dict:
    model = make_model()
    opt = LocalOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        sync_every=2,
        compression=fmt,
        overlap=overlap,
        outer_optimizer=NESTEROV if outer else None,
    )
    theta0 = flat(model)
    captured, after = [], []

    def hook(*_):  # the local models of every rank, just before a round
        if opt.will_sync:
            captured.append(gathered(model, world))

    opt.optimizer.register_step_post_hook(hook)
    for t in range(9):
        train_step(model, opt, *batch(1000 * rank + t))
        if opt.synced:
            after.append(flat(model))
    captured.append(gathered(model, world))
    opt.sync()  # a round (one local step since the last), completing the mean in flight
    after.append(flat(model))
    final = gathered(model, world)
    return dict(
        theta0=theta0,
        captured=captured,
        after=after,
        bytes=opt.bytes_communicated,
        num_syncs=opt.num_syncs,
        agree=all(torch.equal(final[0], f) for f in final),
    )


CASES = [
    ("int8", False, False),
    ("bf16", False, False),
    ("int8", False, True),
    (None, True, False),
    ("int8", True, False),
    ("bf16", True, True),
]


def _all_cases(rank: int, world: int) -> list[dict]:
    return [_rounds(rank, world, *case) for case in CASES]  # one spawn for every case


@pytest.fixture(scope="module", params=[2, 4])
def rounds_on(request):
    world = request.param
    per_rank = run_distributed(_all_cases, world, timeout=300)
    return world, {case: [r[i] for r in per_rank] for i, case in enumerate(CASES)}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("fmt,overlap,outer", CASES)
def test_rounds_equal_the_reference(rounds_on, fmt, overlap, outer):
    world, by_case = rounds_on
    res = by_case[(fmt, overlap, outer)]
    ref = Reference(res[0]["theta0"], world, fmt, overlap, outer)
    rounds = len(res[0]["captured"])
    assert rounds == 5 and all(len(r["after"]) == rounds for r in res)
    worst = 0.0
    for k in range(rounds):
        xs = res[0]["captured"][k]
        expected = ref.round(xs, flush=k == rounds - 1)
        for m, r in enumerate(res):
            assert torch.equal(r["captured"][k][m], xs[m])
            worst = max(worst, (r["after"][k] - expected[m]).abs().max().item())
    assert worst < 2e-6, worst
    n = 1003
    per_round = 4 * n if fmt is None else _compress.mean_nbytes(n, world, fmt)
    for r in res:
        assert r["agree"] and r["num_syncs"] == rounds
        assert r["bytes"] == rounds * per_round
    if fmt == "int8":
        assert 4 * n / per_round > (3.5 if world == 2 else 3.9)  # 4012 / 1024 (M=2), / 1020 (M=4)


def _error_feedback(rank: int, world: int, fmt: str, rounds: list[int]) -> dict:
    """Every rank moves by a fixed g_m per round: the uncompressed update is mean(g) each round."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(600))
    opt = LocalOptimizer(torch.optim.SGD([p], lr=0.1), sync_every=1, compression=fmt)
    gens = [torch.Generator().manual_seed(m) for m in range(world)]
    gs = [
        torch.randn(600, generator=g) * torch.exp(2 * torch.randn(600, generator=g)) for g in gens
    ]
    target = sum(gs) / world
    out = {}
    for k in range(1, max(rounds) + 1):
        with torch.no_grad():
            p.sub_(gs[rank])
        opt.sync()
        if k in rounds:
            applied_avg = -p.detach() / k  # (θ_0 - θ_k) / k
            sd = opt.state_dict()["local_opt"]
            e = sd["residual"][0]
            es = [torch.empty_like(e) for _ in range(world)]
            dist.all_gather(es, e)
            r = sd["shard_residual"][0]
            rs = [torch.empty_like(r) for _ in range(world)]
            dist.all_gather(rs, r)
            r_full = torch.cat(rs)[:600]
            # Σ_k Δ̄_k = k·mean(g) − mean_m(e_m) − r
            identity = (k * target - sum(es) / world - r_full) - (-p.detach())
            out[k] = dict(
                err=(applied_avg - target).norm().item(),
                identity=identity.abs().max().item(),
                scale=target.abs().max().item(),
            )
    return out


def _error_feedback_both(rank: int, world: int) -> dict:
    return {fmt: _error_feedback(rank, world, fmt, [1, 10, 100]) for fmt in ("int8", "bf16")}


@pytest.mark.timeout(120)
def test_error_feedback_time_average_converges_to_the_uncompressed_update():
    for both in run_distributed(_error_feedback_both, 2):
        for fmt, r in both.items():
            assert r[1]["err"] > 0  # one round is off by the quantization error
            # the closed form: applied updates = true updates − final residuals (fp32 rounding)
            for k in (1, 10, 100):
                assert r[k]["identity"] < 1e-5 * k * r[k]["scale"], (fmt, r[k])
            # bounded residuals, so the time average converges like 1/k
            assert r[10]["err"] < r[1]["err"] / 4 and r[100]["err"] < r[1]["err"] / 30, (fmt, r)


def _resume(rank: int, world: int, fmt, overlap: bool, outer: bool) -> dict:
    def build(seed):
        m = make_model(seed)
        o = LocalOptimizer(
            torch.optim.AdamW(m.parameters(), lr=1e-2),
            sync_every=3,
            compression=fmt,
            overlap=overlap,
            outer_optimizer=NESTEROV if outer else None,
        )
        return m, o

    model, opt = build(0)
    for t in range(7):  # mid-round, a mean in flight with overlap
        train_step(model, opt, *batch(50 * rank + t))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    for t in range(7, 14):
        train_step(model, opt, *batch(50 * rank + t))
    opt.sync()
    uninterrupted = flat(model)
    model2, opt2 = build(123)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    for t in range(7, 14):
        train_step(model2, opt2, *batch(50 * rank + t))
    opt2.sync()
    has_residual = fmt is not None and ckpt["opt"]["local_opt"]["residual"][0].abs().max() > 0
    return dict(
        same=torch.equal(uninterrupted, flat(model2)),
        has_residual=has_residual,
        bytes=(opt.bytes_communicated, opt2.bytes_communicated),
    )


RESUME_CASES = [("int8", False, False), ("bf16", True, True), (None, True, False)]


def _resume_all(rank: int, world: int) -> list[dict]:
    return [_resume(rank, world, *case) for case in RESUME_CASES]


@pytest.mark.timeout(240)
def test_resume_continues_identically():
    for per_case in run_distributed(_resume_all, 2):
        for (fmt, _, _), r in zip(RESUME_CASES, per_case):
            assert r["same"] and r["bytes"][0] == r["bytes"][1], (fmt, r)
            assert r["has_residual"] == (fmt is not None)


def test_single_process_ignores_compression_and_overlap():
    ref = make_model()
    ours = copy.deepcopy(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = LocalOptimizer(
        torch.optim.SGD(ours.parameters(), lr=0.1), sync_every=2, compression="int8", overlap=True
    )
    for t in range(5):
        train_step(ref, ref_opt, *batch(t))
        train_step(ours, opt, *batch(t))
    opt.sync()
    assert torch.equal(flat(ref), flat(ours)) and opt.bytes_communicated == 0


BAD = [
    (dict(compression="fp8"), ValueError, "compression"),
    (dict(compression=8), ValueError, "compression"),
    (dict(overlap=1), ValueError, "overlap"),
    (dict(overlap=True, on_nonfinite="skip"), ValueError, "on_nonfinite.*overlap"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_arguments(kwargs, exc, match):
    model = make_model()
    with pytest.raises(exc, match=match):
        LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2, **kwargs)


SETUPS = {
    "plain": dict(),
    "int8": dict(compression="int8"),
    "int8+overlap": dict(compression="int8", overlap=True),
    "overlap": dict(overlap=True),
    "outer": dict(outer_optimizer=NESTEROV),
}


@pytest.mark.parametrize("saved", list(SETUPS))
@pytest.mark.parametrize("loaded", list(SETUPS))
def test_a_state_of_another_setup_is_refused_in_either_direction(saved, loaded):
    """Found as a new user: a state saved with int8 + overlap (or an outer optimizer) loaded into
    a plain LocalOptimizer without a word, dropping the mean in flight and the residuals; it is
    refused before anything is loaded, whichever side has the option."""

    def build(setup):
        m = make_model(0)
        return m, LocalOptimizer(
            torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=3, **SETUPS[setup]
        )

    model, opt = build(saved)
    for t in range(4):
        train_step(model, opt, *batch(t))
    state = copy.deepcopy(opt.state_dict())
    _, opt2 = build(loaded)
    before = copy.deepcopy(opt2.state_dict())
    if saved == loaded:
        opt2.load_state_dict(state)
        assert opt2.steps == 4
        return
    with pytest.raises(ValueError, match="state_dict (was saved with|has no outer)"):
        opt2.load_state_dict(state)
    assert opt2.steps == 0 and opt2.optimizer.state_dict()["state"] == before["state"] == {}
