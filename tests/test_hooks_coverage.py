"""Coverage of the hooks backend by behaviour: every rule against a per-sample autograd loop.

The reference is the plainest one there is: one forward and one backward per sample, in float64,
``torch.autograd.grad`` of that sample's loss with respect to every trainable parameter. Each
case runs in eval and in train mode (no dropout, no BatchNorm: the per-sample gradients are the
same definition in both) and checks ``Σ_i g_i``, ``Σ_i ‖g_i‖²`` and ``Σ_i ⟨g_i, v⟩²`` (a random
``v`` and the mean gradient) to 1e-8 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from local_opt._stats import pool
from local_opt.backends.hooks import StatsCapture, hooks_grad_stats, unsupported_layers

TOL = 1e-8


# ----------------------------------------------------------------------------------------------
# reference and check
# ----------------------------------------------------------------------------------------------


def loop_per_sample(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """Per-sample gradients ``(N, P)`` of the trainable parameters (``parameters()`` order), one
    forward and backward per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1).double()
                    for g, p in zip(gs, params)
                ]
            )
        )
    return torch.stack(rows)


def flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def rel(a, b) -> float:
    a, b = (torch.as_tensor(t, dtype=torch.float64) for t in (a, b))
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check(model: nn.Module, x, y, loss_fn=F.cross_entropy, tol=TOL, capture=True) -> None:
    """The hooks backend (separate pass and, with ``capture``, the training step's own backward)
    against the per-sample loop."""
    assert unsupported_layers(model) == []
    ref = loop_per_sample(model, loss_fn, x, y)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    ref_sum, ref_sq = ref.sum(0), (ref * ref).sum()
    ref_q = ((ref @ flat(v)) ** 2).sum()
    ref_qm = ((ref @ (ref_sum / x.shape[0])) ** 2).sum()
    stats = hooks_grad_stats(model, loss_fn, x, y)
    assert rel(flat(stats.grad_sum), ref_sum) <= tol
    assert rel(stats.sq_norm_sum, ref_sq) <= tol
    assert rel(stats.inner_sq_sum(v), ref_q) <= tol
    assert rel(pool(stats).inner_sq_sum, ref_qm) <= tol
    if not capture:
        return
    for p in params:
        p.grad = None
    with StatsCapture(model) as cap:
        loss_fn(model(x), y).backward()
    got = cap.grad_stats()
    assert rel(flat(p.grad for p in params), ref_sum / x.shape[0]) <= tol
    assert rel(flat(got.grad_sum) * got.sum_scale, ref_sum) <= tol
    assert rel(got.sq_norm_sum, ref_sq) <= tol
    assert rel(got.inner_sq_sum(v), ref_q) <= tol
    for p in params:
        p.grad = None


