"""LocalOptimizer: parity with the bare optimizer (1 process) and with torch's PostLocalSGDOptimizer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.optim import PostLocalSGDOptimizer

from local_opt import LocalOptimizer

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
}


def make_model(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> float:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


# ------------------------------------------------------------------------- single process
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_single_process_is_the_wrapped_optimizer_bit_for_bit(name):
    ref = make_model()
    ours = copy.deepcopy(ref)
    ref_opt = OPTIMIZERS[name](ref.parameters())
    opt = LocalOptimizer(OPTIMIZERS[name](ours.parameters()), sync_every=3, module=ours)
    for t in range(10):
        x, y = batch(t)
        train_step(ref, ref_opt, x, y)
        train_step(ours, opt, x, y)
        assert_same(params_of(ours), params_of(ref))
        assert opt.synced == ((t + 1) % 3 == 0)
    assert opt.num_syncs == 3 and opt.steps == 10 and opt.local_step == 1
    assert opt.bytes_communicated == 0


def test_param_groups_and_state_are_the_wrapped_optimizers():
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = LocalOptimizer(inner, sync_every=2)
    assert opt.param_groups is inner.param_groups
    train_step(model, opt, *batch(0))
    assert opt.state is inner.state and len(opt.state) == 4
    assert opt.defaults is inner.defaults
    assert "sync_every=2" in repr(opt) and "SGD" in repr(opt)


def test_lr_scheduler_on_the_wrapper_changes_the_real_learning_rate():
    model = make_model()
    ref = copy.deepcopy(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = LocalOptimizer(inner, sync_every=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    for t in range(6):
        x, y = batch(t)
        train_step(model, opt, x, y)
        train_step(ref, ref_opt, x, y)
        sched.step()
        ref_sched.step()
        assert inner.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        assert_same(params_of(model), params_of(ref))
    assert inner.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_zero_grad_set_to_none_and_closure_loss():
    model = make_model()
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=1)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    train_step(model, opt, x, y)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_add_param_group_reaches_the_wrapped_optimizer():
    model = make_model()
    head = nn.Linear(3, 2)
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2)
    opt.add_param_group({"params": head.parameters(), "lr": 0.01})
    assert len(opt.optimizer.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.01


def test_sync_every_can_change_between_steps_and_sync_forces_a_round():
    model = make_model()
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2)
    pattern = []
    for t in range(8):
        if t == 4:
            opt.sync_every = 3
        train_step(model, opt, *batch(t))
        pattern.append(opt.synced)
    assert pattern == [False, True, False, True, False, False, True, False]
    opt.sync()
    assert opt.num_syncs == 4 and opt.local_step == 0 and opt.synced
    with pytest.raises(ValueError, match="sync_every"):
        opt.sync_every = 0


def test_state_dict_round_trip_single_process():
    model = make_model()
    opt = LocalOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), sync_every=3)
    for t in range(4):
        train_step(model, opt, *batch(t))
    opt.sync_every = 5
    sd = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    assert sd["local_opt"]["local_step"] == 1 and "state" in sd and "param_groups" in sd

    model2 = make_model(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = LocalOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-2), sync_every=3)
    opt2.load_state_dict(sd)
    assert (opt2.sync_every, opt2.local_step, opt2.steps, opt2.num_syncs) == (5, 1, 4, 1)
    for t in range(4, 12):
        train_step(model, opt, *batch(t))
        train_step(model2, opt2, *batch(t))
        assert_same(params_of(model), params_of(model2))
        assert opt.synced == opt2.synced


def test_outer_optimizer_single_process_lookahead_semantics():
    """One worker with an outer SGD(lr=0.5): after a round, θ ← θ − 0.5(θ − x) = (θ + x)/2."""
    model = make_model()
    theta = params_of(model)
    opt = LocalOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        sync_every=2,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
    )
    train_step(model, opt, *batch(0))
    x_before_round = None

    def capture(*_):
        nonlocal x_before_round
        x_before_round = params_of(model)

    opt.optimizer.register_step_post_hook(capture)
    train_step(model, opt, *batch(1))
    for p, t0, x in zip(model.parameters(), theta, x_before_round):
        torch.testing.assert_close(p.detach(), t0 - 0.5 * (t0 - x), rtol=0, atol=1e-7)


BAD_ARGUMENTS = [
    (dict(sync_every=0), ValueError, "sync_every"),
    (dict(sync_every=-3), ValueError, "sync_every"),
    (dict(sync_every=2.0), ValueError, "sync_every"),
    (dict(sync_every=True), ValueError, "sync_every"),
    (dict(sync_every=2, average_optimizer_state=["exp_avg"]), ValueError, "exp_avg"),
    (dict(sync_every=2, average_optimizer_state="momentum_buffer"), TypeError, "average_optimizer_state"),
    (dict(sync_every=2, module="model"), TypeError, "module"),
    (dict(sync_every=2, module=nn.Linear(2, 2)), ValueError, "module"),
    (dict(sync_every=2, outer_optimizer=3), TypeError, "outer_optimizer"),
    (dict(sync_every=2, outer_optimizer=lambda p: None), TypeError, "outer_optimizer"),
    (dict(sync_every=2, on_nonfinite="ignore"), ValueError, "on_nonfinite"),
    (dict(sync_every=2, buffers=1), TypeError, "buffers"),
    (dict(sync_every=2, buffers="all"), TypeError, "buffers"),
    (dict(sync_every=2, buffers=["running_mean"]), ValueError, "buffers.*module="),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_ARGUMENTS)
def test_bad_arguments(kwargs, exc, match):
    model = make_model()
    with pytest.raises(exc, match=match):
        LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **kwargs)


def test_not_an_optimizer():
    model = make_model()
    with pytest.raises(TypeError, match="optimizer"):
        LocalOptimizer(model.parameters(), sync_every=2)
    inner = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2)
    with pytest.raises(TypeError, match="already"):
        LocalOptimizer(inner, sync_every=2)


def test_known_state_names_are_accepted():
    model = make_model()
    opt = LocalOptimizer(
        torch.optim.AdamW(model.parameters()),
        sync_every=2,
        average_optimizer_state=["exp_avg", "exp_avg_sq"],
    )
    assert opt._state_names == ("exp_avg", "exp_avg_sq")


# ------------------------------------------------------------------------ distributed
H = 3
STEPS = 10


def _parity_with_post_local_sgd(rank: int, world: int, name: str) -> dict:
    """Ours vs torch's PostLocalSGDOptimizer(PeriodicModelAverager(H, warmup H-1)), step by step."""
    ours, theirs = make_model(), make_model()
    opt = LocalOptimizer(OPTIMIZERS[name](ours.parameters()), sync_every=H)
    ref = PostLocalSGDOptimizer(
        OPTIMIZERS[name](theirs.parameters()),
        PeriodicModelAverager(period=H, warmup_steps=H - 1),
    )
    max_diff, synced = 0.0, []
    for t in range(STEPS):
        x, y = batch(1000 * rank + t)  # different data per rank
        train_step(ours, opt, x, y)
        train_step(theirs, ref, x, y)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            max_diff = max(max_diff, (a - b).abs().max().item())
        synced.append(opt.synced)
    # after the last round the workers agree, and they disagree in between (different data)
    flat = torch.cat([p.detach().reshape(-1) for p in ours.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    diverged = not torch.equal(gathered[0], gathered[-1])
    return dict(max_diff=max_diff, synced=synced, num_syncs=opt.num_syncs, nbytes=opt.bytes_communicated,
                numel=flat.numel(), diverged_after_local_step=diverged)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_equals_torch_post_local_sgd(world, name):
    results = run_distributed(_parity_with_post_local_sgd, world, name)
    for r in results:
        assert r["max_diff"] == 0.0  # bit for bit: same flat buffer, same divide-then-sum order
        assert r["synced"] == [(t + 1) % H == 0 for t in range(STEPS)]
        assert r["num_syncs"] == STEPS // H
        assert r["nbytes"] == STEPS // H * r["numel"] * 4
        # step 10 is a local step after the round at step 9: the ranks' models differ again
        assert r["diverged_after_local_step"]


def _broadcast_buffers_state_outer(rank: int, world: int) -> dict:
    out: dict = {}
    # 1. construction broadcasts parameters and buffers from rank 0
    model = make_model(seed=rank, bn=True)
    with torch.no_grad():
        model[1].running_mean.fill_(float(rank))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = LocalOptimizer(inner, sync_every=2, module=model, average_optimizer_state=["exp_avg"])
    out["params_after_init"] = params_of(model)
    out["rm_after_init"] = model[1].running_mean.clone()
    reference_model = make_model(seed=0, bn=True)
    out["rank0_params"] = params_of(reference_model)

    # 2. buffers and the chosen optimizer state are averaged at a round
    captured = {}

    def capture(*_):
        captured["exp_avg"] = [inner.state[p]["exp_avg"].clone() for p in model.parameters()]
        captured["exp_avg_sq"] = [inner.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
        captured["running_mean"] = model[1].running_mean.clone()
        captured["nbt"] = model[1].num_batches_tracked.clone()

    inner.register_step_post_hook(capture)
    for t in range(2):
        train_step(model, opt, *batch(100 * rank + t))
    out["captured"] = captured
    out["exp_avg"] = [inner.state[p]["exp_avg"].clone() for p in model.parameters()]
    out["exp_avg_sq"] = [inner.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
    out["running_mean"] = model[1].running_mean.clone()
    out["nbt"] = model[1].num_batches_tracked.clone()

    # 3. outer SGD(lr=1) is plain averaging; outer Nesterov follows its closed form
    m_plain, m_outer, m_nest = make_model(), make_model(), make_model()
    o_plain = LocalOptimizer(torch.optim.SGD(m_plain.parameters(), lr=0.1), sync_every=2)
    o_outer = LocalOptimizer(
        torch.optim.SGD(m_outer.parameters(), lr=0.1),
        sync_every=2,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
    )
    o_nest = LocalOptimizer(
        torch.optim.SGD(m_nest.parameters(), lr=0.1),
        sync_every=2,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True),
    )
    theta = params_of(m_nest)
    buf = None
    diffs = []
    for t in range(6):
        x, y = batch(7 * rank + t)
        train_step(m_plain, o_plain, x, y)
        train_step(m_outer, o_outer, x, y)
        if t % 2 == 1:  # a round happens inside this step: compute the expected outer update
            o_nest.optimizer.zero_grad()
            F.cross_entropy(m_nest(x), y).backward()
            o_nest.optimizer.step()
            local = torch.cat([p.detach().reshape(-1) for p in m_nest.parameters()])
            mean = local / world
            dist.all_reduce(mean)
            th = torch.cat([p.reshape(-1) for p in theta])
            delta = th - mean
            buf = delta.clone() if buf is None else 0.9 * buf + delta
            expected = th - 0.7 * (delta + 0.9 * buf)
            o_nest.sync()
            got = torch.cat([p.detach().reshape(-1) for p in m_nest.parameters()])
            theta = [q.detach().clone() for q in m_nest.parameters()]
            diffs.append((got - expected).abs().max().item())
        else:
            train_step(m_nest, o_nest, x, y)
        for a, b in zip(m_plain.parameters(), m_outer.parameters()):
            out.setdefault("outer_lr1_diff", 0.0)
            out["outer_lr1_diff"] = max(out["outer_lr1_diff"], (a - b).abs().max().item())
    out["nesterov_diffs"] = diffs
    return out


@pytest.mark.timeout(180)
def test_broadcast_buffers_optimizer_state_and_outer_step():
    world = 2
    res = run_distributed(_broadcast_buffers_state_outer, world)
    for r in res:
        assert_same(r["params_after_init"], res[0]["rank0_params"])
        assert torch.equal(r["rm_after_init"], torch.zeros(8))  # rank 0 filled 0.0
        # averaged: the mean over ranks of the values right after the inner step of the round
        for name in ("exp_avg",):
            for i, got in enumerate(r[name]):
                mean = sum(q["captured"][name][i] for q in res) / world
                torch.testing.assert_close(got, mean, rtol=1e-6, atol=1e-7)
        # not requested: exp_avg_sq stays local
        assert any(
            not torch.equal(a, b) for a, b in zip(res[0]["exp_avg_sq"], res[1]["exp_avg_sq"])
        )
        mean_rm = sum(q["captured"]["running_mean"] for q in res) / world
        torch.testing.assert_close(r["running_mean"], mean_rm, rtol=1e-6, atol=1e-7)
        assert torch.equal(r["nbt"], r["captured"]["nbt"])  # integer buffer untouched
        assert r["outer_lr1_diff"] < 1e-6
        assert len(r["nesterov_diffs"]) == 3 and max(r["nesterov_diffs"]) < 1e-6


def _resume(rank: int, world: int, name: str, outer: bool) -> dict:
    factory = (lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True)) if outer else None

    def build(seed):
        m = make_model(seed=seed, bn=True)
        o = LocalOptimizer(OPTIMIZERS[name](m.parameters()), sync_every=3, module=m, outer_optimizer=factory)
        return m, o

    model, opt = build(0)
    for t in range(7):  # stop mid-round (local_step == 1)
        train_step(model, opt, *batch(50 * rank + t))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    for t in range(7, 14):
        train_step(model, opt, *batch(50 * rank + t))
    uninterrupted = params_of(model)

    model2, opt2 = build(123)  # fresh objects; construction broadcast is overwritten by the load
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    for t in range(7, 14):
        train_step(model2, opt2, *batch(50 * rank + t))
    return dict(same=all(torch.equal(a, b) for a, b in zip(uninterrupted, params_of(model2))),
                counters=(opt2.steps, opt2.num_syncs, opt2.local_step),
                ref_counters=(opt.steps, opt.num_syncs, opt.local_step))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name,outer", [("sgd_momentum", False), ("adamw", True)])
def test_resume_on_two_ranks_continues_identically(name, outer):
    for r in run_distributed(_resume, 2, name, outer):
        assert r["same"]
        assert r["counters"] == r["ref_counters"] == (14, 4, 2)


def _nonfinite(rank: int, world: int, mode: str) -> dict:
    model = make_model()
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2, on_nonfinite=mode)
    train_step(model, opt, *batch(rank))
    if rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
    before = params_of(model)
    opt.optimizer.step = lambda closure=None: None  # keep the parameters as they are
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.step()
    except FloatingPointError as e:
        return dict(error=str(e))
    unchanged = all(
        torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
        for a, b in zip(before, params_of(model))
    )
    return dict(error=None, warned=[str(x.message) for x in w], unchanged=unchanged,
                num_syncs=opt.num_syncs)


@pytest.mark.timeout(120)
def test_nonfinite_average_raises_on_every_rank_or_skips():
    for r in run_distributed(_nonfinite, 2, "raise"):
        assert r["error"] is not None and "step 2" in r["error"]
    for r in run_distributed(_nonfinite, 2, "skip"):
        assert r["error"] is None and r["unchanged"] and r["num_syncs"] == 0
        assert any("skipped" in m for m in r["warned"])


# ------------------------------------------------------------ buffers and memory formats
class MaskedTransformer(nn.Module):
    """A causal-mask transformer as users write it: the mask (holding -inf) is a buffer."""

    def __init__(self, seq: int = 5, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.block = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(d, 3)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x):
        return self.head(self.block(self.embed(x), src_mask=self.mask, is_causal=True))


def test_buffers_auto_picks_persistent_floating_point_buffers():
    model = make_model(bn=True)
    model.register_buffer("tmp", torch.zeros(2), persistent=False)
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2, module=model)
    # not the integer num_batches_tracked, not the non-persistent buffer
    assert opt._buffer_names == ["1.running_mean", "1.running_var"]
    pick = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2, module=model,
                          buffers=lambda name, b: name.endswith("var"))
    assert pick._buffer_names == ["1.running_var"]
    every = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2, module=model,
                           buffers=True)
    assert every._buffer_names == ["tmp", "1.running_mean", "1.running_var"]


