r"""LocalOptimizer: Local SGD (periodic model averaging) around any ``torch.optim`` optimizer."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from local_opt import _checks, _comm, _compress
from local_opt._validate import is_int

__all__ = ["LocalOptimizer"]

OuterFactory = Callable[[list[Tensor]], Optimizer]
StateSpec = Union[bool, Sequence[str]]
BufferSpec = Union[str, bool, Sequence[str], Callable[[str, Tensor], bool]]


class LocalOptimizer(Optimizer):
    r"""Wrap an optimizer so that M workers take ``sync_every`` local steps, then average models.

    Local SGD (`Stich, 2019 <https://arxiv.org/abs/1805.09767>`_; the setting of
    `Lau et al., 2024 <https://arxiv.org/abs/2406.13936>`_): every worker :math:`m` runs the
    wrapped optimizer on its own data, and after every :math:`H` = ``sync_every`` steps the
    workers replace their parameters by the mean over the process group,

    .. math::
        x^{m}_{t+1} = \begin{cases}
            \frac{1}{M}\sum_{k=1}^{M} \mathrm{opt}(x^{k}_t) & \text{if } (t+1) \bmod H = 0 \\
            \mathrm{opt}(x^{m}_t) & \text{otherwise,}
        \end{cases}

    so the group communicates once per :math:`H` steps instead of once per step. Numerically this
    is torch's ``PostLocalSGDOptimizer`` with ``PeriodicModelAverager(period=H,
    warmup_steps=H-1)`` (same flat buffers, same divide-then-sum order).

    With ``outer_optimizer`` a round is a DiLoCo-style outer step
    (`Douillard et al., 2023 <https://arxiv.org/abs/2311.08105>`_): a global copy :math:`\theta`
    kept by every worker is updated by the outer optimizer with the pseudo-gradient
    :math:`\Delta = \theta - \frac1M\sum_k x^{k}`, and :math:`\theta` becomes every worker's model.
    Outer SGD with ``lr=1`` and no momentum is plain averaging.

    ``param_groups``, ``state`` and ``defaults`` *are* the wrapped optimizer's, so learning-rate
    schedulers (``SequentialLR``, ``OneCycleLR``, ...) and ``group["lr"]`` edits reach it. The rest
    of the ``torch.optim.Optimizer`` API works on the wrapper as on any optimizer: step pre/post
    hooks (they see the wrapper and run around the whole step, round included), ``state_dict`` /
    ``load_state_dict`` hooks, ``add_param_group``, ``zero_grad(set_to_none)`` and the profiler's
    ``Optimizer.step#LocalOptimizer.step`` record. (Global hooks from
    ``register_optimizer_step_pre_hook`` run for the wrapper and for the wrapped optimizer.)
    Without torch.distributed initialized, or with a group of one rank, ``step`` is bit-for-bit
    the wrapped optimizer's (rounds are still counted, nothing is communicated); with an
    ``outer_optimizer`` its outer step still runs each round, on the one worker's
    pseudo-gradient (DiLoCo with :math:`M = 1`).

    Args:
        optimizer (Optimizer): the local (inner) optimizer, already built on the model's
            parameters.
        sync_every (int): :math:`H`, local steps per communication round; may be changed between
            steps through the attribute of the same name.
        module (nn.Module, optional): the model. When given, all its buffers are broadcast
            from rank 0 at construction and the buffers chosen by ``buffers`` are averaged at each
            round. It must not be a ``DistributedDataParallel`` over the same ranks (its gradient
            all-reduce at every step would defeat Local SGD; see the note on nodes) (default: None).
        process_group (ProcessGroup, optional): the group to average over (default: None, the
            world group).
        buffers (str, bool, list of str or callable): which of ``module``'s buffers a round
            averages. ``"auto"``: the persistent floating-point buffers that training changes,
            e.g. BatchNorm running statistics, found at each round by comparing each with a copy
            taken at the previous round (a buffer that changed on any rank is averaged; the ranks
            agree through one small all-reduce of flags); non-persistent buffers and constants such
            as a causal mask holding ``-inf`` are left alone and never sent. ``True``: every
            floating-point buffer; ``False``: none; a list of buffer names (as in
            ``module.named_buffers()``); or a predicate ``(name, tensor) -> bool`` called once at
            construction (default: ``"auto"``).
        average_optimizer_state (bool or list of str): also average the wrapped optimizer's
            state at each round: ``True`` for every floating-point state tensor except ``step``,
            or the state names to average, e.g. ``["exp_avg", "exp_avg_sq"]`` (default: False).
        outer_optimizer (callable, optional): factory ``params -> Optimizer`` for a DiLoCo outer
            step, e.g. ``lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True)``. It
            receives the global copies of the parameters (default: None, plain averaging).
        on_nonfinite (str): what a round does when an average (of the parameters and of what
            ``buffers`` and ``average_optimizer_state`` choose) is NaN or Inf (a worker diverged):
            ``"raise"`` a ``FloatingPointError`` naming the step on every rank, or ``"skip"`` the
            round with a warning, leaving each worker's model as it was (default: ``"raise"``).
            The message names the ranks whose values were not finite (one small all-reduce of
            flags, on that path only).
        warmup_steps (int): :math:`N`, steps that each end with a round before Local SGD starts:
            steps :math:`1, \dots, N` are averaged every step (fully synchronous training, as
            with a gradient all-reduce), then rounds come every ``sync_every`` steps, at steps
            :math:`N + H, N + 2H, \dots` Saved in :meth:`state_dict`; the rounds and bytes of
            warm-up are counted in :attr:`num_syncs` and :attr:`bytes_communicated`. This is
            torch's DDP ``post_localSGD_hook`` with ``start_localSGD_iter=N - 1`` and
            ``PeriodicModelAverager(period=H, warmup_steps=N - 1)`` (which also averages right
            after warm-up), up to rounding (default: 0).
        compression (str, optional): send each round's pseudo-gradient in a low precision, with
            error feedback: ``"bf16"`` (2x fewer bytes) or ``"int8"`` (block-wise absmax scales,
            about 3.9x fewer bytes); see the note on compressed rounds (default: None, the fp32
            average of the parameters).
        overlap (bool): one-round-delayed averaging: a round's all-reduce runs in the background
            during the next ``sync_every`` local steps; see the note on overlapped rounds. With
            an ``outer_optimizer`` the outer step then lags a round: lower its momentum
            (docs/network.md measures 0.9 against 0.5) (default: False).

    Example::

        >>> model = timm.create_model("resnet18", num_classes=10)
        >>> inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> opt = LocalOptimizer(inner, sync_every=8, module=model)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     F.cross_entropy(model(x), y).backward()
        ...     opt.step()  # averages the models every 8th call
        ...     sched.step()

    .. note::
        Parameters (and ``module``'s buffers) are broadcast from rank 0 at construction, as
        ``DistributedDataParallel`` does, so all workers start from the same model. Build the
        ``LocalOptimizer`` on every rank at the same point of the program, after
        ``torch.distributed.init_process_group(...)``: built under ``torchrun``
        (``WORLD_SIZE > 1``) without a process group it warns, since every process would train
        alone.

    .. note::
        **Mixed precision.** bf16 ``autocast`` needs nothing special. With a ``GradScaler`` call
        ``scaler.step(opt)`` on the wrapper: it then calls ``opt.step()`` at *every* step (the
        wrapper declares ``_step_supports_amp_scaling``), and the wrapper unscales the gradients
        and runs the wrapped optimizer, or skips the wrapped optimizer's step when the scaler found
        an inf or a NaN on this rank. A skipped step still counts: the round counter counts calls
        of :meth:`step`, so rounds stay aligned across ranks when one rank skips (its model enters
        the average as it was). Each rank's scaler keeps its own scale (Local SGD shares no
        gradients).

    .. note::
        **Nodes.** ``DistributedDataParallel`` over the ranks this optimizer averages is refused
        (it all-reduces gradients at every step). For several nodes, run DDP (or identical
        replicas) inside each node and average across nodes every ``sync_every`` steps:
        ``groups = node_groups()`` (from :mod:`local_opt.topology`),
        ``model = DDP(model, process_group=groups.intra)``,
        ``LocalOptimizer(inner, sync_every=H, module=model, process_group=groups.inter)``.

    .. note::
        **Compressed rounds** (``compression="bf16"`` or ``"int8"``). Let :math:`\theta` be the
        model after the previous round (the same on every rank) and :math:`x_m` rank :math:`m`'s
        model at the end of the round. The rank sends its pseudo-gradient plus its residual,
        :math:`u_m = (\theta - x_m) + e_m`, encoded (:math:`E`, decoded by :math:`D`; formats in
        :mod:`local_opt._compress`), and keeps the error :math:`e_m \leftarrow u_m - D(E(u_m))`
        (error feedback: what was not sent is sent later). The mean is accumulated in fp32,

        .. math::
            \bar\Delta = D(E(v)), \quad v = \frac1M \sum_{k=1}^{M} D(E(u_k)) + r, \qquad
            \theta \leftarrow \theta - \bar\Delta \ \ (\text{or the outer step with gradient }
            \bar\Delta), \qquad x_m \leftarrow \theta,

        by an ``all_to_all_single`` of the encoded chunks (each rank sums its shard of the
        vector in fp32), re-encoding of each shard with the shard owner's own residual :math:`r`
        (:math:`r \leftarrow v - D(E(v))`), and an ``all_gather`` (INTELLECT-1's scheme: no
        collective ever adds in low precision). Over
        :math:`K` rounds the applied updates sum to the true pseudo-gradients minus the final
        residuals: :math:`\sum_k \bar\Delta_k = \sum_k \frac1M\sum_m(\theta_k - x_{m,k}) -
        \frac1M\sum_m e_{m,K} - r_K`. Module buffers (``buffers``) and
        ``average_optimizer_state`` are averaged in fp32 as without compression.

        ``bytes_communicated`` counts, per collective, the bytes of the vector reduced: an fp32
        all-reduce of :math:`N` parameters counts :math:`4N`; a compressed round counts the whole
        encoded vector, :math:`MP` with :math:`P` the payload of one of the :math:`M` chunks of
        :math:`C = \lceil N/M\rceil` elements: :math:`P = 2C` (bf16), :math:`C + 4\lceil
        C/256\rceil` (int8). Per rank the wire carries :math:`2\frac{M-1}{M}` times the count
        in both cases (ring all-reduce; all-to-all + all-gather).

    .. note::
        **Overlapped rounds** (``overlap=True``). With :math:`s_m` rank :math:`m`'s model when
        it sent at the previous round and :math:`A` the agreed model, a round at step :math:`t`
        is

        .. math::
            \Delta_m = s_m - x_m, \qquad A \leftarrow A - \bar\Delta_{\text{prev}}, \qquad
            x_m \leftarrow A - \Delta_m, \qquad s_m \leftarrow x_m,

        then it starts (``async_op=True``) the mean :math:`\bar\Delta` of the :math:`\Delta_m`
        (compressed or fp32), which the next round, ``sync_every`` steps later, waits for and
        applies. With plain averaging that is :math:`x_m \leftarrow \frac1M\sum_k s_k^{\text{prev}}
        + (x_m - s_m^{\text{prev}})`: the average of the models sent one round ago plus this
        rank's progress since. The first round only sends. With an outer optimizer the update of
        :math:`A` is its step with gradient :math:`\bar\Delta_{\text{prev}}`. :meth:`sync`
        completes the mean in flight (after a round if local steps were taken), so the models
        agree after it. With compression only the ``all_to_all_single`` runs in the background;
        the ``all_gather`` (half the bytes) runs when the round applies the mean.
        ``on_nonfinite="skip"`` is not supported with overlap.

    .. warning::
        Every rank must call :meth:`step` the same number of times between rounds: a round is a
        collective call, and a rank that stops stepping leaves the others waiting until the
        process group's ``timeout`` (set in ``init_process_group``) ends them with an error.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        sync_every: int,
        module: nn.Module | None = None,
        process_group: dist.ProcessGroup | None = None,
        buffers: BufferSpec = "auto",
        average_optimizer_state: StateSpec = False,
        outer_optimizer: OuterFactory | None = None,
        on_nonfinite: str = "raise",
        warmup_steps: int = 0,
        compression: str | None = None,
        overlap: bool = False,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"Invalid optimizer: expected a torch.optim.Optimizer instance, "
                f"got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, LocalOptimizer):
            raise TypeError("Invalid optimizer: it is already a LocalOptimizer")
        _check_sync_every(sync_every)
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"Invalid module: expected an nn.Module, got {type(module).__name__}")
        if module is not None:
            _check_not_ddp_over(module, process_group)
        if outer_optimizer is not None and not callable(outer_optimizer):
            raise TypeError(
                f"Invalid outer_optimizer: expected a callable params -> Optimizer, "
                f"got {type(outer_optimizer).__name__}"
            )
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r} (expected 'raise' or 'skip')")
        if not is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (expected an int >= 0)")
        _checks.warn_if_not_initialized("LocalOptimizer", process_group)
        compression = _compress.check_format(compression)
        if not isinstance(overlap, bool):
            raise ValueError(f"Invalid overlap: {overlap!r} (expected a bool)")
        if overlap and on_nonfinite == "skip":
            raise ValueError(
                "Invalid on_nonfinite: 'skip' is not supported with overlap=True (a round "
                "applies the previous round's mean, which cannot be skipped without losing "
                "the ranks' progress); use on_nonfinite='raise'"
            )

        self.optimizer = optimizer
        self.module = module
        self.process_group = process_group
        self.on_nonfinite = on_nonfinite
        self.compression = compression
        self.overlap = overlap
        self._sync_every = int(sync_every)
        self.warmup_steps = int(warmup_steps)
        self._state_names = _check_state_spec(average_optimizer_state, optimizer)
        if module is not None:
            _check_module_params(module, self._params())
        # names of the buffers a round may average; "auto" decides among them at each round
        self._buffer_names, self._auto_buffers = _choose_buffers(module, buffers)
        self._buffer_copies: list[Tensor] = []  # "auto": the candidates at the previous round

        # torch.optim.Optimizer's own machinery (hooks, profiling names); param_groups, state and
        # defaults stay the wrapped optimizer's (properties below), so Optimizer.__init__ is not run
        self._optimizer_step_pre_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._patch_step_function()  # profiling name, step hooks
        self._warned_capturable_if_run_uncaptured = True

        # The wrapper's own counters: advanced once per step() and saved in state_dict().
        self._local_step = 0  # steps since the last round
        self._steps = 0  # steps in total
        self._num_syncs = 0
        self._synced = False
        self._bytes = 0

        if _comm.is_distributed(process_group):
            _comm.broadcast(self._params() + self._module_tensors(), 0, process_group)
        if self._auto_buffers and _comm.is_distributed(process_group):
            self._buffer_copies = [b.detach().clone() for b in self._buffers()]

        self._flat: _comm.FlatParams | None = None  # parameters as views of flat buffers
        self._outer: Optimizer | None = None
        self._global: list[Tensor] = []
        if outer_optimizer is not None:
            self._global = [p.detach().clone() for p in self._params()]
            self._outer = outer_optimizer(self._global)
            if not isinstance(self._outer, Optimizer):
                raise TypeError(
                    "Invalid outer_optimizer: the factory must return a torch.optim.Optimizer, "
                    f"got {type(self._outer).__name__}"
                )
        # Compressed or overlapped rounds (distributed only): the agreed model θ (the outer
        # step's global copy when there is one), this rank's model when it last sent, the
        # error-feedback residuals and the means in flight.
        self._delta_mode = compression is not None or overlap
        self._anchor: list[Tensor] = []
        self._anchor_flat: _comm.FlatParams | None = None
        if self._delta_mode:
            self._anchor = (
                self._global
                if self._outer is not None
                else [p.detach().clone() for p in self._params()]
            )
        self._sent: list[Tensor] = []  # s_m (overlap), flat, per (device, dtype) of the params
        self._residual: list[Tensor] = []  # e_m (compression), fp32, per buffer
        self._shard_residual: list[Tensor] = []  # r (compression), fp32, per buffer
        self._pending: list[Any] | None = None  # the means in flight (overlap)

    # ----------------------------------------------------------- the torch.optim surface
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sync_every={self._sync_every}, "
            f"world_size={_comm.world_size(self.process_group)}, "
            f"outer={'none' if self._outer is None else type(self._outer).__name__}, "
            f"optimizer={self.optimizer!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("LocalOptimizer is not picklable; save state_dict() instead")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``, profiled under the wrapper's name."""
        with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (broadcast from rank 0 in a distributed run)."""
        before = {id(p) for p in self._params()}
        self.optimizer.add_param_group(param_group)
        new = [p for p in self._params() if id(p) not in before]
        if _comm.is_distributed(self.process_group):
            _comm.broadcast(new, 0, self.process_group)
        if self._outer is not None and new:
            copies = [p.detach().clone() for p in new]
            self._global.extend(copies)
            self._outer.add_param_group({"params": copies})
        elif self._delta_mode and new:
            self._anchor.extend(p.detach().clone() for p in new)
        if self._delta_mode and new:
            if self._pending is not None:
                raise RuntimeError("add_param_group: call sync() first (a mean is in flight)")
            self._sent, self._residual, self._shard_residual = [], [], []

    # ------------------------------------------------------------------------- counters
    @property
    def sync_every(self) -> int:
        """Local steps per round; may be changed between steps (takes effect at the next step)."""
        return self._sync_every

    @sync_every.setter
    def sync_every(self, value: int) -> None:
        _check_sync_every(value)
        self._sync_every = int(value)

    @property
    def local_step(self) -> int:
        """Local steps taken since the last round (0 right after a round)."""
        return self._local_step

    @property
    def steps(self) -> int:
        """Calls of :meth:`step` in total."""
        return self._steps

    @property
    def num_syncs(self) -> int:
        """Communication rounds completed (counted in a single process too)."""
        return self._num_syncs

    @property
    def will_sync(self) -> bool:
        """Whether the coming :meth:`step` ends a round (e.g. to record its micro-batches)."""
        return self._steps < self.warmup_steps or self._local_step + 1 >= self._sync_every

    @property
    def synced(self) -> bool:
        """Whether the last :meth:`step` ended with a round."""
        return self._synced

    @property
    def bytes_communicated(self) -> int:
        """Bytes of the vectors this rank reduced in rounds (0 without torch.distributed): an
        fp32 all-reduce of N elements counts 4N, a compressed mean the whole encoded vector (see
        the note on compressed rounds); the wire carries 2(M-1)/M times that per rank."""
        return self._bytes

    # ------------------------------------------------------------------------ stepping
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One local step of the wrapped optimizer; a round after every ``sync_every``-th.

        Returns the closure's loss, as the wrapped optimizer does. Called by
        ``GradScaler.step(opt)``, it skips the wrapped optimizer's step when the gradients are not
        finite but still counts the call (see the note on mixed precision).
        """
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step (see the class note)
        if found_inf is None:
            loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        else:
            loss = self._scaled_step(found_inf, getattr(self, "grad_scale", None), closure)
        self._steps += 1
        self._local_step += 1
        self._synced = False
        if self._local_step >= self._sync_every or self._steps <= self.warmup_steps:
            self._round()
        return loss

    # GradScaler.step(opt) then calls opt.step() even when the gradients hold an inf or a NaN,
    # with found_inf and grad_scale set as attributes: every rank counts every step.
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def _scaled_step(
        self, found_inf: Tensor, grad_scale: Tensor | None, closure: Callable[[], float] | None
    ) -> float | None:
        """The wrapped optimizer's step as ``GradScaler.step`` would run it: unscale, or skip."""
        if closure is not None:
            raise RuntimeError("Invalid closure: GradScaler.step does not support closures")
        inner = self.optimizer
        if getattr(inner, "_step_supports_amp_scaling", False):  # e.g. fused Adam: it decides
            inner.grad_scale, inner.found_inf = grad_scale, found_inf  # type: ignore[attr-defined]
            try:
                return inner.step()
            finally:
                del inner.grad_scale, inner.found_inf  # type: ignore[attr-defined]
        if found_inf.item():
            return None  # skipped, as GradScaler skips it: the parameters stay as they are
        if grad_scale is not None:  # not unscaled yet: unscale as GradScaler.unscale_ does
            inv = grad_scale.double().reciprocal().float()
            grads = [p.grad for p in self._params() if p.grad is not None]
            for group in _comm._buckets(grads):
                torch._foreach_mul_(group, inv.to(group[0].device).reshape(()))
        return inner.step()

    def sync(self) -> None:
        """Run a round now (e.g. before evaluation or a checkpoint). Collective: call on all ranks.

        With ``overlap=True`` it also completes the mean in flight, so the models agree after
        it; right after a round (no local step since) it only completes that mean, and it does
        nothing when no mean is in flight and no step was taken since.
        """
        self._round(flush=True)

    @torch.no_grad()
    def _round(self, flush: bool = False) -> None:
        steps_since = self._local_step
        self._local_step = 0
        params = self._params()
        distributed = _comm.is_distributed(self.process_group)
        if distributed and self._delta_mode:
            if flush and steps_since == 0 and self.overlap and self._pending is None:
                return  # the models agree already
            new_round = not (flush and steps_since == 0 and self._pending is not None)
            if self._delta_round(params, new_round, flush) and new_round:
                self._num_syncs += 1
                self._synced = True
            return
        extra = self._buffers_to_average(distributed) + self._state_tensors()
        if distributed:
            if not self._average(params, extra):
                return
        if self._auto_buffers and distributed and self._buffer_names:
            self._copy_buffers()
        if self._outer is not None:
            for g, p in zip(self._global, params):
                g.grad = g - p  # pseudo-gradient: global copy minus the mean of the local models
            self._outer.step()
            torch._foreach_copy_(params, self._global)
        self._num_syncs += 1
        self._synced = True

    def _buffers_to_average(self, distributed: bool) -> list[Tensor]:
        """The module buffers this round averages (for ``"auto"``: the ones changed on any rank)."""
        if not self._auto_buffers:
            return self._buffers()
        if not self._buffer_names or not distributed:
            return []
        current, copies = self._buffers(), self._buffer_copies
        if len(copies) != len(current):  # no copy yet (torch.distributed started later)
            copies = [torch.full_like(b, float("nan")) for b in current]  # all "changed"
        changed = _comm.any_across(
            [not _same_values(b, c) for b, c in zip(current, copies)],
            self.process_group,
            device=current[0].device,
        )
        self._bytes += 4 * len(changed)  # the flags
        return [b for b, c in zip(current, changed) if c]

    def _average(self, params: list[Tensor], extra: list[Tensor]) -> bool:
        """All-reduce the mean of params (in place, in their flat buffers) and of ``extra``.

        Returns False when the round is skipped because an average is not finite. Every rank sees
        the same reduced values, so every rank takes the same decision.
        """
        if self._flat is None or [id(p) for p in self._flat.params] != [id(p) for p in params]:
            self._flat = _comm.FlatParams(params)
        flats = self._flat.buffers()
        backup = [f.clone() for f in flats] if self.on_nonfinite == "skip" else None
        local_ok = _comm.finite_flag(flats)  # this rank's, before the average (no sync yet)
        extra_flats, extra_groups = _comm.reduce_mean_packed(extra, self.process_group)
        self._bytes += _comm.mean_(flats, self.process_group)
        self._bytes += sum(f.numel() * f.element_size() for f in extra_flats)
        if not _comm.all_finite(flats + extra_flats):
            bad = _comm.nonfinite_ranks(bool(local_ok) and _comm.all_finite(extra),
                                        self.process_group, flats[0].device)
            msg = (
                f"non-finite values in the model average at step {self._steps} "
                f"(round {self._num_syncs + 1}): worker(s) with rank {bad} in the process group "
                "diverged (NaN or Inf in their parameters, averaged buffers or optimizer state)"
            )
            if self.on_nonfinite == "raise":
                raise FloatingPointError(
                    msg + "; lower the learning rate, clip gradients, or pass on_nonfinite='skip'"
                )
            torch._foreach_copy_(flats, backup)
            warnings.warn(msg + "; the round is skipped", RuntimeWarning, stacklevel=4)
            return False
        _comm.unpack_into(extra_flats, extra_groups)
        return True

    # ------------------------------------------------------- compressed and overlapped rounds
    def _delta_round(self, params: list[Tensor], new_round: bool, flush: bool) -> bool:
        """A compressed or overlapped round (see the class notes). Returns False when skipped."""
        group = self.process_group
        if self._flat is None or [id(p) for p in self._flat.params] != [id(p) for p in params]:
            self._flat = _comm.FlatParams(params)
        if self._anchor_flat is None or len(self._anchor_flat.params) != len(self._anchor):
            self._anchor_flat = _comm.FlatParams(self._anchor)
        flats, anchor = self._flat.buffers(), self._anchor_flat.buffers()
        if self.overlap and len(self._sent) != len(flats):
            self._sent = [a.clone() for a in anchor]
        if self.compression is not None and len(self._residual) != len(flats):
            world = dist.get_world_size(group)
            self._residual = [torch.zeros_like(f, dtype=torch.float32) for f in flats]
            self._shard_residual = [
                f.new_zeros(_compress.chunk_numel(f.numel(), world), dtype=torch.float32)
                for f in flats
            ]
        ref = self._sent if self.overlap else anchor
        delta = [r.float() - f.float() for r, f in zip(ref, flats)]  # θ_start - x, fp32
        backup = None
        if self.on_nonfinite == "skip":
            backup = [t.clone() for t in self._residual + self._shard_residual]
        extra_flats: list[Tensor] = []
        extra_groups: list[list[Tensor]] = []
        means: list[Any] | None = None
        if new_round:
            extra = self._buffers_to_average(True) + self._state_tensors()
            means = [self._start_mean(d, i) for i, d in enumerate(delta)]
            self._bytes += sum(m.nbytes for m in means)
            extra_flats, extra_groups = _comm.reduce_mean_packed(extra, group)
            self._bytes += sum(f.numel() * f.element_size() for f in extra_flats)
            if self._auto_buffers and self._buffer_names:
                self._copy_buffers()
        if not self.overlap:
            assert means is not None
            mean = [m.wait() for m in means]
            if not self._check_finite(mean + extra_flats, backup, flats):
                return False
            self._apply(anchor, mean)
            torch._foreach_copy_(flats, anchor)
        else:
            prev, self._pending = self._pending, means
            mean = [] if prev is None else [m.wait() for m in prev]
            self._check_finite(mean + extra_flats, None, flats)  # raises (no "skip" with overlap)
            if prev is not None:
                self._apply(anchor, mean)
            for f, a, d in zip(flats, anchor, delta):
                f.copy_(a.float() - d)
            if flush and self._pending is not None:
                mean = [m.wait() for m in self._pending]
                self._pending = None
                self._check_finite(mean, None, flats)
                self._apply(anchor, mean)
                torch._foreach_copy_(flats, anchor)
            torch._foreach_copy_(self._sent, flats)
        _comm.unpack_into(extra_flats, extra_groups)
        return True

    def _start_mean(self, delta: Tensor, i: int) -> Any:
        """Post the mean of this rank's ``delta`` for buffer ``i`` (compressed: plus its
        residual, which becomes what the encoding lost)."""
        if self.compression is None:
            return _compress.PlainMean(delta, self.process_group).start(async_op=self.overlap)
        u = delta + self._residual[i]
        m = _compress.CompressedMean(
            u, self.compression, self._shard_residual[i], self.process_group
        )
        self._residual[i] = u.sub_(m.sent)
        return m.start(async_op=self.overlap)

    def _check_finite(
        self, flats: list[Tensor], backup: list[Tensor] | None, local: list[Tensor]
    ) -> bool:
        """True when the means ``flats`` are finite; otherwise raise or skip, naming the ranks
        whose ``local`` values (their models before the round) were not (every rank gets here
        together, since the means are the same everywhere)."""
        if _comm.all_finite(flats):
            return True
        bad = _comm.nonfinite_ranks(_comm.all_finite(local), self.process_group, local[0].device)
        msg = (
            f"non-finite values in the model average at step {self._steps} "
            f"(round {self._num_syncs + 1}): worker(s) with rank {bad} in the process group "
            "diverged (NaN or Inf in their parameters)"
        )
        if self.on_nonfinite == "raise" or backup is None:
            raise FloatingPointError(
                msg + "; lower the learning rate, clip gradients, or pass on_nonfinite='skip'"
            )
        torch._foreach_copy_(self._residual + self._shard_residual, backup)
        warnings.warn(msg + "; the round is skipped", RuntimeWarning, stacklevel=5)
        return False

    def _apply(self, anchor: list[Tensor], mean: list[Tensor]) -> None:
        """θ ← θ - mean, or the outer step with gradient ``mean`` (θ: the agreed model)."""
        if self._outer is None:
            for a, m in zip(anchor, mean):
                a.sub_(m.to(a.dtype))
            return
        assert self._anchor_flat is not None
        grads = self._anchor_flat.views_of([m.to(a.dtype) for a, m in zip(anchor, mean)])
        for g, gr in zip(self._global, grads):
            g.grad = gr
        self._outer.step()

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's ``state_dict`` plus a ``"local_opt"`` entry with the counters.

        With an outer optimizer the entry also holds its ``state_dict`` and the global copy.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.optimizer.state_dict()
        own: dict[str, Any] = {
            "sync_every": self._sync_every,
            "warmup_steps": self.warmup_steps,
            "local_step": self._local_step,
            "steps": self._steps,
            "num_syncs": self._num_syncs,
            "synced": self._synced,
            "bytes_communicated": self._bytes,
        }
        if self._outer is not None:
            own["outer"] = self._outer.state_dict()
            own["global_params"] = [g.detach().clone() for g in self._global]
        if self._delta_mode:
            own["compression"], own["overlap"] = self.compression, self.overlap
            if self._outer is None:
                own["anchor"] = [a.detach().clone() for a in self._anchor]
            # a mean in flight is completed first (collective with compression: every rank
            # saves), as it updates the shard residual
            own["pending"] = (
                None if self._pending is None else [m.wait().clone() for m in self._pending]
            )
            own["sent"] = [t.clone() for t in self._sent]
            own["residual"] = [t.clone() for t in self._residual]
            own["shard_residual"] = [t.clone() for t in self._shard_residual]
        sd["local_opt"] = own
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load what :meth:`state_dict` returned (the counters, and the outer step's state)."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        own = state_dict.pop("local_opt", None)
        if own is not None:
            self._check_own(own)  # before anything is loaded
        self.optimizer.load_state_dict(state_dict)
        if own is None:
            warnings.warn(
                "state_dict has no 'local_opt' entry: counters start from 0",
                UserWarning,
                stacklevel=2,
            )
        else:
            self._load_own(own)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_own(self, own: dict[str, Any]) -> None:
        """Refuse a state saved with another outer optimizer set-up, compression or overlap, in
        either direction: the global copy, an in-flight mean and the residuals belong to them."""
        if "outer" in own and self._outer is None:
            raise ValueError(
                "state_dict was saved with an outer optimizer, but this LocalOptimizer has none "
                "(pass the same outer_optimizer= to resume)"
            )
        if self._outer is not None and "outer" not in own:
            raise ValueError("state_dict has no outer optimizer state, but this one has one")
        saved = (own.get("compression"), bool(own.get("overlap", False)))
        if saved != (self.compression, self.overlap):
            raise ValueError(
                f"state_dict was saved with compression={saved[0]!r}, overlap={saved[1]!r}; this "
                f"LocalOptimizer has compression={self.compression!r}, overlap={self.overlap!r} "
                "(build it with the saved ones to resume)"
            )

    def _load_own(self, own: dict[str, Any]) -> None:
        self.sync_every = own["sync_every"]
        self.warmup_steps = int(own.get("warmup_steps", self.warmup_steps))
        self._local_step = own["local_step"]
        self._steps = own["steps"]
        self._num_syncs = own["num_syncs"]
        self._synced = own["synced"]
        self._bytes = own["bytes_communicated"]
        if self._outer is not None:
            with torch.no_grad():
                for g, saved in zip(self._global, own["global_params"]):
                    g.copy_(saved)
            self._outer.load_state_dict(own["outer"])
        if self._delta_mode:
            with torch.no_grad():
                if "anchor" in own:
                    for a, saved in zip(self._anchor, own["anchor"]):
                        a.copy_(saved)
            self._sent = [t.clone() for t in own["sent"]]
            self._residual = [t.clone() for t in own["residual"]]
            self._shard_residual = [t.clone() for t in own["shard_residual"]]
            pending = own["pending"]
            self._pending = None if pending is None else [_compress.Done(t) for t in pending]

    # ------------------------------------------------------------------------ internals
    def _params(self) -> list[Tensor]:
        return _unique(p for group in self.param_groups for p in group["params"])

    def _module_tensors(self) -> list[Tensor]:
        """Module buffers and parameters the optimizer lacks, for the initial broadcast."""
        if self.module is None:
            return []
        known = {id(p) for p in self._params()}
        out = list(self.module.buffers())
        out += [p for p in self.module.parameters() if id(p) not in known]
        return _unique(out)

    def _buffers(self) -> list[Tensor]:
        """The buffers named by ``buffers`` (looked up each time: ``module.to()`` replaces them)."""
        module = self.module
        return [] if module is None else [module.get_buffer(n) for n in self._buffer_names]

    def _copy_buffers(self) -> None:
        current = self._buffers()
        if current and all(
            b.shape == c.shape and b.dtype == c.dtype and b.device == c.device
            for b, c in zip(current, self._buffer_copies)
        ):
            torch._foreach_copy_(self._buffer_copies, current)
        else:
            self._buffer_copies = [b.detach().clone() for b in current]

    def _state_tensors(self) -> list[Tensor]:
        names = self._state_names
        if names is None:
            return []
        out = []
        for p in self._params():
            st = self.optimizer.state.get(p, {})
            if names == "all":
                out += [
                    v
                    for k, v in st.items()
                    if k != "step" and torch.is_tensor(v) and v.is_floating_point()
                ]
            else:
                out += [st[k] for k in names if k in st and torch.is_tensor(st[k])]
        return out


# ------------------------------------------------------------------------------ validation
def _unique(tensors: Iterable[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _check_sync_every(sync_every: Any) -> None:
    if not is_int(sync_every) or sync_every < 1:
        raise ValueError(f"Invalid sync_every: {sync_every!r} (expected an int >= 1)")


def _check_not_ddp_over(module: nn.Module, process_group: dist.ProcessGroup | None) -> None:
    """Refuse a DistributedDataParallel whose ranks overlap the group LocalOptimizer averages."""
    if not isinstance(module, nn.parallel.DistributedDataParallel):
        return
    if not (dist.is_available() and dist.is_initialized()):
        return
    ours = set(dist.get_process_group_ranks(process_group or dist.group.WORLD))
    theirs = set(dist.get_process_group_ranks(module.process_group))
    shared = sorted(ours & theirs)
    if len(shared) > 1:
        raise ValueError(
            "Invalid module: it is a DistributedDataParallel over ranks "
            f"{sorted(theirs)}, which include ranks {shared} of the group this LocalOptimizer "
            "averages over. DDP all-reduces the gradients at every step, so those workers would "
            "never take a local step and Local SGD would communicate every step instead of every "
            "sync_every steps. Pass the plain model, or use DDP inside a node and "
            "LocalOptimizer(process_group=...) across nodes (local_opt.topology.node_groups)."
        )


def _choose_buffers(module: nn.Module | None, spec: BufferSpec) -> tuple[list[str], bool]:
    """The names of the buffers a round may average, and whether "auto" picks among them."""
    auto = isinstance(spec, str) and spec == "auto"
    if not (auto or isinstance(spec, bool) or callable(spec)) and (
        isinstance(spec, str) or not isinstance(spec, Sequence)
    ):
        raise TypeError(
            f"Invalid buffers: {spec!r} (expected 'auto', a bool, a list of buffer names or "
            "a predicate (name, tensor) -> bool)"
        )
    if module is None:
        if not (auto or isinstance(spec, bool)):
            raise ValueError(f"Invalid buffers: {spec!r} needs module= (the model)")
        return [], False
    named = list(module.named_buffers(remove_duplicate=True))
    if auto:
        persistent = _persistent_buffer_names(module)
        return [n for n, b in named if b.is_floating_point() and n in persistent], True
    if isinstance(spec, bool):
        return ([n for n, b in named if b.is_floating_point()] if spec else []), False
    by_name = dict(named)
    if callable(spec):
        names = [n for n, b in named if spec(n, b)]
    else:
        names = list(spec)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"Invalid buffers: {names!r} (names must be strings)")
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(
                f"Invalid buffers: unknown buffer names {unknown}; the module's buffers are "
                f"{sorted(by_name)}"
            )
    not_float = [n for n in names if not by_name[n].is_floating_point()]
    if not_float:
        raise ValueError(
            f"Invalid buffers: {not_float} are not floating-point and cannot be averaged"
        )
    return list(dict.fromkeys(names)), False


def _persistent_buffer_names(module: nn.Module) -> set[str]:
    out = set()
    for prefix, m in module.named_modules(remove_duplicate=False):
        skip = getattr(m, "_non_persistent_buffers_set", set())
        for name in m._buffers:
            if name not in skip and m._buffers[name] is not None:
                out.add(f"{prefix}.{name}" if prefix else name)
    return out


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal values (NaN equal to NaN), for telling which buffers training changed."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return bool(torch.eq(a, b).logical_or_(torch.isnan(a).logical_and_(torch.isnan(b))).all())


def _check_module_params(module: nn.Module, params: list[Tensor]) -> None:
    known = {id(p) for p in params}
    missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in known]
    if missing:
        raise ValueError(
            f"Invalid module: its parameters {missing[:5]}{'...' if len(missing) > 5 else ''} "
            "are not optimized by the wrapped optimizer"
        )


def _state_names_of(optimizer: Optimizer) -> set[str] | None:
    """Names of the per-parameter state the optimizer keeps, or None when they can't be known.

    Uses the existing state when there is some, else one step of a throw-away copy of the
    optimizer on a two-element parameter with a zero gradient.
    """
    names: set[str] = set()
    for st in optimizer.state.values():
        names.update(st.keys())
    if names:
        return names
    try:
        ref = next(p for g in optimizer.param_groups for p in g["params"])
        dummy = torch.zeros(2, dtype=ref.dtype, device=ref.device, requires_grad=True)
        probe = type(optimizer)([dummy], **optimizer.defaults)
        dummy.grad = torch.zeros_like(dummy)
        probe.step()
        return set(probe.state[dummy].keys())
    except Exception:  # a third-party optimizer whose defaults are not its kwargs
        return None


def _check_state_spec(spec: StateSpec, optimizer: Optimizer) -> str | tuple[str, ...] | None:
    if isinstance(spec, bool):
        return "all" if spec else None
    if isinstance(spec, str) or not isinstance(spec, Sequence):
        raise TypeError(
            f"Invalid average_optimizer_state: {spec!r} (expected a bool or a list of state names)"
        )
    spec = tuple(spec)
    if not all(isinstance(s, str) for s in spec):
        raise TypeError(f"Invalid average_optimizer_state: {spec!r} (names must be strings)")
    known = _state_names_of(optimizer)
    unknown = [s for s in spec if known is not None and s not in known]
    if unknown:
        raise ValueError(
            f"Invalid average_optimizer_state: unknown state names {unknown} for "
            f"{type(optimizer).__name__} (it keeps {sorted(known or ())})"
        )
    return spec
