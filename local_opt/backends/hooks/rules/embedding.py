"""Rule for ``nn.Embedding``: per-sample gradient rows are sums of ``δ`` over the positions
holding each token id."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from local_opt.backends.hooks.rules.base import (
    LayerStats,
    Memory,
    Rule,
    Site,
    register,
    sum_but_batch,
)

__all__: list[str] = []  # private module


class EmbeddingRule(Rule):
    param_names = ("weight",)

    def unsupported(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalizes the weight in place"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq couples samples"
        return None

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        w = site.params["weight"]
        vocab, dim = w.shape
        calls = [c for c in site.calls if c.delta is not None]
        sq = torch.zeros(n, dtype=torch.float64, device=w.device)
        grad_sum = {"weight": torch.zeros_like(w)}
        if not calls:
            return LayerStats(grad_sum, sq, lambda v: torch.zeros_like(sq))
        ids = torch.cat([c.inputs.reshape(n, -1) for c in calls], dim=1)  # (N, T)
        delta = torch.cat([c.delta.reshape(n, -1, dim).to(w.dtype) for c in calls], dim=1)
        if site.module.padding_idx is not None:
            keep = (ids != site.module.padding_idx).unsqueeze(-1)
            delta = delta * keep
        flat_ids = ids.reshape(-1)
        flat_delta = delta.reshape(-1, dim)
        grad_sum["weight"].index_add_(0, flat_ids, flat_delta)
        sample = torch.arange(n, device=ids.device).repeat_interleave(ids.shape[1])
        uniq, inv = torch.unique(sample * vocab + flat_ids, return_inverse=True)
        rows = torch.zeros(uniq.shape[0], dim, dtype=delta.dtype, device=delta.device)
        rows.index_add_(0, inv, flat_delta)
        sq.index_add_(0, uniq // vocab, rows.double().pow(2).sum(1))

        def inner(v: dict[str, Tensor]) -> Tensor:
            picked = v["weight"].to(delta.dtype)[ids]  # (N, T, D)
            return sum_but_batch(picked * delta).double()

        return LayerStats(grad_sum, sq, inner)


# Exact classes (subclasses that do not override ``forward`` are accepted too) and third-party
# classes known to compute the same function as a rule, by "module.qualname".


register(EmbeddingRule(), nn.Embedding)
