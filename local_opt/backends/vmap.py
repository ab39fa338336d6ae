r"""The reference per-sample backend: exact per-sample gradients with ``torch.func``.

:func:`vmap_stats` turns one rank's batch into :class:`~local_opt._stats.GradStats` with one
*unit per sample* (``unit_size=1``). The per-sample gradient :math:`g_i` is defined by how the
model couples the samples of a batch:

* **Independent samples** (no BatchNorm using batch statistics: convolutions, linear layers,
  LayerNorm, GroupNorm, BatchNorm in eval mode, ...):

  .. math::
      g_i = \nabla_\theta\, \ell\big(f_\theta(x_i), y_i\big),

  the gradient of ``loss_fn(model(x_i[None]), y_i[None])``, computed as
  ``vmap(grad(...))`` over chunks of ``chunk_size`` samples with
  :func:`torch.func.functional_call`. For a mean-reduced ``loss_fn`` the mean of the
  :math:`g_i` is the batch gradient.

* **Batch-coupled samples** (a :class:`~torch.nn.modules.batchnorm._BatchNorm` in training mode,
  or one without running statistics, normalizes with the statistics of the whole batch, so a
  single sample has no forward pass of its own). Here :math:`g_i` is the gradient of sample
  :math:`i`'s *term of the batch loss*: with the whole batch :math:`B` forwarded in training mode,

  .. math::
      \ell_i(\theta) = \ell\big(f_\theta(x_i;\, B), y_i\big), \qquad
      g_i = \nabla_\theta\, \ell_i(\theta),

  i.e. the rows of the Jacobian of the vector of per-sample losses. Their mean is exactly the
  gradient of the batch loss :math:`\frac1N\sum_i \ell_i` that training uses. They are computed
  with :func:`torch.func.vjp` of one batched forward and ``vmap`` over one-hot cotangents, in
  chunks of ``chunk_size`` rows. Each row is a backward pass through the whole batch, so this
  path costs :math:`O(N^2)` where the independent one costs :math:`O(N)`. During the forward the
  training-mode BatchNorms get no running buffers, so nothing tries to update them.

The model is left untouched: parameters are passed to ``functional_call`` detached, buffers as
clones (so BatchNorm running statistics do not move), ``.grad``, train/eval mode and
``requires_grad`` flags are never changed. Only parameters with ``requires_grad=True`` count.

**Two passes.** Pass one accumulates :math:`\sum_i g_i` and :math:`\sum_i \lVert g_i\rVert^2`
(float64). The inner products :math:`\langle g_i, \bar g\rangle` need the mean over *all ranks*,
known only after the all-reduce, so :attr:`GradStats.inner_sq_sum` either reuses the flattened
per-sample gradients kept from pass one, when they fit in ``store_bytes`` (default 256 MiB), or
recomputes them chunk by chunk (pass two, same random numbers as pass one, so dropout masks
agree). Pass two is skipped entirely when ``inner_products=False`` (the norm test does not need
:math:`Q`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from local_opt._stats import GradStats, reduce_units

__all__: list[str] = []  # private module

#: Per-sample gradients up to this many bytes are kept between the two passes.
STORE_BYTES = 256 * 2**20

ChunkFn = Callable[[], Iterator[list[Tensor]]]


def uses_batch_statistics(model: nn.Module) -> bool:
    """True when some BatchNorm of ``model`` normalizes with the statistics of the batch.

    That is a :class:`~torch.nn.modules.batchnorm._BatchNorm` (BatchNorm1d/2d/3d, SyncBatchNorm,
    lazy variants) in training mode, or one built with ``track_running_stats=False``, which uses
    batch statistics in eval mode too.
    """
    return any(
        isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)
        for m in model.modules()
    )


def _split_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(trainable, rest)``: detached trainable parameters; frozen parameters and buffer clones."""
    trainable: dict[str, Tensor] = {}
    rest: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        (trainable if p.requires_grad else rest)[name] = p.detach()
    for name, b in model.named_buffers():
        rest[name] = b.detach().clone()
    return trainable, rest


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _sample_chunks(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    chunk_size: int,
) -> ChunkFn:
    """Chunks of independent per-sample gradients, ``vmap(grad(loss of one sample))``."""
    trainable, rest = _split_state(model)
    names = list(trainable)

    def sample_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (params, rest), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
    device = inputs.device
    first_state: list[tuple[Tensor, Tensor | None]] = []

    def run() -> Iterator[list[Tensor]]:
        for start in range(0, inputs.shape[0], chunk_size):
            g = per_sample(
                trainable, inputs[start : start + chunk_size], targets[start : start + chunk_size]
            )
            yield [g[n] for n in names]

    def chunks() -> Iterator[list[Tensor]]:
        if not first_state:  # pass one: remember the random state it starts from
            first_state.append(_rng_state(device))
            yield from run()
            return
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # replay pass one's random numbers
            _set_rng_state(first_state[0], device)
            yield from run()

    return chunks


