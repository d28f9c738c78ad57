"""The shared driver of every lsfused optimizer: closure handling, validation, flat buckets, records, state."""

from __future__ import annotations

import _signal
import copy
import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lsfused.backends import resolve as resolve_backend
from lsfused.flat import FlatBucket, is_sharded
from lsfused.optim import checkpoint, rng
from lsfused.optim.interpolation import Interpolator
from lsfused.optim.skipping import MODES as SKIP_MODES
from lsfused.optim.skipping import SETTLED_TRIALS, TrialSkipper
from lsfused.reference import MODE_ADAM, NORM_COLUMNS

Closure = Callable[[], Tensor]

OUTCOMES = ("accepted", "failed", "skipped", "unresolvable", "interrupted")
ARMIJO_TESTS = ("noise_aware", "classic")
#: absorbed fraction at or above which smaller steps cannot change the network
ABSORBED_STOP = 0.999


@dataclass(frozen=True)
class StepRecord:
    """What one ``step()`` decided. ``opt.last_step`` holds the latest one.

    Attributes:
        step: 1-based index of the step.
        loss: float64 copy of the loss at the starting point ``w0``.
        trial_loss: loss at the last trial evaluated (the accepted one when ``outcome == "accepted"``; a skipped trial
            evaluated by ``skip_trials="measure"``), or None.
        step_sizes: step size of every param group after the step (PLASLS: merged components share one value).
        searched: indices of the param groups whose step size was line-searched in this step.
        trials: number of trial points evaluated.
        outcome: ``"accepted"``, ``"failed"`` (no trial passed within ``max_backtracks``), ``"skipped"``
            (no line search ran: zero decrease term, or a SaLSa speed-up step) or ``"unresolvable"`` (noise-aware
            test: the trial could not be judged, see ``reason``) or ``"interrupted"`` (an exception ended the step
            after it started changing state; see ``step()``).
        closure_calls: closure evaluations in this step (the gradient evaluation, an optional noise estimate and
            the trials).
        merged: for PLASLS, the pair of component indices merged after this step, else None.
        reason: for ``"unresolvable"``: ``"noise"`` (predicted decrease and measured difference both below the
            rounding bound) or ``"absorbed"`` (the update is absorbed by rounding); ``"joint"`` for a PLASLS step
            whose joint check failed; for ``"interrupted"`` the exception's type name; for ``"skipped"``:
            ``"overflow"`` (dynamic loss scaling found inf/NaN gradients: nothing changed but the scale) or ``"cap"``
            (a step-size cap of 0, e.g. a warm-up's first step); else None.
        grad_norm: global L2 norm of the gradient (float64, unscaled, before clipping), or None.
        trial_skipped: ``skip_trials``: the search accepted its first step size without evaluating the trial.
        skip_rule: ``skip_trials``, on a step whose search ran: ``"skip"`` (skipped), or why its trials were
            evaluated: ``"unproven"`` (fewer tested steps passing in a row than the rule asks) or ``"due"`` (the
            most steps in a row have skipped); None otherwise (see ``lsfused.optim.skipping``).
        skipped_trial_passed: ``skip_trials="measure"``: whether the skipped trial, evaluated anyway, passes the
            acceptance test (False: the rule missed a failure), else None.
    """

    step: int
    loss: float
    trial_loss: float | None
    step_sizes: tuple[float, ...]
    searched: tuple[int, ...]
    trials: int
    outcome: str
    closure_calls: int
    merged: tuple[int, int] | None = None
    reason: str | None = None
    grad_norm: float | None = None
    trial_skipped: bool = False
    skip_rule: str | None = None
    skipped_trial_passed: bool | None = None


@dataclass
class SearchResult:
    outcome: str
    eta: float
    trials: int
    trial_loss: float | None
    reason: str | None = None


def loss_ulp(value: float, dtype: torch.dtype) -> float:
    """One ulp of ``value`` in ``dtype`` (the spacing of representable losses there)."""
    if not dtype.is_floating_point:
        return 0.0
    t = torch.tensor(abs(value), dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)) - t)


def check_loss(value: Any, where: str) -> float:
    """Validate what a closure returned and give its float64 value."""
    if not isinstance(value, Tensor):
        raise TypeError(f"the closure must return the loss as a torch.Tensor, got {type(value).__name__} {where}")
    if value.numel() != 1:
        raise ValueError(f"the closure must return a scalar loss, got a tensor of shape {tuple(value.shape)} {where}")
    if value.is_complex():
        raise ValueError(f"the closure returned a complex loss {where}")
    return float(value.item())  # exact: every floating dtype converts to a Python float (float64) exactly


_BACKWARD_REFUSED = (
    "the closure called backward(): lsfused optimizers run backward themselves (once, then the closure under "
    "torch.no_grad() for each trial). Return the loss from the closure without calling backward() or zero_grad(). "
    "A framework whose closure runs backward (Lightning's automatic optimization) needs lsfused.integrations (see "
    "the README); with your own forward and backward, call step(closure, loss=loss) with a closure that only "
    "computes the loss"
)