BAD_BUFFERS = [
    (["1.running_mean", "nope", "mask"], ValueError, r"unknown buffer names \['nope', 'mask'\]"),
    (["1.num_batches_tracked"], ValueError, "buffers.*not floating-point"),
    ([3], TypeError, "buffers"),
    (lambda name, b: True, ValueError, "buffers.*num_batches_tracked"),
]


@pytest.mark.parametrize("spec,exc,match", BAD_BUFFERS)
def test_bad_buffers(spec, exc, match):
    model = make_model(bn=True)
    with pytest.raises(exc, match=match):
        LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2, module=model,
                       buffers=spec)


def test_will_sync_tells_the_step_that_ends_a_round():
    model = make_model()
    opt = LocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=3)
    seen = []
    for t in range(7):
        will = opt.will_sync
        train_step(model, opt, *batch(t))
        seen.append((will, opt.synced))
        if t == 3:
            opt.sync_every = 2
    assert all(w == s for w, s in seen), seen
    assert [w for w, _ in seen] == [False, False, True, False, True, False, True]


def test_flat_buffers_keep_channels_last_and_dtype():
    from local_opt import _comm

    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    lin = nn.Linear(4, 2).double()
    t = torch.randn(5, 3).t()  # a transpose: dense, not contiguous
    params = [conv.weight, conv.bias, lin.weight, nn.Parameter(t)]
    values = [p.detach().clone() for p in params]
    flats = _comm.FlatParams(params).buffers()
    assert len(flats) == 2  # one per dtype
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert lin.weight.dtype == torch.float64 and params[3].stride() == t.stride()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    flats[0].mul_(2)  # the parameters live in the flat buffers
    assert torch.equal(conv.weight, 2 * values[0]) and torch.equal(params[3], 2 * values[3])


