"""Assembly for the hooks backend: from the captured ``(input, δ)`` of every covered call to
:class:`~local_opt._stats.GradStats`, through the layer rules and the one reducer
(:func:`~local_opt._stats.reduce_units`), within a memory budget for kept per-sample gradients.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from local_opt._stats import GradStats, reduce_units
from local_opt.backends.hooks.check import UnsupportedShapes
from local_opt.backends.hooks.rules import LayerStats, Memory, Site
from local_opt.backends.hooks.rules.base import GroupStats, add_up

__all__: list[str] = []  # private module

#: Out-of-memory errors are re-raised as they are (torch.OutOfMemoryError is torch >= 2.5).
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def grant_keep(sites: list[Site], n: int, keep_bytes: int, mode: str) -> int:
    """Set ``site.mode``: forced modes everywhere, or ``"keep"`` for the layers that save the most
    time per byte within ``keep_bytes``. Returns the bytes left."""
    requests = []
    for s in sites:
        s.mode = "" if mode == "auto" else mode
        req = s.rule.keep_request(s, n)
        if req is not None:
            if mode == "auto":
                requests.append((req[0] / max(1, req[1]), req[1], s))
            elif mode == "keep":
                keep_bytes -= req[1]
    requests.sort(key=lambda r: -r[0])
    for _, nbytes, s in requests:
        if nbytes <= keep_bytes:
            keep_bytes -= nbytes
            s.mode = "keep"
    return max(0, keep_bytes)


# Workspaces for kept per-sample gradients, by (dtype, device): reused by the next pass once the
# GradStats that used them is released, which avoids faulting fresh pages in on every pass.
_WORKSPACES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def release_workspaces() -> None:
    """Free the memory cached for the per-sample gradients of later passes."""
    _WORKSPACES.clear()


def _acquire(sites: list[Site], n: int) -> dict[tuple[torch.dtype, torch.device], Tensor]:
    need: dict[tuple[torch.dtype, torch.device], int] = {}
    for s in sites:
        w = s.params.get("weight")
        if s.mode == "keep" and w is not None and s.rule.keep_request(s, n) is not None:
            key = (w.dtype, w.device)
            need[key] = need.get(key, 0) + n * w.numel()
    out = {}
    for key, numel in need.items():
        buf = _WORKSPACES.pop(key, None)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=key[0], device=key[1])
        out[key] = buf
    return out


def _give_back(workspaces: dict[tuple[torch.dtype, torch.device], Tensor]) -> None:
    for key, buf in workspaces.items():
        old = _WORKSPACES.get(key)
        if old is None or old.numel() < buf.numel():
            _WORKSPACES[key] = buf


def _finish(site: Site, n: int, memory: Memory) -> LayerStats:
    """``site.rule.finish`` with one guarantee: one row per sample, or :class:`UnsupportedShapes`.

    A rule fails (or would broadcast) when the layer's saved tensors do not have the ``n``
    samples along their first dimension, e.g. when a model folds image patches into the batch
    dimension; the backend then hands the model to ``vmap`` with a warning naming the layer."""
    try:
        st = site.rule.finish(site, n, memory)
    except _OOM:
        raise
    except RuntimeError as e:
        rows = sorted(
            {int(c.delta.shape[0]) for c in site.calls if c.delta is not None and c.delta.dim()}
        )
        seen = f"saved rows {rows} for {n} samples; " if rows and rows != [n] else ""
        raise UnsupportedShapes([site.name], f"{seen}{type(e).__name__}: {e}") from e
    if tuple(st.sq_norms.shape) != (n,):
        raise UnsupportedShapes(
            [site.name], f"{tuple(st.sq_norms.shape)} per-sample norms for {n} samples"
        )
    return st


def _finish_groups(sites: list[Site], n: int, memory: Memory) -> dict[int, LayerStats]:
    """Finish together the sites whose rules give them equal :meth:`~.rules.Rule.group_key`
    (two or more); ``id(site) -> LayerStats`` for them. A group whose rule fails is left to
    the sites' own :meth:`~.rules.Rule.finish`."""
    keys: dict[tuple, list[Site]] = {}
    for s in sites:
        key = s.rule.group_key(s, n, memory)
        if key is not None:
            keys.setdefault((id(s.rule), key), []).append(s)
    out: dict[int, LayerStats] = {}
    for members in keys.values():
        if len(members) < 2:
            continue
        try:
            with torch.no_grad():
                gs = members[0].rule.finish_group(members, n, memory)
        except _OOM:
            raise
        except RuntimeError:  # the sites' own finish names the layer if it fails too
            continue
        for j, s in enumerate(members):
            out[id(s)] = LayerStats(gs.grad_sums[j], gs.sq_norms, _grouped, (gs, j))
    return out


def _grouped(v: dict[str, Tensor]) -> Tensor:
    raise RuntimeError("a layer finished in a group has the group's inner products")


