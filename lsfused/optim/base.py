"""The shared driver of every lsfused optimizer: closure handling, validation, flat buckets, records, state."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lsfused.backends import resolve as resolve_backend
from lsfused.flat import FlatBucket, is_sharded
from lsfused.reference import MODE_ADAM, NORM_COLUMNS

Closure = Callable[[], Tensor]

OUTCOMES = ("accepted", "failed", "skipped", "unresolvable")
ARMIJO_TESTS = ("noise_aware", "classic")
#: absorbed fraction at or above which smaller steps cannot change the network
ABSORBED_STOP = 0.999
_STATE_VERSION = 1


@dataclass(frozen=True)
class StepRecord:
    """What one ``step()`` decided. ``opt.last_step`` holds the latest one.

    Attributes:
        step: 1-based index of the step.
        loss: float64 copy of the loss at the starting point ``w0``.
        trial_loss: loss at the last trial evaluated (the accepted one when ``outcome == "accepted"``), or None.
        step_sizes: step size of every param group after the step (PLASLS: merged components share one value).
        searched: indices of the param groups whose step size was line-searched in this step.
        trials: number of trial points evaluated.
        outcome: ``"accepted"``, ``"failed"`` (no trial passed within ``max_backtracks``), ``"skipped"``
            (no line search ran: zero decrease term, or a SaLSa speed-up step) or ``"unresolvable"`` (noise-aware
            test: the trial could not be judged, see ``reason``).
        closure_calls: closure evaluations in this step (the gradient evaluation, an optional noise estimate and
            the trials).
        merged: for PLASLS, the pair of component indices merged after this step, else None.
        reason: for ``"unresolvable"``: ``"noise"`` (predicted decrease and measured difference both below the
            rounding bound) or ``"absorbed"`` (the update is absorbed by rounding); ``"joint"`` for a PLASLS step
            whose joint check failed; else None.
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
    return float(value.detach().reshape(()).to("cpu", torch.float64))


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _in_range(name: str, value: float, lo: float, hi: float, hi_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value!r}")