def _real_stack(rank: int, world: int) -> dict:
    out: dict = {}
    # 1. a causal-mask transformer trains over rounds; the mask is never sent nor averaged
    torch.manual_seed(0)
    model = MaskedTransformer()
    mask = model.mask.clone()
    opt = LocalOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), sync_every=2, module=model)
    losses = []
    for t in range(4):
        g = torch.Generator().manual_seed(100 * rank + t)
        x, y = torch.randn(4, 5, 3, generator=g), torch.randint(0, 3, (4, 5), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    out["losses"], out["num_syncs"] = losses, opt.num_syncs
    out["mask_same"] = torch.equal(model.mask, mask)
    out["params"] = params_of(model)
    numel = sum(p.numel() for p in model.parameters())
    out["bytes_expected"] = 2 * (4 * numel + 4)  # 2 rounds: the parameters + one flag (the mask)
    out["bytes"] = opt.bytes_communicated

    # 2. explicit names: only running_var is averaged; BatchNorm running_mean stays local
    bn = make_model(seed=0, bn=True)
    o = LocalOptimizer(torch.optim.SGD(bn.parameters(), lr=0.1), sync_every=2, module=bn,
                       buffers=["1.running_var"])
    for t in range(2):
        train_step(bn, o, *batch(10 * rank + t))
    out["rm"], out["rv"] = bn[1].running_mean.clone(), bn[1].running_var.clone()

    # 3. channels_last conv weights keep their format and match torch's PostLocalSGDOptimizer
    def conv_model():
        torch.manual_seed(1)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten())
        return m.to(memory_format=torch.channels_last)

    ours, theirs = conv_model(), conv_model()
    opt = LocalOptimizer(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), sync_every=2)
    ref = PostLocalSGDOptimizer(torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9),
                                PeriodicModelAverager(period=2, warmup_steps=1))
    calls = []
    real_all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.dtype)
        return real_all_reduce(tensor, *args, **kwargs)

    max_diff, formats = 0.0, []
    for t in range(4):
        g = torch.Generator().manual_seed(7 * rank + t)
        x, y = torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 8, generator=g)
        x = x.to(memory_format=torch.channels_last)
        for m, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            if o is opt:
                dist.all_reduce = counting
            o.step()
            dist.all_reduce = real_all_reduce
        max_diff = max(max(((a - b).abs().max().item() for a, b in
                            zip(ours.parameters(), theirs.parameters()))), max_diff)
        formats.append(all(m.weight.is_contiguous(memory_format=torch.channels_last)
                           and m.weight.grad.is_contiguous(memory_format=torch.channels_last)
                           for m in (ours[0], ours[2])))
    out["conv_max_diff"], out["formats"], out["calls"] = max_diff, formats, calls
    return out


