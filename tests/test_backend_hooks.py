"""The hooks backend against independent references.

* models without cross-sample coupling: per-sample gradients from ``torch.func.vmap(grad(...))``;
* BatchNorm in training mode: the mean of the contributions is autograd's batch gradient, and the
  contributions themselves come from a brute-force pass in which every layer uses one copy of its
  parameters per sample.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from local_opt._stats import pool
from local_opt.backends.hooks import (
    StatsCapture,
    hooks_grad_stats,
    hooks_stats,
    release_workspaces,
    supports,
    unsupported_layers,
)

MODES = ["auto", "ghost", "keep", "stream"]


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------


def vmap_per_sample(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """Per-sample gradients ``(N, P)`` of the trainable parameters, in ``parameters()`` order."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_loss(pr, xi, yi):
        out = functional_call(model, ({**pr, **frozen}, buffers), (xi[None],))
        return loss_fn(out, yi[None])

    g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], 1).double()


def reference_stats(per_sample: torch.Tensor, v: torch.Tensor) -> tuple:
    return per_sample.sum(0), (per_sample * per_sample).sum(), ((per_sample @ v) ** 2).sum()


def flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def check_against(model, loss_fn, x, y, per_sample, tol, **kw):
    stats = hooks_grad_stats(model, loss_fn, x, y, **kw)
    assert stats.count == x.shape[0] and stats.unit_size == 1
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [g.shape for g in stats.grad_sum] == [p.shape for p in trainable]
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in trainable]
    ref_sum, ref_sq, ref_q = reference_stats(per_sample, flat(v))
    assert rel(flat(stats.grad_sum), ref_sum) <= tol
    assert rel(stats.sq_norm_sum, ref_sq) <= tol
    assert rel(stats.inner_sq_sum(v), ref_q) <= tol
    # and at the pooled mean, as the variance tests call it
    mean = ref_sum / x.shape[0]
    pooled = torch.tensor(pool(stats).inner_sq_sum, dtype=torch.float64)
    assert rel(pooled, ((per_sample @ mean) ** 2).sum()) <= tol
    return stats


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Conv2d (padding, stride, groups, dilation, 'same' + reflect), GroupNorm, Conv1d, LayerNorm."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.c3 = nn.Conv2d(8, 6, 2, dilation=2, padding="same", padding_mode="reflect")
        self.c1d = nn.Conv1d(6, 6, 3, padding=1, stride=1)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 5)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        x = F.relu(self.gn(self.c1(x)))
        x = F.relu(self.dw(self.c2(x)))
        x = self.c3(x).flatten(2)  # (N, 6, 16)
        x = self.c1d(x).transpose(1, 2)  # (N, 16, 6)
        return self.fc(self.ln(x).mean(1))


class TinyTransformer(nn.Module):
    """Embedding (padding_idx), a bare broadcast parameter, Linear over sequences used twice,
    LayerNorm used twice, attention, a head on the first token."""

    def __init__(self, vocab=11, dim=8, length=7):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.1)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        h = self.emb(ids) + self.pos
        for _ in range(2):
            q, k, v = self.qkv(self.ln(h)).chunk(3, -1)
            att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1)
            h = h + self.proj(att @ v)
        return self.head(h[:, 0])


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)
        self.bn3 = nn.BatchNorm1d(3)

    def forward(self, x):
        x = self.bn1(self.c1(x)).relu_()  # in-place activation on a BatchNorm output
        x = self.bn2(self.c2(x)).relu_()
        return self.bn3(self.fc(x.mean((2, 3))))


def _data(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 5, (n,), generator=g)


# ----------------------------------------------------------------------------------------------
# exactness against vmap
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_convnet_matches_vmap(mode):
    torch.manual_seed(0)
    model = ConvNet().double()
    x, y = _data()
    ref = vmap_per_sample(model, F.cross_entropy, x, y)
    check_against(model, F.cross_entropy, x, y, ref, 1e-10, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_transformer_matches_vmap(mode):
    torch.manual_seed(0)
    model = TinyTransformer().double()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (5, 7), generator=g)
    ids[0, :4] = 3  # a repeated token
    ids[1, 2:] = 0  # padding
    y = torch.randint(0, 3, (5,), generator=g)
    ref = vmap_per_sample(model, F.cross_entropy, ids, y)
    check_against(model, F.cross_entropy, ids, y, ref, 1e-10, mode=mode)


