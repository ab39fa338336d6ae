r"""Bare parameters used through slicing, indexing, reshaping or broadcasting.

A *bare* parameter is owned by a module without a per-layer rule (ConvNeXt's ``gamma``, a
positional table used as ``self.pos[:T]``, Swin's relative-position bias table, PoolFormer's
``Scale``, XCiT's ``temperature`` …). While the model runs, a :class:`~torch.overrides.TorchFunctionMode`
follows the tensors computed from bare parameters alone (*static* tensors: slices, gathers,
reshapes, products of bare parameters and constants) and the tensors computed from the batch.
Where a static tensor ``S`` meets the batch in an elementwise op (``x * S``, ``x + S``,
``addcmul``, ``where``), ``S`` is broadcast along dimension 0 of the op's output: the op gets
``E = S.expand(R, …)`` instead (the same values), and the gradient at ``E`` holds one row per
output row. Rows are assigned to samples in sample-major order (``R = k·N`` rows, row ``r`` of
sample ``r // k``, as in batch-first models and window partitions), which a probe checks once
per model: perturbing one sample's input changes only that sample's rows. Each sample's
gradient at ``S`` is then pulled back to the parameters through the batch-free graph of ``S``
(one batched vector-Jacobian product), so several uses of one parameter are summed *before*
the norms are taken.

A static tensor that meets the batch any other way (a matmul, a convolution weight, a
concatenation) is reported, never counted as zero: the pass raises
:class:`~local_opt.backends.hooks.check.UnaccountedGradient` naming the parameters (the
``"hooks"`` backend then hands the model to ``"vmap"``).

:class:`BareRule` is the rule of the one site that holds all such parameters of a model
(:func:`~local_opt.backends.hooks.plan.plan_model` builds it); its hooks sit on the model itself.
Modules of ``torch.nn`` without a rule (``nn.LSTM``, ``nn.Bilinear`` …) and subclasses of a
covered layer that override its ``forward`` are not given to it: they are reported by the plan.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from local_opt.backends.hooks.check import UnaccountedGradient
from local_opt.backends.hooks.rules.base import (
    RULES,
    LayerStats,
    Memory,
    Rule,
    Site,
    find_rule,
    sq_norms,
)
from local_opt.backends.hooks.rules.diagonal import DiagonalRule
from local_opt.backends.hooks.rules.linear import FOLDABLE, LinearRule
from local_opt.backends.stack import in_backward

__all__: list[str] = []  # private module

# Elementwise ops whose tensor arguments broadcast against each other.
_ELEMENTWISE: set[Any] = {
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.addcmul, torch.addcdiv, torch.where,
}
for _name in ("add", "sub", "mul", "div", "addcmul", "addcdiv", "true_divide", "multiply",
              "subtract", "divide"):
    _ELEMENTWISE.add(getattr(Tensor, _name))
    _ELEMENTWISE.add(getattr(Tensor, _name + "_"))
for _name in ("add", "sub", "mul", "truediv"):
    for _fmt in ("__{}__", "__r{}__", "__i{}__"):
        _ELEMENTWISE.add(getattr(Tensor, _fmt.format(_name)))
# Reshapes and permutations followed for copies along dimension 0 (:meth:`BareMode._follow_copies`).
_ROWWISE = {Tensor.reshape, Tensor.view, Tensor.permute, Tensor.transpose, Tensor.flatten,
            torch.reshape, torch.permute, torch.transpose, torch.flatten}
_INPLACE = {f for f in _ELEMENTWISE if getattr(f, "__name__", "").endswith("_")
            or getattr(f, "__name__", "").startswith("__i")}


@dataclass
class Use:
    """One elementwise op where a static tensor met the batch."""

    op: str
    static: Tensor  # S, computed from bare parameters only
    expanded: Tensor | None  # E = S (aligned).expand(R, ...), None during a probe
    rows: int
    edge: Any = None
    grad: Tensor | None = None  # dL/dE, (R, ...)


@dataclass
class Trace:
    """What one forward under :class:`BareMode` saw."""

    uses: list[Use] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)  # probe: the meeting ops' outputs
    unsupported: list[str] = field(default_factory=list)

    def signature(self) -> tuple:
        return tuple((u.op, tuple(u.static.shape)) for u in self.uses)


def _name(func: Any) -> str:
    return getattr(func, "__name__", repr(func))


class BareMode(TorchFunctionMode):
    """Follows static and batch tensors; rewrites the elementwise ops where they meet."""

    def __init__(
        self,
        params: Sequence[Tensor],
        inputs: Sequence[Tensor],
        *,
        probe: bool = False,
        on_use: Callable[[Use], None] | None = None,
    ) -> None:
        super().__init__()
        self.trace = Trace()
        self.probe = probe
        self.on_use = on_use
        self._static: dict[int, weakref.ref] = {}
        self._copies: dict[int, tuple[weakref.ref, Tensor]] = {}
        # Each parameter enters the graph through a view of it made on its first use: per-sample
        # gradients are pulled back to that view, so hooks on the parameter itself (a training
        # step's own, or the accounting check's) never see them.
        self._roots = {id(p) for p in params}
        self.aliases: dict[int, Tensor] = {}
        self._batch: dict[int, weakref.ref] = {}
        for p in params:
            self._static[id(p)] = weakref.ref(p)
        for x in inputs:
            self._mark(self._batch, x)

    def _alias(self, p: Tensor) -> Tensor:
        a = self.aliases.get(id(p))
        if a is None:
            a = self.aliases[id(p)] = p.view_as(p)
            self._mark(self._static, a)
        return a

    @staticmethod
    def _mark(table: dict[int, weakref.ref], t: Any) -> None:
        if isinstance(t, Tensor):
            table[id(t)] = weakref.ref(t)

    @staticmethod
    def _has(table: dict[int, weakref.ref], t: Tensor) -> bool:
        r = table.get(id(t))
        return r is not None and r() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, Tensor)]
        static = [t for t in tensors if self._has(self._static, t)]
        if any(id(t) in self._roots for t in static):  # parameters enter through their aliases
            swap = {id(t): self._alias(t) for t in static if id(t) in self._roots}
            args, kwargs = tree_map(
                lambda t: swap.get(id(t), t) if isinstance(t, Tensor) else t, (args, kwargs)
            )
            tensors = [swap.get(id(t), t) for t in tensors]
            static = [swap.get(id(t), t) for t in static]
        batch = [t for t in tensors if self._has(self._batch, t)]
        if not static:
            out = func(*args, **kwargs)
            if batch:
                tree_map(lambda t: self._mark(self._batch, t), out)
            return out
        if not batch:
            out = func(*args, **kwargs)
            tree_map(lambda t: self._mark(self._static, t), out)
            src = args[0] if args else None
            if (
                func in (Tensor.repeat, Tensor.expand)
                and isinstance(out, Tensor)
                and isinstance(src, Tensor)
                and src.dim() == out.dim()
                and src.shape[0] == 1
                and out.shape[1:] == src.shape[1:]
            ):  # copies along dimension 0 (one per sample): a broadcast
                self._copies[id(out)] = (weakref.ref(out), src)
            elif func in _ROWWISE and isinstance(out, Tensor) and isinstance(src, Tensor):
                self._follow_copies(func, args, kwargs, src, out)
            return out
        if self._supported(func, args, kwargs, static):
            out = self._meet(func, args, kwargs, tensors, static)
        else:
            self.trace.unsupported.append(
                f"{_name(func)} of a tensor computed from loose parameters with the batch"
            )
            out = func(*args, **kwargs)
        tree_map(lambda t: self._mark(self._batch, t), out)
        return out

    def _follow_copies(self, func, args, kwargs, src: Tensor, out: Tensor) -> None:
        """Keep knowing that ``out`` is copies of one row when a reshape or permutation that
        keeps dimension 0 is applied to copies (checked on the values)."""
        copies = self._copies.get(id(src))
        if copies is None or copies[0]() is not src or out.dim() == 0:
            return
        b = src.shape[0]
        if out.shape[0] != b:
            return
        rest = [1 if (i == 0 and a == b) else a for i, a in enumerate(args[1:])]
        try:
            row = func(copies[1], *rest, **kwargs)
        except (RuntimeError, TypeError, IndexError):
            return
        if isinstance(row, Tensor) and row.shape[0] == 1 and row.shape[1:] == out.shape[1:]:
            if torch.equal(row.expand_as(out), out):
                self._copies[id(out)] = (weakref.ref(out), row)

    def _supported(self, func, args, kwargs, static) -> bool:
        if func is F.linear:  # a static weight and/or bias on a batch input
            x, w, b = _linear_args(args, kwargs)
            return not any(x is s for s in static) and isinstance(x, Tensor) and x.dim() >= 2
        if func is F.scaled_dot_product_attention:
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            return all(s is mask for s in static) and mask.is_floating_point()
        return func in _ELEMENTWISE and not (func in _INPLACE and self._has(self._static, args[0]))

    def _linear(self, args, kwargs, static):
        """``F.linear(x, W, b)`` with a static ``W`` and/or ``b``: ``W`` becomes ``R`` copies,
        one per row of ``x`` (a batched matmul, whose weight gradient is per row), and a static
        ``b`` is added as an elementwise meeting op (see :meth:`_meet`)."""
        x, w, b = _linear_args(args, kwargs)
        w_static = any(w is s for s in static)
        b_static = b is not None and any(b is s for s in static)
        if not w_static or self.probe:
            out = F.linear(x, w)
            if self.probe and w_static:  # record the batch operand, as the output's rows
                self.trace.uses.append(Use("linear", w, None, x.shape[0]))
                self.trace.outputs.append(x.reshape(x.shape[0], -1).clone())
        else:
            rows = x.shape[0]
            e = w.unsqueeze(0).expand(rows, *w.shape)
            use = Use("linear", w.unsqueeze(0), e, rows)
            if e.requires_grad:
                use.edge = get_gradient_edge(e)
                if self.on_use is not None:
                    self.on_use(use)
            self.trace.uses.append(use)
            x3 = x.reshape(rows, -1, x.shape[-1])
            out = torch.bmm(x3, e.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[0])
        if b is None:
            return out
        if not b_static:
            return out + b
        self._mark(self._batch, out)
        return self._meet(torch.add, (out, b), {}, [out, b], [b])

    def _meet(self, func, args, kwargs, tensors, static):
        if func is F.linear:
            return self._linear(args, kwargs, static)
        if func is F.scaled_dot_product_attention:  # an additive mask on the scores
            q, k = args[0], args[1] if len(args) > 1 else kwargs["key"]
            shape = torch.Size((*q.shape[:-1], k.shape[-2]))
        elif func in _INPLACE:
            shape = args[0].shape
        else:
            shape = torch.broadcast_shapes(*[t.shape for t in tensors])
        if len(shape) == 0:
            self.trace.unsupported.append(f"{_name(func)} on a 0-dim batch tensor")
            return func(*args, **kwargs)
        rows = shape[0]
        swap: dict[int, Tensor] = {}
        for s in static:
            copies = self._copies.get(id(s))
            src = copies[1] if copies is not None and copies[0]() is s else None
            if src is not None and s.dim() == len(shape) and s.shape[0] == shape[0]:
                aligned = src  # ``s`` is ``src`` repeated along dimension 0
            else:
                aligned = s.reshape((1,) * (len(shape) - s.dim()) + tuple(s.shape))
            if aligned.shape[0] != 1:
                self.trace.unsupported.append(
                    f"{_name(func)} with a tensor of shape {tuple(s.shape)} computed from loose "
                    "parameters that is not broadcast along dimension 0"
                )
                return func(*args, **kwargs)
            if self.probe:
                continue
            e = aligned.expand(rows, *aligned.shape[1:])
            use = Use(_name(func), aligned if src is not None else s, e, rows)
            if e.requires_grad:
                use.edge = get_gradient_edge(e)
                if self.on_use is not None:
                    self.on_use(use)
            self.trace.uses.append(use)
            swap[id(s)] = e
        if self.probe:  # record the batch operands, as the output's rows
            batch = [t for t in tensors if self._has(self._batch, t)]
            self.trace.uses.append(Use(_name(func), static[0], None, rows))
            self.trace.outputs.append(
                torch.cat([_rows(b, shape) for b in batch], 1).clone()
            )
            return func(*args, **kwargs)
        new_args, new_kwargs = tree_map(
            lambda t: swap.get(id(t), t) if isinstance(t, Tensor) else t, (args, kwargs)
        )
        return func(*new_args, **new_kwargs)


def _linear_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    """``(input, weight, bias)`` of an ``F.linear`` call."""
    bound = dict(zip(("input", "weight", "bias"), args), **kwargs)
    return bound.get("input"), bound.get("weight"), bound.get("bias")


def _rows(b: Tensor, shape: torch.Size) -> Tensor:
    """A batch operand as one row per output row (for the probe)."""
    if b.dim() == len(shape) and b.shape[0] == shape[0]:
        return b.reshape(shape[0], -1)
    return b.broadcast_to(shape).reshape(shape[0], -1)


def _perturbed(x: Tensor, j: int) -> Tensor:
    y = x.clone()
    other = x[(j + 1) % x.shape[0]]
    if x.is_floating_point() or x.is_complex():
        gen = torch.Generator(device=x.device).manual_seed(j)
        y[j] = x[j] + torch.randn(x[j].shape, generator=gen, dtype=x.dtype, device=x.device)
    else:
        y[j] = other
    return y


# Covered layers (a rule, trainable parameters) that the probe saw run on tensors without the
# batch (nanoGPT's ``wpe(arange(T))``, an MLP on relative coordinates): their parameters are
# loose, followed like the others.
OFF_BATCH: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_SEEN: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def batch_of(args: tuple, kwargs: dict | None) -> Any:
    """The batch of a model call: its first argument, or its first keyword argument when it has
    no positional ones (``model(input_ids=ids)``), as :class:`StatsCapture` reads it."""
    return args[0] if args else next(iter((kwargs or {}).values()), None)


def _with_batch(args: tuple, kwargs: dict, x: Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the batch (:func:`batch_of`) replaced by ``x``."""
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, next(iter(kwargs)): x}


