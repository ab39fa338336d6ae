r"""Per-layer rules of the hooks backend: the base class, the shared records and the registry.

Each rule knows one kind of parameterized layer. From what a forward hook saved (the layer's
input ``a``) and what the backward delivered (``δ``, the gradient of ``N·L`` with respect to the
layer's output, so ``δ_i = ∂ℓ_i/∂out_i`` when samples do not interact), it returns for the
layer's parameters

* ``Σ_i g_i`` (the batch gradient times ``N``),
* ``‖g_i‖²`` for every sample ``i`` (a length-``N`` vector, summed over the layer's parameters),
* a function ``V ↦ (⟨g_i, V⟩)_i`` evaluated later, once the pooled mean gradient is known.

Rules are grouped by layer family, one module each (:mod:`.linear`, :mod:`.conv`, :mod:`.norm`,
:mod:`.diagonal`, :mod:`.embedding`), and each module registers its rules here with
:func:`register` (by layer type). :func:`find_rule` dispatches on behaviour: a subclass of a
registered type that keeps the parent's ``forward`` gets the parent's rule, one that overrides
``forward`` gets none (it may compute something else). :func:`register_named` maps third-party
classes known to compute the same function as a rule, by ``"module.qualname"``, without importing
their library.

A new layer is one :class:`Rule` subclass in the right family module, one :func:`register` call
and one test against the per-sample autograd loop.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__: list[str] = []  # private module

#: Size bound (elements per layer of the inputs and output gradients a group stacks) for layers
#: finished together (:meth:`Rule.finish_group`): grouping saves ~30 tensor operations per layer
#: (~5-10 us each on CPU) and pays a copy of what it stacks, into fresh memory (page faults:
#: measured ~0.4 ms for 5 LayerNorm inputs of 16x64x64 floats, more than the operations saved).
GROUP_ELEMENTS = 1 << 16

@dataclass
class Call:
    """One forward call of a covered module: its saved input and, after backward, ``δ``."""

    inputs: Tensor
    version: int
    edge: Any  # torch.autograd.graph.GradientEdge of the output, taken before any in-place op
    delta: Tensor | None = None


@dataclass
class Site:
    """A covered module, the rule that handles it and what the hooks captured."""

    name: str
    module: nn.Module
    rule: Rule
    params: dict[str, nn.Parameter]  # trainable parameters the rule handles, by attribute name
    calls: list[Call] = field(default_factory=list)
    mode: str = ""  # Linear/Conv weights: the mode chosen for the last pass


@dataclass
class LayerStats:
    """A layer's part of the statistics (see the module docstring)."""

    grad_sum: dict[str, Tensor]
    sq_norms: Tensor  # (N,), float64
    inner: Callable[[dict[str, Tensor]], Tensor]  # {name: V} -> (N,) per-sample ⟨g_i, V⟩
    # a member of a group finished together (:meth:`Rule.finish_group`): the group's statistics
    # and this layer's index in it; ``sq_norms`` and ``inner`` are then the group's
    group: tuple[GroupStats, int] | None = None


@dataclass
class GroupStats:
    """The statistics of several layers finished together (:meth:`Rule.finish_group`)."""

    grad_sums: list[dict[str, Tensor]]  # per layer, as ``LayerStats.grad_sum``
    sq_norms: Tensor  # (N,), float64: the per-sample squared norms summed over the layers
    # [{name: V} per layer] -> (N,) per-sample ⟨g_i, V⟩ summed over the layers
    inner: Callable[[list[dict[str, Tensor]]], Tensor]