def test_float32_and_no_memory():
    torch.manual_seed(0)
    model = ConvNet()
    x, y = _data()
    ref = vmap_per_sample(model.double(), F.cross_entropy, x, y)
    model.float()
    check_against(model, F.cross_entropy, x.float(), y, ref, 1e-4, keep_bytes=0)


def test_frozen_parameters_are_left_out():
    torch.manual_seed(0)
    model = ConvNet().double()
    model.c2.weight.requires_grad_(False)
    model.ln.bias.requires_grad_(False)
    model.fc.requires_grad_(False)
    x, y = _data()
    ref = vmap_per_sample(model, F.cross_entropy, x, y)
    check_against(model, F.cross_entropy, x, y, ref, 1e-10)


def test_timm_resnet18_eval_matches_vmap():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).double().eval()
    assert unsupported_layers(model) == []
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 5, 7])
    ref = vmap_per_sample(model, F.cross_entropy, x, y)
    check_against(model, F.cross_entropy, x, y, ref, 1e-10)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_timm_vit_tiny_matches_vmap():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10
    ).double()
    with torch.no_grad():  # timm initializes cls_token/pos_embed tiny and the head to zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    assert unsupported_layers(model) == []
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([3, 8])
    ref = vmap_per_sample(model, F.cross_entropy, x, y)
    check_against(model, F.cross_entropy, x, y, ref, 1e-10)


# ----------------------------------------------------------------------------------------------
# BatchNorm in training mode: per-sample contributions
# ----------------------------------------------------------------------------------------------


def brute_force_contributions(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """Every Conv2d/Linear/BatchNorm uses one copy of its parameters per sample; the gradient of
    ``N·L`` with respect to sample ``i``'s copies is sample ``i``'s contribution ``(N, P)``."""
    n = x.shape[0]
    copies: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        copies[id(p)] = p.detach().expand(n, *p.shape).clone().requires_grad_(True)

    def hook(module, args, out):
        (a,) = args
        w = copies[id(module.weight)]
        b = copies[id(module.bias)] if module.bias is not None else None
        if isinstance(module, nn.Conv2d):
            outs = [
                F.conv2d(
                    a[i : i + 1], w[i], None if b is None else b[i], module.stride, module.padding
                )
                for i in range(n)
            ]
            return torch.cat(outs)
        if isinstance(module, nn.Linear):
            return torch.einsum("nk,nmk->nm", a, w) + b
        # BatchNorm in training mode: batch statistics, per-sample affine copies
        xhat = F.batch_norm(a, None, None, None, None, True, 0.0, module.eps)
        shape = (n, -1) + (1,) * (a.dim() - 2)
        return xhat * w.view(shape) + b.view(shape)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d))
    ]
    try:
        loss = loss_fn(model(x), y) * n
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(loss, [copies[id(p)] for p in model.parameters()])
    return torch.cat([g.reshape(n, -1) for g in grads], 1).double()


def test_batchnorm_train_contributions_are_exact():
    torch.manual_seed(0)
    model = BNNet().double().train()
    x, y = _data(6)
    y = y % 3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = brute_force_contributions(model, F.cross_entropy, x, y)
    model.load_state_dict(state)
    for mode in MODES:
        check_against(model, F.cross_entropy, x, y, ref, 1e-10, mode=mode)
    # the definition: their mean is the batch gradient
    batch = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    model.load_state_dict(state)
    stats = hooks_grad_stats(model, F.cross_entropy, x, y)
    assert rel(flat(stats.grad_sum) / x.shape[0], flat(batch)) <= 1e-12


def test_timm_resnet18_train_mean_is_batch_gradient():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).double().train()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 5, 7, 0])
    stats = hooks_grad_stats(model, F.cross_entropy, x, y)
    batch = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert rel(flat(stats.grad_sum) / 4, flat(batch)) <= 1e-12
    assert stats.sq_norm_sum > 0