def assemble(
    params: list[nn.Parameter],
    sites: list[Site],
    bare: list[tuple[str, nn.Parameter]],
    expanded: dict[str, Tensor],
    grads: Sequence[Tensor | None],
    n: int,
    keep_bytes: int,
    mode: str,
    inner_products: bool = True,
    scale: float = 1.0,
) -> GradStats:
    """:class:`GradStats` of one captured pass, one unit per sample.

    ``grads`` are the captured ``δ`` of every call of every site (in site order), then the
    per-sample gradients of the bare parameters; ``δ`` is ``N·∂L/∂out`` divided by ``scale``
    (:class:`StatsCapture` captures ``grad_scale·∂L/∂out``), so the per-sample statistics are
    rescaled by ``scale`` here.
    """
    it = iter(grads)
    for s in sites:
        for c in s.calls:
            c.delta = next(it)
            if c.inputs._version != c.version:
                raise RuntimeError(
                    f"The input of {s.name} was modified in place after the layer used it"
                )
    bare_grads = [next(it) for _ in expanded]

    device = params[0].device if params else None
    free = grant_keep(sites, n, keep_bytes, mode)
    workspaces = _acquire(sites, n)
    memory = Memory(free, workspaces, inner_products, keep_patches=True)
    grouped = _finish_groups(sites, n, memory)
    finished = []
    norms = []  # per-sample squared norms of the layers and groups, added in one operation
    for s in sites:
        st = grouped.get(id(s))
        if st is None:
            st = _finish(s, n, memory)
            norms.append(st.sq_norms.to(device))
        elif st.group is not None and st.group[1] == 0:  # the group's norms, once
            norms.append(st.sq_norms.to(device))
        finished.append((s, st))
        s.calls = []
    sq = add_up(norms) if norms else torch.zeros(n, dtype=torch.float64, device=device)
    return reduce_layers(
        params, finished, bare, bare_grads, n, sq, inner_products, scale, workspaces
    )


def reduce_layers(
    params: list[nn.Parameter],
    finished: list[tuple[Site, LayerStats]],
    bare: list[tuple[str, nn.Parameter]],
    bare_grads: Sequence[Tensor | None],
    n: int,
    sq: Tensor,
    inner_products: bool,
    scale: float,
    workspaces: dict[tuple[torch.dtype, torch.device], Tensor] | None = None,
) -> GradStats:
    """:class:`GradStats` from the finished layers (``sq`` already holds the sum of their
    per-sample squared norms), the per-sample gradients of the bare parameters, and ``scale``
    (see :func:`assemble`)."""
    where: dict[int, tuple[int, str]] = {}  # id(param) -> (layer index or -1 - bare index, name)
    sums: dict[int, Tensor] = {}
    layers = []
    for j, (s, st) in enumerate(finished):
        layers.append(st)
        for k, p in s.params.items():
            where[id(p)] = (j, k)
            sums[id(p)] = st.grad_sum[k]
    if not inner_products:  # drop what the inner products would have needed
        layers = []
    per_bare: list[Tensor] = []
    for b, ((_, p), g) in enumerate(zip(bare, bare_grads)):
        g = torch.zeros((n, *p.shape[1:]), dtype=p.dtype, device=p.device) if g is None else g
        per_bare.append(g.reshape(n, -1))
        where[id(p)] = (-1 - b, "")
        sums[id(p)] = g.sum(0).reshape(p.shape)
        sq += g.reshape(n, -1).double().pow(2).sum(1).to(sq.device)

    def dots(v: Sequence[Tensor]) -> Tensor:
        if len(v) != len(params):
            raise ValueError(f"Invalid v: {len(v)} tensors for {len(params)} parameters")
        by_site: list[dict[str, Tensor]] = [{} for _ in layers]
        ip = torch.zeros(n, dtype=torch.float64, device=sq.device)
        for p, vp in zip(params, v):
            j, k = where[id(p)]
            if j >= 0:
                by_site[j][k] = vp.detach()
            else:
                g = per_bare[-1 - j]
                ip += (g @ vp.detach().reshape(-1).to(g.dtype)).double().to(ip.device)
        groups: dict[int, tuple[GroupStats, list[dict[str, Tensor]]]] = {}
        for st, vs in zip(layers, by_site):
            if st.group is not None:  # every member has all its parameters in v
                gs, _ = st.group
                groups.setdefault(id(gs), (gs, []))[1].append(vs)
            elif vs:
                ip += st.inner(vs).to(ip.device)
        for gs, vss in groups.values():
            ip += gs.inner(vss).to(ip.device)
        return ip * scale

    if workspaces:  # back to the cache when the statistics (which hold ``dots``) are released
        weakref.finalize(dots, _give_back, workspaces)
    return reduce_units(
        [sums[id(p)].detach() for p in params],
        sq * scale**2,
        dots if inner_products else None,
        sum_scale=scale,
    )
