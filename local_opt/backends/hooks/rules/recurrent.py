r"""Rules for ``nn.LSTM`` and ``nn.GRU`` (any layers, bidirectional, batch first or not).

Their ``forward`` hands every weight to one fused kernel (``_VF.lstm``/``_VF.gru``), so no hook
sees a per-step input. While such a module runs, a :class:`~torch.overrides.TorchFunctionMode`
takes that call and computes the same recurrence step by step in Python (float64 agrees with the
kernel to rounding): per layer and direction, the input projection ``A = linear(x, W_ih, b_ih)``
over the whole sequence and, at each step, ``B_t = linear(h_{t-1}, W_hh, b_hh)``, both reported
as Linear calls. A weight's per-sample gradient is then a Linear layer's,
:math:`G_i = \sum_t \delta_{it} u_{it}^\top` over the steps (summed before squaring), with the
closed forms of :mod:`.affine`. The step loop costs a Python iteration per time step:
exact, not fast, for long sequences. Packed sequences and ``proj_size`` are not supported
(reported by the plan or the pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from local_opt.backends.hooks.rules.affine import seq_inner, seq_sq_norms, seq_weight_sum
from local_opt.backends.hooks.rules.base import (
    LayerStats,
    Memory,
    Rule,
    Site,
    calls_by_tag,
    intercept_forward,
    register,
    sq_norms,
    tagged,
)

__all__: list[str] = []  # private module


class _Intercept(TorchFunctionMode):
    def __init__(self, module: nn.Module, handler: Callable[..., Any]) -> None:
        super().__init__()
        self.module, self.handler = module, handler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("lstm", "gru") and len(args) == 9 and isinstance(args[2], (list, tuple)):
            if args[2] and args[2][0] is self.module._flat_weights[0]:
                return self.handler(name, *args)
        if name in ("lstm", "gru") and len(args) == 9 and isinstance(args[3], (list, tuple)):
            raise RuntimeError("The hooks backend does not support packed sequences")
        return func(*args, **kwargs)


class _Prefixed(tuple):
    """Parameter names by prefix: ``"weight_hh_l1_reverse" in _Prefixed(("weight_hh_l",))``."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.startswith(tuple(self))


class RecurrentRule(Rule):
    """``nn.LSTM`` / ``nn.GRU``: see the module docstring."""

    param_names = _Prefixed(("weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l"))

    def unsupported(self, module: nn.Module) -> str | None:
        if getattr(module, "proj_size", 0):
            return "proj_size is not supported"
        return None

    def register(self, site: Site, on_call: Callable[[Tensor, Tensor], None]) -> list[Any]:
        module = site.module
        emit = tagged(site, on_call)
        return intercept_forward(
            module, lambda: _Intercept(module, lambda kind, *a: _recurrence(emit, kind, *a))
        )

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        by_tag = calls_by_tag(site)
        ref = next(iter(site.params.values()))
        sq = torch.zeros(n, dtype=torch.float64, device=ref.device)
        grad_sum: dict[str, Tensor] = {}
        factors: dict[str, tuple[Tensor, Tensor]] = {}
        per: dict[str, Tensor] = {}
        for name, p in site.params.items():
            kind, _, rest = name.partition("_")  # "weight", "ih_l0_reverse"
            piece, layer = rest.split("_", 1)  # "ih", "l0_reverse"
            pairs = by_tag.get((layer, piece), [])
            if not pairs:
                grad_sum[name] = torch.zeros_like(p)
                continue
            u = torch.cat([x.to(p.dtype).reshape(n, -1, x.shape[-1]) for x, _ in pairs], 1)
            d = torch.cat([y.to(p.dtype).reshape(n, -1, y.shape[-1]) for _, y in pairs], 1)
            if kind == "bias":
                g = d.sum(1)
                per[name] = g
                grad_sum[name] = g.sum(0)
                sq += sq_norms(g)
                continue
            grad_sum[name] = seq_weight_sum(u, d)
            sq += seq_sq_norms(u, d)
            factors[name] = (u, d)

        def inner(v: dict[str, Tensor]) -> Tensor:
            res = torch.zeros(n, dtype=torch.float64, device=sq.device)
            for name, (u, d) in factors.items():
                if name in v:
                    res += seq_inner(u, d, v[name].to(u.dtype))
            for name, g in per.items():
                if name in v:
                    res += (g @ v[name].to(g.dtype)).double()
            return res

        return LayerStats(grad_sum, sq, inner)


def _recurrence(
    emit: Callable[[tuple, Tensor, Tensor], None],
    kind: str,
    input: Tensor,
    hx: Any,
    weights: list[Tensor],
    bias: bool,
    num_layers: int,
    dropout: float,
    training: bool,
    bidirectional: bool,
    batch_first: bool,
) -> tuple[Tensor, ...]:
    """``_VF.lstm``/``_VF.gru`` step by step, reporting the linear maps."""
    lstm = kind == "lstm"
    x = input if batch_first else input.transpose(0, 1)  # (N, T, F)
    h0, c0 = hx if lstm else (hx, None)
    dirs = 2 if bidirectional else 1
    per = 4 if bias else 2
    steps = x.shape[1]
    hs, cs = [], []
    layer_in = x
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            j = layer * dirs + d
            w = weights[j * per : (j + 1) * per]
            b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
            tag = f"l{layer}" + ("_reverse" if d else "")
            a = F.linear(layer_in, w[0], b_ih)  # (N, T, G)
            emit((tag, "ih"), layer_in, a)
            h = h0[j]
            c = c0[j] if lstm else None
            out: list[Tensor] = [h] * steps
            for t in range(steps - 1, -1, -1) if d else range(steps):
                bt = F.linear(h, w[1], b_hh)
                emit((tag, "hh"), h, bt)
                if lstm:
                    i, f, g, o = (a[:, t] + bt).chunk(4, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                else:
                    r_i, z_i, n_i = a[:, t].chunk(3, 1)
                    r_h, z_h, n_h = bt.chunk(3, 1)
                    r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
                    h = (1 - z) * torch.tanh(n_i + r * n_h) + z * h
                out[t] = h
            outs.append(torch.stack(out, 1))
            hs.append(h)
            cs.append(c)
        layer_in = torch.cat(outs, 2) if dirs == 2 else outs[0]
        if dropout and training and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, True)
    output = layer_in if batch_first else layer_in.transpose(0, 1)
    if lstm:
        return output, torch.stack(hs), torch.stack(cs)  # type: ignore[arg-type]
    return output, torch.stack(hs)


register(RecurrentRule(), nn.LSTM, nn.GRU)
