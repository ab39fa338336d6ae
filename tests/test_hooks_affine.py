"""Linear/Conv rules of the hooks backend: every mode and code path against a per-sample loop.

The reference is one ``torch.autograd.grad`` per sample in float64 (no vmap, no hooks). The
paths: per-sample gradients through a grouped convolution's weight gradient (``"keep"``,
``"stream"``, with kept chunks of several samples), Gram matrices on viewed im2col patches
(``"ghost"``, grouped and not), modules called more than once (per-sample gradients summed over
calls, Gram matrices over the concatenated positions), padding modes, Conv1d, Linear over
sequences; and the cost model's choice across input sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from local_opt.backends.hooks import hooks_grad_stats
from local_opt.backends.hooks.rules import affine

MODES = ["auto", "ghost", "keep", "stream"]


class TwiceNet(nn.Module):
    """A Conv2d and a grouped Conv1d each called twice, circular padding, a Linear over a
    sequence called twice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular")
        self.c2 = nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=3)
        self.c1d = nn.Conv1d(6, 4, 3, stride=2, padding=1, groups=2, bias=False)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.tanh(self.c1(x))
        x = torch.tanh(self.c2(x)) + torch.tanh(self.c2(x.flip(-1)))
        s = x.flatten(2)  # (N, 6, 16)
        s = torch.tanh(self.c1d(s)) * torch.tanh(self.c1d(s.flip(-1)))  # (N, 4, 8)
        s = s.transpose(1, 2)
        s = torch.tanh(self.fc(s)) + self.fc(s * 0.5)
        return self.head(s.mean(1))