# ----------------------------------------------------------------------------------------------
# the model is left as found; statistics stay valid while others are computed
# ----------------------------------------------------------------------------------------------


def test_model_left_as_found():
    torch.manual_seed(0)
    model = BNNet().double().train()
    model.bn2.eval()
    model.c1.bias.requires_grad_(False)
    x, y = _data(4)
    y = y % 3
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks_grad_stats(model, F.cross_entropy, x, y)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. running stats
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert not model.c1._forward_hooks


def test_live_statistics_do_not_share_workspace():
    torch.manual_seed(0)
    release_workspaces()
    model = TinyTransformer(dim=16).double()
    ids = torch.randint(1, 11, (6, 7))
    y = torch.randint(0, 3, (6,))
    v = [torch.randn_like(p) for p in model.parameters()]
    first = hooks_grad_stats(model, F.cross_entropy, ids, y, mode="auto")
    expected = first.inner_sq_sum(v)
    second = hooks_grad_stats(model, F.cross_entropy, ids.flip(0) % 5 + 1, y, mode="auto")
    assert torch.equal(first.inner_sq_sum(v), expected)
    del first, second
    gc.collect()
    third = hooks_grad_stats(model, F.cross_entropy, ids, y, mode="auto")
    assert torch.allclose(third.inner_sq_sum(v), expected, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# coverage
# ----------------------------------------------------------------------------------------------


class Bare(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(shape))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * self.scale


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.b.bias = self.a.bias  # a shared weight alone is covered; a shared bias is not


@pytest.mark.parametrize(
    "model, expected",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4, proj_size=2)), ["1 (LSTM: proj_size"]),
        (nn.Sequential(nn.RNNCell(4, 4)), ["0 (RNNCell"]),
        (nn.Sequential(nn.Bilinear(4, 4, 4)), ["0 (Bilinear: parameters"]),
        (nn.Sequential(OwnForward(4, 4)), ["0 (OwnForward"]),
        (nn.Sequential(nn.RNN(4, 4)), ["0 (RNN"]),
        (nn.Sequential(nn.Embedding(5, 4, max_norm=1.0)), ["0 (Embedding: max_norm"]),
        (Tied(), ["a (Linear: parameter shared", "b (Linear: parameter shared"]),
    ],
)
def test_unsupported_layers_are_named(model, expected):
    found = unsupported_layers(model)
    assert len(found) == len(expected)
    assert all(f.startswith(e) for f, e in zip(found, expected)), found
    with pytest.raises(RuntimeError, match="does not cover"):
        hooks_grad_stats(model, lambda o, t: o.sum(), torch.zeros(2, 4), None)


def test_covered_models():
    assert unsupported_layers(ConvNet()) == []
    assert unsupported_layers(TinyTransformer()) == []
    assert unsupported_layers(Bare((1, 4))) == []  # broadcast along the batch: covered
    frozen = nn.Sequential(nn.Linear(2, 2), nn.LSTM(2, 2).requires_grad_(False))
    assert unsupported_layers(frozen) == []