@contextmanager
def _backward_refused() -> Iterator[None]:
    """While a closure runs, ``backward()`` from this thread raises a ValueError that says what to do instead (it would
    otherwise fail later with torch's "backward through the graph a second time" or, under no_grad, "does not
    require grad"). ``Tensor.backward`` calls ``torch.autograd.backward``, which is swapped for the call."""
    original = torch.autograd.backward
    owner = threading.get_ident()

    def refuse(*args: Any, **kwargs: Any) -> None:
        if threading.get_ident() != owner:
            return original(*args, **kwargs)
        raise ValueError(_BACKWARD_REFUSED)

    torch.autograd.backward = refuse
    try:
        yield
    finally:
        torch.autograd.backward = original


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block is done, for the few passes that must not stop half way."""
    # _signal: the signal module's C functions, without its enum conversions (most of this block's cost per step).
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _signal.getsignal(signal.SIGINT)
    if not callable(handler):
        yield
        return
    received: list[tuple[int, Any]] = []
    _signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        _signal.signal(signal.SIGINT, handler)
        if received:
            handler(*received[0])


# ---------------------------------------------------------------------- validators
# Every constructor argument and every value load_state_dict accepts goes through these: a bad value raises a
# ValueError naming the key and the value. Booleans are not numbers here (True would pass as 1).


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(name: str, value: float) -> None:
    if not (_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _in_range(name: str, value: float, lo: float, hi: float, hi_open: bool = True) -> None:
    ok = _number(value) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value!r}")


def _open_interval(name: str, value: float, lo: float, hi: float) -> None:
    if not (_number(value) and lo < value < hi):
        raise ValueError(f"{name} must be in ({lo}, {hi}), got {value!r}")


def _finite_at_least(name: str, value: float, lo: float) -> None:
    if not (_number(value) and math.isfinite(value) and value >= lo):
        raise ValueError(f"{name} must be a finite number >= {lo}, got {value!r}")


def _finite(name: str, value: float) -> None:
    if not (_number(value) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _int_at_least(name: str, value: int, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def _boolean(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _cap_value(name: str, value: Any) -> None:
    if value is not None:
        _finite_at_least(name, value, 0.0)


#: GradScaler's defaults: initial scale, growth and backoff factors, clean steps before growing.
_SCALER_INIT, _SCALER_GROWTH, _SCALER_BACKOFF, _SCALER_INTERVAL = 2.0**16, 2.0, 0.5, 2000
#: added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does
_CLIP_EPS = 1e-6


def _refuse_nonfinite(f0: float) -> None:
    if not math.isfinite(f0):
        raise ValueError(f"the loss at the starting point is not finite ({f0}); the step was refused")


#: param-group keys a state_dict may have or lack: the step-size cap's (older state dicts lack them), and those that
#: torch's LR schedulers, SWALR and named parameters add to the groups
_OPTIONAL_KEYS = {"lr", "max_step_size", "param_names", "initial_lr", "max_lr", "min_lr", "max_momentum"}
_OPTIONAL_KEYS |= {"base_momentum", "swa_lr"}
#: the per-parameter state that lives in the flat buffers
_MOMENTS = ("exp_avg", "exp_avg_sq")
#: the entries of every optimizer's search_state; the rest is the subclass's ``_extra_state``
_SEARCH_STATE_KEYS = {"optimizer", "seed", "loss_scale", "loss_scale_tracker", "trial_skipping"}


def _lr_cap(name: str, lr: Any) -> float:
    """A value found in ``group["lr"]`` (a number, or a one-element tensor as some schedulers write), validated."""
    if isinstance(lr, Tensor) and lr.numel() == 1:
        lr = lr.item()
    _finite_at_least(name, lr, 0.0)
    return float(lr)


def _step_value(t: Any, index: int) -> int:
    """A saved per-parameter ``step``: a whole number >= 0 (a scalar tensor, as torch's Adam saves it, or a number)."""
    value = t.item() if isinstance(t, Tensor) and t.numel() == 1 else t
    ok = _number(value) and math.isfinite(value) and value >= 0 and float(value).is_integer()
    if not ok:
        raise ValueError(f"state_dict step of parameter {index} must be a whole number >= 0, got {value!r}")
    return int(value)


def _betas(value: Any) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {value!r}")
    _in_range("betas[0]", value[0], 0.0, 1.0)
    _in_range("betas[1]", value[1], 0.0, 1.0)


class LineSearchOptimizer(torch.optim.Optimizer):
    """Base class: subclasses declare which buffers they need and implement ``_search``.

    The optimizer layer holds no elementwise math: it drives the fused ops of the selected backend over flat
    buffers and keeps every scalar that decides acceptance in float64.
    """

    #: hyperparameters that steer the (global) line search; they must be equal across param groups.
    _search_keys: tuple[str, ...] = ()
    _mode: int = MODE_ADAM
    #: False: Pass A writes no trial and every trial runs Pass B (the unfused sequence; tests compare the two)
    _fuse_first_trial = True

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        backend: str,
        deterministic_closure: bool,
        armijo: str = "noise_aware",
        estimate_noise: bool = False,
        process_group: Any = None,
        max_grad_norm: float | None = None,
        loss_scale: str | float | None = None,
        skip_trials: bool | str = False,
    ):
        _boolean("deterministic_closure", deterministic_closure)
        _choice("armijo", armijo, ARMIJO_TESTS)
        if not any(skip_trials is mode or skip_trials == mode and isinstance(mode, str) for mode in SKIP_MODES):
            raise ValueError(f"skip_trials must be False, True or 'measure', got {skip_trials!r}")
        _boolean("estimate_noise", estimate_noise)
        if max_grad_norm is not None:
            _positive("max_grad_norm", max_grad_norm)
        if not (loss_scale is None or loss_scale == "dynamic"):
            _positive('loss_scale (None, "dynamic" or a positive number)', loss_scale)
        self.armijo = armijo
        self.skip_trials = skip_trials
        self._skipper = TrialSkipper()
        # this step's skip plan (see skipping.TrialSkipper.plan; None: skip_trials off) and what its search's first
        # trial did: ("skip", passed when measured) or ("tested", passed)
        self._skip_plan: str | None = None
        self._skip_event: tuple[str, bool | None] | None = None
        self.estimate_noise = estimate_noise
        self.max_grad_norm = max_grad_norm
        self.loss_scale = loss_scale
        # the current loss scale and the clean steps since it last changed (``loss_scale`` set), else None
        self._scaler = None if loss_scale is None else {"scale": _SCALER_INIT, "tracker": 0}
        if _number(loss_scale):
            self._scaler["scale"] = float(loss_scale)
        self._decrease_ratio = 0.0
        self._warned_scaled = False
        self._process_group = process_group
        self._dist_checked = False
        self._recorder = None
        self._rng_step = -1  # the step whose RNG state step_rng() gave the caller's own forward
        # loss= path (see _loss_at_start): the step whose forward a watch() hook ran under the step's seed, the
        # generator states zero_grad() saw (step, states), the open hook contexts, and whether we warned already
        self._watched_step = -1
        self._captured: tuple[int, list[Tensor]] | None = None
        self._watch_stack: list[Any] = []
        self._in_closure = False  # a closure call of a step, or a step_rng() body, runs: the RNG is the step's
        self._warned_rng = False
        self._calls = [0]
        self._noise = 0.0
        self._pending: tuple[dict[int, float], str] | None = None  # the trial point Pass A wrote, not yet used
        self._loss_dtype = torch.float32
        self._initialized = False
        super().__init__(params, defaults)
        self._check_groups()
        self.deterministic_closure = deterministic_closure
        self._step_count = 0
        self._seed = int(torch.initial_seed()) % (2**62)
        self.last_step: StepRecord | None = None
        for group in self.param_groups:
            # init_step_size="auto": 0.0 until the first search chooses it (see _auto_start)
            group.setdefault("step_size", 0.0 if group["init_step_size"] == "auto" else float(group["init_step_size"]))
            group.setdefault("max_step_size", None)
        self._lr_written: list[float] = []
        self._publish_lr()
        self._ops = resolve_backend(backend, self.param_groups[0]["params"][0].device)
        self.backend = self._ops.name
        self._buckets = self._build_buckets()
        # Per param group: the optimizer's step count when the group was added (add_param_group after steps), and
        # the group's step count as torch's Adam shows it (state["step"] of each of its parameters).
        self._group_offsets = [0] * self.n_groups
        self._steps = checkpoint.step_tensor([0] * self.n_groups)  # group gi's is the view _steps[gi]
        self._bind_state()
        self._initialized = True
        self._sync_state()

    # ------------------------------------------------------------------ construction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, at construction or later (gradual unfreezing).

        A group added after construction starts with fresh moments and its own step count for Adam's bias
        correction, as in torch; its step size is the current one of the search (``_new_group_step_size``), and an
        ``"lr"`` given in ``param_group`` caps it (``max_step_size``), as any value written into ``"lr"`` does. The
        flat buffers are rebuilt around the new parameters (the existing moments are copied over). Everything is
        validated before anything changes: a refused group leaves the optimizer as it was.
        """
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise ValueError("a param group must be a dict with a 'params' entry")
        params = param_group["params"]
        param_group = {**param_group, "params": [params] if isinstance(params, Tensor) else list(params)}
        if getattr(self, "_initialized", False):
            self._add_group_later(param_group)
        else:
            self._append_group(param_group)

    def _append_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group (defaults filled in, a parameter in two groups refused), tied weights once."""
        unique, seen = [], set()
        for p in param_group["params"]:  # tied weights: count once
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        if not unique:
            raise ValueError(
                f"param group {len(self.param_groups)} has no parameters; every param group needs at least one"
            )
        param_group["params"] = unique
        super().add_param_group(param_group)

    def _add_group_later(self, param_group: dict[str, Any]) -> None:
        if any(b.sharded for b in self._buckets) or any(is_sharded(p) for p in param_group["params"]):
            raise ValueError(
                "add_param_group after construction is not supported under FSDP2: build the optimizer over every "
                "parameter group (frozen parameters keep zero gradients)"
            )
        user_lr = param_group.pop("lr", None)
        n, old_buckets = self.n_groups, self._buckets
        moments = {p: {k: t.clone() for k, t in st.items() if k in _MOMENTS} for p, st in self.state.items()}
        try:
            self._append_group(param_group)
            group = self.param_groups[n]
            group.setdefault("step_size", self._new_group_step_size())
            group.setdefault("max_step_size", None)
            self._check_groups()
            if user_lr is not None:
                _finite_at_least(f'param group {n}\'s "lr" (read as the step-size cap max_step_size)', user_lr, 0.0)
            self._buckets = self._build_buckets()  # re-points every parameter at new flat buffers
        except BaseException:
            del self.param_groups[n:]
            self._buckets = old_buckets
            for b in old_buckets:
                b.rebind()
            raise
        self._group_offsets.append(self._step_count)
        self._steps = checkpoint.step_tensor(self._steps.tolist() + [0])
        self._bind_state()
        self._copy_moments(moments)
        group["lr"] = self._capped(n, float(group["step_size"]))
        self._lr_written.append(group["lr"])
        if user_lr is not None:
            group["lr"] = float(user_lr)  # not written by the optimizer: the next step reads it as the cap
        self._after_group_added()
        self._dist_checked = False  # every rank must add the same group
        self._sync_state()

    def _new_group_step_size(self) -> float:
        """The step size of a group added after construction: the search's current one (one global search)."""
        return float(self.param_groups[0]["step_size"])

    def _after_group_added(self) -> None:
        """Subclasses: update their search state for the group just appended to ``param_groups``."""

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Subclasses raise ValueError for invalid hyperparameters of one group."""

    def _check_values(self, groups: list[dict[str, Any]]) -> None:
        """Validate the hyperparameters of ``groups`` (constructor and ``load_state_dict`` alike)."""
        first = groups[0]
        for i, group in enumerate(groups):
            self._validate_group(group)
            pending_auto = group.get("init_step_size") == "auto" and group.get("step_size") == 0.0
            if "step_size" in group and not pending_auto:
                _positive("step_size", group["step_size"])
            _cap_value(f"param group {i}'s max_step_size", group.get("max_step_size"))
            for key in self._search_keys:
                if group[key] != first[key]:
                    raise ValueError(
                        f"param group {i} sets {key}={group[key]!r} but group 0 has {first[key]!r}; line-search "
                        f"hyperparameters ({', '.join(self._search_keys)}) must be the same in every group"
                    )

    def _check_groups(self) -> None:
        self._check_values(self.param_groups)
        for i, group in enumerate(self.param_groups):
            devices = {p.device for p in group["params"]}
            if len(devices) > 1:
                raise ValueError(
                    f"param group {i} mixes devices {sorted(map(str, devices))}; put each in its own group"
                )
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError("lsfused optimizers do not support complex parameters")
                if not p.is_floating_point():
                    raise ValueError(f"parameters must be floating point, got {p.dtype}")
                if p.is_sparse:
                    raise ValueError("lsfused optimizers do not support sparse parameters")

    def _needs(self) -> tuple[bool, bool, bool]:
        """(second moment v, momentum m, momentum direction dm) buffers needed by this optimizer."""
        return False, False, False

    def _build_buckets(self) -> list[FlatBucket]:
        with_v, with_m, with_dm = self._needs()
        by_key: dict[tuple, tuple[list[Tensor], list[int]]] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                params, owners = by_key.setdefault((p.device, p.dtype, is_sharded(p)), ([], []))
                params.append(p)
                owners.append(gi)
        with torch.no_grad():
            return [FlatBucket(ps, gs, with_v, with_m, with_dm) for ps, gs in by_key.values()]

    def _bind_state(self) -> None:
        """Expose per-parameter state like ``torch.optim.Adam``'s: ``step`` (the group's step count) and the moments
        as views into the flat buffers."""
        moments: dict[Tensor, dict[str, Tensor]] = {}
        for b in self._buckets:
            for i, p in enumerate(b.params):
                st = moments[p] = {}
                if b.m is not None:
                    st["exp_avg"] = b.views(b.m, i)
                if b.v is not None:
                    st["exp_avg_sq"] = b.views(b.v, i)
        self.state.clear()
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                self.state[p] = {"step": self._steps[gi], **moments[p]}

    def _copy_moments(self, moments: dict[Tensor, dict[str, Tensor]]) -> None:
        """Write moments (per parameter, by name) into the flat buffers' views."""
        for p, st in moments.items():
            for key, t in st.items():
                self.state[p][key].copy_(t)

    def _search_state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The optimizer-wide state as the state_dict carries it: plain values for every param group's
        ``search_state``, and the tensors that go into the first parameter's state."""
        extra = self._extra_state()
        tensors = {k: v for k, v in extra.items() if isinstance(v, Tensor)}
        plain = {
            "optimizer": type(self).__name__,
            "seed": self._seed,
            "loss_scale": None if self._scaler is None else self._scaler["scale"],
            "loss_scale_tracker": None if self._scaler is None else self._scaler["tracker"],
            **{k: checkpoint.plain(v) for k, v in extra.items() if k not in tensors},
        }
        if self.skip_trials:
            plain["trial_skipping"] = self._skipper.state()
        return plain, tensors

    def _sync_state(self) -> None:
        """Bring what ``param_groups`` and ``state`` show of the optimizer-wide state up to date (after
        construction, a load or a new group): torch's DCP reads which keys exist from them."""
        self._steps.copy_(checkpoint.step_tensor([self._step_count - k for k in self._group_offsets]))
        self._sync_search_state()

    def _sync_search_state(self) -> None:
        plain, tensors = self._search_state()
        for group in self.param_groups:
            group["search_state"] = plain  # one fresh dict, shown by every group (state_dict() copies it)
        if tensors:
            self.state[self.param_groups[0]["params"][0]].update(tensors)

    def _count_step(self) -> None:
        """One more step for the optimizer and every group (a step that ended, accepted or not, or interrupted)."""
        self._step_count += 1
        self._steps.add_(1)  # one op for every group's step
        # Only the loss scale and a subclass's own search state change from step to step.
        own_state = type(self)._extra_state is not LineSearchOptimizer._extra_state
        if self._scaler is not None or self.skip_trials or own_state:
            self._sync_search_state()

    # ------------------------------------------------------------------ helpers for subclasses

    @property
    def n_groups(self) -> int:
        return len(self.param_groups)

    def _hp(self, bucket: FlatBucket, k: int) -> list[float]:
        """Per-range hyperparameters (see ``reference.HP_COLUMNS``) for Adam step ``k``, flattened."""
        rows: list[float] = []
        for gi in bucket.groups:
            group = self.param_groups[gi]
            b1, b2 = group.get("betas", (0.0, 0.0))
            wd = group.get("weight_decay", 0.0)
            eta = self._capped(gi, group["step_size"])
            kg = k - self._group_offsets[gi]  # the group's own step (a group added later starts at 1)
            rows += [b1, b2, group.get("eps", 0.0), 1.0 - b1**kg, math.sqrt(1.0 - b2**kg), 1.0 - wd * eta]
        return rows

    def _auto_pending(self) -> bool:
        """init_step_size="auto" and no search has chosen the step size yet (it is 0.0 until then)."""
        g0 = self.param_groups[0]
        return g0["init_step_size"] == "auto" and g0["step_size"] == 0.0

    def _first_trial(self) -> tuple[dict[int, float], str] | None:
        """Subclasses: the first trial point of this step's search, known before Pass A: the step size per param
        group and the direction (``"d"`` or ``"dm"``), or None. Pass A then writes it in the same pass, and the
        search's first ``_apply`` of exactly these step sizes and direction costs nothing."""
        return None

    def _pass_a(self) -> Tensor:
        """Run Pass A on every bucket; return float64 sums per param group, ``[n_groups, len(NORM_COLUMNS)]`` (``gg``
        and ``dd`` NaN unless a recorder is attached).

        With a ``_first_trial``, Pass A also writes that trial point (bit-identical to Pass A followed by Pass B)."""
        k = self._step_count + 1
        self._pending = None
        plan = self._first_trial()  # always asked: PLASLS chooses the searched component there
        if not self._fuse_first_trial:
            plan = None
        along_dm = plan is not None and plan[1] == "dm"
        # gg and dd: only the precision report reads them. FSDP2 adds shard sums over ranks, and a rank without a
        # recorder would add NaN into a recording rank's.
        all_sums = self._recorder is not None or any(b.sharded for b in self._buckets)
        done: list[FlatBucket] = []
        parts: list[Tensor] = []
        try:
            for b in self._buckets:
                eta = None
                if plan is not None and any(gi in plan[0] for gi in b.groups):
                    etas = [plan[0].get(gi, math.nan) for gi in b.groups]  # NaN: no trial, w stays as it is
                    eta = torch.tensor(etas, dtype=torch.float64, device=b.device)
                part = self._ops.direction_and_norms(
                    b.g, b.w, b.w0, b.d, b.v, b.m, b.dm, b.flat_ranges, self._hp(b, k), self._mode, eta, along_dm,
                    all_sums=all_sums,
                )  # fmt: skip
                done.append(b)
                parts.append(part)
                if eta is not None:
                    b.write_back()
        except BaseException:
            # Pass A did not finish, so the step's handler will not restore w: put back the trial points it wrote
            # (a bucket's op checks its inputs before it writes anything).
            if plan is not None:
                for b in done:
                    self._ops.restore(b.w, b.w0, b.flat_ranges)
                    b.write_back()
            raise
        self._pending = plan
        return self._group_sums(parts)

    def _group_sums(self, parts: list[Tensor]) -> Tensor:
        """Pass A's sums per bucket range -> per param group, added in bucket order."""
        if len(parts) == 1 and not self._buckets[0].sharded and self._buckets[0].groups == list(range(self.n_groups)):
            return parts[0].cpu()  # one bucket, one range per group in order (the usual case): nothing to add
        sums = torch.zeros(self.n_groups, len(NORM_COLUMNS), dtype=torch.float64)
        shard_sums = torch.zeros_like(sums)
        for b, part in zip(self._buckets, parts, strict=True):
            (shard_sums if b.sharded else sums)[b.groups] += part.cpu()
        if any(b.sharded for b in self._buckets):
            # FSDP2: each rank holds a disjoint shard, so the decision sums are the sums over ranks.
            reduced = self._reduce(shard_sums.flatten().tolist(), average=False)
            sums += torch.tensor(reduced, dtype=torch.float64).view_as(sums)
        return sums

    def _take_pending(self, covered: Iterable[int] | None) -> set[int]:
        """Forget the trial point Pass A wrote; return its groups that an op over ``covered`` (None: all) leaves
        out. Those must go back to ``w0``: the value they had before Pass A (w0 == w exactly unless SaLSa's weight
        decay scales w0, and SaLSa plans its trial on every group, which every later op covers), so the result is
        the unfused sequence's."""
        pending, self._pending = self._pending, None
        if pending is None or covered is None:
            return set()
        return set(pending[0]) - set(covered)

    def _apply(self, eta: dict[int, float], direction: str = "d") -> None:
        """Pass B: ``w = w0 + eta[g]*dir`` over the param groups listed in ``eta``; others are left as they are."""
        if self._pending == (eta, direction):
            self._pending = None  # Pass A already wrote exactly this point
            return
        left = self._take_pending(eta)
        if left:
            self._restore(left)
        for b in self._buckets:
            sel = [r for r, gi in enumerate(b.groups) if gi in eta]
            if sel:
                etas = torch.tensor([eta[b.groups[r]] for r in sel], dtype=torch.float64).to(
                    b.device, non_blocking=True
                )
                self._ops.trial_step(b.w, b.w0, getattr(b, direction), [x for r in sel for x in b.ranges[r]], etas)
                b.write_back()

    def _restore(self, groups: Iterable[int] | None = None) -> None:
        """``w = w0`` over the given param groups (all when None)."""
        wanted = None if groups is None else set(groups)
        left = self._take_pending(wanted)
        wanted = None if wanted is None else wanted | left
        for b in self._buckets:
            sel = [x for rng, gi in zip(b.ranges, b.groups, strict=True) if wanted is None or gi in wanted for x in rng]
            if sel:
                self._ops.restore(b.w, b.w0, sel)
                b.write_back()

    # ------------------------------------------------------------------ step-size cap ("lr") and gradients

    def _cap(self, gi: int) -> float:
        """The step-size cap of param group ``gi`` (``group["max_step_size"]``; None: no cap)."""
        cap = self.param_groups[gi].get("max_step_size")
        return math.inf if cap is None else float(cap)

    def _capped(self, gi: int, eta: float) -> float:
        return min(eta, self._cap(gi))

    def _settle(self, gi: int, eta_prev: float, start: float, uncapped: float, result: SearchResult) -> float:
        """The search's own step size after a search that started at ``start = min(uncapped, cap)``.

        When the cap (not a rejection) limited an accepted first trial, the search's step size is not shrunk to the
        cap (it would never grow back under a warm-up): it stays ``max(eta_prev, start)``. Otherwise it is what the
        search found (``result.eta``)."""
        if start < uncapped and result.outcome == "accepted" and result.trials <= 1:  # 0: a skipped first trial
            return max(eta_prev, start)
        return result.eta

    def _new_caps(self) -> dict[int, float]:
        """A value in ``group["lr"]`` other than the one this optimizer wrote after the last step was set by an LR
        scheduler or by hand: it becomes the group's step-size cap ``max_step_size``. Validated here, before the
        step changes anything; committed by ``step()``."""
        new = {}
        for i, group in enumerate(self.param_groups):
            lr = group.get("lr")
            written = self._lr_written[i] if i < len(self._lr_written) else None
            if lr is not written and lr != written:
                new[i] = _lr_cap(f'param group {i}\'s "lr" (read as the step-size cap max_step_size)', lr)
        return new

    def _publish_lr(self) -> None:
        """``group["lr"] = min(step_size, max_step_size)``: the step size the next step starts from (before its
        growth), which loggers, LR monitors and schedulers read."""
        self._lr_written = []
        for i, group in enumerate(self.param_groups):
            group["lr"] = self._capped(i, float(group["step_size"]))
            self._lr_written.append(group["lr"])

    def _grad_norm(self, scaled: bool) -> float | None:
        """Check the flat gradients (one read each: non-finite count and float64 squared norm), then unscale and
        clip them in place before Pass A. Returns the unscaled, unclipped global L2 norm, or None when loss scaling
        found an overflow (the step is then skipped and the scale lowered)."""
        bad, sumsq, bad_sh, sumsq_sh = 0, 0.0, 0.0, 0.0
        for b in self._buckets:
            count, sq = self._ops.grad_check(b.g)
            if b.sharded:
                bad_sh, sumsq_sh = bad_sh + count, sumsq_sh + sq
            else:
                bad, sumsq = bad + count, sumsq + sq
        if any(b.sharded for b in self._buckets):
            # FSDP2: each rank holds a disjoint shard, so the count and the squared norm are sums over ranks (every
            # rank refuses, skips or clips together). Plain buckets hold the full (DDP: already averaged) gradient.
            bad_sh, sumsq_sh = self._reduce([float(bad_sh), sumsq_sh], average=False)
        bad, sumsq = bad + int(bad_sh), sumsq + sumsq_sh
        if bad and scaled:
            self._scaler["scale"] *= _SCALER_BACKOFF
            self._scaler["tracker"] = 0
            return None
        if bad:
            raise ValueError(f"{bad} gradient entries are not finite (NaN or inf); the step was refused")
        factor = 1.0
        if scaled:
            factor = 1.0 / self._scaler["scale"]
            sumsq *= factor * factor
        norm = math.sqrt(sumsq)
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            factor *= self.max_grad_norm / (norm + _CLIP_EPS)
        if factor != 1.0:
            for b in self._buckets:
                self._ops.scale_(b.g, factor)
        if scaled:
            self._scaler["tracker"] += 1
            if self._scaler["tracker"] >= _SCALER_INTERVAL:
                self._scaler["scale"] *= _SCALER_GROWTH
                self._scaler["tracker"] = 0
        return norm

    def _warn_if_scaled(self, result: SearchResult) -> None:
        """With ``loss=``, a gradient still multiplied by a loss scale (``scaler.scale(loss).backward()`` without
        unscaling) makes every predicted decrease ``scale`` times too large: the search shrinks the step until it
        fails, while the loss does fall, by a tiny fraction of the prediction. Say so, once."""
        ratio = self._decrease_ratio
        if self._warned_scaled or result.outcome not in ("failed", "unresolvable") or not 0.0 < ratio < 1e-3:
            return
        self._warned_scaled = True
        warnings.warn(
            f"{type(self).__name__}: the loss fell along the search direction, but only {ratio:.2g} times the "
            "decrease the gradient predicts, and the search found no step: is the gradient still scaled (AMP "
            "GradScaler)? Unscale before step(loss=...): scaler.step(opt, closure, loss=loss) does, or "
            "scaler.unscale_(opt); or use step(closure) with loss_scale='dynamic'",
            stacklevel=3,
        )

    @property
    def loss_scale_value(self) -> float | None:
        """The current loss scale (``loss_scale`` set), else None."""
        return None if self._scaler is None else self._scaler["scale"]

    # ------------------------------------------------------------------ distributed

    def _group(self):
        """The process group decisions are shared over (None: this process decides alone)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self._process_group if self._process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _reduce(self, values: list[float], average: bool = True) -> list[float]:
        """All-reduce float64 scalars (one packed tensor): the mean over ranks, or the sum."""
        group = self._group()
        if group is None:
            return values
        device = self._buckets[0].device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        if average:
            t /= dist.get_world_size(group)
        return t.tolist()

    def _signature(self) -> str:
        """Layout and hyperparameters every rank must agree on."""
        state_keys = ("params", "step_size", "lr", "search_state")  # search_state: the seed differs between ranks
        groups = [{k: v for k, v in g.items() if k not in state_keys} for g in self.param_groups]
        options = (self.armijo, self.max_grad_norm, self.skip_trials)
        return repr((type(self).__name__, self._layout(), groups, options, self._step_count))

    def _check_ranks_agree(self) -> None:
        group = self._group()
        self._dist_checked = True
        if group is None:
            return
        mine = self._signature()
        everyone: list[tuple[str, int]] = [("", 0)] * dist.get_world_size(group)
        dist.all_gather_object(everyone, (mine, self._seed), group=group)
        if any(sig != mine for sig, _ in everyone):
            raise ValueError(
                "ranks disagree on the optimizer's parameter layout or hyperparameters; every rank must build the "
                f"same optimizer over the same model (this rank: {mine})"
            )
        # One closure seed for every rank (rank 0's), as the state_dict holds one: a resumed run then draws the same
        # random numbers on every rank as the run that saved it, whatever seeds the ranks started from.
        self._seed = everyone[0][1]
        self._sync_search_state()

    def _armijo(
        self,
        run: Closure,
        f0: float,
        groups: list[int],
        eta0: float,
        decrease: Callable[[float, float], bool],
        predicted: Callable[[float], float],
        shrink: float,
        max_trials: int,
        direction: str = "d",
        scale: dict[int, float] | None = None,
        slope: float | None = None,
        first_rule: str = "grow",
        line: tuple[float, float] | None = None,
        may_skip: bool = False,
    ) -> SearchResult:
        """Backtracking: trial ``w = w0 + eta*dir`` on ``groups`` (``eta*scale[g]`` when ``scale`` is given) until
        ``decrease(eta, f_trial)`` holds.

        After a rejection the next eta is ``eta*shrink`` (``backtracking="geometric"``) or, with
        ``backtracking="interpolate"``, the safeguarded boundary of the acceptance test on a quadratic model of the
        loss along the ray built from ``f0``, ``slope`` (the loss's derivative with respect to ``eta`` at 0) and the
        latest rejected trial (``lsfused.optim.interpolation``); ``line = (k, offset)`` writes the acceptance test as
        ``f0 - f_trial >= k*eta - offset`` (default ``(predicted(1.0), 0.0)``, the Armijo test; SaLSa passes its
        smoothed test). ``first_rule`` names where ``eta0`` came from, for the recorder.
        A non-finite trial loss is a rejected trial. On failure ``eta`` is the last value tried. With
        ``armijo="noise_aware"`` a rejected trial that cannot be judged (``_unresolvable``) ends the search without
        shrinking eta further. ``may_skip``: this is a step's search, whose first trial ``skip_trials`` may skip
        (``lsfused.optim.skipping``).
        """
        k, offset = line or (predicted(1.0), 0.0)
        if may_skip and self._skip_plan == "skip":
            points, passed = {g: eta0 * (scale[g] if scale else 1.0) for g in groups}, None
            if self.skip_trials == "measure":  # evaluated, and only recorded: the decisions are skip_trials=True's
                self._apply(points, direction)
                ft = self._call(run, "at a skipped trial (measured)")[1]
                passed = TrialSkipper.passes(f0, ft, eta0, k, offset, margin=0.0)  # the acceptance test
            elif self._pending is None or self._pending[1] == direction:
                self._apply(points, direction)  # else Pass A wrote the step's final point, which the caller applies
            self._skip_event = ("skip", passed)
            return SearchResult("accepted", eta0, 0, None if passed is None else ft)
        interp = None
        if self.param_groups[0].get("backtracking", "geometric") == "interpolate" and slope is not None:
            interp = Interpolator(f0, slope, k, offset, shrink=shrink)
        eta, ft, unchanged, first_unchanged_eta, rule = eta0, None, 0, eta0, first_rule
        for t in range(1, max_trials + 1):
            self._apply({g: eta * (scale[g] if scale else 1.0) for g in groups}, direction)
            ft = self._call(run, "at a trial point")[1]
            ok = math.isfinite(ft) and decrease(eta, ft)
            if math.isfinite(ft) and ft < f0 and predicted(eta) > 0.0:  # measured / predicted decrease (see step)
                self._decrease_ratio = max(self._decrease_ratio, (f0 - ft) / predicted(eta))
            if ft == f0:
                unchanged += 1
                first_unchanged_eta = eta if unchanged == 1 else first_unchanged_eta
            else:
                unchanged = 0
            reason = None
            if not ok and self.armijo == "noise_aware":
                reason = self._unresolvable(f0, ft, predicted(eta), groups, direction, unchanged >= 2)
            if self._recorder is not None:
                self._recorder.trial(self, f0, ft, eta, predicted(eta), ok, groups, direction, scale, rule=rule)
            if may_skip and self._skip_plan is not None:  # a tested search: did it pass the rule's test (so far)?
                self._skip_event = (
                    "tested",
                    ok and t <= SETTLED_TRIALS and TrialSkipper.passes(f0, ft, eta, k, offset),
                )
            if ok:
                return SearchResult("accepted", eta, t, ft)
            if reason is not None:
                # Keep the step size where the unjudgeable run began: shrinking on a tie is no evidence.
                kept = first_unchanged_eta if unchanged >= 2 else eta
                return SearchResult("unresolvable", kept, t, ft, reason)
            if t < max_trials:
                if interp is None:
                    eta *= shrink
                    rule = "geometric"
                else:
                    eta, rule = interp.next(eta, ft)
        return SearchResult("failed", eta, max_trials, ft)

    def rounding_bound(self, f0: float, ft: float) -> float:
        """The smallest loss difference this step can resolve: one ulp of the larger loss in the closure's dtype,
        or the measured evaluation noise (``estimate_noise=True``) when that is larger."""
        scale = max(abs(f0), abs(ft)) if math.isfinite(ft) else abs(f0)
        return max(loss_ulp(scale, self._loss_dtype), self._noise)

    def absorbed_fraction(self, groups: Iterable[int], direction: str = "d") -> float:
        """Fraction of the moving elements (``dir != 0``) of ``groups`` that the current trial left unchanged."""
        wanted, moving, absorbed = set(groups), 0.0, 0.0
        for b in self._buckets:
            sel = [x for rng, gi in zip(b.ranges, b.groups, strict=True) if gi in wanted for x in rng]
            if sel:
                counts = self._ops.absorbed_counts(b.w, b.w0, getattr(b, direction), sel).sum(0).tolist()
                moving, absorbed = moving + counts[0], absorbed + counts[1]
        return absorbed / moving if moving else 1.0

    def _unresolvable(
        self, f0: float, ft: float, pred: float, groups: list[int], direction: str, unchanged_twice: bool
    ) -> str | None:
        """Why a rejected trial cannot be judged, or None when the rejection is real.

        ``"noise"``: the predicted decrease ``c*eta*s`` and the measured ``|f(trial) - f(w0)|`` are both within the
        rounding bound, so the comparison is decided by rounding, not by the loss; or two trials in a row (at
        different step sizes) left the loss exactly unchanged: the weights moved but the loss did not register it,
        so it is quantized coarser than the change (cancellation inside the loss computation, e.g. a cross-entropy
        of 1e-6 computed from logits of size 40, whose ulp is 4e-6) and smaller steps cannot register either (one
        exact tie can be a genuine crossing, twice cannot). ``"absorbed"``: (nearly) every element's update is
        absorbed by rounding, so smaller steps cannot change the network.
        """
        if not math.isfinite(ft):
            return None
        bound = self.rounding_bound(f0, ft)
        if unchanged_twice or (pred <= bound and abs(ft - f0) <= bound):
            return "noise"
        if self.absorbed_fraction(groups, direction) >= ABSORBED_STOP:
            return "absorbed"
        return None

    # ------------------------------------------------------------------ step

    def _search(self, run: Closure, f0: float, sums: Tensor) -> tuple[SearchResult, tuple[int, ...], Any]:
        """Subclasses: decide and apply the update. Return (result, searched groups, merge info)."""
        raise NotImplementedError

    def _generators(self) -> list[torch.Generator]:
        return rng.generators([b.device for b in self._buckets])

    def _seeded(self, step: int, states: list[Tensor] | None = None) -> Any:
        """The RNG state every closure call of step ``step`` runs under (``states``: generator states to replay, else
        the step's seed); the caller's state is restored after."""
        return rng.seeded(self._generators(), (self._seed + step) % (2**62), states)

    @contextmanager
    def step_rng(self) -> Iterator[None]:
        """Run your own forward for ``step(closure, loss=loss)`` under the random state of the step's trials, and
        vouch for it: the step then trusts that your loss is comparable with the trials and skips the check of
        ``f(w0)`` (one forward fewer than :meth:`watch`). Use it when the random part of your loss is not one
        forward of one module (a model called twice, random numbers drawn in the loss)::

            with opt.step_rng():
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step(closure, loss=loss)

        The step is then bit-identical to ``step(closure)``. With ``deterministic_closure=False`` this does nothing.
        """
        if not self.deterministic_closure:
            yield
            return
        step = self._step_count
        outer, self._in_closure = self._in_closure, True  # watch() hooks inside must not seed a second time
        try:
            with self._seeded(step):
                yield
        finally:
            self._in_closure = outer
        self._rng_step = step

    def watch(self, module: torch.nn.Module) -> rng.WatchHooks:
        """Make your own forward of ``module`` run under the random state of the step's trials, for
        ``step(closure, loss=loss)`` loops (custom loops, ``accelerator.backward``, GradScaler): call it once::

            opt.watch(model)
            for x, y in loader:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step(lambda: loss_fn(model(x), y), loss=loss)

        A forward pre-hook seeds the CPU generator and those of the parameters' GPUs with the step's seed when a
        forward of ``module`` starts with grad enabled outside a step, and a forward hook restores your RNG state when
        it ends (your other random draws are unaffected). Your gradient, ``f(w0)`` and every trial then see the same
        dropout masks, and the step is bit-identical to ``step(closure)``. The step still checks it: ``f(w0)``
        evaluated under that state must equal your loss within rounding (one forward without grad, as before this
        existed); when it does not (``module`` called twice for one loss, random numbers drawn outside it), the step
        falls back (see :meth:`step`). Nested watched modules: the outermost one seeds. Returns a handle whose
        ``remove()`` removes both hooks. The hooks hold the optimizer weakly, and a copy or pickle of ``module``
        carries them detached: call ``watch()`` again for the copy with its own optimizer.

        Why a hook that seeds the forward: measured with ``benchmarks/own_backward.py`` (MLP 20-64-5 with dropout
        0.5, 30 steps; ``step(closure)`` ends at step size 0.033 with 2.37 closure calls per step), comparing the
        caller's loss with trials of other masks ended at 9e-7; replaying the state ``zero_grad()`` saw (kept for
        loops without ``watch``) matches (0.033, 2.37 calls) only while nothing random runs between
        ``zero_grad()`` and the forward: one ``torch.rand`` there (a sampler, an augmentation) makes every step
        fall back (3.3 calls); the hook sits at the forward itself, so it matches in both loops and reproduces
        ``step(closure)`` bit for bit (also the 2-layer BERT, directly and through accelerate). Seeding in
        ``zero_grad()`` instead would hand the optimizer's seed to whatever the caller draws before the forward, and
        leave it there when no step follows.
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"watch() takes the torch.nn.Module whose forward computes the loss, got {module!r}")
        return rng.WatchHooks(self, module)

    def _forward_starts(self) -> None:
        """A watched forward starts: seed it when it is the caller's own (grad enabled, outside a step's closure
        and ``step_rng()``) and no outer watched forward seeded already."""
        own = self.deterministic_closure and torch.is_grad_enabled() and not self._in_closure
        context = None
        if own and not any(c is not None for c in self._watch_stack):
            context = self._seeded(self._step_count)
            context.__enter__()
            self._watched_step = self._step_count
        self._watch_stack.append(context)

    def _forward_ends(self) -> None:
        context = self._watch_stack.pop() if self._watch_stack else None
        if context is not None:
            context.__exit__(None, None, None)

    def _replay_states(self) -> list[Tensor] | None:
        """For a ``loss=`` step: the generator states its closure calls replay. None (the step's seed) when the
        caller's forward ran under it (``step_rng``, ``watch``) or when ``zero_grad()`` captured nothing for this
        step; else the states ``zero_grad()`` saw, which the caller's forward started from unless something drew
        random numbers in between (the check in ``_loss_at_start`` finds that)."""
        step = self._step_count
        if self._rng_step == step or self._watched_step == step or self._captured is None:
            return None
        captured_step, states = self._captured
        return states if captured_step == step else None

    def _runner(self, closure: Closure, states: list[Tensor] | None = None) -> Callable[[], Tensor]:
        calls = self._calls = [0]
        step = self._step_count

        def run() -> Tensor:
            calls[0] += 1
            with _backward_refused():
                if not self.deterministic_closure:
                    return closure()
                self._in_closure = True
                try:
                    with self._seeded(step, states):
                        return closure()
                finally:
                    self._in_closure = False

        return run

    def _call(self, run: Closure, where: str, grad: bool = False) -> tuple[Tensor, float]:
        """Evaluate the closure once: its output and the float64 loss (under ``torch.distributed``, the mean over
        ranks). When the closure raises on one rank, every rank raises at this same call, so that every rank ends
        the step the same way (the failing rank with its own exception)."""
        group = self._group()
        try:
            with torch.set_grad_enabled(grad):
                out = run()
            value = check_loss(out, where)
        except BaseException:
            if group is not None:
                self._reduce([math.nan, 1.0], average=False)  # the other ranks wait for this call
            raise
        if group is None:
            return out, value
        total, failed = self._reduce([value, 0.0], average=False)
        if failed:
            raise RuntimeError(
                f"another rank raised inside the closure {where}; this rank ends the step the same way (the "
                "parameters are back at w0, see the failing rank's error)"
            )
        return out, total / dist.get_world_size(group)

    def _loss_at_start(self, run: Closure, loss: Tensor | None) -> tuple[Tensor, float]:
        """``f(w0)`` that the trials are compared with, and the loss tensor ``step()`` returns. Runs backward when
        the optimizer computes the loss itself (and in the ``loss=`` fallback). Changes no optimizer state."""
        if loss is None:
            loss, f0 = self._call(run, "at the starting point", grad=True)
            _refuse_nonfinite(f0)
            if not loss.requires_grad:
                raise ValueError(
                    "the closure's loss does not require grad: compute it from the parameters with grad enabled, and "
                    "return it without calling backward() (the optimizer runs backward itself)"
                )
            for b in self._buckets:
                b.zero_grad()
            with torch.enable_grad():
                if self._scaler is None:
                    loss.backward()
                else:  # loss scaling: backward on loss * scale, in float32 at least (an fp16 loss * 2**16 overflows)
                    (loss.float() * self._scaler["scale"]).backward()
            return loss, f0
        given = check_loss(loss, "(the loss argument)")
        if not self.deterministic_closure or self._rng_step == self._step_count:
            # No matching asked for, or step_rng() vouched for the caller's forward: the trials are compared with it.
            f0 = self._reduce([given])[0]
            _refuse_nonfinite(f0)
            return loss, f0
        # Check that the caller's loss is the closure's f(w0) under the state the trials replay: its gradient is only
        # a valid direction for the losses the search compares when both saw the same random numbers (dropout).
        replayed = check_loss(self._call(run, "at the starting point (replayed to check the loss argument)")[0], "")
        tolerance = 4 * loss_ulp(max(abs(given), abs(replayed)), loss.dtype)
        differs = not abs(replayed - given) <= tolerance  # NaN differs
        total, differing = self._reduce([given, float(differs)], average=False)  # every rank decides alike
        f0 = total / max(1, self._world())
        _refuse_nonfinite(f0)
        if not differing:
            return loss, f0
        if differs:  # the ranks whose own loss differed say so; the others fall back with them
            self._warn_rng_mismatch(given, replayed)
        # Fallback: gradient, f(w0) and trials under one RNG state, one forward and backward more.
        return self._loss_at_start(run, None)

    def _world(self) -> int:
        group = self._group()
        return 1 if group is None else dist.get_world_size(group)

    def _warn_rng_mismatch(self, given: float, replayed: float) -> None:
        """Once: the caller's loss could not be matched, so this step (and each such step) ran its own forward and
        backward. Name the cheap fix for the loop at hand."""
        if self._warned_rng:
            return
        self._warned_rng = True
        step = self._step_count
        captured = self._captured is not None and self._captured[0] == step
        fix = rng.mismatch_fix(self._watched_step == step, captured)
        warnings.warn(
            f"{type(self).__name__}.step(closure, loss=loss): the closure's loss at the starting point under the "
            f"random state of the trials ({replayed!r}) differs from the loss passed ({given!r}), so the gradient "
            "does not belong to the losses the search compares (dropout masks). This step, and every such step, "
            f"falls back to one more forward and backward of the closure. Cheap fix: {fix}",
            stacklevel=4,
        )

    @torch.no_grad()
    def step(self, closure: Closure | None = None, loss: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """One line-search step.

        Args:
            closure: callable that evaluates the loss on the current batch and returns it as a scalar tensor. It
                must not call ``backward()`` (refused with a ValueError): the optimizer runs backward once, then
                calls the closure under ``torch.no_grad()`` for every trial point. Required.
            loss: the loss at the current parameters when the caller already ran forward and backward (as HF
                Trainer or Lightning do). The optimizer then uses the existing ``.grad`` and only runs trials. With
                ``deterministic_closure=True`` the gradient, ``f(w0)`` and the trials must share one random state
                (dropout masks). The trials replay the state of your forward: the step's seed when the forward ran
                under :meth:`watch`'s hook or inside :meth:`step_rng`, else the generator state ``zero_grad()`` saw
                for this step (or the step's seed when it saw none). Unless :meth:`step_rng` vouched for it, one
                forward without grad checks that the closure's ``f(w0)`` under that state equals ``loss`` within 4
                ulps; when it does not, the step falls back to one more forward and backward of the closure under
                that state (your gradient is replaced) and warns once, naming the cheap fix. Never a step whose
                gradient comes from other dropout masks than the losses it compares.

        Returns:
            The loss at the starting point. When ``loss`` is None, grads are zeroed before backward, so calling
            ``zero_grad()`` is not needed.

        Failure semantics (a step is all-or-nothing for the parameters):
            - Refused input (no closure, a closure that calls ``backward()`` or returns no scalar tensor at the
              starting point, a non-finite loss or gradient, sparse or complex grads, moved parameters): raised
              before anything changes; parameters and optimizer state stay bit-identical.
            - Anything raised after the step started changing state (inside the closure at a trial, a trial that
              returns no scalar tensor, out of memory, ``KeyboardInterrupt``, a kernel error): the parameters are put
              back bit-exactly at ``w0`` (the step's snapshot: the parameters before the step, with this step's
              decoupled weight decay applied when ``weight_decay > 0``), the step sizes and the line-search state
              (PLASLS components, cursor and merges, SaLSa's smoothing state) return to their values before the
              step, the moments keep this step's gradient (as after a skipped step) and the step counter advances
              with them; ``last_step`` records the step with outcome ``"interrupted"`` (``reason`` names the
              exception); then the exception is re-raised. Training can simply continue with the next
              ``step()``. Under ``torch.distributed`` a closure that raises on one rank makes every rank raise at the
              same call and end the step this way.
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step() requires a closure that returns the loss")
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        for b in self._buckets:
            b.check_params()
        if loss is not None and self._scaler is not None:
            raise ValueError(
                "loss_scale applies to step(closure) only (the optimizer scales the loss before its own backward); "
                "with loss= backward already ran: unscale first (GradScaler: scaler.step(opt, closure, loss=loss))"
            )
        caps = self._new_caps()
        if not self._dist_checked:
            self._check_ranks_agree()
        rng.refuse_accelerate_accumulation()
        given_loss = loss is not None
        run = self._runner(closure, self._replay_states() if given_loss else None)
        if given_loss:  # the caller's gradient is input: refused as such before a fallback could replace it
            for b in self._buckets:
                b.check_grads()
        loss, f0 = self._loss_at_start(run, loss)
        for b in self._buckets:
            b.check_grads()
        for b in self._buckets:
            b.read_params()
            b.gather_grads()
        grad_norm = self._grad_norm(scaled=self._scaler is not None)
        if grad_norm is None:  # loss-scale overflow: nothing changes but the (lowered) scale
            self.last_step = StepRecord(
                step=self._step_count,
                loss=f0,
                trial_loss=None,
                step_sizes=tuple(float(g["step_size"]) for g in self.param_groups),
                searched=(),
                trials=0,
                outcome="skipped",
                closure_calls=self._calls[0],
                reason="overflow",
                grad_norm=math.inf,
            )
            self._sync_search_state()  # the lowered loss scale
            return loss.detach()
        for i, cap in caps.items():  # a scheduled (or hand-set) "lr" caps this step and the next ones
            self.param_groups[i]["max_step_size"] = cap
        self._loss_dtype = loss.dtype
        self._noise = 0.0
        if self.estimate_noise:
            # A repeated evaluation at w0 measures the closure's evaluation noise (nondeterministic kernels).
            repeat = self._call(run, "at the starting point (noise estimate)")[1]
            self._noise = abs(repeat - f0) if math.isfinite(repeat) else 0.0
        # From here on the state changes: whatever raises ends the step as "interrupted" (see the docstring).
        before = (tuple(g["step_size"] for g in self.param_groups), self._extra_state(), self._skipper.state())
        pass_a_done, calls_before = False, self._calls[0]
        self._skip_plan = self._skipper.plan() if self.skip_trials else None
        self._skip_event = None
        try:
            with _sigint_deferred():  # Pass A updates the moments in place: never leave it half done
                sums = self._pass_a()
            pass_a_done = True
            if self._recorder is not None:
                self._recorder.begin_step(self, f0, sums)
            self._decrease_ratio = 0.0
            result, searched, merged = self._search(run, f0, sums)
            if self._pending is not None:  # a search that never moved w assumed it at w0: not at Pass A's trial
                self._restore()
            skipped, passed = self._skip_event or (None, None)
            if skipped == "skip":
                self._skipper.skipped()
            elif skipped == "tested":
                self._skipper.tested(bool(passed))
        except BaseException as err:
            with _sigint_deferred():
                self._interrupted(before, pass_a_done, f0, self._calls[0] - calls_before, err)
            raise
        self._count_step()
        self.last_step = StepRecord(
            step=self._step_count,
            loss=f0,
            trial_loss=result.trial_loss,
            step_sizes=tuple(float(g["step_size"]) for g in self.param_groups),
            searched=searched,
            trials=result.trials,
            outcome=result.outcome,
            closure_calls=self._calls[0],
            merged=merged,
            reason=result.reason,
            grad_norm=grad_norm,
            trial_skipped=skipped == "skip",
            skip_rule=self._skip_plan if skipped else None,
            skipped_trial_passed=passed if skipped == "skip" else None,
        )
        self._publish_lr()
        if given_loss:
            self._warn_if_scaled(result)
        if self._recorder is not None:
            self._recorder.end_step(self, self.last_step)
        return loss.detach()

    def _interrupted(
        self,
        before: tuple[tuple[float, ...], dict[str, Any], dict[str, int]],
        pass_a_done: bool,
        f0: float,
        trials: int,
        err,
    ) -> None:
        """End a step that raised after Pass A started: parameters back at ``w0``, step sizes and line-search state
        as before the step, moments (already updated by Pass A) kept, the step counted and recorded."""
        # A trial may have moved w, the first one inside Pass A (pending: Pass A finished, e.g. a held Ctrl-C raised
        # on leaving it); a Pass A that raised restored what it wrote itself.
        if pass_a_done or self._pending is not None:
            self._restore()
        step_sizes, extra, skipping = before
        for group, eta in zip(self.param_groups, step_sizes, strict=True):
            group["step_size"] = eta
        self._load_extra_state(extra)
        self._skipper.load(skipping)
        self._count_step()
        self.last_step = StepRecord(
            step=self._step_count,
            loss=f0,
            trial_loss=None,
            step_sizes=step_sizes,
            searched=(),
            trials=trials,
            outcome="interrupted",
            closure_calls=self._calls[0],
            reason=type(err).__name__,
        )
        if self._recorder is not None and pass_a_done:
            self._recorder.end_step(self, self.last_step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat grad buffers. Grads stay allocated as views of them whatever ``set_to_none`` says, so
        backward keeps writing in place; a parameter without a gradient counts as a zero gradient.

        Also saves the RNG state (read only) that the next forward will start from, so that a following
        ``step(closure, loss=loss)`` can replay it for its trials (see :meth:`step`)."""
        for b in self._buckets:
            b.zero_grad()
        if self.deterministic_closure:
            self._captured = (self._step_count, rng.capture(self._generators()))

    # ------------------------------------------------------------------ copy and pickle

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and pickle carry: every attribute but the flat buffers and the backend's ops, which
        ``__setstate__`` rebuilds around the (copied) parameters; the moments travel in ``state``. Hooks and an
        attached recorder are not carried (torch's optimizers drop hooks too)."""
        if any(b.sharded for b in self._buckets) or self._process_group is not None:
            what = "over FSDP2 (DTensor) parameters" if self._process_group is None else "with a process_group"
            raise TypeError(
                f"{type(self).__name__} {what} cannot be copied or pickled: save and load its state_dict "
                "(torch.distributed.checkpoint) instead"
            )
        skip = {"_buckets", "_ops", "_recorder", "_process_group", "_watch_stack", "_in_closure"}
        skip |= {k for k in self.__dict__ if k.startswith("_optimizer_") and k.endswith("_hooks")}
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        # Copies of the moments, not views: a view would carry its whole flat buffer with it (pickle writes a
        # storage once per tensor).
        state["state"] = {p: {k: t.clone() for k, t in st.items()} for p, st in self.state.items()}
        return state

    def __copy__(self) -> LineSearchOptimizer:
        """A shallow copy shares everything with the original (flat buffers too), as a shallow copy of torch's
        optimizers does: stepping either steps the same parameters."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        had_differentiable = "differentiable" in state["defaults"]
        super().__setstate__(state)  # torch: the attributes, empty hook dicts
        if not had_differentiable:  # torch adds it; a group added later would then have a key the original lacks
            self.defaults.pop("differentiable", None)
        self._recorder = None
        self._process_group = None
        self._dist_checked = False
        self._watch_stack, self._in_closure = [], False
        self._ops = resolve_backend(self.backend, self.param_groups[0]["params"][0].device)
        # The parameters are new tensors (deepcopy clones each parameter on its own): lay them out in new flat
        # buffers, then copy the moments in.
        moments = {p: {k: t for k, t in st.items() if k in _MOMENTS} for p, st in self.state.items()}
        self._buckets = self._build_buckets()
        self._bind_state()
        self._copy_moments(moments)
        self._sync_state()

    # ------------------------------------------------------------------ state

    def _extra_state(self) -> dict[str, Any]:
        """Subclass state beyond moments and step sizes (plain Python values)."""
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def _layout(self) -> list[list[list[int]]]:
        return [[list(p.shape) for p in g["params"]] for g in self.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly, in torch's shape: ``state`` (per parameter ``step`` and the
        moments, as copies) and ``param_groups`` (hyperparameters, step sizes and ``search_state``, the
        optimizer-wide state as plain values); see :mod:`lsfused.optim.checkpoint`. Runs the state-dict hooks
        registered with ``register_state_dict_pre_hook``/``register_state_dict_post_hook``, as torch does."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        plain, _ = self._search_state()  # the tensors are in the first parameter's state already
        state: dict[int, dict[str, Tensor]] = {}
        groups = []
        for group in self.param_groups:
            packed = {k: copy.deepcopy(v) for k, v in group.items() if k not in ("params", "search_state")}
            packed["search_state"] = copy.deepcopy(plain)
            packed["params"] = []
            for p in group["params"]:
                index = len(state)
                state[index] = {
                    k: checkpoint.export_tensor(p, v) if k in _MOMENTS else v.clone() for k, v in self.state[p].items()
                }
                packed["params"].append(index)
            groups.append(packed)
        state_dict = {"state": state, "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of the same optimizer class over the same parameter layout (or one in the format
        before this one, with its ``"lsfused"`` entry).

        Parameters are matched by position, as torch does: the saved groups' ``params`` may be indices or the
        fully qualified names that ``torch.distributed.checkpoint`` writes, and a moment may be a DTensor (FSDP2).
        Everything is validated before anything changes, with the same validators as the constructor: a value out
        of range (a NaN step size, a negative second moment, ``c=-1``), a missing or unknown key, or a layout
        mismatch raises ValueError naming the key and the value. Runs the load-state-dict hooks, as torch does.
        """
        name = type(self).__name__
        if not isinstance(state_dict, dict):
            raise ValueError(f"a state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)  # a shallow copy, as torch's: hooks may edit it
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if checkpoint.V1_KEY in state_dict:
            state_dict = self._upgraded(state_dict)
        missing = [k for k in ("state", "param_groups") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {missing}; cannot load it into {name}")
        saved_groups, search = self._checked_groups(state_dict["param_groups"])
        new_state, steps, tensors = self._checked_state(state_dict["state"], state_dict["param_groups"])
        extra = {k: checkpoint.unplain(v) for k, v in search.items() if k not in _SEARCH_STATE_KEYS} | tensors
        self._check_extra_state(extra, saved_groups)
        # Validated: now commit.
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            group.update(saved)
        self._copy_moments(new_state)
        self._step_count = max(steps)
        self._group_offsets = [self._step_count - k for k in steps]
        self._seed = search["seed"]
        if self._scaler is not None and search["loss_scale"] is not None:
            self._scaler = {"scale": float(search["loss_scale"]), "tracker": int(search["loss_scale_tracker"])}
        self._load_extra_state(extra)
        self._skipper = TrialSkipper()
        if "trial_skipping" in search:
            self._skipper.load(search["trial_skipping"])
        # What this optimizer last wrote into "lr" (_publish_lr): a scheduler's value saved before a step read it
        # differs from it, and still counts as new after loading.
        self._lr_written = [self._capped(i, float(g["step_size"])) for i, g in enumerate(self.param_groups)]
        self._dist_checked = False  # the ranks check again that they loaded the same
        self._sync_state()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _upgraded(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A state_dict of format version 1 (before ``search_state``), checked and converted."""
        name = type(self).__name__
        meta = state_dict[checkpoint.V1_KEY]
        if not isinstance(meta, dict):
            raise ValueError(f"not an lsfused state_dict ('lsfused' is not a dict); cannot load it into {name}")
        meta_keys = ("optimizer", "version", "layout", "step", "seed", "extra")
        missing = [f"lsfused.{k}" for k in meta_keys if k not in meta]
        if missing:
            raise ValueError(f"state_dict lacks {missing}; cannot load it into {name}")
        if meta["optimizer"] != name:
            raise ValueError(f"state_dict was saved by {meta['optimizer']!r}, cannot load it into {name}")
        if meta["version"] != 1:
            raise ValueError(f"unsupported lsfused state_dict version {meta['version']!r}")
        if meta["layout"] != self._layout():
            raise ValueError(
                f"state_dict parameter layout does not match this {name}: saved groups/shapes "
                f"{meta['layout']} vs {self._layout()}"
            )
        _int_at_least("state_dict step", meta["step"], 0)
        if not isinstance(meta["extra"], dict):
            raise ValueError(f"state_dict entry lsfused.extra must be a dict, got {type(meta['extra']).__name__}")
        plain, tensors = self._search_state()
        return checkpoint.from_v1(state_dict, set(plain) - _SEARCH_STATE_KEYS, set(tensors))

    def _checked_groups(self, saved: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The saved param groups' hyperparameters (without ``params`` and ``search_state``), validated like the
        constructor's, and their (common) ``search_state`` with its base entries validated."""
        name = type(self).__name__
        if not isinstance(saved, list) or len(saved) != len(self.param_groups):
            n = len(saved) if isinstance(saved, list) else type(saved).__name__
            raise ValueError(f"state_dict has {n} param groups, this optimizer has {len(self.param_groups)}")
        if not all(isinstance(entry, dict) for entry in saved):
            bad = next(i for i, entry in enumerate(saved) if not isinstance(entry, dict))
            raise ValueError(f"state_dict param group {bad} must be a dict, got {type(saved[bad]).__name__}")
        if not all(isinstance(entry.get("search_state"), dict) for entry in saved):
            raise ValueError(
                f"not an lsfused state_dict (its param groups have no 'search_state'); cannot load it into {name}"
            )
        search = saved[0]["search_state"]
        if search.get("optimizer") != name:
            raise ValueError(f"state_dict was saved by {search.get('optimizer')!r}, cannot load it into {name}")
        if any(entry["search_state"] != search for entry in saved):
            raise ValueError("state_dict param groups disagree on search_state (it is the same in every group)")
        out = []
        for i, (group, entry) in enumerate(zip(self.param_groups, saved, strict=True)):
            params, n = entry.get("params"), len(group["params"])
            if not isinstance(params, (list, tuple)) or len(params) != n:
                got = len(params) if isinstance(params, (list, tuple)) else repr(params)
                raise ValueError(
                    f"state_dict parameter layout does not match this {name}: param group {i} lists {got} "
                    f"parameters, this optimizer's has {n}"
                )
            keys = set(entry) - {"params", "search_state"}
            expected = set(group) - {"params", "search_state"}
            missing, unknown = expected - keys - _OPTIONAL_KEYS, keys - expected - _OPTIONAL_KEYS
            if missing or unknown:
                what = [f"missing {sorted(missing)}"] * bool(missing) + [f"unknown {sorted(unknown)}"] * bool(unknown)
                raise ValueError(f"state_dict param group {i} has keys {' and '.join(what)}")
            values = copy.deepcopy({k: entry[k] for k in keys})  # the optimizer's own, as torch's load makes them
            if "lr" in values:
                _lr_cap(f'state_dict param group {i}\'s "lr"', values["lr"])
            out.append({"max_step_size": None, **values})
        try:
            self._check_values(out)
        except ValueError as err:
            raise ValueError(f"state_dict: {err}") from None
        # trial_skipping may be there or not: a checkpoint of a run with or without skip_trials loads either way.
        expected = set(self._search_state()[0]) - {"trial_skipping"}
        if set(search) - {"trial_skipping"} != expected:
            raise ValueError(
                f"state_dict search_state lacks {sorted(expected - set(search))} and has unknown "
                f"{sorted(set(search) - expected)}"
            )
        _int_at_least("state_dict seed", search["seed"], 0)
        if search["loss_scale"] is not None:
            _positive("state_dict loss_scale", search["loss_scale"])
            _int_at_least("state_dict loss_scale_tracker", search["loss_scale_tracker"], 0)
        if "trial_skipping" in search:
            TrialSkipper.check(search["trial_skipping"])
        return out, search

    def _checked_state(
        self, saved: Any, saved_groups: list[dict[str, Any]]
    ) -> tuple[dict[Tensor, dict[str, Tensor]], list[int], dict[str, Tensor]]:
        """The saved moments per parameter (complete, of the right shape, finite; ``exp_avg_sq`` also >= 0), the
        step count of each param group, and the optimizer-wide tensors kept in the first parameter's state."""
        if not isinstance(saved, dict):
            raise ValueError(f"state_dict entry 'state' must be a dict, got {type(saved).__name__}")
        local_shape = {id(p): b.shapes[i] for b in self._buckets for i, p in enumerate(b.params)}
        first = self.param_groups[0]["params"][0]
        new_state, steps, tensors, i = {}, [], {}, 0
        for gi, (group, entry) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            group_steps = set()
            for p, key in zip(group["params"], entry["params"], strict=True):
                expected = set(self.state[p])
                st = saved.get(key, saved.get(str(key)))
                if not isinstance(st, dict) or set(st) != expected:
                    raise ValueError(
                        f"state_dict has no complete state for parameter {i} (expected {sorted(expected)})"
                    )
                moments = {}
                for name, t in st.items():
                    t = checkpoint.local_tensor(t)
                    if name == "step":
                        group_steps.add(_step_value(t, i))
                    elif p is first and name not in _MOMENTS:
                        tensors[name] = t
                    else:
                        if not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != local_shape[id(p)]:
                            raise ValueError(
                                f"state_dict entry {name!r} of parameter {i} does not match its shape (or is not "
                                "floating point)"
                            )
                        bad = ~torch.isfinite(t) | (t < 0) if name == "exp_avg_sq" else ~torch.isfinite(t)
                        if bool(bad.any()):
                            value = t[bad].flatten()[0].item()
                            what = "finite and >= 0" if name == "exp_avg_sq" else "finite"
                            raise ValueError(
                                f"state_dict entry {name!r} of parameter {i} must be {what}, holds {value!r}"
                            )
                        moments[name] = t
                new_state[p] = moments
                i += 1
            if len(group_steps) > 1:
                raise ValueError(f"state_dict param group {gi} holds different steps {sorted(group_steps)}")
            steps.append(group_steps.pop())
        return new_state, steps, tensors

    def _check_extra_state(self, extra: dict[str, Any], saved_groups: list[dict[str, Any]]) -> None:
        """Subclasses raise ValueError when their saved state cannot apply."""