def randomize(model: nn.Module, scale: float = 0.3) -> nn.Module:
    """Move every parameter and float buffer away from its (often 0 or 1) initial value, so that
    no per-sample gradient vanishes by construction."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for b in model.buffers():
            if b.is_floating_point():
                b.copy_(b + 0.1 * torch.rand(b.shape, generator=gen, dtype=b.dtype))
    return model


def images(n=4, c=4, hw=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=g)


def sequences(n=4, t=5, d=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=g)


class Head(nn.Module):
    """Pool to ``(N, C)`` and classify: the loss sees every position."""

    def __init__(self, c: int, classes: int = 3, dims=(2, 3)):
        super().__init__()
        self.dims = dims
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(x.pow(2).mean(self.dims) + x.mean(self.dims))


MODES = pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])


# ----------------------------------------------------------------------------------------------
# normalizations, activations, timm's Linear
# ----------------------------------------------------------------------------------------------


def _image_layers():
    pytest.importorskip("timm")
    from timm.layers import GroupNormAct, LayerNormAct2d, RmsNorm2d
    from timm.layers.grn import GlobalResponseNorm

    return {
        "InstanceNorm2d": lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        "InstanceNorm1d": lambda: nn.Sequential(
            nn.Flatten(2), nn.InstanceNorm1d(4, affine=True), nn.Unflatten(2, (6, 6))
        ),
        "PReLU(C)": lambda: nn.PReLU(4),
        "PReLU(1)": lambda: nn.PReLU(),
        "timm.RmsNorm2d": lambda: RmsNorm2d(4),
        "timm.GroupNormAct": lambda: GroupNormAct(4, 2, act_layer=nn.ReLU, inplace=True),
        "timm.LayerNormAct2d": lambda: LayerNormAct2d(4, act_layer=nn.GELU),
        "timm.GlobalResponseNorm(NCHW)": lambda: GlobalResponseNorm(4, channels_last=False),
        "timm.GlobalResponseNorm(NHWC)": lambda: nn.Sequential(
            Permute(0, 2, 3, 1), GlobalResponseNorm(4), Permute(0, 3, 1, 2)
        ),
    }


class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


IMAGE_LAYERS = [
    "InstanceNorm2d",
    "InstanceNorm1d",
    "PReLU(C)",
    "PReLU(1)",
    "timm.RmsNorm2d",
    "timm.GroupNormAct",
    "timm.LayerNormAct2d",
    "timm.GlobalResponseNorm(NCHW)",
    "timm.GlobalResponseNorm(NHWC)",
]


@MODES
@pytest.mark.parametrize("name", IMAGE_LAYERS)
def test_image_layer_matches_loop(name, train):
    layer = _image_layers()[name]()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layer, Head(4))
    randomize(model.double()).train(train)
    x, y = images(c=3)
    check(model, x, y)


def _sequence_layers():
    pytest.importorskip("timm")
    from timm.layers import LayerNormAct, Linear, RmsNorm

    return {
        "RMSNorm": lambda: nn.RMSNorm(8),
        "RMSNorm(eps=None)": lambda: nn.RMSNorm([5, 8], eps=None),
        "timm.RmsNorm": lambda: RmsNorm(8),
        "timm.LayerNormAct": lambda: LayerNormAct(8, act_layer=nn.SiLU),
        "timm.Linear": lambda: Linear(8, 8),
        "PReLU(T)": lambda: nn.PReLU(5),
    }


SEQUENCE_LAYERS = [
    "RMSNorm",
    "RMSNorm(eps=None)",
    "timm.RmsNorm",
    "timm.LayerNormAct",
    "timm.Linear",
    "PReLU(T)",
]


@MODES
@pytest.mark.parametrize("name", SEQUENCE_LAYERS)
def test_sequence_layer_matches_loop(name, train):
    layer = _sequence_layers()[name]()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), layer, Head(8, dims=(1,)))
    randomize(model.double()).train(train)
    x, y = sequences()
    check(model, x, y)


def test_timm_mobilenetv3_is_covered_and_exact():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=3).double().eval()
    randomize(model, 0.05)
    assert unsupported_layers(model) == []
    x, y = images(n=2, c=3, hw=32)
    check(model, x, y, capture=False)


# ----------------------------------------------------------------------------------------------
# loose parameters used through slicing, indexing and broadcasting
# ----------------------------------------------------------------------------------------------


class RelPosAttention(nn.Module):
    """Swin-style attention: a bias gathered from a relative-position table (through
    ``scaled_dot_product_attention``'s mask or added to the scores), an XCiT-style temperature
    per head, windows of the sequence as extra rows of the batch."""

    def __init__(self, dim=8, heads=2, window=3, sdpa=False):
        super().__init__()
        self.heads, self.window, self.sdpa = heads, window, sdpa
        self.qkv = nn.Linear(dim, 3 * dim)
        self.table = nn.Parameter(torch.randn(2 * window - 1, heads))
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        idx = torch.arange(window)
        self.register_buffer("index", idx[:, None] - idx[None, :] + window - 1)

    def forward(self, x):
        n, t, d = x.shape
        if self.sdpa:  # windows as extra rows of the batch, before the Linear (as in Swin)
            qkv = self.qkv(x.reshape(n * (t // self.window), self.window, d))
        else:
            qkv = self.qkv(x).reshape(n * (t // self.window), self.window, 3 * d)
        q, k, v = qkv.reshape(qkv.shape[0], self.window, 3, self.heads, -1).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        bias = self.table[self.index.reshape(-1)].reshape(self.window, self.window, -1)
        bias = bias.permute(2, 0, 1).unsqueeze(0)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q * self.temperature, k, v, attn_mask=bias)
        else:
            att = (q @ k.transpose(-1, -2)) * self.temperature + bias
            out = att.softmax(-1) @ v
        return out.transpose(1, 2).reshape(n, t, d)


class LooseNet(nn.Module):
    """A positional table used sliced, a ConvNeXt-style ``gamma`` used in place and twice,
    attention with a relative-position table."""

    def __init__(self, dim=8, length=9, sdpa=False):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(length + 3, dim))
        self.attn = RelPosAttention(dim, sdpa=sdpa)
        self.gamma = nn.Parameter(torch.randn(dim))
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = x + self.pos[: x.shape[1]]
        h = h + self.attn(h)
        h = (self.fc(h) + h).mul_(self.gamma.reshape(1, 1, -1)) + h * self.gamma[0]
        return self.head(h.mean(1))


@MODES
@pytest.mark.parametrize("sdpa", [False, True], ids=["scores", "sdpa"])
def test_loose_parameters_match_loop(sdpa, train):
    torch.manual_seed(0)
    model = randomize(LooseNet(sdpa=sdpa).double()).train(train)
    assert unsupported_layers(model) == []
    x, y = sequences(t=9)
    check(model, x, y)


class LooseMatmul(nn.Module):
    """A loose parameter used as a matmul weight: not an elementwise use."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head((x @ self.w).mean(1))


class SequenceFirst(nn.Module):
    """A loose bias added to a sequence-first tensor: its rows are positions, not samples."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = x.transpose(0, 1) + self.bias  # (T, N, D)
        return self.head(h.pow(2).mean(0))


@pytest.mark.parametrize(
    "model, match",
    [(LooseMatmul(), "matmul"), (SequenceFirst(), "rows for 3 samples")],
    ids=["matmul", "sequence-first"],
)
def test_loose_parameter_used_otherwise_is_reported(model, match):
    model.double()
    x, y = sequences()
    assert unsupported_layers(model) == []  # found out while the model runs, not before
    with pytest.raises(RuntimeError, match=match):
        hooks_grad_stats(model, F.cross_entropy, x, y)


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention and the transformer layers built on it
# ----------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, batch_first=True, mask=False, **kw):
        super().__init__()
        self.batch_first, self.mask = batch_first, mask
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kw)
        self.head = Head(8, dims=(1,))

    def forward(self, x):
        t = x.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1) if self.mask else None
        padding = x[..., 0] > 1.0  # per sample, from the data
        padding[:, 0] = False
        h = x if self.batch_first else x.transpose(0, 1)
        out, weights = self.attn(
            h, h, h, attn_mask=causal, key_padding_mask=padding if self.mask else None,
            need_weights=self.mask,
        )
        out = out if self.batch_first else out.transpose(0, 1)
        if weights is not None:
            out = out + weights.mean(-1, keepdim=True)
        return self.head(out)


class CrossAttention(nn.Module):
    """Separate q/k/v projection weights (kdim, vdim != embed_dim), a shorter memory."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True)
        self.head = Head(8, dims=(1,))

    def forward(self, x):
        mem = x[:, :3]
        out, _ = self.attn(x, mem[..., :6], mem[..., 3:])
        return self.head(out)


ATTENTION = {
    "packed, batch_first": lambda: SelfAttention(),
    "packed, sequence first": lambda: SelfAttention(batch_first=False),
    "bias_k/v, zero attn, masks, weights": lambda: SelfAttention(
        mask=True, add_bias_kv=True, add_zero_attn=True
    ),
    "separate q/k/v": lambda: CrossAttention(),
}


@MODES
@pytest.mark.parametrize("name", list(ATTENTION))
def test_multihead_attention_matches_loop(name, train):
    torch.manual_seed(0)
    model = randomize(ATTENTION[name]().double()).train(train)
    x, y = sequences()
    check(model, x, y)


def test_multihead_attention_frozen_in_proj():
    """The issue's case: a frozen in_proj and a trainable out_proj."""
    torch.manual_seed(0)
    model = randomize(SelfAttention().double())
    model.attn.in_proj_weight.requires_grad_(False)
    model.attn.in_proj_bias.requires_grad_(False)
    x, y = sequences()
    check(model, x, y)


@MODES
def test_transformer_encoder_matches_loop(train):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.Sequential(
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), Head(8, dims=(1,))
    )
    randomize(model.double()).train(train)
    x, y = sequences()
    check(model, x, y)