def _first_samples(args: tuple, kwargs: dict | None) -> tuple[tuple, dict, int]:
    """``(args, kwargs, m)`` cut to their first ``m = min(3, n)`` samples: every tensor with the
    ``n`` samples of the batch (:func:`batch_of`) along dimension 0 is sliced, anything else
    passed as is."""
    n = int(batch_of(args, kwargs).shape[0])
    m = min(3, n)

    def head(t: Any) -> Any:
        return t[:m] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n else t

    return tuple(tree_map(head, list(args))), tree_map(head, kwargs or {}), m


# Per model, the (module, attribute) of its tensor caches (found once).
_CACHES: weakref.WeakKeyDictionary[nn.Module, list[tuple[nn.Module, str]]] = (
    weakref.WeakKeyDictionary()
)


def _tensor_caches(model: nn.Module) -> list[tuple[nn.Module, str, dict]]:
    """Dictionaries of tensors that modules keep between forwards (LeViT's and EfficientFormer's
    ``attention_bias_cache``, filled in eval mode): ``(module, attribute, dict)``."""
    where = _CACHES.get(model)
    if where is None:
        where = [
            (mod, k)
            for mod in model.modules()
            for k, v in vars(mod).items()
            if isinstance(v, dict)
            and not k.startswith("_")
            and ("cache" in k or (v and all(isinstance(t, Tensor) for t in v.values())))
            and all(isinstance(t, Tensor) for t in v.values())
        ]
        _CACHES[model] = where
    return [(mod, k, getattr(mod, k)) for mod, k in where if isinstance(getattr(mod, k, None), dict)]


