r"""Exact per-sample gradient statistics from layer hooks (the ``"hooks"`` backend).

The variance tests of `Lau et al. (2024) <https://arxiv.org/abs/2406.13936>`_ need only two
per-sample quantities, :math:`\lVert g_i\rVert^2` and :math:`\langle g_i, v\rangle` for one vector
:math:`v` (the pooled mean gradient :math:`\bar g`):

.. math::
    \sum_i \lVert g_i - \bar g\rVert^2 = \sum_i \lVert g_i\rVert^2 - N\lVert\bar g\rVert^2, \qquad
    \sum_i \langle g_i, \bar g\rangle^2, \qquad
    \lVert g_i\rVert^2 - \frac{\langle g_i, \bar g\rangle^2}{\lVert\bar g\rVert^2}.

:func:`hooks_grad_stats` gets both from one forward and one backward pass, without materializing
the whole model's per-sample gradients: forward hooks on the parameterized layers save each
layer's input and the autograd edge of its output; ``torch.autograd.grad`` of ``N·L`` (``L`` the
mean-reduced batch loss) at those edges gives every layer's output gradient
:math:`\delta_i = \partial\ell_i/\partial\,\mathrm{out}_i`; per-layer closed forms
(:mod:`local_opt._hooks_rules`) turn ``(input, δ)`` into :math:`\sum_i g_i`, the per-sample squared
norms and, later, the per-sample inner products. Per-sample squared norms are summed over layers;
inner products are summed over layers *before* they are squared.

Covered layers: ``nn.Linear`` (on vectors or on sequences, as in attention blocks),
``nn.Conv1d``/``nn.Conv2d`` (any stride, padding, dilation and groups), ``nn.Embedding``,
``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` and timm's ``LayerNorm``,
``LayerNorm2d``, ``GroupNorm``, ``LayerScale``, ``BatchNormAct2d``; subclasses that do not override ``forward`` too.
A *bare* parameter (owned by a module without a rule, like timm ViT's ``cls_token`` and
``pos_embed``) is covered when its first dimension is 1 and it has at least 2 dimensions: such a
parameter is broadcast along the batch dimension, so the pass uses ``N`` copies of it (one per
sample, via :func:`torch.func.functional_call`) and autograd returns its per-sample gradients
directly. That this substitution leaves the model's output unchanged is checked once per model.

.. note::
    **BatchNorm in training mode** couples the samples of a batch, so a per-sample gradient
    :math:`\partial\ell_i/\partial\theta` is not defined by the batch pass. This backend then
    defines :math:`g_i` as sample ``i``'s *contribution*: each layer's parameter gradient is
    split by the sample index of that layer's input and output, with ``δ`` the backpropagated
    gradient of ``N·L`` (which includes the coupling through the batch statistics). Their mean
    is exactly the batch gradient, :math:`\frac1N\sum_i g_i = \nabla L`. Without BatchNorm in
    training mode the :math:`g_i` are the ordinary per-sample gradients (those of the
    ``"vmap"`` backend).

:class:`StatsCapture` collects the same statistics from the training step's own forward and
backward instead of a separate pass. :func:`unsupported_layers` names what is not covered (the
``"auto"`` backend choice falls back to vmap or micro-batches for such models).

Assumptions: ``loss_fn`` is mean-reduced over the batch; a covered module's parameters are used
only through that module's ``forward``; a parameter is not shared between two modules.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from local_opt._hooks_rules import Call, Memory, Site, find_rule, input_of
from local_opt._stats import GradStats

__all__: list[str] = []  # private module

Inputs = Union[Tensor, Sequence[Tensor]]

# Default memory for per-sample gradients kept between the pass and ``inner_sq_sum``.
DEFAULT_KEEP_BYTES = 2**30
_MODES = ("auto", "ghost", "keep", "stream")

# Models whose bare broadcast parameters were checked, with the names checked.
_VALIDATED: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()


def _is_broadcast(p: Tensor) -> bool:
    return p.dim() >= 2 and p.shape[0] == 1


def _plan_model(model: nn.Module) -> tuple[list[Site], list[tuple[str, nn.Parameter]], list[str]]:
    """Covered sites, bare broadcast parameters, and descriptions of what is not covered."""
    sites: list[Site] = []
    bare: list[tuple[str, nn.Parameter]] = []
    missing: list[str] = []
    modules = list(model.named_modules())
    owners: dict[int, list[str]] = {}
    for mname, module in modules:
        for n, p in module._parameters.items():
            if p is not None and p.requires_grad:
                owners.setdefault(id(p), []).append(f"{mname}.{n}" if mname else n)
    for mname, module in modules:
        trainable = {
            n: p for n, p in module._parameters.items() if p is not None and p.requires_grad
        }
        if not trainable:
            continue
        cls = type(module).__name__
        shared = [q for p in trainable.values() for q in owners[id(p)] if len(owners[id(p)]) > 1]
        if shared:
            missing.append(
                f"{mname or '<root>'} ({cls}: parameter shared as {sorted(set(shared))})"
            )
            continue
        rule = find_rule(module)
        if rule is not None:
            reason = rule.unsupported(module)
            extra = [n for n in trainable if n not in rule.param_names]
            if reason is None and not extra:
                sites.append(Site(mname, module, rule, trainable))
            else:
                why = reason or f"unexpected parameters {extra}"
                missing.append(f"{mname or '<root>'} ({cls}: {why})")
            continue
        other = [n for n, p in trainable.items() if not _is_broadcast(p)]
        if other:
            missing.append(f"{mname or '<root>'} ({cls}: parameters {other} have no rule)")
        for n, p in trainable.items():
            if _is_broadcast(p):
                bare.append((f"{mname}.{n}" if mname else n, p))
    return sites, bare, missing


def unsupported_layers(model: nn.Module) -> list[str]:
    r"""What the hooks backend cannot handle in ``model`` (empty when it covers the model).

    Each entry names a module (qualified name and class) that owns trainable parameters directly
    and has no per-layer rule, or a bare trainable parameter that is not broadcast along the batch
    dimension, or a parameter shared between modules.

    Args:
        model (nn.Module): the model.

    Example::

        >>> bad = unsupported_layers(model)
        >>> if bad:
        ...     warnings.warn(f"hooks backend does not cover {bad[0]}; using vmap")
    """
    return _plan_model(model)[2]


def _split_inputs(inputs: Inputs) -> tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    return tuple(inputs)


def hooks_grad_stats(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Inputs,
    targets: Any,
    *,
    keep_bytes: int = DEFAULT_KEEP_BYTES,
    mode: str = "auto",
    inner_products: bool = True,
) -> GradStats:
    r"""Exact per-sample gradient statistics of one batch from one forward and one backward pass.

    The model is left as found: parameters, ``.grad``, buffers (BatchNorm running statistics are
    restored), ``training`` flags and ``requires_grad``.

    Args:
        model (nn.Module): the model; :func:`unsupported_layers` must be empty.
        loss_fn (Callable): ``loss_fn(model(inputs), targets)`` is the *mean* loss of the batch.
        inputs (Tensor or sequence of Tensor): the batch (``model(*inputs)`` for a sequence);
            dimension 0 of the first tensor is the batch.
        targets: passed to ``loss_fn``.
        keep_bytes (int): memory for per-sample gradients of layers whose gradient is cheaper to
            materialize than to recompute (kept until the returned ``inner_sq_sum`` is released)
            (default: 1 GiB). The memory is cached for the next pass once the returned
            statistics are released (:func:`release_workspaces` frees it).
        mode (str): how Linear and Conv weights are handled: ``"auto"`` (a cost model picks
            per layer), or ``"ghost"``, ``"keep"`` or ``"stream"`` for all of them (see
            :mod:`local_opt._hooks_rules`) (default: ``"auto"``).
        inner_products (bool): whether ``inner_sq_sum`` will be called; without it nothing is
            kept for it and it returns NaN (the norm test needs no inner products)
            (default: ``True``).

    Returns:
        GradStats: with ``unit_size=1`` and ``grad_sum`` in the order of the model's trainable
        parameters (``p for p in model.parameters() if p.requires_grad``).

    Example::

        >>> stats = hooks_grad_stats(model, nn.functional.cross_entropy, x, y)
        >>> pooled = pool(stats)  # all-reduce, then Σ_i ⟨g_i, ḡ⟩² at the pooled mean
    """
    if keep_bytes < 0:
        raise ValueError(f"Invalid keep_bytes: {keep_bytes}")
    if mode not in _MODES:
        raise ValueError(f"Invalid mode: {mode!r}")
    args = _split_inputs(inputs)
    n = int(args[0].shape[0])
    sites, bare, missing = _plan_model(model)
    if missing:
        raise RuntimeError(
            f"The hooks backend does not cover {', '.join(missing)}; use the vmap or micro-batch backend"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    with _capture(model, sites):
        saved = {k: b.detach().clone() for k, b in model.named_buffers()}
        try:
            expanded = {q: _expand(p, n) for q, p in bare}
            if expanded and _VALIDATED.get(model) != frozenset(expanded):
                _validate_bare(model, args, expanded, saved)
                for s in sites:
                    s.calls.clear()
            if expanded:
                out = torch.func.functional_call(model, expanded, args, strict=False)
            else:
                out = model(*args)
            loss = loss_fn(out, targets)
            if loss.dim() != 0:
                raise ValueError(
                    f"Invalid loss_fn: returned shape {tuple(loss.shape)}, not a scalar"
                )
            edges: list[Any] = [c.edge for s in sites for c in s.calls]
            grads = torch.autograd.grad(
                loss,
                edges + list(expanded.values()),
                grad_outputs=torch.full_like(loss, float(n)),
                allow_unused=True,
            )
        finally:
            with torch.no_grad():
                for k, b in model.named_buffers():
                    if k in saved:
                        b.copy_(saved[k])
    if not inner_products:
        keep_bytes = 0
    return _assemble(params, sites, bare, expanded, grads, n, keep_bytes, mode, inner_products)


def hooks_stats(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Inputs,
    targets: Any,
    *,
    inner_products: bool = True,
    **options: Any,
) -> GradStats:
    """:func:`hooks_grad_stats` with the backend signature of ``VarianceTest`` (other options,
    such as ``chunk_size`` or ``micro_batches``, do not apply and are ignored)."""
    return hooks_grad_stats(model, loss_fn, inputs, targets, inner_products=inner_products)


def supports(model: nn.Module) -> bool:
    """Whether the hooks backend covers ``model`` (:func:`unsupported_layers` is empty)."""
    return not unsupported_layers(model)


def _expand(p: Tensor, n: int) -> Tensor:
    return p.detach().expand(n, *p.shape[1:]).clone().requires_grad_(True)


def _validate_bare(
    model: nn.Module,
    args: tuple[Tensor, ...],
    expanded: dict[str, Tensor],
    saved: dict[str, Tensor],
) -> None:
    """Check once that per-sample copies of the bare parameters leave the output unchanged."""
    devices = [t.device for t in args if t.is_cuda]
    with torch.no_grad():
        with torch.random.fork_rng(devices=devices):
            ref = model(*args)
        with torch.random.fork_rng(devices=devices):
            for k, b in model.named_buffers():
                b.copy_(saved[k])
            got = torch.func.functional_call(model, expanded, args, strict=False)
        for k, b in model.named_buffers():
            b.copy_(saved[k])
    refs, gots = _tensors(ref), _tensors(got)
    ok = len(refs) == len(gots) and all(
        r.shape == g.shape
        and torch.allclose(r, g, rtol=1e-4, atol=1e-6 * (1 + r.abs().max().item()))
        for r, g in zip(refs, gots)
    )
    if not ok:
        raise RuntimeError(
            f"The hooks backend cannot handle the bare parameters {sorted(expanded)}: per-sample "
            "copies change the model's output (they are not broadcast along the batch "
            "dimension); use the vmap or micro-batch backend"
        )
    _VALIDATED[model] = frozenset(expanded)


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _register_site(site: Site, on_call: Callable[[Tensor, Tensor], None]) -> list[Any]:
    """Forward hooks calling ``on_call(x, y)`` once per forward of ``site.module``: ``x`` its
    input (detached), ``y`` the output the rule differentiates — the module's output, or the
    input of the rule's :meth:`~Rule.output_child` — before any in-place op can change ``y``."""

    def read_input(args: tuple, kwargs: dict) -> Tensor:
        x = input_of(args, kwargs)
        if not isinstance(x, Tensor):
            raise RuntimeError(f"The hooks backend cannot read the input of {site.name}")
        return x.detach()

    def emit(x: Tensor, y: Any) -> None:
        if isinstance(y, Tensor) and y.requires_grad:
            on_call(x, y)

    child = site.rule.output_child(site.module)
    if child is None:

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if isinstance(output, Tensor) and output.requires_grad:
                on_call(read_input(args, kwargs), output)

        return [site.module.register_forward_hook(hook, with_kwargs=True)]
    pending: list[Tensor] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        pending[:] = [read_input(args, kwargs)]

    def child_pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if pending:  # the child called from its parent's forward, not on its own
            emit(pending.pop(), input_of(args, kwargs))

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        if pending:  # never silently without this layer's gradient
            pending.clear()
            raise RuntimeError(
                f"The hooks backend expected {site.name} ({type(site.module).__name__}) to call "
                f"its {type(child).__name__} submodule on the output it differentiates"
            )

    return [
        site.module.register_forward_pre_hook(pre, with_kwargs=True),
        child.register_forward_pre_hook(child_pre, with_kwargs=True),
        site.module.register_forward_hook(post),
    ]


