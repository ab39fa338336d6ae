r"""Rule for ``nn.MultiheadAttention`` (and so ``nn.TransformerEncoder``/``DecoderLayer``).

``nn.MultiheadAttention.forward`` hands its parameters to
``F.multi_head_attention_forward``, which uses them functionally: the packed ``in_proj_weight``
(or ``q/k/v_proj_weight``) and ``in_proj_bias`` in three linear maps, ``bias_k``/``bias_v``
appended to the keys and values, and ``out_proj``'s weight and bias (its ``forward`` never
runs). While the module runs, a :class:`~torch.overrides.TorchFunctionMode` takes that call and
computes the same function in pieces whose inputs and outputs the hooks can see:

#. ``q, k, v = linear(query, W_q, b_q), linear(key, W_k, b_k), linear(value, W_v, b_v)``
   (``W_q`` … rows of ``in_proj_weight``, or the separate weights), each piece reported as a
   call ``(input, output)``;
#. ``bias_k``/``bias_v`` broadcast over the batch (a per-sample copy each), appended;
#. the attention itself: ``F.multi_head_attention_forward`` with identity projections and
   no biases (exact: a product with the identity rounds nothing), so masks, ``is_causal``,
   ``add_zero_attn``, dropout and the returned weights are torch's own;
#. ``linear(o, out_proj.weight, out_proj.bias)``, reported.

Each linear piece is a Linear layer on ``(L, N, ·)`` inputs (batch in dimension 1): per-sample
weight gradients ``Σ_t δ_t x_tᵀ`` of disjoint rows of the packed weight, so their squared norms
add; calls of the module on several inputs are concatenated along the positions (summed before
squaring). The identity products cost about the four projections' flops again.
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

_ARGS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
    "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias",
)
# (tag, weight name, row block of the packed weight, bias block of in_proj_bias)
_PIECES = (("q", "q_proj_weight", 0), ("k", "k_proj_weight", 1), ("v", "v_proj_weight", 2))


class _Intercept(TorchFunctionMode):
    def __init__(self, module: nn.Module, handler: Callable[..., Any]) -> None:
        super().__init__()
        self.module, self.handler = module, handler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            bound = dict(zip(_ARGS, args), **kwargs)
            if bound.get("out_proj_weight") is self.module.out_proj.weight:
                return self.handler(**bound)
        return func(*args, **kwargs)


class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention``: see the module docstring."""

    param_names = (
        "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
        "bias_k", "bias_v",
    )
    claimed_children = ("out_proj",)

    def unsupported(self, module: nn.Module) -> str | None:
        if type(module.out_proj).forward is not nn.Linear.forward:
            return "out_proj is not a Linear"
        return None

    def register(self, site: Site, on_call: Callable[[Tensor, Tensor], None]) -> list[Any]:
        module = site.module
        names = set(site.params)
        wanted = {"bias_k", "bias_v"} & names
        if names & {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                    "v_proj_weight"}:
            wanted |= {"q", "k", "v"}
        if names & {"out_proj.weight", "out_proj.bias"}:
            wanted.add("out")

        capture = tagged(site, on_call)

        def emit(tag: str, x: Tensor, y: Tensor) -> None:
            if tag in wanted:
                capture(tag, x, y)

        def handler(**a: Any) -> Any:
            return _forward(emit, **a)

        return intercept_forward(module, lambda: _Intercept(module, handler))

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        module, params = site.module, site.params
        by_tag = calls_by_tag(site)
        ref = next(iter(params.values()))
        e = module.embed_dim
        sq = torch.zeros(n, dtype=torch.float64, device=ref.device)
        grad_sum: dict[str, Tensor] = {}
        per: dict[str, Tensor] = {}  # small per-sample gradients (biases)
        factors: dict[str, tuple[str, int, Tensor, Tensor]] = {}  # tag -> (param, block, U, D)

        def ud(tag: str, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
            pairs = by_tag.get(tag)
            if not pairs:
                return None
            # (L, N, ·) -> (N, L, ·), calls concatenated along the positions
            u = torch.cat([x.to(dtype).transpose(0, 1) for x, _ in pairs], 1)
            d = torch.cat([y.to(dtype).transpose(0, 1) for _, y in pairs], 1)
            return u.contiguous(), d.contiguous()

        for tag, sep, block in _PIECES:
            name = "in_proj_weight" if "in_proj_weight" in params else sep
            w = params.get(name)
            if w is None:
                continue
            got = ud(tag, w.dtype)
            rows = w.shape[0] // 3 if name == "in_proj_weight" else w.shape[0]
            if got is None:
                g = torch.zeros((rows, w.shape[1]), dtype=w.dtype, device=w.device)
            else:
                u, d = got
                g = seq_weight_sum(u, d)
                sq += seq_sq_norms(u, d)
                factors[tag] = (name, block if name == "in_proj_weight" else 0, u, d)
            grad_sum.setdefault(name, []).append(g)  # type: ignore[arg-type]
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            if name in grad_sum:
                grad_sum[name] = torch.cat(grad_sum[name]).reshape(params[name].shape)  # type: ignore[arg-type]
        if "in_proj_bias" in params:
            b = params["in_proj_bias"]
            blocks = []
            for tag, _, _ in _PIECES:
                pairs = by_tag.get(tag, [])
                blk = torch.zeros((n, e), dtype=b.dtype, device=b.device)
                for _, y in pairs:
                    blk += y.to(b.dtype).sum(0)
                blocks.append(blk)
            per["in_proj_bias"] = torch.cat(blocks, 1)
        for name, tag in (("bias_k", "bias_k"), ("bias_v", "bias_v")):
            if name in params:
                p = params[name]
                g = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
                for _, y in by_tag.get(tag, []):
                    g += y.to(p.dtype).reshape(n, *p.shape)
                per[name] = g
        out_w, out_b = params.get("out_proj.weight"), params.get("out_proj.bias")
        if out_w is not None:
            got = ud("out", out_w.dtype)
            if got is None:
                grad_sum["out_proj.weight"] = torch.zeros_like(out_w)
            else:
                u, d = got
                grad_sum["out_proj.weight"] = seq_weight_sum(u, d)
                sq += seq_sq_norms(u, d)
                factors["out"] = ("out_proj.weight", 0, u, d)
        if out_b is not None:
            g = torch.zeros((n, *out_b.shape), dtype=out_b.dtype, device=out_b.device)
            for _, y in by_tag.get("out", []):
                g += y.to(out_b.dtype).sum(0)
            per["out_proj.bias"] = g
        for name, g in per.items():
            sq += sq_norms(g)
            grad_sum[name] = g.sum(0)

        def inner(v: dict[str, Tensor]) -> Tensor:
            res = torch.zeros(n, dtype=torch.float64, device=sq.device)
            for name, block, u, d in factors.values():
                if name not in v:
                    continue
                vw = v[name].to(u.dtype)
                if name == "in_proj_weight":
                    vw = vw.chunk(3)[block]
                res += seq_inner(u, d, vw)
            for name, g in per.items():
                if name in v:
                    res += (g.reshape(n, -1) @ v[name].reshape(-1).to(g.dtype)).double()
            return res

        return LayerStats(grad_sum, sq, inner)


def _forward(
    emit: Callable[[str, Tensor, Tensor], None],
    *,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None,
    static_v: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` in pieces the hooks can see (the module docstring)."""
    if query.dim() != 3 or static_k is not None or static_v is not None:
        raise RuntimeError(
            "The hooks backend needs batched nn.MultiheadAttention inputs without static_k/v"
        )
    e = embed_dim_to_check
    if use_separate_proj_weight:
        ws = (q_proj_weight, k_proj_weight, v_proj_weight)
    else:
        ws = in_proj_weight.chunk(3)  # type: ignore[union-attr]
    bs = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    proj = []
    for (tag, _, _), x, w, b in zip(_PIECES, (query, key, value), ws, bs):
        y = F.linear(x, w, b)
        emit(tag, x, y)
        proj.append(y)
    q, k, v = proj
    n = query.shape[1]
    if bias_k is not None and bias_v is not None:
        bk = bias_k.expand(1, n, e)
        bv = bias_v.expand(1, n, e)
        emit("bias_k", bk, bk)
        emit("bias_v", bv, bv)
        k, v = torch.cat([k, bk]), torch.cat([v, bv])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    eye = torch.eye(e, dtype=q.dtype, device=q.device)
    o, weights = F.multi_head_attention_forward(
        q, k, v, e, num_heads, None, None, None, None, add_zero_attn, dropout_p, eye, None,
        training=training, key_padding_mask=key_padding_mask, need_weights=need_weights,
        attn_mask=attn_mask, use_separate_proj_weight=True, q_proj_weight=eye,
        k_proj_weight=eye, v_proj_weight=eye, average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    out = F.linear(o, out_proj_weight, out_proj_bias)
    emit("out", o, out)
    return out, weights


register(MultiheadAttentionRule(), nn.MultiheadAttention)