@contextlib.contextmanager
def fresh_caches(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Within the block the modules' tensor caches (:func:`_tensor_caches`) are empty, so every
    forward computes what they would hold from the parameters (the loose-parameter mode then
    sees it); the returned function empties them again; the original ones are put back after."""
    caches = _tensor_caches(model)

    def empty() -> None:
        for mod, k, _ in caches:
            setattr(mod, k, {})

    empty()
    try:
        yield empty
    finally:
        for mod, k, v in caches:
            setattr(mod, k, v)


@contextlib.contextmanager
def _probing(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Eval mode and no grad for a probe's forward passes; every module's mode, every buffer,
    every tensor cache and the random number generators (a training step that follows draws
    its dropout masks as without the probe) are restored afterwards. Yields the function that
    empties the caches (call it before each forward)."""
    modes = {mod: mod.training for mod in model.modules()}
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.is_cuda})
    try:
        with fresh_caches(model) as empty, torch.random.fork_rng(devices=devices):
            model.eval()
            with torch.no_grad():
                yield empty
    finally:
        for mod, t in modes.items():
            mod.train(t)
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(saved[k])


@contextlib.contextmanager
def _sliced_copies(model: nn.Module, n: int, m: int) -> Iterator[None]:
    """Within the block, per-sample copies of bare parameters that the pass put in place of the
    parameters (``(n, ...)`` tensors that are not ``nn.Parameter``) are cut to ``m`` samples,
    as the probe's inputs are."""
    swapped = []
    for mod in model.modules():
        for k, t in mod._parameters.items():
            if (
                isinstance(t, Tensor)
                and not isinstance(t, nn.Parameter)
                and t.dim() >= 2
                and t.shape[0] == n
            ):
                swapped.append((mod, k, t))
                mod._parameters[k] = t[:m]
    try:
        yield
    finally:
        for mod, k, t in swapped:
            mod._parameters[k] = t