@contextlib.contextmanager
def _capture(model: nn.Module, sites: list[Site]):
    """Forward hooks saving each covered module's input and the gradient edge of its output."""

    def make_on_call(site: Site) -> Callable[[Tensor, Tensor], None]:
        return lambda x, y: site.calls.append(Call(x, x._version, get_gradient_edge(y)))

    handles = [h for s in sites for h in _register_site(s, make_on_call(s))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _grant_keep(sites: list[Site], n: int, keep_bytes: int, mode: str) -> int:
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


def _assemble(
    params: list[nn.Parameter],
    sites: list[Site],
    bare: list[tuple[str, nn.Parameter]],
    expanded: dict[str, Tensor],
    grads: Sequence[Tensor | None],
    n: int,
    keep_bytes: int,
    mode: str,
    inner_products: bool = True,
) -> GradStats:
    it = iter(grads)
    for s in sites:
        for c in s.calls:
            c.delta = next(it)
            if c.inputs._version != c.version:
                raise RuntimeError(
                    f"The input of {s.name} was modified in place after the layer used it"
                )
    bare_grads = [next(it) for _ in expanded]

    sq = torch.zeros(n, dtype=torch.float64, device=params[0].device if params else None)
    where: dict[int, tuple[int, str]] = {}  # id(param) -> (site index or -1 - bare index, name)
    sums: dict[int, Tensor] = {}
    layers = []
    free = _grant_keep(sites, n, keep_bytes, mode)
    workspaces = _acquire(sites, n)
    memory = Memory(free, workspaces)
    for j, s in enumerate(sites):
        st = s.rule.finish(s, n, memory)
        layers.append(st)
        sq += st.sq_norms.to(sq.device)
        for k, p in s.params.items():
            where[id(p)] = (j, k)
            sums[id(p)] = st.grad_sum[k]
        s.calls = []
    if not inner_products:  # drop what the inner products would have needed
        layers = []
    per_bare: list[Tensor] = []
    for b, ((_, p), g) in enumerate(zip(bare, bare_grads)):
        g = torch.zeros((n, *p.shape[1:]), dtype=p.dtype, device=p.device) if g is None else g
        per_bare.append(g.reshape(n, -1))
        where[id(p)] = (-1 - b, "")
        sums[id(p)] = g.sum(0).reshape(p.shape)
        sq += g.reshape(n, -1).double().pow(2).sum(1).to(sq.device)

    def inner_sq_sum(v: Sequence[Tensor]) -> Tensor:
        if len(v) != len(params):
            raise ValueError(f"Invalid v: {len(v)} tensors for {len(params)} parameters")
        if not inner_products:
            return torch.tensor(float("nan"), dtype=torch.float64)
        by_site: list[dict[str, Tensor]] = [{} for _ in layers]
        ip = torch.zeros(n, dtype=torch.float64, device=sq.device)
        for p, vp in zip(params, v):
            j, k = where[id(p)]
            if j >= 0:
                by_site[j][k] = vp.detach()
            else:
                g = per_bare[-1 - j]
                ip += (g @ vp.detach().reshape(-1).to(g.dtype)).double().to(ip.device)
        for st, vs in zip(layers, by_site):
            if vs:
                ip += st.inner(vs).to(ip.device)
        return (ip * ip).sum()

    if workspaces:
        weakref.finalize(inner_sq_sum, _give_back, workspaces)
    return GradStats(
        count=n,
        unit_size=1,
        grad_sum=[sums[id(p)].detach() for p in params],
        sq_norm_sum=sq.sum(),
        inner_sq_sum=inner_sq_sum,
    )


class StatsCapture:
    r"""Per-sample gradient statistics from the training step's own forward and backward.

    Instead of the separate pass of :func:`hooks_grad_stats`, the hooks ride on the step that
    precedes a synchronization: the extra cost is only the per-layer norms, sums and inner
    products. The model's ``.grad`` is accumulated by ``backward()`` as usual; BatchNorm running
    statistics are updated by the forward as usual.

    Args:
        model (nn.Module): the model; :func:`unsupported_layers` must be empty.
        grad_scale (float): the factor the mean batch loss was multiplied by before
            ``backward()`` (e.g. ``1 / K`` when accumulating ``K`` micro-batches, or a loss
            scaler's scale) (default: 1.0).
        keep_bytes (int): as in :func:`hooks_grad_stats` (default: 1 GiB).
        mode (str): as in :func:`hooks_grad_stats` (default: ``"auto"``).

    .. warning::
        Exactly one forward and one backward of ``model`` may run inside the ``with`` block,
        and the backward must be of ``grad_scale`` times the *mean* loss of that batch.

    Example::

        >>> with StatsCapture(model) as cap:
        ...     loss = F.cross_entropy(model(x), y)
        ...     loss.backward()
        >>> stats = cap.grad_stats()
        >>> opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        grad_scale: float = 1.0,
        keep_bytes: int = DEFAULT_KEEP_BYTES,
        mode: str = "auto",
    ) -> None:
        if not grad_scale > 0:
            raise ValueError(f"Invalid grad_scale: {grad_scale}")
        if keep_bytes < 0:
            raise ValueError(f"Invalid keep_bytes: {keep_bytes}")
        if mode not in _MODES:
            raise ValueError(f"Invalid mode: {mode!r}")
        self.model = model
        self.grad_scale = float(grad_scale)
        self.keep_bytes = keep_bytes
        self.mode = mode
        self._handles: list[Any] = []
        self._sites: list[Site] = []
        self._bare: list[tuple[str, nn.Parameter]] = []
        self._forwards = 0
        self._n = 0
        self._bare_grads: dict[str, Tensor] = {}
        self._swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._validating = False

    def __enter__(self) -> StatsCapture:
        sites, bare, missing = _plan_model(self.model)
        if missing:
            raise RuntimeError(
                f"The hooks backend does not cover {', '.join(missing)}; use the vmap or "
                "micro-batch backend"
            )
        self._sites, self._bare, self._forwards, self._bare_grads = sites, bare, 0, {}
        for s in sites:
            self._handles.extend(_register_site(s, self._on_call(s)))
        self._handles.append(
            self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        )
        self._handles.append(self.model.register_forward_hook(self._post_forward))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_call(self, site: Site) -> Callable[[Tensor, Tensor], None]:
        def on_call(x: Tensor, y: Tensor) -> None:
            if self._validating:
                return
            call = Call(x, x._version, None)
            site.calls.append(call)
            y.register_hook(lambda g: setattr(call, "delta", g))

        return on_call

    def _pre_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._validating:
            return
        self._forwards += 1
        first = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(first, Tensor):
            raise RuntimeError("StatsCapture needs the batch as the model's first argument")
        self._n = int(first.shape[0])
        if not self._bare:
            return
        if _VALIDATED.get(model) != frozenset(q for q, _ in self._bare):
            saved = {k: b.detach().clone() for k, b in model.named_buffers()}
            expanded = {q: _expand(p, self._n) for q, p in self._bare}
            self._validating = True
            try:
                _validate_bare(model, args, expanded, saved)
            finally:
                self._validating = False
        # Per-sample views of the bare parameters: their gradient is summed back into the
        # parameter by autograd, and a hook keeps the per-sample rows.
        for q, p in self._bare:
            owner, name = _owner(model, q)
            view = p.expand(self._n, *p.shape[1:])
            view.register_hook(lambda g, q=q: self._bare_grads.__setitem__(q, g))
            owner._parameters[name] = view  # type: ignore[assignment]
            self._swapped.append((owner, name, p))

    def _post_forward(self, model: nn.Module, args: tuple, output: Any) -> None:
        if not self._validating:
            self._restore()

    def _restore(self) -> None:
        for owner, name, p in self._swapped:
            owner._parameters[name] = p
        self._swapped = []

    def grad_stats(self) -> GradStats:
        """The statistics of the captured step (call after ``backward()``)."""
        if self._forwards != 1:
            raise RuntimeError(f"StatsCapture saw {self._forwards} forward passes, expected 1")
        calls = [c for s in self._sites for c in s.calls]
        if calls and all(c.delta is None for c in calls):
            raise RuntimeError("StatsCapture saw no backward pass; call loss.backward() first")
        n = self._n
        grads = [c.delta for c in calls] + [self._bare_grads.get(q) for q, _ in self._bare]
        params = [p for p in self.model.parameters() if p.requires_grad]
        expanded = {q: p for q, p in self._bare}
        stats = _assemble(
            params, self._sites, self._bare, expanded, grads, n, self.keep_bytes, self.mode
        )
        for s in self._sites:
            s.calls = []
        c = n / self.grad_scale  # the captured δ are grad_scale·∂L/∂out; the core wants N·∂L/∂out
        inner = stats.inner_sq_sum
        return GradStats(
            count=n,
            unit_size=1,
            grad_sum=stats.grad_sum,
            sq_norm_sum=stats.sq_norm_sum * c**2,
            inner_sq_sum=lambda v: inner(v) * c**2,
            sum_scale=stats.sum_scale * c,
        )


def _owner(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    path, _, name = qualified.rpartition(".")
    return (model.get_submodule(path) if path else model), name
