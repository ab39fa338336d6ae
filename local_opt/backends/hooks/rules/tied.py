r"""Tied weights: one parameter shared by several ``nn.Linear``/``nn.Embedding`` modules.

nanoGPT's head shares the token embedding's weight (``head.weight = wte.weight``). A sample's
gradient of a shared weight is the *sum* of its uses' gradients, so its squared norm has cross
terms:

.. math::
    \lVert G_i^a + G_i^b\rVert^2 = \lVert G_i^a\rVert^2 + \lVert G_i^b\rVert^2
        + 2\langle G_i^a, G_i^b\rangle .

Each module keeps its own rule for its own part; :class:`TiedRule` (one site for the whole group
of modules) adds the cross terms from the same factors the rules use, without forming any
per-sample gradient: a Linear use is ``G = Σ_t δ_t u_tᵀ`` and an Embedding use is
``G = Σ_s e_{id_s} δ_sᵀ`` (one-hot rows), so

* Linear × Linear: :math:`\sum_{t,t'} (u_t\cdot u'_{t'})(\delta_t\cdot\delta'_{t'})`;
* Embedding × Linear (weight ``V × D``, the Linear maps ``D → V``):
  :math:`\sum_{s,t} \delta^{lin}_t[\mathrm{id}_s]\,(\delta^{emb}_s\cdot u_t)`;
* Embedding × Embedding: :math:`\sum_{s,s'} [\mathrm{id}_s = \mathrm{id}'_{s'}]\,
  (\delta_s\cdot\delta'_{s'})`.

Only the weight may be shared (a shared bias is reported by the plan).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from local_opt.backends.hooks.rules.base import (
    Call,
    LayerStats,
    Memory,
    Rule,
    Site,
    find_rule,
    input_of,
)
from local_opt.backends.hooks.rules.embedding import EmbeddingRule
from local_opt.backends.hooks.rules.linear import LinearRule
from local_opt.backends.stack import in_backward

__all__: list[str] = []  # private module


class TiedRule(Rule):
    """A group of Linear/Embedding modules sharing a weight, as one site (see the module
    docstring). ``members`` are ``(name, module, rule, {attribute: key in site.params})``."""

    def __init__(self, members: list[tuple[str, nn.Module, Rule, dict[str, str]]]) -> None:
        self.members = members

    def register(self, site: Site, on_call: Callable[[Tensor, Tensor], None]) -> list[Any]:
        handles = []
        for j, (_, module, _, _) in enumerate(self.members):

            def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any, j: int = j) -> None:
                x = input_of(args, kwargs)
                if in_backward():  # a checkpoint's recomputation: the first forward counts
                    return
                if isinstance(output, Tensor) and output.requires_grad and isinstance(x, Tensor):
                    before = len(site.calls)
                    on_call(x.detach(), output)
                    if len(site.calls) > before:
                        site.calls[-1].member = j  # type: ignore[attr-defined]

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return handles

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        calls: list[list[Call]] = [[] for _ in self.members]
        for c in site.calls:
            calls[c.member].append(c)  # type: ignore[attr-defined]
        site.calls = []
        parts = []
        for (name, module, rule, keys), cs in zip(self.members, calls):
            sub = Site(name, module, rule, {a: site.params[k] for a, k in keys.items()}, cs)
            sub.mode = site.mode
            parts.append((rule.finish(sub, n, memory), keys))
        sq = sum(st.sq_norms for st, _ in parts)
        grad_sum: dict[str, Tensor] = {}
        for st, keys in parts:
            for a, k in keys.items():
                g = st.grad_sum[a]
                grad_sum[k] = grad_sum[k] + g if k in grad_sum else g
        w = site.params[self.members[0][3]["weight"]]
        factors = [
            _factor(module, cs, n, w.dtype)
            for (_, module, _, keys), cs in zip(self.members, calls)
            if "weight" in keys and keys["weight"] == self.members[0][3]["weight"]
        ]
        factors = [f for f in factors if f is not None]
        for a in range(len(factors)):
            for b in range(a + 1, len(factors)):
                sq = sq + 2 * _cross(factors[a], factors[b])

        def inner(v: dict[str, Tensor]) -> Tensor:
            res = torch.zeros(n, dtype=torch.float64, device=w.device)
            for st, keys in parts:
                res += st.inner({a: v[k] for a, k in keys.items() if k in v})
            return res

        return LayerStats(grad_sum, sq, inner)


def _factor(module: nn.Module, calls: list[Call], n: int, dtype: torch.dtype) -> tuple | None:
    calls = [c for c in calls if c.delta is not None]
    if not calls:
        return None
    if isinstance(module, nn.Embedding):
        ids = torch.cat([c.inputs.reshape(n, -1) for c in calls], 1)
        d = torch.cat([c.delta.reshape(n, -1, c.delta.shape[-1]) for c in calls], 1).to(dtype)
        if module.padding_idx is not None:
            d = d * (ids != module.padding_idx).unsqueeze(-1)
        return ("emb", ids, d)
    u = torch.cat([c.inputs.to(dtype).reshape(n, -1, c.inputs.shape[-1]) for c in calls], 1)
    d = torch.cat([c.delta.to(dtype).reshape(n, -1, c.delta.shape[-1]) for c in calls], 1)
    return ("lin", u, d)


def _cross(a: tuple, b: tuple) -> Tensor:
    """Per-sample ``⟨G^a_i, G^b_i⟩`` of two uses of one weight, ``(N,)`` float64."""
    if a[0] == "lin" and b[0] == "emb":
        a, b = b, a
    if a[0] == "emb" and b[0] == "lin":
        ids, de = a[1], a[2]  # (N, S), (N, S, D)
        u, dl = b[1], b[2]  # (N, T, D), (N, T, V)
        picked = torch.gather(dl, 2, ids.unsqueeze(1).expand(-1, dl.shape[1], -1))  # (N, T, S)
        return (picked * torch.bmm(u, de.transpose(1, 2))).sum((1, 2)).double()
    if a[0] == "lin":
        return (torch.bmm(a[1], b[1].transpose(1, 2)) * torch.bmm(a[2], b[2].transpose(1, 2))).sum(
            (1, 2)
        ).double()
    same = (a[1].unsqueeze(2) == b[1].unsqueeze(1)).to(a[2].dtype)  # (N, S, S')
    return (same * torch.bmm(a[2], b[2].transpose(1, 2))).sum((1, 2)).double()


def plan_tied(
    modules: list[tuple[str, nn.Module]], owners: dict[int, list[str]]
) -> tuple[list[Site], set[int]]:
    """Sites for the groups of Linear/Embedding modules that share a weight, and the ids of the
    modules they cover (the plan reports other sharing)."""
    by_name = dict(modules)
    parent: dict[str, str] = {}

    def root(m: str) -> str:
        while parent.get(m, m) != m:
            m = parent[m]
        return m

    for names in owners.values():
        if len(names) > 1:
            mods = [q.rpartition(".")[0] for q in names]
            for m in mods:
                parent.setdefault(m, m)
            for m in mods[1:]:
                parent[root(m)] = root(mods[0])
    groups: dict[str, list[str]] = {}
    for m in parent:
        groups.setdefault(root(m), []).append(m)
    sites, done = [], set()
    for names in groups.values():
        names = sorted(names, key=list(by_name).index)
        members, params, ok = [], {}, True
        key_of: dict[int, str] = {}
        for mname in names:
            module = by_name[mname]
            rule = find_rule(module)
            trainable = {a: p for a, p in module._parameters.items() if p is not None and p.requires_grad}
            shared = {a for a, p in trainable.items() if len(owners[id(p)]) > 1}
            if not _accepts(module, rule, shared):
                ok = False
                break
            keys = {}
            for a, p in trainable.items():
                k = key_of.setdefault(id(p), f"{mname}.{a}")
                params[k] = p
                keys[a] = k
            members.append((mname, module, rule, keys))
        if ok:
            sites.append(Site("+".join(names), members[0][1], TiedRule(members), params))
            done.update(id(by_name[m]) for m in names)
    return sites, done


def _accepts(module: nn.Module, rule: Rule | None, shared: set[str]) -> bool:
    return (
        isinstance(rule, (LinearRule, EmbeddingRule))
        and rule.unsupported(module) is None
        and shared <= {"weight"}
    )