@pytest.mark.timeout(180)
def test_masked_transformer_buffers_and_channels_last_on_two_ranks():
    res = run_distributed(_real_stack, 2)
    for r in res:
        assert r["num_syncs"] == 2 and all(map(lambda v: v == v and abs(v) < 1e3, r["losses"]))
        assert r["mask_same"] and r["bytes"] == r["bytes_expected"]
        assert_same(r["params"], res[0]["params"])  # step 4 ended a round
        # named buffer averaged (ranks agree), the other one local (ranks differ: different data)
        assert torch.equal(r["rv"], res[0]["rv"])
        assert r["conv_max_diff"] == 0.0 and all(r["formats"])
        assert r["calls"] == [torch.float32, torch.float32]  # one collective per round (2 rounds)
    assert not torch.equal(res[0]["rm"], res[1]["rm"])


# ------------------------------------------------- the torch.optim API, side by side
def _api_step_hooks(model, opt):
    log = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: log.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: log.append(("post", o is opt)))
    for t in range(3):
        train_step(model, opt, *batch(t))
        if t == 1:
            h1.remove()
    return log


def _api_state_dict_hooks(model, opt):
    log = []
    opt.register_state_dict_pre_hook(lambda o: log.append(("pre", o is opt)))

    def post(o, sd):
        sd["extra"] = 7
        return sd

    opt.register_state_dict_post_hook(post)
    train_step(model, opt, *batch(0))
    sd = opt.state_dict()
    return log, sd["extra"], sorted(k for k in sd if k != "local_opt")