def find_off_batch(model: nn.Module, args: tuple, kwargs: dict | None = None) -> bool:
    """Once per model: run ``model.forward`` on at most 3 samples (eval mode, no grad, state
    restored) and add to :data:`OFF_BATCH` the covered layers whose input never derives from the
    batch and does not have the samples along dimension 0. Returns whether it added any."""
    x = batch_of(args, kwargs)
    if model in _SEEN or not isinstance(x, Tensor) or x.dim() == 0:
        return False
    _SEEN.add(model)
    small, small_kw, m = _first_samples(args, kwargs)
    covered = [
        mod
        for mod in model.modules()
        if find_rule(mod) is not None and any(p.requires_grad for p in mod.parameters())
    ]
    if not covered:
        return False
    mode = BareMode([], [t for t in tree_flatten((small, small_kw))[0] if isinstance(t, Tensor)])
    fed: dict[nn.Module, bool] = {}
    folded: list[nn.Module] = []  # run on k·N rows (MobileViT's patches, LeViT's BatchNorm)

    def record(mod: nn.Module, a: tuple) -> None:
        x = a[0] if a else None
        if isinstance(x, Tensor):
            on = mode._has(mode._batch, x) or (x.dim() > 0 and x.shape[0] == m)
            fed[mod] = fed.get(mod, False) or on
            if on and x.dim() >= 2 and x.shape[0] != m:
                folded.append(mod)

    handles = [mod.register_forward_pre_hook(record) for mod in covered]
    try:
        with _probing(model), mode:
            model.forward(*small, **small_kw)
    except Exception:  # noqa: BLE001 - the pass itself will report what fails
        return False
    finally:
        for h in handles:
            h.remove()
    # off the batch, or never called: its parameters are used functionally (BEiT's attention
    # calls ``F.linear(x, self.qkv.weight, bias)`` itself) or not at all
    off = [mod for mod in covered if not fed.get(mod, False)]
    OFF_BATCH.update(off)
    if folded:  # which sample each row belongs to: probed (FOLDABLE), or the rules refuse
        try:
            check_rows(model, [], args, kwargs)
        except Exception:  # noqa: BLE001 - the pass itself will report what fails
            pass
    return bool(off)


