"""Never a crash where a fallback is possible: any exception inside the hooks backend's pass.

Under ``backend="auto"`` the pass falls back (to ``"vmap"`` here, by the cost rule) with one
warning naming the layer and the exception, and the statistics are the fallback's exact ones;
with ``backend="hooks"`` requested explicitly the error names the layer. No hook or
torch-function mode is left behind.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from local_opt import VarianceTest, backends
from local_opt.backends.hooks.failure import HooksBackendError
from local_opt.backends.hooks.rules import bare, linear
from local_opt.backends.vmap import vmap_stats


class Scale(nn.Module):
    """A loose parameter (followed by the hooks' torch-function mode)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.gamma


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), Scale(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def _batch(n: int = 5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _raise(*args, **kwargs):
    raise ValueError("boom from a rule")


_FINISH = linear.LinearRule.finish


def _raise_on_fc(self, site, n, memory):
    """The Linear rule, failing on the head only."""
    if site.name == "fc":
        raise ValueError("boom from a rule")
    return _FINISH(self, site, n, memory)


@pytest.mark.parametrize(
    "where, layer",
    [("rule", "fc"), ("forward", "body.2")],
    ids=["rule-finish", "inside-forward"],
)
def test_any_exception_falls_back_under_auto(monkeypatch, where, layer):
    if where == "rule":
        monkeypatch.setattr(linear.LinearRule, "finish", _raise_on_fc)
    else:  # raised by the loose-parameter mode while the model's forward runs
        monkeypatch.setattr(bare.BareMode, "_meet", _raise)
    torch.manual_seed(0)
    model = Net().double()
    x, y = _batch()
    with pytest.warns(RuntimeWarning, match=rf"failed on layer '{layer}' \(ValueError: boom"):
        name, stats = backends.compute("auto", model, F.cross_entropy, x, y)
    assert name == "vmap"
    assert _get_current_function_mode_stack() == []  # nothing left entered
    ref = vmap_stats(model, F.cross_entropy, x, y)
    assert torch.allclose(stats.sq_norm_sum, ref.sq_norm_sum, rtol=1e-10)
    # the model stays on the fallback, without a second warning; VarianceTest works on it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", model, 5) == "vmap"
        assert 1 <= VarianceTest(model, F.cross_entropy).suggest(x, y, 5)
    # the model's own forward is untouched: no hook left on any module
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_explicit_hooks_backend_names_the_layer(monkeypatch):
    monkeypatch.setattr(linear.LinearRule, "finish", _raise_on_fc)
    model = Net().double()
    x, y = _batch()
    with pytest.raises(HooksBackendError, match=r"layer 'fc'.*ValueError: boom") as info:
        VarianceTest(model, F.cross_entropy, backend="hooks").suggest(x, y, 5)
    assert info.value.layer == "fc"
    assert isinstance(info.value.error, ValueError)
    assert _get_current_function_mode_stack() == []


def test_beit_is_never_a_crash():
    """timm BEiT once crashed inside the loose-parameter probe (``RuntimeError: The expanded
    size of the tensor (3) must match ...``); under ``"auto"`` it now runs, exact."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "beit_base_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
        depth=1, embed_dim=16, num_heads=2,
    ).double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name, stats = backends.compute("auto", model, F.cross_entropy, x, y)
        ref = vmap_stats(model, F.cross_entropy, x, y)
    assert name in ("hooks", "vmap")
    assert torch.allclose(stats.sq_norm_sum, ref.sq_norm_sum, rtol=1e-8)
    assert _get_current_function_mode_stack() == []