def loop_per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("variant", ["grouped", "im2col", "chunks", "cache_chunks"])
@pytest.mark.parametrize("mode", MODES)
def test_affine_paths_match_per_sample_loop(mode, variant, monkeypatch):
    # the convolutions' per-sample kernel: grouped convolution or im2col + batched matmul
    monkeypatch.setattr(affine, "_GROUPED_OVERHEAD", 1e9 if variant == "im2col" else 0.0)
    if variant == "chunks":  # several chunks of samples per layer (by default one fits all)
        monkeypatch.setattr(affine, "_CACHE_ELEMENTS", 200)
        monkeypatch.setattr(affine, "_CHUNK_ELEMENTS", 200)
    if variant == "cache_chunks":  # "stream" chunks sized by what they touch: 1-3 samples here
        monkeypatch.setattr(affine, "_STREAM_ELEMENTS", 2000)
    torch.manual_seed(0)
    model = TwiceNet().double()
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    ref = loop_per_sample(model, x, y)
    stats = hooks_grad_stats(model, F.cross_entropy, x, y, mode=mode)
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]
    flat_v = torch.cat([t.reshape(-1) for t in v])
    got_sum = torch.cat([g.reshape(-1) for g in stats.grad_sum])
    torch.testing.assert_close(got_sum, ref.sum(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.sq_norm_sum, (ref * ref).sum(), rtol=1e-9, atol=0)
    torch.testing.assert_close(stats.inner_sq_sum(v), ((ref @ flat_v) ** 2).sum(), rtol=1e-9, atol=0)


def test_float32_keep_and_ghost_agree_with_float64():
    """float32 statistics of the grouped-convolution and Gram paths within float32 accuracy."""
    torch.manual_seed(1)
    model = TwiceNet()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    ref = loop_per_sample(model.double(), x.double(), y)
    model.float()
    for mode in ("keep", "ghost"):
        stats = hooks_grad_stats(model, F.cross_entropy, x, y, mode=mode)
        torch.testing.assert_close(
            stats.sq_norm_sum.double(), (ref * ref).sum(), rtol=1e-4, atol=0
        )


def _modes_chosen(model: nn.Module, px: int, monkeypatch) -> dict[str, str]:
    chosen: dict[str, str] = {}
    finish = affine.AffineRule.finish

    def spy(self, site, n, memory):
        out = finish(self, site, n, memory)
        chosen[site.name] = site.mode
        return out

    monkeypatch.setattr(affine.AffineRule, "finish", spy)
    x = torch.randn(2, 3, px, px)
    hooks_grad_stats(model, F.cross_entropy, x, torch.randint(0, 10, (2,)), keep_bytes=2**40)
    return chosen


def test_cost_model_choice_follows_the_input_size(monkeypatch):
    """Early convolutions (many positions, small weights) keep per-sample gradients; late ones
    at a low resolution use Gram matrices (``T² (K + M)`` small against ``T·K·M``)."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    for px in (32, 96):
        chosen = _modes_chosen(model, px, monkeypatch)
        assert chosen["conv1"] == "keep" and chosen["layer4.1.conv2"] == "ghost", (px, chosen)
    assert chosen["layer1.0.conv1"] == "keep", chosen  # 576 positions at 96 px


class NdNet(nn.Module):
    """Conv3d (grouped and not) and ConvTranspose1d/2d: the rules of ``rules/conv_nd.py``, whose
    patches must follow AffineRule's ``(N, g, T, K)`` layout in every mode."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, 2, padding=1)
        self.c3g = nn.Conv3d(4, 4, 2, stride=2, groups=2, bias=False)
        self.t2 = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)
        self.t1 = nn.ConvTranspose1d(3, 2, 2, stride=2, groups=1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        x = torch.tanh(self.c3g(torch.tanh(self.c3(x))))  # (N, 4, 2, 2, 2)
        x = torch.tanh(self.t2(x.flatten(3)))  # (N, 3, 3, 7)
        x = torch.tanh(self.t1(x.flatten(2)))  # (N, 2, 42)
        return self.head(x.mean(2))


@pytest.mark.parametrize("variant", ["grouped", "im2col"])
@pytest.mark.parametrize("mode", MODES)
def test_nd_and_transposed_conv_paths_match_per_sample_loop(mode, variant, monkeypatch):
    monkeypatch.setattr(affine, "_GROUPED_OVERHEAD", 1e9 if variant == "im2col" else 0.0)
    torch.manual_seed(0)
    model = NdNet().double()
    x = torch.randn(5, 2, 3, 3, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    ref = loop_per_sample(model, x, y)
    stats = hooks_grad_stats(model, F.cross_entropy, x, y, mode=mode)
    v = [torch.randn_like(p) for p in model.parameters()]
    flat_v = torch.cat([t.reshape(-1) for t in v])
    got_sum = torch.cat([g.reshape(-1) for g in stats.grad_sum])
    torch.testing.assert_close(got_sum, ref.sum(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.sq_norm_sum, (ref * ref).sum(), rtol=1e-9, atol=0)
    torch.testing.assert_close(stats.inner_sq_sum(v), ((ref @ flat_v) ** 2).sum(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("positions_major", [False, True])
@pytest.mark.parametrize(
    "k, dil, pad, stride, hw",
    [
        ((3, 3), (1, 1), (1, 1), (1, 1), 7),  # narrow output (F.unfold unless positions-major)
        ((3, 3), (1, 1), (1, 1), (1, 1), 9),  # at least 8 wide: the strided copy
        ((3, 2), (2, 1), (2, 0), (2, 1), 11),
        ((1, 1), (1, 1), (0, 0), (2, 2), 9),  # strided 1x1 (a ResNet's downsample)
        ((2, 2), (1, 1), (0, 0), (2, 2), 8),  # non-overlapping patches
        ((3, 3), (1, 1), (0, 0), (1, 1), 3),  # one position
    ],
)
def test_im2col_matches_unfold(k, dil, pad, stride, hw, positions_major):
    from local_opt.backends.hooks.rules.conv import im2col

    a = torch.randn(3, 4, hw, hw + 1, dtype=torch.float64)
    want = F.unfold(a, k, dilation=dil, padding=pad, stride=stride)
    got = im2col(a, k, dil, pad, stride, positions_major)
    assert torch.equal(got, want)


class OneGroupNet(nn.Module):
    """One-group Conv2d/Conv1d layers whose "ghost" patches are laid out positions-major: a
    narrow output, a dilated strided one, one called twice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, padding=1)
        self.c2 = nn.Conv2d(5, 6, 3, stride=2, padding=2, dilation=2)
        self.c1d = nn.Conv1d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.tanh(self.c1(x))  # 7x7: narrow
        x = torch.tanh(self.c2(x))  # 4x4
        s = x.flatten(2)
        s = torch.tanh(self.c1d(s)) + self.c1d(s.flip(-1))
        return self.head(s.mean(2))


@pytest.mark.parametrize("mode", MODES)
def test_one_group_conv_paths_match_per_sample_loop(mode):
    from local_opt import StatsCapture

    torch.manual_seed(0)
    model = OneGroupNet().double()
    x = torch.randn(5, 3, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    ref = loop_per_sample(model, x, y)
    stats = hooks_grad_stats(model, F.cross_entropy, x, y, mode=mode)
    got_sum = torch.cat([g.reshape(-1) for g in stats.grad_sum])
    torch.testing.assert_close(got_sum, ref.sum(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.sq_norm_sum, (ref * ref).sum(), rtol=1e-9, atol=0)
    with StatsCapture(model, mode=mode, inner_products=False) as cap:
        F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(cap.grad_stats().sq_norm_sum, (ref * ref).sum(), rtol=1e-9, atol=0)
