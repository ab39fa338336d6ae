r"""Capture for the hooks backend: forward hooks on the covered modules, and the two entry points.

:func:`hooks_grad_stats` runs its own forward and backward pass (the ``"hooks"`` backend);
:class:`StatsCapture` rides on the training step's own forward and backward. Both save, per call
of a covered module, its input and (after the backward) ``δ``, the gradient of ``N·L`` at the
output the rule differentiates; :mod:`.assemble` turns those into statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from local_opt._stats import GradStats
from local_opt.backends.hooks.assemble import _OOM, _finish, assemble, reduce_layers
from local_opt.backends.hooks.check import (
    UNCOVERED,
    GradFingerprints,
    NonFiniteGradient,
    UnaccountedGradient,
    _raise_nonfinite,
    capture_check_due,
    mark_capture_checked,
    mark_checked,
    needs_check,
    unaccounted,
    warn_unaccounted,
)
from local_opt.backends.hooks.inline import eligible, install
from local_opt.backends.hooks.plan import (
    _VALIDATED,
    Walk,
    cached_plan,
    expand_bare,
    owner_of,
    validate_bare,
)
from local_opt.backends.hooks.rules import Call, LayerStats, Memory, Site, input_of
from local_opt.backends.hooks.rules.bare import batch_of, find_off_batch
from local_opt.backends.stack import in_backward, plain_checkpoints
from local_opt.backends.vmap import vmap_stats

__all__ = ["StatsCapture", "hooks_grad_stats", "hooks_stats"]

Inputs = Union[Tensor, Sequence[Tensor]]

# Default memory for per-sample gradients kept between the pass and ``inner_sq_sum``.
DEFAULT_KEEP_BYTES = 2**30
_MODES = ("auto", "ghost", "keep", "stream")
_LOW = (torch.float16, torch.bfloat16)


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
    check: bool = True,
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
        check (bool): verify that the per-sample contributions the hooks saw add up to the
            batch gradient of every covered parameter (:func:`~.check.unaccounted`); the first
            pass per model and module modes pays one weight-gradient matmul per layer for it.
            A parameter that receives gradient through a path the hooks did not see raises
            :class:`~.check.UnaccountedGradient`; a non-finite gradient (a diverging step)
            raises :class:`~.check.NonFiniteGradient` (default: ``True``).

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
    walk = Walk(model)  # the one walk over the modules of this pass
    sites, bare, missing = cached_plan(model, walk)
    if not missing and find_off_batch(model, args):  # once per model: layers run off the batch
        sites, bare, missing = cached_plan(model, walk)
    if missing:
        raise RuntimeError(
            f"The hooks backend does not cover {', '.join(missing)}; use the vmap or micro-batch backend"
        )
    params = walk.params
    checked = [p for s in sites for p in s.params.values()]
    training = walk.training()
    verify = check and needs_check(model, checked, training)
    with _capture(model, sites), torch.enable_grad(), plain_checkpoints(non_reentrant=False):
        buffers = [(m, k, m._buffers[k]) for m, k in walk.buffers]
        copies = [b.detach().clone() for _, _, b in buffers]
        try:
            expanded = {q: expand_bare(p, n) for q, p in bare}
            if expanded and _VALIDATED.get(model) != frozenset(expanded):
                saved = {k: c for (k, _), c in zip(model.named_buffers(), copies)}
                validate_bare(model, args, expanded, saved)
                for s in sites:
                    s.calls.clear()
            out = _call_with(model, bare, expanded, args) if expanded else model(*args)
            loss = loss_fn(out, targets)
            if loss.dim() != 0:
                raise ValueError(
                    f"Invalid loss_fn: returned shape {tuple(loss.shape)}, not a scalar"
                )
            edges: list[Any] = [c.edge for s in sites for c in s.calls]
            wanted = edges + list(expanded.values()) + (checked if verify else [])
            grads = torch.autograd.grad(
                loss, wanted, grad_outputs=torch.full_like(loss, float(n)), allow_unused=True
            )
        finally:
            with torch.no_grad():
                for (m, k, _), c in zip(buffers, copies):
                    b = m._buffers.get(k)  # the buffer under that name now
                    if b is not None:
                        b.copy_(c)
    if not inner_products:
        keep_bytes = 0
    low = any(g is not None and g.dtype in _LOW for g in grads) or any(
        c.inputs.dtype in _LOW for s in sites for c in s.calls
    )
    reference = list(grads[len(grads) - len(checked) :]) if verify else []
    nsite = len(grads) - len(reference)
    stats = assemble(
        params, sites, bare, expanded, grads[:nsite], n, keep_bytes, mode, inner_products
    )
    if verify:
        sums = dict(zip(map(id, params), stats.grad_sum))
        got = [sums[id(p)] for p in checked]
        try:
            bad = unaccounted(model, checked, got, reference, low)
        except NonFiniteGradient as e:
            e.stats = _nan_stats(stats)
            raise
        if bad:
            raise UnaccountedGradient(bad)
        mark_checked(model, checked, training)
    return stats


def _call_with(
    model: nn.Module,
    bare: list[tuple[str, nn.Parameter]],
    expanded: dict[str, Tensor],
    args: tuple[Tensor, ...],
) -> Any:
    """``model(*args)`` with the bare parameters replaced by their per-sample copies (as
    ``torch.func.functional_call`` would, without its walks over the model; a bare parameter is
    never shared, :func:`~.plan.plan_model` reports those)."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for q, p in bare:
            owner, name = owner_of(model, q)
            owner._parameters[name] = expanded[q]  # type: ignore[assignment]
            swapped.append((owner, name, p))
        return model(*args)
    finally:
        for owner, name, p in swapped:
            owner._parameters[name] = p


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
    such as ``chunk_size`` or ``micro_batches``, do not apply and are ignored).

    Never silently wrong: when a parameter receives gradient through a path the hooks did not
    see (:class:`~.check.UnaccountedGradient`), this warns once per model, naming the
    parameters, and returns the exact statistics of the ``"vmap"`` backend instead; the model
    is then no longer :func:`~.plan.supports`-ed, so ``"auto"`` chooses for it directly. When
    the batch gradient is not finite (:class:`~.check.NonFiniteGradient`, a diverging step),
    the returned statistics are, with ``sq_norm_sum`` NaN.
    """
    if model not in UNCOVERED:
        try:
            return hooks_grad_stats(model, loss_fn, inputs, targets, inner_products=inner_products)
        except UnaccountedGradient as e:
            warn_unaccounted(model, e)
        except NonFiniteGradient as e:  # the statistics of any backend: VarianceTest keeps b
            assert e.stats is not None
            return e.stats  # type: ignore[return-value]
    return vmap_stats(model, loss_fn, inputs, targets, inner_products=inner_products, **options)


def _register_site(site: Site, on_call: Callable[[Tensor, Tensor], None]) -> list[Any]:
    """Forward hooks calling ``on_call(x, y)`` once per forward of ``site.module``: ``x`` its
    input (detached), ``y`` the output the rule differentiates — the module's output, or the
    input of the rule's :meth:`~Rule.output_child` — before any in-place op can change ``y``.
    Forwards run by autograd during a backward (a checkpoint's recomputation) are ignored: the
    gradient flows through the graph of the first forward."""

    def read_input(args: tuple, kwargs: dict) -> Tensor:
        x = input_of(args, kwargs)
        if not isinstance(x, Tensor):
            raise RuntimeError(f"The hooks backend cannot read the input of {site.name}")
        return x.detach()

    def emit(x: Tensor, y: Any) -> None:
        if isinstance(y, Tensor) and y.requires_grad:
            on_call(x, y)

    own = getattr(site.rule, "register", None)
    if own is not None:  # a rule that installs its own hooks (the model's loose parameters)
        return own(site, on_call)
    child = site.rule.output_child(site.module)
    if child is None:

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if isinstance(output, Tensor) and output.requires_grad and not in_backward():
                on_call(read_input(args, kwargs), output)

        return [site.module.register_forward_hook(hook, with_kwargs=True)]
    pending: list[Tensor] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not in_backward():
            pending[:] = [read_input(args, kwargs)]

    def child_pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if pending:  # the child called from its parent's forward, not on its own
            y = input_of(args, kwargs)
            emit(pending.pop(), y)
            if args and y is args[0] and y.requires_grad and y._base is not None:
                # an in-place op (the activation) on a view (timm's LayerNormAct2d permutes)
                # would take y's edge out of the graph: the child gets a copy instead
                return (y.clone(), *args[1:]), kwargs
        return None

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
        def on_call(x: Tensor, y: Tensor) -> None:
            call = Call(x, x._version, get_gradient_edge(y))
            site.rule.on_output(call, y)
            site.calls.append(call)

        return on_call

    handles = [h for s in sites for h in _register_site(s, make_on_call(s))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class StatsCapture:
    r"""Per-sample gradient statistics from the training step's own forward and backward.

    The exact statistics of the ``"hooks"`` backend (per-sample squared norms
    :math:`\lVert g_i\rVert^2` and, optionally, inner products :math:`\langle g_i, \bar g\rangle`;
    `Lau et al., 2024 <https://arxiv.org/abs/2406.13936>`_) without the separate pass of
    :func:`hooks_grad_stats`: the hooks ride on the training step that precedes a
    synchronization. Each layer's share is computed in the backward as soon as its output
    gradient arrives, and the output gradient is freed right after (ghost norms or per-sample
    gradients, whichever the cost model of :mod:`~local_opt.backends.hooks.rules.affine`
    finds cheaper for the layer, Bu et al., 2023). For ``nn.Linear`` / ``nn.Conv1d`` /
    ``nn.Conv2d`` the rule's :math:`\sum_i G_i` *is* the weight gradient autograd receives, so
    it is not computed twice (:mod:`~local_opt.backends.hooks.inline`). The model's ``.grad`` is
    accumulated by ``backward()`` as usual (equal to a plain step's up to float rounding);
    BatchNorm running statistics are updated by the forward as usual. Hand the capture to
    :meth:`local_opt.VarianceTest.suggest_from_capture` (or use
    :meth:`local_opt.VarianceTest.capture`), which pools it over the ranks and applies the test.

    Never silently wrong: on the first capture of a model (per set of parameters and module
    modes) and every 16th after it, a hook on each covered parameter reads two numbers of the
    gradient the backward computes, and :meth:`grad_stats` raises
    :class:`~local_opt.backends.hooks.check.UnaccountedGradient` naming the parameters whose
    gradient the layer hooks did not fully see (see :mod:`local_opt.backends.hooks.check`); a
    non-finite step raises :class:`~local_opt.backends.hooks.check.NonFiniteGradient` on
    every capture. An
    error of a rule inside the backward never breaks the training step: it is raised by
    :meth:`grad_stats`.

    Args:
        model (nn.Module): the module whose forward the step calls, or the inner module of a
            DDP wrapper (``ddp.module``); :func:`unsupported_layers` must be empty.
        grad_scale (float): the factor the mean batch loss was multiplied by before
            ``backward()`` (e.g. ``1 / K`` when accumulating ``K`` micro-batches, or a loss
            scaler's scale) (default: 1.0).
        keep_bytes (int): as in :func:`hooks_grad_stats` (default: 1 GiB).
        mode (str): as in :func:`hooks_grad_stats` (default: ``"auto"``).
        inner_products (bool): whether ``grad_stats().inner_sq_sum`` will be called (the
            inner-product and augmented tests); without it nothing is kept after each layer's
            share of the backward, and it returns NaN (the norm test needs no inner products)
            (default: ``True``).

    .. warning::
        Exactly one forward and one backward of ``model`` may run inside the ``with`` block,
        and the backward must be of ``grad_scale`` times the *mean* loss of that batch.
        Non-reentrant activation checkpointing is fine (the recomputation is ignored); a
        reentrant checkpoint hides its layers' gradients from the hooks, which the check above
        reports. A ``torch.compile``'d forward is not supported (the hooks must run eagerly).

    Example::

        >>> with StatsCapture(model, inner_products=False) as cap:
        ...     loss = F.cross_entropy(model(x), y)
        ...     loss.backward()
        >>> opt.step()
        >>> if opt.synced:
        ...     sampler.set_batch_size(vt.suggest_from_capture(cap, sampler.batch_size))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        grad_scale: float = 1.0,
        keep_bytes: int = DEFAULT_KEEP_BYTES,
        mode: str = "auto",
        inner_products: bool = True,
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
        self.inner_products = bool(inner_products)
        self._handles: list[Any] = []
        self._undo: list[Callable[[], None]] = []
        self._sites: list[Site] = []
        self._bare: list[tuple[str, nn.Parameter]] = []
        self._forwards = 0
        self._n = 0
        self._bare_grads: dict[str, Tensor] = {}
        self._swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._validating = False
        self._installed = False
        self._checked: list[nn.Parameter] = []
        self._fingerprints: GradFingerprints | None = None
        self._check_key: tuple | None = None  # what a passing check marks as checked
        self._blocks = 0  # ``with`` blocks entered: which step the statistics are of
        self._reset()

    def _reset(self) -> None:
        self._pending: dict[int, int] = {}  # id(site) -> calls whose δ has not arrived
        self._finished: dict[int, LayerStats] = {}  # id(site) -> its share of the statistics
        self._sq: Tensor | None = None  # Σ over finished layers of the per-sample ‖g_i‖²
        self._free = self.keep_bytes if self.inner_products else 0
        self._errors: list[BaseException] = []
        self._arrived = 0
        self._low = False
        # the statistics (or the error computing them), taken once: at the end of the block at
        # the latest, while the parameters still have the values the backward saw (the
        # accounting check reads them; an optimizer step after the block would change them)
        self._result: GradStats | Exception | None = None

    def __enter__(self) -> StatsCapture:
        sites, bare, missing = cached_plan(self.model)
        if missing:
            raise RuntimeError(
                f"The hooks backend does not cover {', '.join(missing)}; use the vmap or "
                "micro-batch backend"
            )
        self._blocks += 1
        self._sites, self._bare, self._forwards, self._bare_grads = sites, bare, 0, {}
        self._checked, self._fingerprints, self._installed = [], None, False
        self._reset()
        try:
            # the layers' hooks are placed at the first forward, when the batch is known
            # (:meth:`_install`); this hook runs before every other forward pre-hook
            self._handles.append(
                self.model.register_forward_pre_hook(self._install, with_kwargs=True, prepend=True)
            )
            self._handles.append(
                self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
            )
            self._handles.append(self.model.register_forward_hook(self._post_forward))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _install(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """At the model's first forward in the block: probe it (once per model) for covered
        layers run off the batch, such as GPT-2's ``wpe`` on position ids of shape ``(1, T)``,
        whose parameters are then followed as loose parameters (as :func:`hooks_grad_stats`
        does); check once per model that per-sample copies of the bare parameters leave the
        output unchanged (:func:`~.plan.validate_bare`); then place the layers' hooks.
        Model-level pre-hooks placed here (the loose parameters' rule) are called here for this
        forward: the module has already taken the list of pre-hooks it runs."""
        if self._installed or self._validating or in_backward():
            return
        self._installed = True
        if find_off_batch(model, args, kwargs):
            self._sites, self._bare, missing = cached_plan(model)
            if missing:  # not the training step's error: grad_stats raises it
                self._sites, self._bare = [], []
                self._errors.append(
                    RuntimeError(
                        f"The hooks backend does not cover {', '.join(missing)}; use the vmap "
                        "or micro-batch backend"
                    )
                )
                return
        first = batch_of(args, kwargs)
        if (
            self._bare
            and isinstance(first, Tensor)
            and _VALIDATED.get(model) != frozenset(q for q, _ in self._bare)
        ):  # before any rule's hook: the validating forwards run without them
            saved = {k: b.detach().clone() for k, b in model.named_buffers()}
            expanded = {q: expand_bare(p, int(first.shape[0])) for q, p in self._bare}
            self._validating = True
            try:
                validate_bare(model, args, expanded, saved, kwargs)
            finally:
                self._validating = False
        sites = self._sites
        self._checked = [p for s in sites for p in s.params.values()]
        self._check_key = capture_check_due(model, self._checked)
        if self._check_key is not None:
            self._fingerprints = GradFingerprints(self._checked)
        before = set(model._forward_pre_hooks)
        for s in sites:
            if eligible(s):
                self._undo.append(install(s, self, self._on_call(s), self._active))
            else:
                self._handles.extend(_register_site(s, self._on_call(s)))
        for key, hook in list(model._forward_pre_hooks.items()):
            if key in before:
                continue
            if key in model._forward_pre_hooks_with_kwargs:
                out = hook(model, args, kwargs)
            else:
                out = hook(model, args)
            if out is not None:
                raise RuntimeError("StatsCapture: a rule's forward pre-hook changed the arguments")

    def __exit__(self, *exc: Any) -> None:
        self._restore()
        if self._fingerprints is not None:
            self._fingerprints.remove()
        for h in self._handles:
            h.remove()
        for undo in self._undo:
            undo()
        self._handles, self._undo = [], []
        if exc[0] is None and self._result is None:
            try:
                self._result = self._compute_stats()
            except Exception as e:  # raised by grad_stats(), where the caller asks for them
                self._result = e

    def _active(self) -> bool:
        return not self._validating

    # -- the forward: one record per call of a covered module --------------------------------

    def open_call(self, site: Site, x: Tensor) -> Call | None:
        """A new call of ``site`` whose input and ``δ`` the backward hands over (:mod:`.inline`)."""
        if self._validating:
            return None
        call = Call(None, 0, None)  # type: ignore[arg-type]  # the input comes with δ
        site.calls.append(call)
        self._pending[id(site)] = self._pending.get(id(site), 0) + 1
        return call

    def _on_call(self, site: Site) -> Callable[[Tensor, Tensor], None]:
        def on_call(x: Tensor, y: Tensor) -> None:
            if self._validating:
                return
            call = Call(x, x._version, None)
            site.rule.on_output(call, y)
            site.calls.append(call)
            self._pending[id(site)] = self._pending.get(id(site), 0) + 1
            # the hook stays on y's autograd node until the graph is freed: it must not keep
            # the call (input and δ) alive after it fired
            box = [call]
            y.register_hook(lambda g: self._on_delta(site, box.pop(), g) if box else None)

        return on_call

    # -- the backward: each layer's share as soon as its last δ arrives -----------------------

    def _on_delta(self, site: Site, call: Call, g: Tensor) -> None:
        if call.inputs._version != call.version:
            self._errors.append(
                RuntimeError(f"The input of {site.name} was modified in place after the layer used it")
            )
        call.delta = g
        self._arrived += 1
        left = self._pending[id(site)] = self._pending[id(site)] - 1
        if left == 0:
            self._finish_site(site)

    def arrive(
        self, site: Site, call: Call, x: Tensor, delta: Tensor
    ) -> tuple[Tensor | None, Tensor | None] | None:
        """One call's input and ``δ`` from :class:`~.inline._Affine`'s backward; the rule's weight
        and bias gradient sums when the site has this one call, else None."""
        call.inputs, call.delta = x.detach(), delta
        self._arrived += 1
        left = self._pending[id(site)] = self._pending[id(site)] - 1
        if len(site.calls) != 1:  # called more than once: the norm needs every call's δ
            if left == 0:
                self._finish_site(site)
            return None
        st = self._finish_site(site)
        if st is None:  # the rule failed (reported by grad_stats): autograd's way
            return None
        return st.grad_sum.get("weight"), st.grad_sum.get("bias")

    def _finish_site(self, site: Site) -> LayerStats | None:
        calls = site.calls
        if not any(c.delta is not None for c in calls):
            site.calls = []
            return None
        self._low = self._low or any(
            t is not None and t.dtype in _LOW for c in calls for t in (c.inputs, c.delta)
        )
        site.mode = "" if self.mode == "auto" else self.mode
        if self.mode == "auto" and self.inner_products:
            req = site.rule.keep_request(site, self._n)
            if req is not None and req[1] <= self._free:
                site.mode = "keep"
                self._free -= req[1]
        try:
            with torch.no_grad():
                st = _finish(site, self._n, Memory(self._free, {}, self.inner_products))
        except _OOM:
            raise
        except Exception as e:  # never break the training step: grad_stats raises it
            self._errors.append(e)
            site.calls = []
            return None
        site.calls = []
        sq = st.sq_norms.detach()
        self._sq = sq.clone() if self._sq is None else self._sq.add_(sq.to(self._sq.device))
        if not self.inner_products:
            st = LayerStats(st.grad_sum, sq, _no_inner)
        self._finished[id(site)] = st
        return st

    # -- the model's forward ------------------------------------------------------------------

    def _pre_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._validating:
            return
        self._forwards += 1
        first = batch_of(args, kwargs)
        if not isinstance(first, Tensor):
            raise RuntimeError(
                "StatsCapture needs the batch as the model's first argument (or first keyword "
                "argument): call model(x, ...)"
            )
        self._n = int(first.shape[0])
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
        """The statistics of the captured step (call after ``backward()``, inside the block or
        after it; an optimizer step after the block does not change them: they are taken when
        the block ends at the latest).

        Raises :class:`~local_opt.backends.hooks.check.UnaccountedGradient` (a RuntimeError)
        naming the parameters when the contributions the hooks saw do not add up to the
        gradient the backward computed (see :mod:`~local_opt.backends.hooks.check`),
        :class:`~local_opt.backends.hooks.check.NonFiniteGradient` (a FloatingPointError) when
        that gradient holds an Inf or a NaN (the training diverges), and any error a rule met
        during the backward."""
        if self._result is None:
            self._result = self._compute_stats()
        if isinstance(self._result, Exception):  # met when the block ended
            raise self._result
        return self._result

    def _compute_stats(self) -> GradStats:
        if self._forwards != 1:
            raise RuntimeError(f"StatsCapture saw {self._forwards} forward passes, expected 1")
        opened = any(s.calls for s in self._sites) or self._finished
        if opened and self._arrived == 0 and not self._bare_grads:
            raise RuntimeError("StatsCapture saw no backward pass; call loss.backward() first")
        for s in self._sites:  # layers some of whose calls got no gradient
            if s.calls:
                self._finish_site(s)
        if self._errors:
            raise self._errors[0]
        n = self._n
        params = [p for p in self.model.parameters() if p.requires_grad]
        device = params[0].device if params else None
        sq = torch.zeros(n, dtype=torch.float64, device=device)
        if self._sq is not None:
            sq += self._sq.to(sq.device)
        finished = []
        for s in self._sites:
            st = self._finished.get(id(s))
            if st is None:  # never called, or no gradient reached it: zero
                zeros = {k: torch.zeros_like(p) for k, p in s.params.items()}
                st = LayerStats(zeros, torch.zeros(n, dtype=torch.float64, device=device), _zero_inner(n, device))
            finished.append((s, st))
        bare_grads = [self._bare_grads.get(q) for q, _ in self._bare]
        self._low = self._low or any(g is not None and g.dtype in _LOW for g in bare_grads)
        c = n / self.grad_scale  # the captured δ are grad_scale·∂L/∂out; the core wants N·∂L/∂out
        stats = reduce_layers(
            params, finished, self._bare, bare_grads, n, sq, self.inner_products, c
        )
        self._finished = {}
        if self._fingerprints is not None:
            sums = dict(zip(map(id, params), stats.grad_sum))
            try:
                bad = self._fingerprints.unaccounted(
                    self.model, [sums[id(p)] for p in self._checked], self._low
                )
            except NonFiniteGradient as e:
                e.stats = _nan_stats(stats)
                raise
            if bad:
                raise UnaccountedGradient(bad)
            assert self._check_key is not None
            mark_capture_checked(self.model, self._check_key)
        else:
            _raise_if_nonfinite(self.model, params, stats)
        return stats


def _raise_if_nonfinite(model: nn.Module, params: list[nn.Parameter], stats: GradStats) -> None:
    """:class:`NonFiniteGradient` (with NaN statistics) when a gradient sum's norm, in its own
    dtype as the accounting check computes it, or the per-sample squared norms are not finite:
    a diverging step is reported on the captures that skip the check too. One host sync."""
    if not params:
        return
    norms = torch._foreach_norm(stats.grad_sum)
    dev = stats.sq_norm_sum.device
    table = torch.stack([t.to(dev, torch.float64) for t in norms] + [stats.sq_norm_sum]).tolist()
    *rows, sq = table
    try:
        _raise_nonfinite(model, params, [(v,) for v in rows])
        _raise_nonfinite(model, params, [(sq,)] * len(params))  # no sum is: all of them
    except NonFiniteGradient as e:
        e.stats = _nan_stats(stats)
        raise


def _nan_stats(stats: GradStats) -> GradStats:
    """``stats`` with ``sq_norm_sum`` NaN: a non-finite step is never taken for a finite one."""
    return dataclasses.replace(stats, sq_norm_sum=torch.full_like(stats.sq_norm_sum, math.nan))


def _no_inner(v: dict[str, Tensor]) -> Tensor:
    raise RuntimeError("StatsCapture(inner_products=False) kept nothing for the inner products")


def _zero_inner(n: int, device: Any) -> Callable[[dict[str, Tensor]], Tensor]:
    return lambda v: torch.zeros(n, dtype=torch.float64, device=device)