# ----------------------------------------------------------------------------------------------
# tied weights: per-sample contributions of every use summed before squaring
# ----------------------------------------------------------------------------------------------


class TiedLM(nn.Module):
    """nanoGPT's tying: the head is the token embedding's weight; two Linear layers share a
    weight too (used on different inputs), and two embeddings share theirs."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim, padding_idx=0)
        self.extra = nn.Embedding(vocab, dim)
        self.extra.weight = self.wte.weight
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim)
        self.b.weight = self.a.weight
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        h = self.wte(ids) + 0.5 * self.extra(ids.flip(1))
        h = h + self.b(torch.tanh(self.a(h)))
        return self.head(self.ln(h))


def lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


@MODES
def test_tied_weights_match_loop(train):
    torch.manual_seed(0)
    model = randomize(TiedLM().double()).train(train)
    assert unsupported_layers(model) == []
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (4, 7), generator=g)
    ids[0, :3] = 5  # a repeated token
    ids[1, -2:] = 0  # padding
    y = torch.randint(0, 11, (4, 7), generator=g)
    check(model, ids, y, loss_fn=lm_loss)


# ----------------------------------------------------------------------------------------------
# Conv3d and transposed convolutions
# ----------------------------------------------------------------------------------------------

CONVS = {
    "Conv3d": lambda: nn.Conv3d(4, 6, (2, 3, 3), stride=(1, 2, 1), padding=1, groups=2),
    "Conv3d(dilation, same, circular)": lambda: nn.Conv3d(
        4, 4, 3, dilation=(1, 2, 1), padding="same", padding_mode="circular", bias=False
    ),
    "ConvTranspose1d": lambda: nn.Sequential(
        nn.Flatten(2), nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1)
    ),
    "ConvTranspose2d": lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2),
    "ConvTranspose3d": lambda: nn.ConvTranspose3d(
        4, 2, (2, 3, 2), stride=(2, 1, 2), padding=(0, 1, 1), output_padding=(1, 0, 1)
    ),
}


@MODES
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_nd_matches_loop(name, train):
    torch.manual_seed(0)
    conv = CONVS[name]()
    volumetric = "3d" in name
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), Unsqueeze(2) if volumetric else nn.Identity(), conv,
        nn.Flatten(2), Head(conv[-1].out_channels if name.endswith("1d") else conv.out_channels,
                            dims=(2,)),
    )
    randomize(model.double()).train(train)
    x, y = images(c=3, hw=5)
    if volumetric:  # a depth of 3: repeat the 2-d features with a shift
        model[1].depth = 3
    check(model, x, y)


class Unsqueeze(nn.Module):
    """``(N, C, H, W) -> (N, C, D, H, W)``: ``D`` shifted copies."""

    def __init__(self, dim):
        super().__init__()
        self.depth = 1

    def forward(self, x):
        return torch.stack([x.roll(i, -1) for i in range(self.depth)], 2)


# ----------------------------------------------------------------------------------------------
# real models: covered ones stay covered (benchmarks/coverage.py has the full table)
# ----------------------------------------------------------------------------------------------

TIMM_COVERED = {
    "mobilenetv3_small_050": ({}, 32),  # timm's Linear
    "test_convnext": ({}, 32),  # ConvNeXt's gamma, LayerNorm2d
    "convnextv2_atto": ({}, 32),  # GlobalResponseNorm
    "test_vit4": ({}, 160),  # RmsNorm
    "test_efficientnet_gn": ({}, 32),  # GroupNormAct
    "swin_tiny_patch4_window7_224": (  # relative-position table, Linear on windows
        dict(img_size=32, patch_size=2, window_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2)),
        32,
    ),
}


def test_timm_models_stay_covered():
    timm = pytest.importorskip("timm")
    from local_opt.backends import resolve

    for name, (kwargs, size) in TIMM_COVERED.items():
        model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
        assert unsupported_layers(model) == [], name
        assert resolve("auto", model) == "hooks", name
        x, y = torch.randn(2, 3, size, size), torch.tensor([0, 2])
        stats = hooks_grad_stats(model, F.cross_entropy, x, y)  # loose parameters followed too
        assert stats.sq_norm_sum > 0, name


@pytest.mark.parametrize("name", ["test_convnext", "swin_tiny_patch4_window7_224"])
def test_timm_models_match_loop(name):
    timm = pytest.importorskip("timm")
    kwargs, size = TIMM_COVERED[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).double().eval()
    randomize(model, 0.02)
    x, y = torch.randn(2, 3, size, size, dtype=torch.float64), torch.tensor([0, 2])
    check(model, x, y, capture=False)


# ----------------------------------------------------------------------------------------------
# LSTM / GRU
# ----------------------------------------------------------------------------------------------


class Recurrent(nn.Module):
    def __init__(self, cell, batch_first=True, **kw):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(8, 5, batch_first=batch_first, **kw)
        self.head = nn.Linear(5 * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x):
        h = x if self.batch_first else x.transpose(0, 1)
        out = self.rnn(h)[0]
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1) + out[:, -1])


RECURRENT = {
    "LSTM": lambda: Recurrent(nn.LSTM),
    "LSTM(2 layers, bidirectional, sequence first)": lambda: Recurrent(
        nn.LSTM, batch_first=False, num_layers=2, bidirectional=True
    ),
    "GRU(2 layers, no bias)": lambda: Recurrent(nn.GRU, num_layers=2, bias=False),
}


@MODES
@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_matches_loop(name, train):
    torch.manual_seed(0)
    model = randomize(RECURRENT[name]().double()).train(train)
    x, y = sequences()
    check(model, x, y)


class OffBatch(nn.Module):
    """Covered layers run off the batch: nanoGPT's position ``nn.Embedding`` on ``arange(T)``,
    an MLP on relative coordinates making an attention bias, XCiT's projection of one position
    encoding then repeated per sample."""

    def __init__(self, dim=8, length=5):
        super().__init__()
        self.wpe = nn.Embedding(length, dim)
        self.mlp = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
        self.proj = nn.Linear(dim, dim)
        self.qk = nn.Linear(dim, 2 * dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        n, t, _ = x.shape
        pos = torch.arange(t)
        h = x + self.wpe(pos)
        enc = torch.sin(pos[None, :, None] / (1.0 + torch.arange(8))).to(x.dtype)
        h = h + self.proj(enc).repeat(n, 1, 1)
        rel = (pos[:, None] - pos[None, :]).double().reshape(-1, 1)
        bias = self.mlp(rel).reshape(t, t)
        q, k = self.qk(h).chunk(2, -1)
        att = torch.softmax(q @ k.transpose(1, 2) + bias, -1)
        return self.head((att @ h).mean(1))


@MODES
def test_layers_run_off_the_batch_match_loop(train):
    torch.manual_seed(0)
    model = randomize(OffBatch().double()).train(train)
    x, y = sequences()
    check(model, x, y)