class NotBroadcast(nn.Module):
    """A (1, D) parameter used as a weight, not broadcast along the batch."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) @ self.w.T


def test_bare_parameter_not_broadcast_is_refused():
    model = NotBroadcast().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="not broadcast along the batch"):
        hooks_grad_stats(model, lambda o, t: o.pow(2).mean(), x, None)


def test_bare_broadcast_parameter_matches_vmap():
    torch.manual_seed(0)
    model = Bare((1, 4)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(5, 4, dtype=torch.float64)
    ref = vmap_per_sample(model, F.mse_loss, x, y)
    check_against(model, F.mse_loss, x, y, ref, 1e-10)


class ModifiesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = x * 1.0
        out = self.fc(x)
        x.add_(1.0)  # changes the input the layer's gradient depends on
        return out + x


def test_input_modified_in_place_is_detected():
    model = ModifiesInput()
    with pytest.raises(RuntimeError):
        hooks_grad_stats(model, lambda o, t: o.pow(2).mean(), torch.randn(3, 4), None)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"keep_bytes": -1}, "Invalid keep_bytes"), ({"mode": "fast"}, "Invalid mode")],
)
def test_invalid_arguments(kwargs, match):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=match):
        hooks_grad_stats(model, F.mse_loss, torch.randn(2, 3), torch.randn(2, 2), **kwargs)


def test_invalid_loss_and_vector():
    model = nn.Linear(3, 2)
    x, y = torch.randn(2, 3), torch.randn(2, 2)
    with pytest.raises(ValueError, match="Invalid loss_fn"):
        hooks_grad_stats(model, lambda o, t: (o - t).pow(2), x, y)
    stats = hooks_grad_stats(model, F.mse_loss, x, y)
    with pytest.raises(ValueError, match="Invalid v"):
        stats.inner_sq_sum([torch.zeros(2, 3)])


# ----------------------------------------------------------------------------------------------
# statistics from the training step's own backward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_capture_matches_vmap_and_keeps_training_gradients(scale):
    torch.manual_seed(0)
    model = TinyTransformer().double()
    ids = torch.randint(1, 11, (5, 7))
    y = torch.randint(0, 3, (5,))
    ref = vmap_per_sample(model, F.cross_entropy, ids, y)
    with StatsCapture(model, grad_scale=scale) as cap:
        (F.cross_entropy(model(ids), y) * scale).backward()
    assert isinstance(model.pos, nn.Parameter)  # the per-sample view is gone again
    assert not model._forward_hooks and not model._forward_pre_hooks
    grads = flat([p.grad for p in model.parameters()])
    assert rel(grads, ref.mean(0) * scale) <= 1e-12  # the user's .grad is the usual one
    v = [torch.randn_like(p) for p in model.parameters()]
    stats = cap.grad_stats()
    ref_sum, ref_sq, ref_q = reference_stats(ref, flat(v))
    assert rel(flat(stats.grad_sum) * stats.sum_scale, ref_sum) <= 1e-10
    assert rel(stats.sq_norm_sum, ref_sq) <= 1e-10
    assert rel(stats.inner_sq_sum(v), ref_q) <= 1e-10


@pytest.mark.parametrize("test", ["norm", "augmented"])
def test_suggest_from_capture_equals_suggest(test):
    from local_opt import StatsCapture as PublicStatsCapture
    from local_opt import VarianceTest

    assert PublicStatsCapture is StatsCapture
    torch.manual_seed(0)
    model = TinyTransformer().double()
    ids = torch.randint(1, 11, (10, 7))  # 9 degrees of freedom: the smoothed policy decides
    y = torch.randint(0, 3, (10,))
    ref = VarianceTest(model, F.cross_entropy, test=test, backend="hooks", max_batch_size=10**6)
    b_ref = ref.suggest(ids, y, 5)
    assert ref.last_stats["reason"] is None
    with StatsCapture(model, grad_scale=0.5) as cap:
        (F.cross_entropy(model(ids), y) * 0.5).backward()
    vt = VarianceTest(model, F.cross_entropy, test=test, max_batch_size=10**6)
    assert vt.suggest_from_capture(cap, 5) == b_ref
    assert vt.last_stats["backend"] == "hooks_capture"
    for key in ("mean_sq_norm", "sq_norm_sum", "raw"):
        assert vt.last_stats[key] == pytest.approx(ref.last_stats[key], rel=1e-10), key
    with pytest.raises(TypeError, match="Invalid capture"):
        vt.suggest_from_capture(object(), 5)


def test_capture_batchnorm_train_equals_separate_pass():
    torch.manual_seed(0)
    model = BNNet().double().train()
    x, y = _data(6)
    y = y % 3
    sep = hooks_grad_stats(model, F.cross_entropy, x, y)
    with StatsCapture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    got = cap.grad_stats()
    v = [torch.randn_like(p) for p in model.parameters()]
    assert rel(flat(got.grad_sum) * got.sum_scale, flat(sep.grad_sum) * sep.sum_scale) <= 1e-12
    assert rel(got.sq_norm_sum, sep.sq_norm_sum) <= 1e-12
    assert rel(got.inner_sq_sum(v), sep.inner_sq_sum(v)) <= 1e-12


def test_capture_misuse():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with StatsCapture(model) as cap:
        F.mse_loss(model(x), y)
    with pytest.raises(RuntimeError, match="no backward"):
        cap.grad_stats()
    with StatsCapture(model) as cap:
        F.mse_loss(model(x), y).backward()
        F.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="2 forward passes"):
        cap.grad_stats()
    with pytest.raises(ValueError, match="Invalid grad_scale"):
        StatsCapture(model, grad_scale=0.0)
    with pytest.raises(RuntimeError, match="does not cover"):
        with StatsCapture(nn.RNN(2, 2)):
            pass


def test_backend_entry_point_without_inner_products():
    torch.manual_seed(0)
    model = ConvNet().double()
    x, y = _data()
    assert supports(model) and not supports(nn.RNN(2, 2))
    full = hooks_grad_stats(model, F.cross_entropy, x, y)
    lean = hooks_stats(model, F.cross_entropy, x, y, inner_products=False, chunk_size=None)
    assert rel(flat(lean.grad_sum), flat(full.grad_sum)) <= 1e-12
    assert rel(lean.sq_norm_sum, full.sq_norm_sum) <= 1e-12
    assert torch.isnan(lean.inner_sq_sum([torch.zeros_like(g) for g in lean.grad_sum]))


# ----------------------------------------------------------------------------------------------
# timm's BatchNormAct2d: δ at the BatchNorm output, before the (in-place) activation
# ----------------------------------------------------------------------------------------------


def _bn_act_net():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        BatchNormAct2d(6, act_layer=nn.ReLU, inplace=True),  # ReLU overwrites the BN output
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        BatchNormAct2d(6, act_layer=nn.SiLU, inplace=True, drop_layer=nn.Identity),
        nn.Flatten(),
        nn.Linear(6 * 16, 3),
    ).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, BatchNormAct2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return timm, net


def test_timm_batchnorm_act_eval_matches_vmap():
    timm, net = _bn_act_net()
    net.eval()
    assert unsupported_layers(net) == []
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    check_against(net, F.cross_entropy, x, y, vmap_per_sample(net, F.cross_entropy, x, y), 1e-10)
    eff = timm.create_model("test_efficientnet", num_classes=4).double().eval()
    assert unsupported_layers(eff) == []  # efficientnet-style models no longer fall back
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 3])
    check_against(eff, F.cross_entropy, x, y, vmap_per_sample(eff, F.cross_entropy, x, y), 1e-10)


def test_timm_batchnorm_act_train_mean_is_batch_gradient_and_capture_agrees():
    _, net = _bn_act_net()
    net.train()
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    state = copy.deepcopy(net.state_dict())
    batch = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    net.load_state_dict(state)
    sep = hooks_grad_stats(net, F.cross_entropy, x, y)
    assert rel(flat(sep.grad_sum) / 6, flat(batch)) <= 1e-12
    net.load_state_dict(state)
    with StatsCapture(net) as cap:
        F.cross_entropy(net(x), y).backward()
    got = cap.grad_stats()
    assert rel(flat([p.grad for p in net.parameters()]), flat(batch)) <= 1e-12
    v = [torch.randn_like(p) for p in net.parameters()]
    assert rel(flat(got.grad_sum) * got.sum_scale, flat(sep.grad_sum) * sep.sum_scale) <= 1e-12
    assert rel(got.sq_norm_sum, sep.sq_norm_sum) <= 1e-12
    assert rel(got.inner_sq_sum(v), sep.inner_sq_sum(v)) <= 1e-12


def test_batchnorm_act_that_skips_its_drop_is_an_error():
    _, net = _bn_act_net()
    bn = net[1]
    bn.forward = lambda x: bn.act(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                               bn.bias, False, 0.0, bn.eps))
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="expected 1 .*to call its Identity"):
        hooks_grad_stats(net.eval(), F.cross_entropy, x, torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------------------------
# accounting: a gradient the hooks did not see is detected, never counted as zero
# ----------------------------------------------------------------------------------------------


class TiedHead(nn.Module):
    """A covered Linear whose weight is used a second time outside its forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(torch.tanh(self.fc(x)), self.fc.weight)))


