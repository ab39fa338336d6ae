r"""Capture for the hooks backend: forward hooks on the covered modules, and the two entry points.

:func:`hooks_grad_stats` runs its own forward and backward pass (the ``"hooks"`` backend);
:class:`StatsCapture` rides on the training step's own forward and backward. Both save, per call
of a covered module, its input and (after the backward) ``δ``, the gradient of ``N·L`` at the
output the rule differentiates; :mod:`.assemble` turns those into statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from local_opt._stats import GradStats
from local_opt.backends.hooks.assemble import assemble
from local_opt.backends.hooks.plan import (
    _VALIDATED,
    expand_bare,
    owner_of,
    plan_model,
    validate_bare,
)
from local_opt.backends.hooks.rules import Call, Site, input_of

__all__ = ["StatsCapture", "hooks_grad_stats", "hooks_stats"]

Inputs = Union[Tensor, Sequence[Tensor]]

# Default memory for per-sample gradients kept between the pass and ``inner_sq_sum``.
DEFAULT_KEEP_BYTES = 2**30
_MODES = ("auto", "ghost", "keep", "stream")


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
            :mod:`local_opt.backends.hooks.rules.affine`) (default: ``"auto"``).
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
    sites, bare, missing = plan_model(model)
    if missing:
        raise RuntimeError(
            f"The hooks backend does not cover {', '.join(missing)}; use the vmap or micro-batch backend"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    with _capture(model, sites):
        saved = {k: b.detach().clone() for k, b in model.named_buffers()}
        try:
            expanded = {q: expand_bare(p, n) for q, p in bare}
            if expanded and _VALIDATED.get(model) != frozenset(expanded):
                validate_bare(model, args, expanded, saved)
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
    return assemble(params, sites, bare, expanded, grads, n, keep_bytes, mode, inner_products)


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
        sites, bare, missing = plan_model(self.model)
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
            expanded = {q: expand_bare(p, self._n) for q, p in self._bare}
            self._validating = True
            try:
                validate_bare(model, args, expanded, saved)
            finally:
                self._validating = False
        # Per-sample views of the bare parameters: their gradient is summed back into the
        # parameter by autograd, and a hook keeps the per-sample rows.
        for q, p in self._bare:
            owner, name = owner_of(model, q)
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
        c = n / self.grad_scale  # the captured δ are grad_scale·∂L/∂out; the core wants N·∂L/∂out
        stats = assemble(
            params, self._sites, self._bare, expanded, grads, n, self.keep_bytes, self.mode,
            scale=c,
        )
        for s in self._sites:
            s.calls = []
        return stats
