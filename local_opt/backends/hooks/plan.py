r"""Planning for the hooks backend: which modules and parameters a pass covers.

:func:`plan_model` walks the model once and sorts every trainable parameter into

* a :class:`~local_opt.backends.hooks.rules.Site`: a module whose class has a rule
  (:func:`~local_opt.backends.hooks.rules.find_rule`) and whose trainable parameters are the ones
  the rule handles;
* a *bare* broadcast parameter: owned by a module without a rule, first dimension 1 and at least
  two dimensions (timm ViT's ``cls_token``, ``pos_embed``); the pass uses ``N`` per-sample copies
  of it and autograd returns its per-sample gradients directly (:func:`validate_bare` checks once
  per model that the copies leave the output unchanged);
* or *missing*: a description of why it is not covered (no rule, unexpected parameters, shared
  between modules). :func:`unsupported_layers` returns those.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from local_opt.backends.hooks.check import UNCOVERED
from local_opt.backends.hooks.rules import Site, find_rule
from local_opt.backends.hooks.rules.bare import BARE_RULE, OFF_BATCH, takes_loose
from local_opt.backends.hooks.rules.base import NAMED_RULES, RULES
from local_opt.backends.hooks.rules.tied import plan_tied

__all__: list[str] = []  # private module

# Models whose bare broadcast parameters were checked, with the names checked.
_VALIDATED: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()


def _is_broadcast(p: Tensor) -> bool:
    return p.dim() >= 2 and p.shape[0] == 1


def plan_model(model: nn.Module) -> tuple[list[Site], list[tuple[str, nn.Parameter]], list[str]]:
    """Covered sites, bare broadcast parameters, and descriptions of what is not covered."""
    sites: list[Site] = []
    bare: list[tuple[str, nn.Parameter]] = []
    missing: list[str] = []
    loose: dict[str, nn.Parameter] = {}
    modules = list(model.named_modules())
    owners: dict[int, list[str]] = {}
    for mname, module in modules:
        for n, p in module._parameters.items():
            if p is not None and p.requires_grad:
                owners.setdefault(id(p), []).append(f"{mname}.{n}" if mname else n)
    claimed = {  # submodules whose parameters their parent's rule handles (MHA's out_proj)
        id(getattr(m, c)) for _, m in modules for c in getattr(find_rule(m), "claimed_children", ())
    }
    tied, grouped = plan_tied(modules, owners)  # Linear/Embedding modules sharing a weight
    sites.extend(tied)
    for mname, module in modules:
        trainable = {
            n: p for n, p in module._parameters.items() if p is not None and p.requires_grad
        }
        if id(module) in claimed or id(module) in grouped:
            continue
        for c in getattr(find_rule(module), "claimed_children", ()):
            trainable.update(
                {f"{c}.{n}": p for n, p in getattr(module, c).named_parameters() if p.requires_grad}
            )
        if not trainable:
            continue
        cls = type(module).__name__
        if module in OFF_BATCH:  # a covered layer run off the batch: its parameters are loose
            loose.update({f"{mname}.{n}" if mname else n: p for n, p in trainable.items()})
            continue
        shared = [q for p in trainable.values() for q in owners[id(p)] if len(owners[id(p)]) > 1]
        if shared:
            missing.append(
                f"{mname or '<root>'} ({cls}: parameter shared as {sorted(set(shared))})"
            )
            continue
        rule = find_rule(module)
        if rule is not None:
            reason = rule.unsupported(module)
            extra = [n for n in trainable if n not in rule.param_names and "." not in n]
            if reason is None and not extra:
                sites.append(Site(mname, module, rule, trainable))
            else:
                why = reason or f"unexpected parameters {extra}"
                missing.append(f"{mname or '<root>'} ({cls}: {why})")
            continue
        other = [n for n, p in trainable.items() if not _is_broadcast(p)]
        if other and takes_loose(module):  # used functionally: followed through the forward
            loose.update({f"{mname}.{n}" if mname else n: trainable[n] for n in other})
        elif other:
            missing.append(f"{mname or '<root>'} ({cls}: parameters {other} have no rule)")
        for n, p in trainable.items():
            if _is_broadcast(p):
                bare.append((f"{mname}.{n}" if mname else n, p))
    if loose:
        sites.append(Site("<loose parameters>", model, BARE_RULE, loose))
    if model in UNCOVERED:
        missing.append(f"{', '.join(UNCOVERED[model])} (gradient through a path the hooks missed)")
    return sites, bare, missing


# Plans of the separate pass by model (:func:`cached_plan`): the fingerprint they were made for,
# site templates (the model itself as None, so that the entry does not keep the model alive),
# bare parameters, what is missing, and the parameters the fingerprint names by id (kept alive
# so that no other parameter can take their id while the entry exists).
_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


class Walk:
    """One walk over ``model.named_modules()`` and what a separate pass reads from it, so that
    the pass walks the model once (each walk costs ~0.1–0.2 ms on a small ViT, and a pass used
    to take six): the modules with their names, the trainable parameters in the order of
    ``model.parameters()``, and the buffers as ``(owner, name)`` in the order of
    ``model.named_buffers()`` (both without duplicates, as those iterators)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: list[tuple[str, nn.Module]] = list(model.named_modules())
        seen: set[int] = set()
        seen_buffers: set[int] = set()
        self.params: list[nn.Parameter] = []
        self.buffers: list[tuple[nn.Module, str]] = []
        for _, m in self.modules:
            for p in m._parameters.values():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    if p.requires_grad:
                        self.params.append(p)
            for name, b in m._buffers.items():
                if b is not None and id(b) not in seen_buffers:
                    seen_buffers.add(id(b))
                    self.buffers.append((m, name))

    def training(self) -> tuple[bool, ...]:
        """The modules' ``training`` flags (what :func:`~.check.needs_check` compares)."""
        return tuple(m.training for _, m in self.modules)