def _int_at_least(name: str, value: int, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


class LineSearchOptimizer(torch.optim.Optimizer):
    """Base class: subclasses declare which buffers they need and implement ``_search``.

    The optimizer layer holds no elementwise math: it drives the fused ops of the selected backend over flat
    buffers and keeps every scalar that decides acceptance in float64.
    """

    #: hyperparameters that steer the (global) line search; they must be equal across param groups.
    _search_keys: tuple[str, ...] = ()
    _mode: int = MODE_ADAM

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
    ):
        if not isinstance(deterministic_closure, bool):
            raise ValueError(f"deterministic_closure must be a bool, got {deterministic_closure!r}")
        if armijo not in ARMIJO_TESTS:
            raise ValueError(f"armijo must be one of {ARMIJO_TESTS}, got {armijo!r}")
        if not isinstance(estimate_noise, bool):
            raise ValueError(f"estimate_noise must be a bool, got {estimate_noise!r}")
        self.armijo = armijo
        self.estimate_noise = estimate_noise
        self._process_group = process_group
        self._dist_checked = False
        self._recorder = None
        self._noise = 0.0
        self._loss_dtype = torch.float32
        self._initialized = False
        super().__init__(params, defaults)
        self._check_groups()
        self.deterministic_closure = deterministic_closure
        self._step_count = 0
        self._seed = int(torch.initial_seed()) % (2**62)
        self.last_step: StepRecord | None = None
        for group in self.param_groups:
            group.setdefault("step_size", float(group["init_step_size"]))
        self._ops = resolve_backend(backend, self.param_groups[0]["params"][0].device)
        self.backend = self._ops.name
        self._buckets = self._build_buckets()
        self._bind_state()
        self._initialized = True

    # ------------------------------------------------------------------ construction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_initialized", False):
            raise RuntimeError(
                "lsfused optimizers keep parameters in flat buffers: pass every param group at construction"
            )
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        unique, seen = [], set()
        for p in params:  # tied weights: count once
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        param_group["params"] = unique
        super().add_param_group(param_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Subclasses raise ValueError for invalid hyperparameters of one group."""

    def _check_groups(self) -> None:
        first = self.param_groups[0]
        for i, group in enumerate(self.param_groups):
            self._validate_group(group)
            for key in self._search_keys:
                if group[key] != first[key]:
                    raise ValueError(
                        f"param group {i} sets {key}={group[key]!r} but group 0 has {first[key]!r}; line-search "
                        f"hyperparameters ({', '.join(self._search_keys)}) must be the same in every group"
                    )
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
        """Expose per-parameter state as views into the flat buffers, like ``torch.optim.Adam``'s."""
        for b in self._buckets:
            for i, p in enumerate(b.params):
                st: dict[str, Tensor] = {}
                if b.m is not None:
                    st["exp_avg"] = b.views(b.m, i)
                if b.v is not None:
                    st["exp_avg_sq"] = b.views(b.v, i)
                self.state[p] = st

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
            rows += [b1, b2, group.get("eps", 0.0), 1.0 - b1**k, math.sqrt(1.0 - b2**k), 1.0 - wd * group["step_size"]]
        return rows

    def _pass_a(self) -> Tensor:
        """Run Pass A on every bucket; return float64 sums per param group, ``[n_groups, len(NORM_COLUMNS)]``."""
        k = self._step_count + 1
        sums = torch.zeros(self.n_groups, len(NORM_COLUMNS), dtype=torch.float64)
        shard_sums = torch.zeros_like(sums)
        for b in self._buckets:
            part = self._ops.direction_and_norms(
                b.g, b.w, b.w0, b.d, b.v, b.m, b.dm, b.flat_ranges, self._hp(b, k), self._mode
            )
            (shard_sums if b.sharded else sums)[b.groups] += part.cpu()
        if any(b.sharded for b in self._buckets):
            # FSDP2: each rank holds a disjoint shard, so the decision sums are the sums over ranks.
            reduced = self._reduce(shard_sums.flatten().tolist(), average=False)
            sums += torch.tensor(reduced, dtype=torch.float64).view_as(sums)
        return sums

    def _apply(self, eta: dict[int, float], direction: str = "d") -> None:
        """Pass B: ``w = w0 + eta[g]*dir`` over the param groups listed in ``eta``; others are left as they are."""
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
        for b in self._buckets:
            sel = [x for rng, gi in zip(b.ranges, b.groups, strict=True) if wanted is None or gi in wanted for x in rng]
            if sel:
                self._ops.restore(b.w, b.w0, sel)
                b.write_back()

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
        groups = [{k: v for k, v in g.items() if k not in ("params", "step_size")} for g in self.param_groups]
        return repr((type(self).__name__, self._layout(), groups, self.armijo, self._step_count))

    def _check_ranks_agree(self) -> None:
        group = self._group()
        self._dist_checked = True
        if group is None:
            return
        mine = self._signature()
        everyone: list[str] = [""] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)
        if any(sig != mine for sig in everyone):
            raise ValueError(
                "ranks disagree on the optimizer's parameter layout or hyperparameters; every rank must build the "
                f"same optimizer over the same model (this rank: {mine})"
            )

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
    ) -> SearchResult:
        """Backtracking: trial ``w = w0 + eta*dir`` on ``groups`` (``eta*scale[g]`` when ``scale`` is given) until
        ``decrease(eta, f_trial)`` holds.

        A non-finite trial loss is a rejected trial. On failure ``eta`` is the last value tried. With
        ``armijo="noise_aware"`` a rejected trial that cannot be judged (``_unresolvable``) ends the search without
        shrinking eta further.
        """
        eta, ft, unchanged, first_unchanged_eta = eta0, None, 0, eta0
        for t in range(1, max_trials + 1):
            self._apply({g: eta * (scale[g] if scale else 1.0) for g in groups}, direction)
            ft = self._reduce([check_loss(run(), "at a trial point")])[0]
            ok = math.isfinite(ft) and decrease(eta, ft)
            if ft == f0:
                unchanged += 1
                first_unchanged_eta = eta if unchanged == 1 else first_unchanged_eta
            else:
                unchanged = 0
            reason = None
            if not ok and self.armijo == "noise_aware":
                reason = self._unresolvable(f0, ft, predicted(eta), groups, direction, unchanged >= 2)
            if self._recorder is not None:
                self._recorder.trial(self, f0, ft, eta, predicted(eta), ok, groups, direction, scale)
            if ok:
                return SearchResult("accepted", eta, t, ft)
            if reason is not None:
                # Keep the step size where the unjudgeable run began: shrinking on a tie is no evidence.
                kept = first_unchanged_eta if unchanged >= 2 else eta
                return SearchResult("unresolvable", kept, t, ft, reason)
            if t < max_trials:
                eta *= shrink
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

    def _runner(self, closure: Closure) -> Callable[[], Tensor]:
        calls = self._calls = [0]
        if not self.deterministic_closure:

            def run() -> Tensor:
                calls[0] += 1
                return closure()

            return run
        seed = (self._seed + self._step_count) % (2**62)
        devices = sorted({b.device.index or 0 for b in self._buckets if b.device.type == "cuda"})

        def run_seeded() -> Tensor:
            calls[0] += 1
            with torch.random.fork_rng(devices=devices):
                # Seed exactly the generators fork_rng restores (torch.manual_seed would also seed every other GPU
                # without restoring it, and on a CPU-only build records a stack trace per call).
                torch.default_generator.manual_seed(seed)
                for i in devices:
                    torch.cuda.default_generators[i].manual_seed(seed)
                return closure()

        return run_seeded

    @torch.no_grad()
    def step(self, closure: Closure | None = None, loss: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """One line-search step.

        Args:
            closure: callable that evaluates the loss on the current batch and returns it as a scalar tensor. It
                must not call ``backward()``: the optimizer runs backward once, then calls the closure under
                ``torch.no_grad()`` for every trial point. Required.
            loss: the loss at the current parameters when the caller already ran forward and backward (as HF
                Trainer or Lightning do). The optimizer then uses the existing ``.grad`` and only runs trials.

        Returns:
            The loss at the starting point. When ``loss`` is None, grads are zeroed before backward, so calling
            ``zero_grad()`` is not needed.
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step() requires a closure that returns the loss")
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        for b in self._buckets:
            b.check_params()
        if not self._dist_checked:
            self._check_ranks_agree()
        run = self._runner(closure)
        if loss is None:
            with torch.enable_grad():
                loss = run()
            # Under torch.distributed the decision uses the mean loss over ranks (a NaN on one rank reaches all).
            f0 = self._reduce([check_loss(loss, "at the starting point")])[0]
            if not math.isfinite(f0):
                raise ValueError(f"the loss at the starting point is not finite ({f0}); the step was refused")
            if not loss.requires_grad:
                raise ValueError("the closure's loss does not require grad: compute it from the parameters")
            for b in self._buckets:
                b.zero_grad()
            with torch.enable_grad():
                loss.backward()
        else:
            f0 = self._reduce([check_loss(loss, "(the loss argument)")])[0]
            if not math.isfinite(f0):
                raise ValueError(f"the loss at the starting point is not finite ({f0}); the step was refused")
        for b in self._buckets:
            b.check_grads()
        for b in self._buckets:
            b.read_params()
            b.gather_grads()
        bad = sum(self._ops.nonfinite_count(b.g) for b in self._buckets)
        if any(b.sharded for b in self._buckets):
            bad = int(self._reduce([float(bad)], average=False)[0])  # every rank must refuse together
        if bad:
            raise ValueError(f"{bad} gradient entries are not finite (NaN or inf); the step was refused")
        self._loss_dtype = loss.dtype
        self._noise = 0.0
        if self.estimate_noise:
            # A repeated evaluation at w0 measures the closure's evaluation noise (nondeterministic kernels).
            repeat = self._reduce([check_loss(run(), "at the starting point (noise estimate)")])[0]
            self._noise = abs(repeat - f0) if math.isfinite(repeat) else 0.0
        # From here on the state changes.
        sums = self._pass_a()
        if self._recorder is not None:
            self._recorder.begin_step(self, f0, sums)
        result, searched, merged = self._search(run, f0, sums)
        self._step_count += 1
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
        )
        if self._recorder is not None:
            self._recorder.end_step(self, self.last_step)
        return loss.detach()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat grad buffers. Grads stay allocated as views of them whatever ``set_to_none`` says, so
        backward keeps writing in place; a parameter without a gradient counts as a zero gradient."""
        for b in self._buckets:
            b.zero_grad()

    # ------------------------------------------------------------------ state

    def _extra_state(self) -> dict[str, Any]:
        """Subclass state beyond moments and step sizes (plain Python values)."""
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def _layout(self) -> list[list[list[int]]]:
        return [[list(p.shape) for p in g["params"]] for g in self.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: moments (as copies), step sizes, counters, subclass state."""
        index, state = 0, {}
        ids = {}
        for group in self.param_groups:
            for p in group["params"]:
                ids[id(p)] = index
                index += 1
        for p, st in self.state.items():
            state[ids[id(p)]] = {k: v.detach().clone() for k, v in st.items()}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [ids[id(p)] for p in group["params"]]
            groups.append(packed)
        return {
            "state": state,
            "param_groups": groups,
            "lsfused": {
                "optimizer": type(self).__name__,
                "version": _STATE_VERSION,
                "layout": self._layout(),
                "step": self._step_count,
                "seed": self._seed,
                "extra": self._extra_state(),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of the same optimizer class over the same parameter layout.

        Everything is validated before anything changes; a mismatch raises ValueError.
        """
        name = type(self).__name__
        meta = state_dict.get("lsfused") if isinstance(state_dict, dict) else None
        if not isinstance(meta, dict):
            raise ValueError(f"not an lsfused state_dict (no 'lsfused' entry); cannot load it into {name}")
        if meta.get("optimizer") != name:
            raise ValueError(f"state_dict was saved by {meta.get('optimizer')!r}, cannot load it into {name}")
        if meta.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported lsfused state_dict version {meta.get('version')!r}")
        if meta.get("layout") != self._layout():
            raise ValueError(
                f"state_dict parameter layout does not match this {name}: saved groups/shapes "
                f"{meta.get('layout')} vs {self._layout()}"
            )
        saved_groups = state_dict["param_groups"]
        params = [p for g in self.param_groups for p in g["params"]]
        local_shape = {id(p): b.shapes[i] for b in self._buckets for i, p in enumerate(b.params)}
        expected_keys = set(next(iter(self.state.values())).keys()) if self.state else set()
        new_state = {}
        for i, p in enumerate(params):
            st = state_dict["state"].get(i, state_dict["state"].get(str(i)))
            if st is None or set(st) != expected_keys:
                raise ValueError(
                    f"state_dict has no complete state for parameter {i} (expected {sorted(expected_keys)})"
                )
            for key, t in st.items():
                if not isinstance(t, Tensor) or t.shape != local_shape[id(p)]:
                    raise ValueError(f"state_dict entry {key!r} of parameter {i} does not match its shape")
            new_state[id(p)] = st
        self._check_extra_state(meta["extra"], saved_groups)
        # Validated: now commit.
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            for k, v in saved.items():
                if k != "params":
                    group[k] = v
        for p in params:
            for key, t in new_state[id(p)].items():
                self.state[p][key].copy_(t)
        self._step_count = int(meta["step"])
        self._seed = int(meta["seed"])
        self._load_extra_state(meta["extra"])

    def _check_extra_state(self, extra: dict[str, Any], saved_groups: list[dict[str, Any]]) -> None:
        """Subclasses raise ValueError when their saved state cannot apply."""