def check_rows(
    model: nn.Module, params: Sequence[Tensor], args: tuple, kwargs: dict | None = None
) -> str | None:
    """Probe that every meeting op's output rows are sample-major: ``None`` if so, else why not.

    Runs ``model.forward`` (in eval mode, without grad, the model's state restored) on at most 3
    samples, and again with one sample's input changed: only that sample's rows may change.
    """
    small, small_kw, m = _first_samples(args, kwargs)
    n = int(batch_of(args, kwargs).shape[0])
    linears = [
        mod
        for mod in model.modules()
        if isinstance(find_rule(mod), (LinearRule, DiagonalRule)) and mod not in OFF_BATCH
    ]

    def run(inputs: tuple, kw: dict) -> Trace:
        empty()  # every run computes its cached tensors itself
        batch = [t for t in tree_flatten((inputs, kw))[0] if isinstance(t, Tensor)]
        mode = BareMode(params, batch, probe=True)

        def record(mod: nn.Module, a: tuple) -> None:  # Linear layers on k·N rows too
            x = a[0] if a else None
            if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] != m:
                use = Use(type(mod).__name__, x, None, x.shape[0])
                use.module = mod  # type: ignore[attr-defined]
                mode.trace.uses.append(use)
                mode.trace.outputs.append(x.reshape(x.shape[0], -1).clone())

        handles = [mod.register_forward_pre_hook(record) for mod in linears]
        try:
            with mode:
                model.forward(*inputs, **kw)  # not model(...): no hooks of the model itself
        finally:
            for h in handles:
                h.remove()
        return mode.trace

    with _probing(model) as empty, _sliced_copies(model, n, m):
        base = run(small, small_kw)
        if base.unsupported:
            return base.unsupported[0]
        changed = [False] * len(base.outputs)
        for j in sorted({0, m - 1}):
            other = run(*_with_batch(small, small_kw, _perturbed(batch_of(small, small_kw), j)))
            if other.signature() != base.signature():
                return "the ops on bare parameters depend on the input"
            for i, (a, b) in enumerate(zip(base.outputs, other.outputs)):
                rows = a.shape[0]
                if rows % m:
                    return f"{base.uses[i].op}: {rows} rows for {m} samples"
                k = rows // m
                diff = (a != b).reshape(rows, -1).any(1)
                own = torch.zeros(rows, dtype=torch.bool, device=diff.device)
                own[j * k : (j + 1) * k] = True
                if bool((diff & ~own).any()):
                    return (
                        f"{base.uses[i].op}: a sample's input changes other samples' rows "
                        "(the batch is not along dimension 0)"
                    )
                # an operand that does not depend on the input (a pooling residual of a
                # 1x1 map is 0) cannot show its layout: accepted with one row per sample
                changed[i] = changed[i] or bool(diff.any()) or k == 1
        if m > 1 and not all(changed):
            return "could not check which sample the rows of an op belong to"
        for u in base.uses:  # Linear layers whose k·N input rows are sample-major
            if getattr(u, "module", None) is not None:
                FOLDABLE.add(u.module)  # type: ignore[attr-defined]
    return None