class Memory:
    """What a pass may keep until the inner products are asked for.

    ``free`` is the byte budget left for tensors stored only for the inner products;
    :meth:`take` carves per-sample gradients (granted beforehand) out of reused workspaces.
    ``inner_products`` is False when the inner products will not be asked for (the norm test):
    a rule may then choose its cheapest way to the sums and norms alone.
    """

    def __init__(
        self,
        free: int,
        workspaces: dict[tuple[torch.dtype, torch.device], Tensor],
        inner_products: bool = True,
        keep_patches: bool = False,
    ):
        self.free = free
        self.inner_products = inner_products  # False: nothing is kept for the inner products
        # whether a rule may keep copies it formed anyway (a convolution's im2col patches) for
        # the inner products, charged to ``free`` (the separate pass, which budgets ``free``)
        self.keep_patches = keep_patches
        self._workspaces = workspaces
        self._offsets: dict[tuple[torch.dtype, torch.device], int] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        numel = 1
        for s in shape:
            numel *= s
        buf = self._workspaces.get(key)
        start = self._offsets.get(key, 0)
        if buf is None or start + numel > buf.numel():
            return torch.empty(shape, dtype=dtype, device=device)
        self._offsets[key] = start + numel
        return buf[start : start + numel].view(shape)


def layer_dots(g: Tensor, v: Tensor) -> Tensor:
    """``(L, N, P)`` per-sample gradients of ``L`` layers and ``(L, P)`` vectors -> ``(L, N)``
    inner products (``torch.bmm`` with one column is several times slower than ``L``
    matrix-vector products on CPU, except for small matrices)."""
    if g.shape[1] * g.shape[2] <= 1 << 12:
        return torch.bmm(g, v.unsqueeze(2)).squeeze(2)
    return torch.stack([g[j] @ v[j] for j in range(g.shape[0])])


def group_stats(per: dict[str, Tensor], params: dict[str, Tensor]) -> GroupStats:
    r"""A group's statistics from its layers' per-sample gradients ``per[name]``, ``(L, N, P)``:
    the sums :math:`\sum_i g_i` of each layer (shaped as ``params``), the per-sample squared
    norms summed over the layers and their parameters, and the inner products
    :math:`\langle g_i, V\rangle` summed likewise."""
    sq = sum(torch.linalg.vector_norm(g, dim=2).double().square() for g in per.values())
    totals = {name: g.sum(1) for name, g in per.items()}  # (L, P)
    ll = next(iter(per.values())).shape[0]
    sums = [{name: totals[name][j].view(p.shape) for name, p in params.items()} for j in range(ll)]

    def inner(vs: list[dict[str, Tensor]]) -> Tensor:
        res = None
        for name, g in per.items():
            v = torch.stack([vj[name].reshape(-1) for vj in vs]).to(g.dtype)
            r = layer_dots(g, v)
            res = r if res is None else res.add_(r)
        assert res is not None
        return res.double().sum(0)

    return GroupStats(sums, sq.sum(0), inner)  # type: ignore[union-attr]