class TwiceLinear(nn.Module):
    """One Linear called twice: two calls of one site, both seen."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.fc(torch.tanh(self.fc(x))))


def _accounting_data(shape):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (shape[0],), generator=gen
    )


@pytest.mark.parametrize(
    "make, shape, names",
    [
        (TiedHead, (6, 5), ["fc.weight"]),
    ],
)
def test_unseen_gradient_is_detected_and_handled_exactly(make, shape, names):
    from local_opt import VarianceTest
    from local_opt.backends.hooks.check import UnaccountedGradient

    torch.manual_seed(0)
    model = make().double()
    x, y = _accounting_data(shape)
    assert supports(model)  # the plan alone cannot tell
    with pytest.raises(UnaccountedGradient) as err:
        hooks_grad_stats(model, F.cross_entropy, x, y)
    assert err.value.names == names
    with pytest.raises(UnaccountedGradient, match=names[0]):  # and from the training step
        with StatsCapture(model) as cap:
            F.cross_entropy(model(x), y).backward()
        cap.grad_stats()
    model.zero_grad(set_to_none=True)
    ref = pool(vmap_stats_of(model, x, y))
    vt = VarianceTest(model, F.cross_entropy, test="augmented")
    with pytest.warns(RuntimeWarning, match=names[0]):
        vt.suggest(x, y, 4)
    for key in ("mean_sq_norm", "sq_norm_sum", "inner_sq_sum"):
        assert vt.last_stats[key] == pytest.approx(getattr(ref, key), rel=1e-10), key
    assert not supports(model) and names[0] in unsupported_layers(model)[0]


def vmap_stats_of(model, x, y):
    from local_opt.backends.vmap import vmap_stats

    return vmap_stats(model, F.cross_entropy, x, y)


@pytest.mark.parametrize("mutation", ["drop_call", "zero_bias"])
def test_mutation_dropped_contribution_is_detected(monkeypatch, mutation):
    """Mutation test: a rule that loses part of a layer's gradient must trip the check."""
    from local_opt.backends.hooks.check import UnaccountedGradient
    from local_opt.backends.hooks.rules.linear import LinearRule

    torch.manual_seed(0)
    model = TwiceLinear().double()
    x, y = _accounting_data((6, 5))
    per_sample = vmap_per_sample(model, F.cross_entropy, x, y)
    check_against(model, F.cross_entropy, x, y, per_sample, 1e-10)  # unmutated: exact
    if mutation == "drop_call":
        finish = LinearRule.finish

        def dropping(self, site, n, memory):
            site.calls = site.calls[:1]  # forget the second call of the shared Linear
            return finish(self, site, n, memory)

        monkeypatch.setattr(LinearRule, "finish", dropping)
    else:
        zeros = lambda self, d: d.new_zeros(d.shape[0], d.shape[-1])  # noqa: E731
        monkeypatch.setattr(LinearRule, "bias_grads", zeros)
    fresh = TwiceLinear().double()  # not yet checked
    with pytest.raises(UnaccountedGradient, match="fc"):
        hooks_grad_stats(fresh, F.cross_entropy, x, y)
    with pytest.raises(UnaccountedGradient, match="fc"):
        with StatsCapture(fresh) as cap:
            F.cross_entropy(fresh(x), y).backward()
        cap.grad_stats()


