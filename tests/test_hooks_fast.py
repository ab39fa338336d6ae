"""The separate pass's fixed-cost savings (issue 20) against the per-sample ``vmap`` reference.

* Layers of equal shapes finished together (:meth:`Rule.finish_group`): Linear layers on
  sequences and on vectors, with and without bias, in every mode; LayerNorm and RMSNorm;
  BatchNorm in eval mode (vmap) and in training mode (the brute-force contributions).
* The plan reused across passes (:func:`~local_opt.backends.hooks.plan.cached_plan`): after every
  change to the model that the plan depends on (``requires_grad``, a parameter or module replaced,
  a module added, a layer's attribute that makes it unsupported) the statistics still match the
  reference, and so they do across train/eval switches, batch sizes, input shapes and dtypes.
* The conv rule's patches (:func:`~local_opt.backends.hooks.rules.conv.im2col`: a view, a strided
  view copied once, or ``F.unfold``) equal ``F.unfold``'s, and convolutions on each path match
  the per-sample reference.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from test_backend_hooks import MODES, brute_force_contributions, check_against, vmap_per_sample
from torch import nn

import local_opt.backends.hooks.plan as plan
from local_opt.backends.hooks import hooks_grad_stats
from local_opt.backends.hooks.rules.base import Rule


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(2 * dim, dim, bias=False)
        self.rms = nn.RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rms(x + self.out(torch.tanh(self.fc(self.ln(x)))))


class Blocks(nn.Module):
    """Identical blocks on sequences, then identical Linear layers on vectors, a bare broadcast
    parameter: every covered layer but the first and the last is in a group."""

    def __init__(self, dim: int = 6, depth: int = 3, length: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(3, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.1)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.vec = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.inp(x) + self.pos[:, : x.shape[1]])
        return self.head(self.vec(h.mean(1)))


def _data(n: int = 5, length: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, 3, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def _check(model: nn.Module, x, y, tol: float = 1e-10, **kw):
    ref = vmap_per_sample(model, F.cross_entropy, x, y)
    return check_against(model, F.cross_entropy, x, y, ref, tol, **kw)


@pytest.fixture
def groups(monkeypatch):
    """The sizes of the groups finished together in the passes of a test."""
    sizes: list[int] = []
    classes = {c for r in _rules() for c in type(r).__mro__ if "finish_group" in c.__dict__}
    for cls in classes - {Rule}:
        orig = cls.__dict__["finish_group"]

        def spy(self, sites, n, memory, orig=orig):
            sizes.append(len(sites))
            return orig(self, sites, n, memory)

        monkeypatch.setattr(cls, "finish_group", spy)
    return sizes


def _rules() -> list[Rule]:
    from local_opt.backends.hooks.rules.base import NAMED_RULES, RULES

    return [*RULES.values(), *NAMED_RULES.values()]


@pytest.mark.parametrize("mode", MODES)
def test_groups_match_vmap(mode, groups):
    torch.manual_seed(0)
    model = Blocks().double()
    x, y = _data()
    _check(model, x, y, mode=mode)
    # LayerNorm and RMSNorm (3 each) always; fc, out (3 each, out without bias) and vec (2,
    # T = 1) in ghost or keep mode (in "auto" as the cost model chooses)
    if mode in ("ghost", "keep"):
        assert sorted(groups) == [2, 3, 3, 3, 3], groups
    else:
        assert groups.count(3) >= 2 and (mode == "auto" or len(groups) == 2), groups


def test_groups_without_inner_products(groups):
    torch.manual_seed(0)
    model = Blocks().double()
    x, y = _data()
    ref = vmap_per_sample(model, F.cross_entropy, x, y)
    stats = hooks_grad_stats(model, F.cross_entropy, x, y, inner_products=False)
    torch.testing.assert_close(stats.sq_norm_sum, (ref * ref).sum(), rtol=1e-10, atol=0)
    assert groups


def test_float32_groups(groups):
    torch.manual_seed(0)
    model = Blocks()
    x, y = _data()
    ref = vmap_per_sample(model.double(), F.cross_entropy, x, y)
    model.float()
    check_against(model, F.cross_entropy, x.float(), y, ref, 1e-4)
    assert groups


class BNStack(nn.Module):
    """Three Conv2d + BatchNorm2d of equal shapes, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3 if j == 0 else 4, 4, 3, padding=1) for j in range(3)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(4) for _ in range(3)])
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = bn(conv(x)).relu()
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_batchnorm_groups(mode, groups):
    torch.manual_seed(0)
    model = BNStack().double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    with torch.no_grad():
        for bn in model.bns:  # running statistics that differ between the layers
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    _check(model, x, y, mode=mode)
    model.bns[1].bias.requires_grad_(False)  # a group of layers with and without bias: two
    _check(model, x, y, mode=mode)
    assert 2 in groups, groups
    model.bns[1].bias.requires_grad_(True)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = brute_force_contributions(model, F.cross_entropy, x, y)
    model.load_state_dict(state)
    check_against(model, F.cross_entropy, x, y, ref, 1e-10, mode=mode)
    assert groups.count(3) >= 2, groups  # the three BatchNorm layers, in each mode


