r"""LocalOptimizer: Local SGD (periodic model averaging) around any ``torch.optim`` optimizer."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from local_opt import _comm
from local_opt._validate import is_int

__all__ = ["LocalOptimizer"]

OuterFactory = Callable[[list[Tensor]], Optimizer]
StateSpec = Union[bool, Sequence[str]]


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

    ``param_groups`` and ``state`` *are* the wrapped optimizer's, so learning-rate schedulers and
    ``group["lr"]`` edits reach it. Without torch.distributed initialized, or with a group of one
    rank, ``step`` is bit-for-bit the wrapped optimizer's (rounds are still counted, nothing is
    communicated).

    Args:
        optimizer (Optimizer): the local (inner) optimizer, already built on the model's
            parameters.
        sync_every (int): :math:`H`, local steps per communication round; may be changed between
            steps through the attribute of the same name.
        module (nn.Module, optional): the model. When given, its floating-point buffers (e.g.
            BatchNorm running statistics) are averaged at each round (see ``average_buffers``) and
            all its buffers are broadcast from rank 0 at construction (default: None).
        process_group (ProcessGroup, optional): the group to average over (default: None, the
            world group).
        average_buffers (bool): average ``module``'s floating-point buffers at each round
            (default: True).
        average_optimizer_state (bool or list of str): also average the wrapped optimizer's
            state at each round: ``True`` for every floating-point state tensor except ``step``,
            or the state names to average, e.g. ``["exp_avg", "exp_avg_sq"]`` (default: False).
        outer_optimizer (callable, optional): factory ``params -> Optimizer`` for a DiLoCo outer
            step, e.g. ``lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True)``. It
            receives the global copies of the parameters (default: None, plain averaging).
        on_nonfinite (str): what a round does when an average is NaN or Inf (a worker diverged):
            ``"raise"`` a ``FloatingPointError`` naming the step on every rank, or ``"skip"`` the
            round with a warning, leaving each worker's model as it was (default: ``"raise"``).

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
        ``LocalOptimizer`` on every rank at the same point of the program.

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
        average_buffers: bool = True,
        average_optimizer_state: StateSpec = False,
        outer_optimizer: OuterFactory | None = None,
        on_nonfinite: str = "raise",
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
        if not isinstance(average_buffers, bool):
            raise TypeError(f"Invalid average_buffers: {average_buffers!r} (expected a bool)")
        if outer_optimizer is not None and not callable(outer_optimizer):
            raise TypeError(
                f"Invalid outer_optimizer: expected a callable params -> Optimizer, "
                f"got {type(outer_optimizer).__name__}"
            )
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r} (expected 'raise' or 'skip')")

        self.optimizer = optimizer
        self.module = module
        self.process_group = process_group
        self.average_buffers = average_buffers
        self.on_nonfinite = on_nonfinite
        self._sync_every = int(sync_every)
        self._state_names = _check_state_spec(average_optimizer_state, optimizer)
        if module is not None:
            _check_module_params(module, self._params())

        # The wrapper's own counters: advanced once per step() and saved in state_dict().
        self._local_step = 0  # steps since the last round
        self._steps = 0  # steps in total
        self._num_syncs = 0
        self._synced = False
        self._bytes = 0

        if _comm.is_distributed(process_group):
            _comm.broadcast(self._params() + self._module_tensors(), 0, process_group)

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

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> Any:
        return self.optimizer.register_step_post_hook(hook)

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
    def synced(self) -> bool:
        """Whether the last :meth:`step` ended with a round."""
        return self._synced

    @property
    def bytes_communicated(self) -> int:
        """Payload bytes this rank all-reduced in rounds (0 without torch.distributed)."""
        return self._bytes

    # ------------------------------------------------------------------------ stepping
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One local step of the wrapped optimizer; a round after every ``sync_every``-th.

        Returns the closure's loss, as the wrapped optimizer does.
        """
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self._steps += 1
        self._local_step += 1
        self._synced = False
        if self._local_step >= self._sync_every:
            self._round()
        return loss

    def sync(self) -> None:
        """Run a round now (e.g. before evaluation or a checkpoint). Collective: call on all ranks."""
        self._round()

    @torch.no_grad()
    def _round(self) -> None:
        self._local_step = 0
        params = self._params()
        extra = self._module_tensors(floating_only=True) if self.average_buffers else []
        extra += self._state_tensors()
        if _comm.is_distributed(self.process_group):
            if not self._average(params, extra):
                return
        if self._outer is not None:
            for g, p in zip(self._global, params):
                g.grad = g - p  # pseudo-gradient: global copy minus the mean of the local models
            self._outer.step()
            torch._foreach_copy_(params, self._global)
        self._num_syncs += 1
        self._synced = True

    def _average(self, params: list[Tensor], extra: list[Tensor]) -> bool:
        """All-reduce the mean of params (in place, in their flat buffers) and of ``extra``.

        Returns False when the round is skipped because an average is not finite. Every rank sees
        the same reduced values, so every rank takes the same decision.
        """
        if self._flat is None or [id(p) for p in self._flat.params] != [id(p) for p in params]:
            self._flat = _comm.FlatParams(params)
        flats = self._flat.buffers()
        backup = [f.clone() for f in flats] if self.on_nonfinite == "skip" else None
        extra_flats, extra_groups = _comm.reduce_mean_packed(extra, self.process_group)
        self._bytes += _comm.mean_(flats, self.process_group)
        self._bytes += sum(f.numel() * f.element_size() for f in extra_flats)
        if not _comm.all_finite(flats + extra_flats):
            msg = (
                f"non-finite values in the model average at step {self._steps} "
                f"(round {self._num_syncs + 1}): a worker diverged"
            )
            if self.on_nonfinite == "raise":
                raise FloatingPointError(msg)
            torch._foreach_copy_(flats, backup)
            warnings.warn(msg + "; the round is skipped", RuntimeWarning, stacklevel=4)
            return False
        _comm.unpack_into(extra_flats, extra_groups)
        return True

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's ``state_dict`` plus a ``"local_opt"`` entry with the counters.

        With an outer optimizer the entry also holds its ``state_dict`` and the global copy.
        """
        sd = self.optimizer.state_dict()
        own: dict[str, Any] = {
            "sync_every": self._sync_every,
            "local_step": self._local_step,
            "steps": self._steps,
            "num_syncs": self._num_syncs,
            "synced": self._synced,
            "bytes_communicated": self._bytes,
        }
        if self._outer is not None:
            own["outer"] = self._outer.state_dict()
            own["global_params"] = [g.detach().clone() for g in self._global]
        sd["local_opt"] = own
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load what :meth:`state_dict` returned (the counters, and the outer step's state)."""
        state_dict = dict(state_dict)
        own = state_dict.pop("local_opt", None)
        self.optimizer.load_state_dict(state_dict)
        if own is None:
            warnings.warn(
                "state_dict has no 'local_opt' entry: counters start from 0",
                UserWarning,
                stacklevel=2,
            )
            return
        self.sync_every = own["sync_every"]
        self._local_step = own["local_step"]
        self._steps = own["steps"]
        self._num_syncs = own["num_syncs"]
        self._synced = own["synced"]
        self._bytes = own["bytes_communicated"]
        if self._outer is not None:
            if "outer" not in own:
                raise ValueError("state_dict has no outer optimizer state, but this one has one")
            with torch.no_grad():
                for g, saved in zip(self._global, own["global_params"]):
                    g.copy_(saved)
            self._outer.load_state_dict(own["outer"])

    # ------------------------------------------------------------------------ internals
    def _params(self) -> list[Tensor]:
        return _unique(p for group in self.param_groups for p in group["params"])

    def _module_tensors(self, floating_only: bool = False) -> list[Tensor]:
        """Module buffers (and, for the initial broadcast, parameters the optimizer lacks)."""
        if self.module is None:
            return []
        out = [b for b in self.module.buffers() if not floating_only or b.is_floating_point()]
        if not floating_only:
            known = {id(p) for p in self._params()}
            out += [p for p in self.module.parameters() if id(p) not in known]
        return _unique(out)

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