def _scaled_ce(scale):
    return lambda out, y: F.cross_entropy(out, y) * scale


@pytest.mark.parametrize(
    "scale",
    [float("inf"), 1e30],  # Inf/NaN gradients; finite ones whose norms overflow float32
    ids=["inf", "overflow"],
)
def test_nonfinite_gradient_is_reported_as_divergence_not_as_unseen_use(scale):
    """A diverging step's gradients fail the accounting check for every parameter; the error
    says they are not finite (lower the learning rate), not that the hooks missed a use, and the
    model stays covered: the next finite step is checked and exact. (The separate pass's check
    sums in float64: gradients of 1e30 pass it, only Inf/NaN ones are reported.)"""
    from local_opt import VarianceTest
    from local_opt.backends.hooks.check import NonFiniteGradient, UnaccountedGradient

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 5, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    with StatsCapture(model) as cap:
        _scaled_ce(scale)(model(x), y).backward()
    with pytest.raises(NonFiniteGradient, match="not finite.*learning rate") as err:
        cap.grad_stats()
    assert not isinstance(err.value, UnaccountedGradient) and "0.weight" in err.value.names
    assert not torch.isfinite(err.value.stats.sq_norm_sum)  # never mistaken for a finite step
    model.zero_grad(set_to_none=True)
    if scale == float("inf"):
        with pytest.raises(NonFiniteGradient, match="diverges"):  # the separate pass's check
            hooks_grad_stats(model, _scaled_ce(scale), x, y)
        # VarianceTest keeps the batch size with a warning saying why, for both paths
        vt = VarianceTest(model, _scaled_ce(scale), backend="hooks")
        with pytest.warns(RuntimeWarning, match="diverges.*keeping batch_size=6"):
            assert vt.suggest(x, y, 6) == 6
    vt = VarianceTest(model, F.cross_entropy)
    with vt.capture() as cap:
        _scaled_ce(scale)(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="diverges.*keeping batch_size=6"):
        assert vt.suggest_from_capture(cap, 6) == 6
    # still covered, and a finite step passes the check with exact statistics
    assert supports(model) and not unsupported_layers(model)
    model.zero_grad(set_to_none=True)
    per_sample = vmap_per_sample(model, F.cross_entropy, x, y)
    check_against(model, F.cross_entropy, x, y, per_sample, 1e-4)
    with StatsCapture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    assert rel(cap.grad_stats().sq_norm_sum, (per_sample * per_sample).sum()) <= 1e-4


