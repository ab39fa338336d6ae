r"""Linear and convolution layers whose weight gradient the rule computes inside the backward.

In a training step, autograd computes every layer's weight gradient :math:`\sum_i G_i` anyway;
a rule that materializes the per-sample gradients :math:`G_i` (``"stream"``) or that takes
:math:`\sum_i G_i` as one matmul next to its Gram matrices (``"ghost"``) computes it too. So
:class:`~local_opt.backends.hooks.StatsCapture` runs covered ``nn.Linear``, ``nn.Conv1d`` and
``nn.Conv2d`` calls (and Hugging Face's ``Conv1D``, a Linear with the weight stored transposed, in
the GPT-2 family) through :class:`_Affine`, an autograd function whose backward computes the
input gradient as the layer's own backward does and hands the layer's output gradient ``δ`` to
the rule at once (:meth:`Tap.arrive`); the rule's :math:`\sum_i G_i` (and the bias sum) are
returned as the parameters' gradients, so autograd does not compute them a second time, and
``δ`` is freed when the rule is done. Everything else autograd does is unchanged: the gradients
reach ``.grad`` through the usual accumulation (and its hooks, DDP's included), a parameter used
elsewhere too gets that gradient added as usual (the capture's check then names it), and the
forward's saved tensors are the layer's own input and weight (activation checkpointing applies
to them).

Calls that cannot take this path run the module's own forward with the generic capture: under
autocast, with mixed dtypes, or for a layer called more than once in the step, whose per-sample
gradient is the sum over its calls (its norm is taken once every call's ``δ`` has arrived, and
autograd-style sums are returned meanwhile).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from local_opt.backends.hooks.rules import Site
from local_opt.backends.hooks.rules.conv import ConvRule
from local_opt.backends.hooks.rules.hf import Conv1DRule
from local_opt.backends.hooks.rules.linear import LinearRule
from local_opt.backends.stack import in_backward

__all__: list[str] = []  # private module


class Tap(Protocol):
    """What :class:`_Affine` reports to (the capture)."""

    def arrive(
        self, site: Site, call: Any, x: Tensor, delta: Tensor
    ) -> tuple[Tensor | None, Tensor | None] | None:
        """Hand over one call's input and output gradient; the weight and bias gradient sums
        when the rule computed them (None: the caller computes them)."""
        ...


def eligible(site: Site) -> bool:
    """Whether ``site`` may run through :class:`_Affine`: a plain (sub)class of ``nn.Linear``,
    ``nn.Conv1d`` or ``nn.Conv2d`` with zero padding, or Hugging Face's ``Conv1D``, handled by the
    stock rule."""
    m = site.module
    if "forward" in m.__dict__ or type(site.rule) not in (LinearRule, ConvRule, Conv1DRule):
        return False
    if set(site.params) - {"weight", "bias"}:
        return False
    if type(site.rule) is Conv1DRule:  # matched by exact class name: its forward is addmm
        return m.weight.dim() == 2
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return False


def _transposed(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D``: ``y = x W + b`` with ``W`` of shape ``(d_in, d_out)``."""
    return not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))


def _input_grad(module: nn.Module, x: Tensor, w: Tensor, d: Tensor) -> Tensor:
    if isinstance(module, nn.Linear):
        return d.matmul(w)
    if _transposed(module):
        return d.matmul(w.t())
    return torch.ops.aten.convolution_backward(
        d, x, w, None, module.stride, module.padding, module.dilation,
        False, (0,) * len(module.padding), module.groups, (True, False, False),
    )[0]


def _param_grads(
    module: nn.Module, x: Tensor, w: Tensor, d: Tensor, bias: bool
) -> tuple[Tensor, Tensor | None]:
    """The weight and bias gradients as the layer's own backward computes them."""
    if isinstance(module, nn.Linear):
        d2 = d.reshape(-1, d.shape[-1])
        gw = d2.t().matmul(x.reshape(-1, x.shape[-1]))
        return gw, d2.sum(0) if bias else None
    if _transposed(module):
        d2 = d.reshape(-1, d.shape[-1])
        return x.reshape(-1, x.shape[-1]).t().matmul(d2), d2.sum(0) if bias else None
    _, gw, gb = torch.ops.aten.convolution_backward(
        d, x, w, [w.shape[0]] if bias else None, module.stride, module.padding, module.dilation,
        False, (0,) * len(module.padding), module.groups, (False, True, bias),
    )
    return gw, gb


class _Affine(torch.autograd.Function):
    """``module``'s Linear/Conv with the weight gradient from the rule (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, site, tap, call):  # type: ignore[override]
        ctx.module, ctx.site, ctx.tap, ctx.call = module, site, tap, call
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        if isinstance(module, nn.Linear):
            return F.linear(x, weight, bias)
        if _transposed(module):  # as Conv1D.forward computes it
            x2 = x.reshape(-1, x.shape[-1])
            y = x2.matmul(weight) if bias is None else torch.addmm(bias, x2, weight)
            return y.view(*x.shape[:-1], weight.shape[-1])
        return module._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, d):  # type: ignore[override]
        x, w = ctx.saved_tensors
        module = ctx.module
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = _input_grad(module, x, w, d) if need_x else None
        got = None
        if ctx.tap is not None and ctx.call is not None:
            got = ctx.tap.arrive(ctx.site, ctx.call, x, d)
        # the node outlives its backward until the graph is freed: drop the input and δ now
        ctx.call = ctx.tap = ctx.site = None
        if got is None:
            gw, gb = _param_grads(module, x, w, d, ctx.has_bias) if (need_w or need_b) else (
                None, None
            )
        else:
            gw, gb = got
        gw = gw.view(w.shape) if need_w and gw is not None else None
        gb = gb if need_b else None
        return gx, gw, gb, None, None, None, None


def install(
    site: Site, tap: Any, on_call: Callable[[Tensor, Tensor], None], active: Callable[[], bool]
) -> Callable[[], None]:
    """Run ``site.module``'s calls through :class:`_Affine`; returns the function that undoes it.

    ``tap.open_call(site, x)`` registers a call and returns its record (or None, e.g. while a
    model is being validated); calls that cannot take the path run the module's own forward and
    ``on_call(x, y)`` (the generic capture) instead. ``active()`` is False while the capture
    must not record (forwards that are not the training step's)."""
    module = site.module
    own = type(module).forward.__get__(module)
    w = site.params.get("weight")
    b = site.params.get("bias")

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args or kwargs or not isinstance(x, Tensor) or not active():
            return own(x, *args, **kwargs)
        weight, bias = module.weight, module.bias
        grads = torch.is_grad_enabled() and (x.requires_grad or w is not None or b is not None)
        plain = (
            not grads
            or torch.is_autocast_enabled(x.device.type)
            or x.dtype != weight.dtype
            or (w is not None and weight is not w)
            or (b is not None and bias is not b)
        )
        if plain:
            y = own(x)
            if grads and not in_backward() and isinstance(y, Tensor) and y.requires_grad:
                on_call(x.detach(), y)
            return y
        call = None if in_backward() else tap.open_call(site, x)
        # a checkpoint's recomputation (in_backward) saves the same tensors, records nothing
        return _Affine.apply(x, weight, bias, module, site, tap, call)

    module.forward = forward  # an instance attribute, deleted again by the returned function

    def undo() -> None:
        if module.__dict__.get("forward") is forward:
            del module.forward

    return undo