def _plans(monkeypatch) -> list[int]:
    calls: list[int] = []
    orig = plan.plan_model

    def spy(model):
        calls.append(1)
        return orig(model)

    monkeypatch.setattr(plan, "plan_model", spy)
    return calls


def test_plan_is_reused_until_the_model_changes(monkeypatch):
    torch.manual_seed(0)
    model = Blocks().double()
    x, y = _data()
    _check(model, x, y)
    calls = _plans(monkeypatch)
    _check(model, x, y)
    assert calls == []  # reused
    model.blocks[1].fc.weight.requires_grad_(False)  # frozen: left out
    _check(model, x, y)
    assert len(calls) == 1
    model.blocks[1].fc.weight.requires_grad_(True)
    model.vec[0].bias.requires_grad_(False)
    _check(model, x, y)
    assert len(calls) == 2
    _check(model, x, y)
    assert len(calls) == 2


def test_replaced_parameter_and_module():
    torch.manual_seed(0)
    model = Blocks().double()
    x, y = _data()
    _check(model, x, y)
    model.head.weight = nn.Parameter(torch.randn(3, 6, dtype=torch.float64))
    _check(model, x, y)
    model.blocks[2].fc = nn.Linear(6, 12).double()  # a new module with new parameters
    _check(model, x, y)
    model.blocks[0] = Block(6).double()
    _check(model, x, y)