def _coupled_chunks(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    chunk_size: int,
) -> ChunkFn:
    """Chunks of rows of the Jacobian of the per-sample losses of one batched forward."""
    trainable, rest = _split_state(model)
    names = list(trainable)
    # A BatchNorm in training mode normalizes with batch statistics either way; without its
    # running buffers it does not try to update them in place (which a transform forbids).
    rest_: dict[str, Tensor | None] = dict(rest)
    for module_name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.training:
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                rest_[f"{module_name}.{b}" if module_name else b] = None

    def one_loss(out: Tensor, y: Tensor) -> Tensor:
        return loss_fn(out.unsqueeze(0), y.unsqueeze(0))

    def batch_losses(params: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, (params, rest_), (inputs,))
        return vmap(one_loss)(out, targets)

    losses, vjp_fn = vjp(batch_losses, trainable)
    if losses.shape != (inputs.shape[0],):
        raise ValueError(
            f"Invalid loss_fn: per-sample losses have shape {tuple(losses.shape)}, "
            f"expected ({inputs.shape[0]},); loss_fn must reduce each sample to a scalar"
        )
    n = inputs.shape[0]
    rows = vmap(vjp_fn)

    def chunks() -> Iterator[list[Tensor]]:
        for start in range(0, n, chunk_size):
            idx = torch.arange(start, min(start + chunk_size, n), device=losses.device)
            one_hot = torch.zeros(len(idx), n, dtype=losses.dtype, device=losses.device)
            one_hot[torch.arange(len(idx), device=losses.device), idx] = 1
            (g,) = rows(one_hot)
            yield [g[k] for k in names]

    return chunks


def per_sample_chunks(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    chunk_size: int | None = None,
) -> ChunkFn:
    """A re-iterable source of per-sample gradients (see the module docstring for their definition).

    Calling the returned function yields, chunk after chunk, one tensor per trainable parameter
    (``named_parameters`` order) with a leading dimension of up to ``chunk_size`` samples. Calling
    it again yields the same gradients.
    """
    size = inputs.shape[0] if chunk_size is None else chunk_size
    make = _coupled_chunks if uses_batch_statistics(model) else _sample_chunks
    return make(model, loss_fn, inputs, targets, max(1, size))


def per_sample_grads(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    chunk_size: int | None = None,
) -> list[Tensor]:
    """All per-sample gradients at once, one ``[N, *param.shape]`` tensor per trainable parameter."""
    chunks = list(per_sample_chunks(model, loss_fn, inputs, targets, chunk_size)())
    return [torch.cat(parts) for parts in zip(*chunks)]


def stats_from_chunks(
    chunks: ChunkFn, *, inner_products: bool = True, store_bytes: int = STORE_BYTES
) -> GradStats:
    """Reduce a re-iterable source of per-sample gradients to :class:`GradStats` (``unit_size=1``).

    Args:
        chunks: called once for the sums and, if the flattened gradients exceed ``store_bytes``,
            once more inside :attr:`GradStats.inner_sq_sum`.
        inner_products: when False, :attr:`GradStats.inner_sq_sum` returns NaN without any pass
            (enough for the norm test).
        store_bytes: keep the flattened per-sample gradients between the passes up to this size.
    """
    grad_sum: list[Tensor] = []
    sq_norms: list[Tensor] = []
    stored: list[Tensor] = []
    keep = inner_products
    nbytes = 0
    for grads in chunks():
        c = grads[0].shape[0]
        sums = [g.sum(0) for g in grads]
        grad_sum = sums if not grad_sum else [a.add_(b) for a, b in zip(grad_sum, sums)]
        sq = torch.stack([g.double().pow(2).reshape(c, -1).sum(1) for g in grads])
        sq_norms.append(sq.sum(0))
        if keep:
            nbytes += sum(g.numel() * g.element_size() for g in grads)
            if nbytes <= store_bytes:
                stored.append(torch.cat([g.reshape(c, -1) for g in grads], dim=1))
            else:
                keep, stored = False, []
    if not sq_norms:
        raise ValueError("Invalid inputs: the batch is empty")

    def dots(v: Sequence[Tensor]) -> Tensor:
        if keep:
            flat_v = torch.cat([t.reshape(-1) for t in v]).double()
            return torch.cat([f.double() @ flat_v for f in stored])
        parts = []
        for grads in chunks():
            c = grads[0].shape[0]
            parts.append(
                sum(g.reshape(c, -1).double() @ u.reshape(-1).double() for g, u in zip(grads, v))
            )
        return torch.cat(parts)  # type: ignore[arg-type]

    return reduce_units(grad_sum, torch.cat(sq_norms), dots if inner_products else None)


def vmap_stats(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    chunk_size: int | None = 32,
    inner_products: bool = True,
    store_bytes: int = STORE_BYTES,
    **_: object,
) -> GradStats:
    r"""Exact per-sample :class:`GradStats` of one rank's batch (the ``"vmap"`` backend).

    Args:
        model, loss_fn, inputs, targets: as in :class:`~local_opt.VarianceTest`.
        chunk_size: samples per ``vmap`` call, bounding memory (None: the whole batch at once).
        inner_products: compute :math:`\sum_i\langle g_i, v\rangle^2` (False: return NaN for it).
        store_bytes: memory budget for keeping the per-sample gradients between the two passes.
    """
    chunks = per_sample_chunks(model, loss_fn, inputs, targets, chunk_size)
    return stats_from_chunks(chunks, inner_products=inner_products, store_bytes=store_bytes)