def _pull_back(
    static: Tensor, rows_grad: Tensor, targets: Sequence[Tensor | None], n: int
) -> list:
    """Per-sample gradients at ``targets`` (the parameters' aliases, None if unused) through
    ``static`` from the gradient at its expanded use, ``(R, ...)`` with ``R = k·N`` sample-major
    rows: ``[(N, *p.shape) or None]``."""
    rows = rows_grad.shape[0]
    if rows % n:
        raise RuntimeError(f"{rows} rows for {n} samples")
    g = rows_grad.reshape(n, rows // n, *rows_grad.shape[1:]).sum(1).reshape(n, *static.shape)
    used = [(i, t) for i, t in enumerate(targets) if t is not None]
    out: list = [None] * len(targets)
    for i, t in used:  # a reshaped view of one parameter (``gamma.reshape(1, -1, 1, 1)``)
        if (
            static.data_ptr() == t.data_ptr()
            and static.numel() == t.numel()
            and static.is_contiguous()
            and t.is_contiguous()
        ):
            out[i] = g.reshape(n, *t.shape)
            return out
    if used:
        got = torch.autograd.grad(
            static, [t for _, t in used], g, retain_graph=True, allow_unused=True,
            is_grads_batched=True,
        )
        for (i, _), gi in zip(used, got):
            out[i] = gi
    return out


def takes_loose(module: nn.Module) -> bool:
    """Whether ``module``'s trainable parameters (it has no rule) go to the :class:`BareRule`
    site: not for ``torch.nn``'s own layers and not for a covered layer whose subclass
    overrides ``forward`` (a different function of the same weights)."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn"):
        return False
    return not any(base in RULES for base in cls.__mro__)


# Models whose sample-major layout was probed, with the signature of their meeting ops.
_PROBED: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


class BareRule(Rule):
    """Every loose parameter of a model (owned by modules without a rule), as one site whose
    module is the model: see the module docstring."""

    def register(self, site: Site, on_call: Callable[[Tensor, Tensor], None]) -> list[Any]:
        """Enter a :class:`BareMode` for each forward of the model; ``on_call(S, E)`` for every
        use (``S`` the static tensor, ``E`` its expanded stand-in)."""
        model, params = site.module, list(site.params.values())
        state: dict[str, Any] = {}

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
            if not inputs or not torch.is_grad_enabled() or in_backward():  # nothing to capture
                return
            n = int(inputs[0].shape[0])
            if model not in _PROBED:
                why = check_rows(model, params, args, kwargs)
                if why is not None:
                    raise UnaccountedGradient(
                        [site.name], f"its use failed the off-batch probe ({why})"
                    )
                _PROBED[model] = ()

            def on_use(use: Use) -> None:
                on_call(use.static, use.expanded)
                call = site.calls[-1] if site.calls else None
                if call is None or call.inputs is not use.static:
                    return

                targets = [mode.aliases.get(id(p)) for p in params]
                call.targets = targets  # type: ignore[attr-defined]

                def hook(g: Tensor) -> None:  # while the graph of S is still there
                    call.per_sample = _pull_back(use.static, g, targets, n)  # type: ignore[attr-defined]

                use.expanded.register_hook(hook)

            fresh = fresh_caches(model)  # cached tensors are computed under the mode
            fresh.__enter__()
            state["fresh"] = fresh
            mode = BareMode(params, inputs, on_use=on_use)
            mode.__enter__()
            state["mode"] = mode

        def post(module: nn.Module, args: tuple, output: Any) -> None:
            mode = state.pop("mode", None)
            fresh = state.pop("fresh", None)
            if fresh is not None:
                fresh.__exit__(None, None, None)
            if mode is None:
                return
            mode.__exit__(None, None, None)
            if mode.trace.unsupported:
                raise UnaccountedGradient(
                    [site.name], f"a use it cannot follow ({mode.trace.unsupported[0]})"
                )

        return [
            model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post),
        ]

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        names, params = list(site.params), list(site.params.values())
        per = [torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) for p in params]
        for c in site.calls:
            if c.delta is None:
                continue
            got = getattr(c, "per_sample", None)
            if got is None:
                got = _pull_back(c.inputs, c.delta, c.targets, n)  # type: ignore[attr-defined]
            for acc, g in zip(per, got):
                if g is not None:
                    acc += g.to(acc.dtype)
        site.calls = []
        sq = torch.zeros(n, dtype=torch.float64, device=per[0].device if per else None)
        for g in per:
            sq += sq_norms(g)

        def inner(v: dict[str, Tensor]) -> Tensor:
            res = torch.zeros(n, dtype=torch.float64, device=sq.device)
            for name, g in zip(names, per):
                if name in v:
                    res += (g.reshape(n, -1) @ v[name].reshape(-1).to(g.dtype)).double()
            return res

        return LayerStats({k: g.sum(0) for k, g in zip(names, per)}, sq, inner)


BARE_RULE = BareRule()