def _fingerprint(model: nn.Module, keep: list[Tensor], walk: Walk | None = None) -> list:
    """What :func:`plan_model` reads: the rule registries, the model's uncovered mark, and per
    module its name, identity, rule, the rule's objection (:meth:`~.rules.Rule.unsupported`,
    which reads the module's attributes), whether it runs off the batch, and its parameters
    (identity, ``requires_grad``, broadcast shape)."""
    out: list = [len(RULES), len(NAMED_RULES), tuple(UNCOVERED.get(model, ()))]
    modules = model.named_modules() if walk is None else walk.modules
    for mname, m in modules:
        if not m._parameters:  # the plan reads nothing else of a module without parameters
            out.append((mname, None if m is model else m))
            continue
        rule = find_rule(m)
        params = []
        for n, p in m._parameters.items():
            if p is not None:
                keep.append(p)
                params.append((n, id(p), p.requires_grad, _is_broadcast(p)))
        out.append(
            (
                mname,
                None if m is model else m,  # the entry must not hold the model itself
                rule,
                None if rule is None else rule.unsupported(m),
                m in OFF_BATCH,
                tuple(params),
            )
        )
    return out


def cached_plan(
    model: nn.Module, walk: Walk | None = None
) -> tuple[list[Site], list[tuple[str, nn.Parameter]], list[str]]:
    """:func:`plan_model`, reused while :func:`_fingerprint` is unchanged (for the separate pass,
    whose fixed cost matters on small models). The sites are fresh objects on every call (their
    ``calls`` and ``mode`` belong to one pass). ``walk``: a :class:`Walk` of the model as it is
    now, if the caller has one."""
    keep: list[Tensor] = []
    key = _fingerprint(model, keep, walk)
    hit = _PLANS.get(model)
    if hit is None or hit[0] != key:
        sites, bare, missing = plan_model(model)
        holds_model = any(
            s.module is model and s.rule is not BARE_RULE for s in sites
        ) or any(m is model for s in sites for _, m, *_ in getattr(s.rule, "members", ()))
        if holds_model:  # e.g. the model is itself a covered layer: plan every time
            _PLANS.pop(model, None)
            return sites, bare, missing
        templates = [
            Site(s.name, None if s.module is model else s.module, s.rule, s.params)  # type: ignore[arg-type]
            for s in sites
        ]
        hit = (key, templates, bare, missing, keep)
        _PLANS[model] = hit
    _, templates, bare, missing, _ = hit
    sites = [
        Site(t.name, model if t.module is None else t.module, t.rule, t.params) for t in templates
    ]
    return sites, list(bare), list(missing)


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
    return plan_model(model)[2]


def supports(model: nn.Module) -> bool:
    """Whether the hooks backend covers ``model`` (:func:`unsupported_layers` is empty)."""
    return not unsupported_layers(model)


def expand_bare(p: Tensor, n: int) -> Tensor:
    return p.detach().expand(n, *p.shape[1:]).clone().requires_grad_(True)


def validate_bare(
    model: nn.Module,
    args: tuple[Tensor, ...],
    expanded: dict[str, Tensor],
    saved: dict[str, Tensor],
    kwargs: dict[str, Any] | None = None,
) -> None:
    """Check once that per-sample copies of the bare parameters leave the output unchanged."""
    kwargs = kwargs or {}
    devices = [t.device for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.is_cuda]
    with torch.no_grad():
        with torch.random.fork_rng(devices=devices):
            ref = model(*args, **kwargs)
        with torch.random.fork_rng(devices=devices):
            for k, b in model.named_buffers():
                b.copy_(saved[k])
            got = torch.func.functional_call(model, expanded, args, kwargs, strict=False)
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


def owner_of(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    path, _, name = qualified.rpartition(".")
    return (model.get_submodule(path) if path else model), name