def _api_load_state_dict_hooks(model, opt):
    log = []
    train_step(model, opt, *batch(0))
    sd = copy.deepcopy(opt.state_dict())

    def pre(o, sd):
        log.append(("pre", o is opt))
        sd["param_groups"][0]["lr"] = 0.03
        return sd

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(lambda o: log.append(("post", o is opt)), prepend=True)
    opt.load_state_dict(sd)
    train_step(model, opt, *batch(1))
    return log, opt.param_groups[0]["lr"]


def _api_add_param_group(model, opt):
    head = nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.fill_(0.1), head.bias.zero_()
    opt.add_param_group({"params": list(head.parameters()), "lr": 0.01})
    for t in range(3):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(head(model(x)), y % 2).backward()
        opt.step()
    return len(opt.param_groups), opt.param_groups[1]["lr"], params_of(head)


def _api_zero_grad(model, opt):
    train_step(model, opt, *batch(0))
    opt.zero_grad(set_to_none=False)
    zeros = [p.grad is not None and not p.grad.any() for p in model.parameters()]
    opt.zero_grad()
    return zeros, [p.grad is None for p in model.parameters()]


def _api_defaults(model, opt):
    return dict(opt.defaults), opt.defaults["lr"]


def _api_profiler_names(model, opt):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step(model, opt, *batch(0))
    names = {e.name for e in prof.events()}
    cls = type(opt).__name__
    return f"Optimizer.step#{cls}.step" in names, f"Optimizer.zero_grad#{cls}.zero_grad" in names