def sum_but_batch(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def add_up(ts: Sequence[Tensor]) -> Tensor:
    """The sum of equal-shaped tensors in one operation (the tensor itself when there is one):
    on small models each tensor operation costs more than its arithmetic, so the hooks rules
    collect parts in a list instead of adding them into zeros."""
    return ts[0] if len(ts) == 1 else torch.stack(list(ts)).sum(0)


def sq_norms(t: Tensor) -> Tensor:
    """``(N, ...) -> (N,)`` squared norms, returned in float64."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).double().square()


class Rule:
    """A per-layer rule; subclasses implement :meth:`finish` and may refine the others."""

    param_names: tuple[str, ...] = ("weight", "bias")

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this module cannot be handled (``None`` if it can)."""
        return None

    def output_child(self, module: nn.Module) -> nn.Module | None:
        """The submodule whose input is this rule's output, when the module's own output comes
        after more computation (None: the module's output)."""
        return None

    def on_output(self, call: Call, y: Tensor) -> None:
        """Called once per captured call with the output ``y`` the rule differentiates, in the
        forward: a rule may note what the forward computed anyway (e.g. BatchNorm's batch
        statistics in ``y.grad_fn``) as attributes of ``call``. Nothing by default."""

    def keep_request(self, site: Site, n: int) -> tuple[float, int] | None:
        """``(saving, bytes)`` if keeping per-sample gradients is this site's cheapest option."""
        return None

    def finish(self, site: Site, n: int, memory: Memory) -> LayerStats:
        """The layer's statistics, from ``site.calls`` (inputs and output gradients).

        ``site.mode`` may carry a decision taken by the caller (``"keep"`` when memory for the
        per-sample gradients was granted, or a mode forced for every layer).
        """
        raise NotImplementedError

    def group_key(self, site: Site, n: int, memory: Memory) -> Any:
        """A key under which ``site`` may be finished together with other sites of this rule
        (:meth:`finish_group`), or None (finished alone; the default). Sites with equal keys
        must have the same shapes, dtypes and modes: small models spend most of the statistics'
        time in the fixed cost of each tensor operation, which a group pays once."""
        return None

    def finish_group(self, sites: list[Site], n: int, memory: Memory) -> GroupStats:
        """The statistics of ``sites`` (two or more, with equal :meth:`group_key`), equal to
        those of :meth:`finish` on each up to float rounding."""
        raise NotImplementedError


# Exact classes (subclasses that do not override ``forward`` are accepted too) and third-party
# classes known to compute the same function as a rule, by "module.qualname".
RULES: dict[type, Rule] = {}
NAMED_RULES: dict[str, Rule] = {}


def register(rule: Rule, *types: type) -> Rule:
    """Use ``rule`` for modules of ``types`` (and their subclasses that keep ``forward``)."""
    for t in types:
        RULES[t] = rule
    _BY_CLASS.clear()
    return rule


def register_named(rule: Rule, *qualnames: str) -> Rule:
    """Use ``rule`` for the classes named ``"module.qualname"`` (exact class only)."""
    for q in qualnames:
        NAMED_RULES[q] = rule
    _BY_CLASS.clear()
    return rule


# find_rule by class (a class's rule depends only on the registries, which clear this).
_BY_CLASS: weakref.WeakKeyDictionary[type, Rule | None] = weakref.WeakKeyDictionary()


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s class, or ``None``."""
    cls = type(module)
    try:
        return _BY_CLASS[cls]
    except KeyError:
        rule = _BY_CLASS[cls] = _find_rule(cls)
        return rule


def _find_rule(cls: type) -> Rule | None:
    named = NAMED_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
    if named is not None:
        return named
    for base in cls.__mro__:
        rule = RULES.get(base)
        if rule is not None:
            # A subclass that overrides forward may compute something else.
            return rule if cls.forward is base.forward else None
    return None


def input_of(args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor | None:
    if args:
        return args[0]
    return kwargs.get("input", kwargs.get("x"))


# Rules that capture a layer's affine maps from inside its forward (MultiheadAttention, LSTM/GRU):
# a TorchFunctionMode replaces the fused call while the module runs, and tags each captured call.


def intercept_forward(module: nn.Module, make_mode: Callable[[], Any]) -> list[Any]:
    """Hooks that enter the mode ``make_mode()`` while ``module`` runs a forward that builds a
    graph (not under ``no_grad``, not a checkpoint's recomputation in the backward); the handles."""
    from local_opt.backends.stack import in_backward  # the package imports the rules first

    state: dict[str, Any] = {}

    def pre(mod: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and not in_backward():
            mode = make_mode()
            mode.__enter__()
            state["mode"] = mode

    def post(mod: nn.Module, args: tuple, output: Any) -> None:
        mode = state.pop("mode", None)
        if mode is not None:
            mode.__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def tagged(site: Site, on_call: Callable[[Tensor, Tensor], None]) -> Callable[..., None]:
    """``emit(tag, x, y)``: capture one affine map's input ``x`` and output ``y`` as a call of
    ``site`` marked with ``tag`` (nothing when ``y`` needs no gradient)."""

    def emit(tag: Any, x: Tensor, y: Tensor) -> None:
        if not y.requires_grad:
            return
        before = len(site.calls)
        on_call(x.detach(), y)
        if len(site.calls) > before:
            site.calls[-1].tag = tag  # type: ignore[attr-defined]

    return emit


def calls_by_tag(site: Site) -> dict[Any, list[tuple[Tensor, Tensor]]]:
    """The site's finished calls as ``(input, output gradient)`` pairs by tag; clears them."""
    by_tag: dict[Any, list[tuple[Tensor, Tensor]]] = {}
    for c in site.calls:
        if c.delta is not None:
            by_tag.setdefault(c.tag, []).append((c.inputs, c.delta))  # type: ignore[attr-defined]
    site.calls = []
    return by_tag