def _diverging_rank_worker(rank, world):
    """Rank 1's step diverges (loss × Inf), rank 0's does not; both paths of VarianceTest."""
    import warnings

    from local_opt import VarianceTest

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(3 + rank)
    x, y = torch.randn(6, 5, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    loss_fn = _scaled_ce(float("inf") if rank == 1 else 1.0)
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vt = VarianceTest(model, loss_fn, backend="hooks")
        out["separate"] = vt.suggest(x, y, 6)
        vt = VarianceTest(model, F.cross_entropy)
        model.zero_grad(set_to_none=True)
        with vt.capture() as cap:
            loss_fn(model(x), y).backward()
        out["capture"] = vt.suggest_from_capture(cap, 6)
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    out["reason"] = vt.last_stats.get("reason")
    return out


@pytest.mark.timeout(120)
def test_a_diverging_rank_keeps_the_batch_size_on_every_rank():
    """One rank's non-finite gradients reach every rank through the pooled statistics: both
    ranks keep b with the divergence warning (no hang, no rank growing alone), on the separate
    pass and on the capture."""
    from dist_utils import run_distributed

    results = run_distributed(_diverging_rank_worker, 2, timeout=100)
    for r in results:
        assert r["separate"] == 6 and r["capture"] == 6
        assert "diverges" in (r["reason"] or "")
        assert sum("diverges" in m for m in r["warnings"]) == 2, r["warnings"]


# ----------------------------------------------------------------------------------------------
# "auto" when the hooks backend cannot cover a model: vmap or microbatch by cost and memory
# ----------------------------------------------------------------------------------------------


class OwnConv3d(nn.Conv3d):
    """A Conv3d subclass with its own forward: no hooks rule."""

    def forward(self, x):
        return super().forward(x)


class Conv3dBN(nn.Module):
    """A Conv3d (no hooks rule) and, optionally, a BatchNorm1d in training mode."""

    def __init__(self, bn: bool):
        super().__init__()
        self.conv3d = OwnConv3d(1, 2, 2)
        self.bn = nn.BatchNorm1d(2) if bn else nn.Identity()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv3d(x).mean((2, 3, 4))))


def _policy_run(model, b, **kw):
    import warnings

    from local_opt import VarianceTest

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 1, 3, 3, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (b,), generator=gen)
    vt = VarianceTest(model, F.cross_entropy, max_batch_size=10**6, **kw)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        vt.suggest(x, y, b)
    # the fallback's warning (not the one-worker BatchNorm warning, tested in test_errors.py)
    msgs = [str(m.message) for m in w]
    return vt.last_stats["backend"], [m for m in msgs if "auto" in m and "one worker" not in m]