def _run_scheduler(make):
    def case(model, opt):
        sched = make(opt)
        seen = []
        for t in range(6):
            loss = train_step(model, opt, *batch(t))
            sched.step(loss) if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) \
                else sched.step()
            seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        return seen, sched.state_dict().get("last_epoch")

    return case


def _api_state_dict_round_trip(model, opt):
    for t in range(3):
        train_step(model, opt, *batch(t))
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    inner2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9)
    opt2 = LocalOptimizer(inner2, sync_every=2) if isinstance(opt, LocalOptimizer) else inner2
    opt2.load_state_dict(sd)
    for t in range(3, 6):
        train_step(model, opt, *batch(t))
        train_step(model2, opt2, *batch(t))
    sd.pop("local_opt", None)
    return sd, [torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters())]


SCHED = torch.optim.lr_scheduler
API_CASES = {
    "step_hooks": _api_step_hooks,
    "state_dict_hooks": _api_state_dict_hooks,
    "load_state_dict_hooks": _api_load_state_dict_hooks,
    "add_param_group": _api_add_param_group,
    "zero_grad": _api_zero_grad,
    "defaults": _api_defaults,
    "profiler_names": _api_profiler_names,
    "state_dict_round_trip": _api_state_dict_round_trip,
    "SequentialLR": _run_scheduler(lambda o: SCHED.SequentialLR(
        o, [SCHED.LinearLR(o, 0.1, total_iters=2), SCHED.CosineAnnealingLR(o, T_max=4)], [2])),
    "OneCycleLR": _run_scheduler(lambda o: SCHED.OneCycleLR(o, max_lr=0.5, total_steps=6)),
    "LambdaLR": _run_scheduler(lambda o: SCHED.LambdaLR(o, lambda e: 1 / (1 + e))),
    "ReduceLROnPlateau": _run_scheduler(lambda o: SCHED.ReduceLROnPlateau(o, patience=0)),
}


@pytest.mark.parametrize("case", API_CASES)
def test_torch_optim_api_side_by_side_with_the_wrapped_optimizer(case):
    """Every call of the Optimizer API gives on the wrapper what it gives on the bare optimizer."""
    results = []
    for wrap in (False, True):
        model = make_model()
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = LocalOptimizer(inner, sync_every=2) if wrap else inner
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
            observed = API_CASES[case](model, opt)
        results.append((observed, params_of(model)))
    (bare, bare_params), (wrapped, wrapped_params) = results
    assert repr(wrapped) == repr(bare)  # tensors compare by their values in repr
    assert_same(wrapped_params, bare_params)