class Scale(nn.Module):
    """No rule: its parameter is followed through the forward (the loose-parameter site)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.s


class OwnForward(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_added_modules_and_tied_weights():
    torch.manual_seed(0)
    model = Blocks().double()
    x, y = _data()
    _check(model, x, y)
    model.vec.insert(1, Scale())  # covered by another site
    _check(model, x, y)
    model.vec.insert(1, OwnForward(6, 6).double())  # not covered
    with pytest.raises(RuntimeError, match="does not cover"):
        hooks_grad_stats(model, F.cross_entropy, x, y)
    del model.vec[1]
    _check(model, x, y)
    model.vec[3].weight = model.vec[0].weight  # tied: one site with the cross terms
    _check(model, x, y)


def test_attribute_that_makes_a_layer_unsupported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3)).double()
    ids = torch.randint(0, 7, (5, 3))
    y = torch.randint(0, 3, (5,))
    _check(model, ids, y)
    model[0].max_norm = 1.0
    with pytest.raises(RuntimeError, match="max_norm"):
        hooks_grad_stats(model, F.cross_entropy, ids, y)
    model[0].max_norm = None
    _check(model, ids, y)


class BNBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fcs = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fcs(self.bn(self.c(x)).relu().mean((2, 3))))


def test_train_eval_switches():
    """Eval mode: per-sample gradients (vmap); train mode: the contributions' mean is the batch
    gradient; the plan is the same object, the accounting check runs for each mode."""
    torch.manual_seed(0)
    model = BNBlocks().double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    for _ in range(2):
        model.eval()
        _check(model, x, y)
        model.train()
        stats = hooks_grad_stats(model, F.cross_entropy, x, y)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for s, p in zip(stats.grad_sum, model.parameters()):
            torch.testing.assert_close(s / x.shape[0], p.grad, rtol=1e-10, atol=1e-12)


def test_batch_sizes_input_shapes_and_dtypes():
    torch.manual_seed(0)
    model = Blocks(length=6).double()
    for n, length in ((5, 4), (3, 4), (5, 6), (1, 2), (4, 4)):
        x, y = _data(n, length, seed=n + length)
        _check(model, x, y)
    model.float()
    x, y = _data(4, 4)
    ref = vmap_per_sample(model, F.cross_entropy, x.float(), y).double()
    check_against(model, F.cross_entropy, x.float(), y, ref, 1e-4)
    model.double()
    _check(model, x, y)


def test_cached_plan_does_not_keep_the_model_alive():
    """The loose-parameter site's module is the model itself: the cache must not hold it."""
    torch.manual_seed(0)
    model = Blocks().double()
    x, y = _data()
    hooks_grad_stats(model, F.cross_entropy, x, y)
    assert model in plan._PLANS
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize(
    "c, hw, k, stride, pad, dil",
    [
        (3, 32, 3, 2, 1, 1),  # wide output: the strided view
        (16, 16, 3, 1, 1, 1),
        (5, 17, (3, 2), (2, 1), (1, 0), (1, 2)),  # uneven kernel, stride, padding, dilation
        (4, 20, 3, 1, 2, 2),
        (8, 4, 3, 1, 1, 1),  # narrow output: F.unfold
        (6, 2, 3, 2, 1, 1),  # one position
        (7, 1, 3, 1, 1, 1),
        (6, 5, 1, 1, 0, 1),  # 1x1 at stride 1: a view
        (6, 9, 1, 2, 0, 1),
        (3, 32, 16, 16, 0, 1),  # non-overlapping patches (a ViT's patch embedding)
        (5, 17, (4, 3), (4, 3), 0, 1),  # ... with a remainder dropped
    ],
)
def test_im2col_equals_unfold(c, hw, k, stride, pad, dil):
    """The conv rule's patches are ``F.unfold``'s, value for value, on every path."""
    from local_opt.backends.hooks.rules.conv import im2col

    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    k, stride, pad, dil = pair(k), pair(stride), pair(pad), pair(dil)
    a = torch.randn(3, c, hw, hw + 1)
    ref = F.unfold(a, k, dilation=dil, padding=pad, stride=stride)
    got = im2col(a, k, dil, pad, stride)
    assert got.shape == ref.shape
    assert torch.equal(got, ref)
    a_cl = a.to(memory_format=torch.channels_last)
    assert torch.equal(im2col(a_cl, k, dil, pad, stride), ref)


@pytest.mark.parametrize("mode", MODES)
def test_conv_patch_paths_match_vmap(mode):
    """Convolutions whose patches take each path of ``im2col`` (1x1 view, strided view, F.unfold)
    against the per-sample reference."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=1, padding=1),  # 10x10 output: strided view
        nn.Tanh(),
        nn.Conv2d(4, 6, 1),  # 1x1: a view
        nn.Tanh(),
        nn.Conv2d(6, 5, 3, stride=2, padding=1, dilation=2),  # 4x4: F.unfold
        nn.Tanh(),
        nn.Conv2d(5, 3, 3, stride=4),  # 1x1 output: strided view
        nn.Flatten(),
        nn.Linear(3, 2),
    ).double()
    x, y = torch.randn(5, 3, 10, 10, dtype=torch.float64), torch.randint(0, 2, (5,))
    per = vmap_per_sample(model, F.cross_entropy, x, y)
    check_against(model, F.cross_entropy, x, y, per, 1e-9, mode=mode)
    patchify = nn.Sequential(  # non-overlapping patches, 3x3 positions and a remainder dropped
        nn.Conv2d(3, 4, 3, stride=3), nn.Tanh(), nn.Flatten(), nn.Linear(36, 2)
    ).double()
    per = vmap_per_sample(patchify, F.cross_entropy, x, y)
    check_against(patchify, F.cross_entropy, x, y, per, 1e-9, mode=mode)