@pytest.mark.parametrize(
    "bn, b, budget, choice, says",
    [
        (False, 16, None, "vmap", "exact"),
        (True, 4, None, "vmap", "O(b^2)"),  # cheap enough at b=4, and the warning says so
        (True, 16, None, "microbatch", "O(b^2)"),  # ~16 passes: the estimate instead
        (False, 16, 1000, "microbatch", "MiB of per-sample gradients"),  # over the memory budget
    ],
)
def test_auto_fallback_policy(monkeypatch, bn, b, budget, choice, says):
    from local_opt import backends

    if budget is not None:
        monkeypatch.setattr(backends, "MEMORY_BUDGET", budget)
    torch.manual_seed(0)
    model = Conv3dBN(bn).double().train()
    backend, warned = _policy_run(model, b)
    assert backend == choice
    assert len(warned) == 1 and "conv3d" in warned[0] and repr(choice) in warned[0]
    assert says in warned[0]
    again, warned = _policy_run(model, b)  # one warning per model and choice
    assert again == choice and warned == []


def test_unseen_gradient_fallback_says_when_it_is_the_quadratic_path():
    model = nn.Sequential(TiedHead(), nn.BatchNorm1d(3)).double().train()
    x, y = _accounting_data((6, 5))
    with pytest.warns(RuntimeWarning, match=r"0\.fc\.weight.*O\(b\^2\)"):
        hooks_stats(model, F.cross_entropy, x, y)


class PatchFold(nn.Module):
    """MobileViT's layout: image patches folded into the batch dimension before a transformer
    block, so the block's layers see N·P rows for N samples."""

    def __init__(self, norm: bool, patch_major: bool = True) -> None:
        super().__init__()
        self.patch_major = patch_major  # rows ordered patch by patch: not sample-major
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4) if norm else nn.Identity()
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.conv(x)  # (N, 4, 4, 4)
        p = h.reshape(n, 4, 2, 2, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(n * 4, 4, 4)
        if self.patch_major:
            p = p.reshape(n, 4, 4, 4).transpose(0, 1).reshape(n * 4, 4, 4)
        p = p + self.mix(self.norm(p))  # (N·P, L, C): rows are patches, not samples
        if self.patch_major:
            p = p.reshape(4, n, 4, 4).transpose(0, 1)
        return self.head(p.reshape(n, -1))


@pytest.mark.parametrize("norm", [True, False])
def test_rows_that_are_not_samples_go_to_vmap_loudly(norm):
    """A layer that sees N·P rows (patches folded into the batch) cannot be split by sample:
    never silently wrong, never an unhelpful shape error; the exact vmap statistics instead."""
    from local_opt import VarianceTest
    from local_opt.backends.hooks.check import UnsupportedShapes

    torch.manual_seed(0)
    model = PatchFold(norm).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    name = "norm" if norm else "mix"
    with pytest.raises(UnsupportedShapes, match=rf"rows of {name} .*\[12\] for 3 samples"):
        hooks_grad_stats(model, F.cross_entropy, x, y)
    ref = pool(vmap_stats_of(model, x, y))
    vt = VarianceTest(model, F.cross_entropy, backend="hooks", min_dof=0)
    with pytest.warns(RuntimeWarning, match=rf"cannot split the rows of {name} by sample"):
        vt.suggest(x, y, 3)
    assert vt.last_stats["backend"] == "vmap"
    assert vt.last_stats["sq_norm_sum"] == pytest.approx(ref.sq_norm_sum, rel=1e-12)


@pytest.mark.parametrize("norm", [True, False])
def test_sample_major_folded_rows_are_exact(norm):
    """MobileViT's own layout (each sample's patches in consecutive rows) is probed once and
    the rows are summed per sample: exact."""
    torch.manual_seed(0)
    model = PatchFold(norm, patch_major=False).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    got = hooks_grad_stats(model, F.cross_entropy, x, y)
    ref = vmap_stats_of(model, x, y)
    assert float(got.sq_norm_sum) == pytest.approx(float(ref.sq_norm_sum), rel=1e-10)
