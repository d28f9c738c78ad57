"""The parameters in flat buffers, and torch's optimizer contract over them: param groups (also added later), the
per-parameter state as views into the flat buffers, the passes of the backend's kernels (Pass A, the trial step,
the restore), the step size published in ``"lr"`` and a scheduler's value read back as a cap,
``state_dict``/``load_state_dict`` and copy/pickle.

``FlatOptimizer`` knows nothing of line searches: ``LineSearchOptimizer`` (``base``) builds the step on it and
supplies its optimizer-wide state through ``_run_state``/``_load_run_state``, its subclasses theirs through
``_extra_state``/``_load_extra_state``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lsfused.backends import resolve as resolve_backend
from lsfused.flat import FlatBucket, is_sharded
from lsfused.optim import checkpoint, passes, validation
from lsfused.reference import MODE_ADAM


class FlatOptimizer(torch.optim.Optimizer):
    """The parameters of every param group laid out in flat buffers (``passes.build_buckets``), with the state torch's
    tools expect to find. Subclasses declare the buffers they need (``_needs``) and validate their groups."""

    #: hyperparameters that must be equal across param groups (one global search).
    _search_keys: tuple[str, ...] = ()
    #: the direction's formula (``reference.MODE_*``) that Pass A computes
    _mode: int = MODE_ADAM
    #: attributes that copies and pickles do not carry (``__setstate__`` rebuilds or resets them)
    _not_copied = {"_buckets", "_ops"}

    def __init__(self, params: Iterable, defaults: dict[str, Any], backend: str):
        self._initialized = False
        self._pending: tuple[dict[int, float], str] | None = None  # the trial point Pass A wrote, not yet used
        super().__init__(params, defaults)
        self._check_groups()
        self._step_count = 0
        for group in self.param_groups:
            # init_step_size="auto": 0.0 until the first search chooses it
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

    # ------------------------------------------------------------------ param groups and flat buffers

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
            param_group["params"] = validation.unique_params(param_group["params"], len(self.param_groups))
            super().add_param_group(param_group)

    def _add_group_later(self, param_group: dict[str, Any]) -> None:
        if any(b.sharded for b in self._buckets) or any(is_sharded(p) for p in param_group["params"]):
            raise ValueError(
                "add_param_group after construction is not supported under FSDP2: build the optimizer over every "
                "parameter group (frozen parameters keep zero gradients)"
            )
        user_lr = param_group.pop("lr", None)
        n, old_buckets = self.n_groups, self._buckets
        moments = {p: {k: t.clone() for k, t in st.items() if k in passes.MOMENTS} for p, st in self.state.items()}
        try:
            param_group["params"] = validation.unique_params(param_group["params"], n)
            super().add_param_group(param_group)
            group = self.param_groups[n]
            group.setdefault("step_size", self._new_group_step_size())
            group.setdefault("max_step_size", None)
            self._check_groups()
            if user_lr is not None:
                what = f'param group {n}\'s "lr" (read as the step-size cap max_step_size)'
                validation.finite_at_least(what, user_lr, 0.0)
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
        self._sync_state()

    def _new_group_step_size(self) -> float:
        """The step size of a group added after construction: the search's current one (one global search)."""
        return float(self.param_groups[0]["step_size"])

    def _after_group_added(self) -> None:
        """Subclasses: update their state for the group just appended to ``param_groups``."""

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Subclasses raise ValueError for invalid hyperparameters of one group."""

    def _check_values(self, groups: list[dict[str, Any]]) -> None:
        """Validate the hyperparameters of ``groups`` (constructor and ``load_state_dict`` alike)."""
        validation.group_values(groups, self._search_keys, self._validate_group)

    def _check_groups(self) -> None:
        self._check_values(self.param_groups)
        validation.group_params(self.param_groups)

    def _needs(self) -> tuple[bool, bool, bool]:
        """(second moment v, momentum m, momentum direction dm) buffers needed by this optimizer."""
        return False, False, False

    def _build_buckets(self) -> list[FlatBucket]:
        return passes.build_buckets(self.param_groups, self._needs())

    def _bind_state(self) -> None:
        """Expose per-parameter state like ``torch.optim.Adam``'s: ``step`` (the group's step count) and the moments
        as views into the flat buffers."""
        views = passes.moment_views(self._buckets)
        self.state.clear()
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                self.state[p] = {"step": self._steps[gi], **views[p]}

    def _copy_moments(self, moments: dict[Tensor, dict[str, Tensor]]) -> None:
        """Write moments (per parameter, by name) into the flat buffers' views."""
        for p, st in moments.items():
            for key, t in st.items():
                self.state[p][key].copy_(t)

    @property
    def n_groups(self) -> int:
        return len(self.param_groups)

    def _layout(self) -> list[list[list[int]]]:
        return [[list(p.shape) for p in g["params"]] for g in self.param_groups]

    # ------------------------------------------------------------------ the passes over the flat buffers

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

    def _run_pass_a(
        self, plan: tuple[dict[int, float], str] | None, all_sums: bool, reduce: Callable[[list[float]], list[float]]
    ) -> Tensor:
        """Pass A of step ``_step_count + 1`` on every bucket: float64 sums per param group, ``[n_groups,
        len(NORM_COLUMNS)]`` (``gg`` and ``dd`` NaN unless ``all_sums``; FSDP2 shard sums added over ranks by
        ``reduce``). With a ``plan`` (step size per param group, direction) it also writes that trial point,
        bit-identical to Pass A followed by Pass B, and remembers it (``_pending``)."""
        k = self._step_count + 1
        parts = passes.pass_a(self._buckets, self._ops, lambda b: self._hp(b, k), self._mode, plan, all_sums)
        self._pending = plan
        return passes.group_sums(self._buckets, parts, self.n_groups, reduce)

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
        passes.trial_step(self._buckets, self._ops, eta, direction, self._mode)

    def _restore(self, groups: Iterable[int] | None = None) -> None:
        """``w = w0`` over the given param groups (all when None)."""
        wanted = None if groups is None else set(groups)
        left = self._take_pending(wanted)
        passes.restore(self._buckets, self._ops, None if wanted is None else wanted | left)

    def absorbed_fraction(self, groups: Iterable[int], direction: str = "d") -> float:
        """Fraction of the moving elements (``dir != 0``) of ``groups`` that the current trial left unchanged."""
        return passes.absorbed_fraction(self._buckets, self._ops, groups, direction, self._mode)

    # ------------------------------------------------------------------ the step size in "lr"

    def _capped(self, gi: int, eta: float) -> float:
        """``eta`` under param group ``gi``'s step-size cap (``group["max_step_size"]``; None: no cap)."""
        cap = self.param_groups[gi].get("max_step_size")
        return eta if cap is None else min(eta, float(cap))

    def _new_caps(self) -> dict[int, float]:
        """A value in ``group["lr"]`` other than the one this optimizer wrote after the last step was set by an LR
        scheduler or by hand: it becomes the group's step-size cap ``max_step_size``. Validated here, before the
        step changes anything; committed by ``step()``."""
        new = {}
        for i, group in enumerate(self.param_groups):
            lr = group.get("lr")
            written = self._lr_written[i] if i < len(self._lr_written) else None
            if lr is not written and lr != written:
                new[i] = validation.lr_cap(f'param group {i}\'s "lr" (read as the step-size cap max_step_size)', lr)
        return new

    def _publish_lr(self) -> None:
        """``group["lr"] = min(step_size, max_step_size)``: the step size the next step starts from (before its
        growth), which loggers, LR monitors and schedulers read."""
        self._lr_written = []
        for i, group in enumerate(self.param_groups):
            group["lr"] = self._capped(i, float(group["step_size"]))
            self._lr_written.append(group["lr"])

    # ------------------------------------------------------------------ optimizer-wide state

    def _run_state(self) -> dict[str, Any]:
        """The step's own optimizer-wide state as plain values (``LineSearchOptimizer``: seed, loss scale, ...)."""
        return {}

    def _check_run_state(self, search: dict[str, Any]) -> None:
        """Raise ValueError when the ``_run_state`` entries of a saved ``search_state`` cannot apply."""

    def _load_run_state(self, search: dict[str, Any]) -> None:
        """Commit a validated ``search_state`` (see ``_run_state``)."""

    def _extra_state(self) -> dict[str, Any]:
        """Subclass state beyond moments and step sizes (plain Python values)."""
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def _check_extra_state(self, extra: dict[str, Any], saved_groups: list[dict[str, Any]]) -> None:
        """Subclasses raise ValueError when their saved state cannot apply."""

    def _search_state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The optimizer-wide state as the state_dict carries it: plain values for every param group's
        ``search_state``, and the tensors that go into the first parameter's state."""
        extra = self._extra_state()
        tensors = {k: v for k, v in extra.items() if isinstance(v, Tensor)}
        plain = {"optimizer": type(self).__name__, **self._run_state()}
        plain |= {k: checkpoint.plain(v) for k, v in extra.items() if k not in tensors}
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

    def _state_moves_each_step(self) -> bool:
        """Whether the optimizer-wide state can change from step to step (else only the step counts do): a
        subclass's own ``_extra_state``."""
        return type(self)._extra_state is not FlatOptimizer._extra_state

    def _count_step(self) -> None:
        """One more step for the optimizer and every group."""
        self._step_count += 1
        self._steps.add_(1)  # one op for every group's step
        if self._state_moves_each_step():
            self._sync_search_state()

    # ------------------------------------------------------------------ copy and pickle

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and pickle carry: every attribute but the flat buffers and the backend's ops, which
        ``__setstate__`` rebuilds around the (copied) parameters; the moments travel in ``state``. Hooks are not
        carried (torch's optimizers drop hooks too)."""
        skip = self._not_copied | {k for k in self.__dict__ if k.startswith("_optimizer_") and k.endswith("_hooks")}
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        # Copies of the moments, not views: a view would carry its whole flat buffer with it (pickle writes a
        # storage once per tensor).
        state["state"] = {p: {k: t.clone() for k, t in st.items()} for p, st in self.state.items()}
        return state

    def __copy__(self) -> FlatOptimizer:
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
        self._ops = resolve_backend(self.backend, self.param_groups[0]["params"][0].device)
        # The parameters are new tensors (deepcopy clones each parameter on its own): lay them out in new flat
        # buffers, then copy the moments in.
        moments = {p: {k: t for k, t in st.items() if k in passes.MOMENTS} for p, st in self.state.items()}
        self._buckets = self._build_buckets()
        self._bind_state()
        self._copy_moments(moments)
        self._sync_state()

    # ------------------------------------------------------------------ state_dict

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly, in torch's shape: ``state`` (per parameter ``step`` and the
        moments, as copies) and ``param_groups`` (hyperparameters, step sizes and ``search_state``, the
        optimizer-wide state as plain values); see :mod:`lsfused.optim.checkpoint`. Runs the state-dict hooks
        registered with ``register_state_dict_pre_hook``/``register_state_dict_post_hook``, as torch does."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        plain, _ = self._search_state()  # the tensors are in the first parameter's state already
        state_dict = checkpoint.pack(self.param_groups, self.state, plain)
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
        plain, tensors = self._search_state()
        if checkpoint.V1_KEY in state_dict:
            checkpoint.checked_v1(state_dict, name, self._layout())
            state_dict = checkpoint.from_v1(state_dict, set(plain) - checkpoint.SEARCH_STATE_KEYS, set(tensors))
        missing = [k for k in ("state", "param_groups") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {missing}; cannot load it into {name}")
        saved_groups, search = checkpoint.checked_groups(
            state_dict["param_groups"], self.param_groups, name, self._check_values, set(plain)
        )
        self._check_run_state(search)
        local_shape = {id(p): b.shapes[i] for b in self._buckets for i, p in enumerate(b.params)}
        new_state, steps, tensors = checkpoint.checked_state(
            state_dict["state"], self.param_groups, state_dict["param_groups"], self.state, local_shape
        )
        extra = {k: checkpoint.unplain(v) for k, v in search.items() if k not in checkpoint.SEARCH_STATE_KEYS}
        extra |= tensors
        self._check_extra_state(extra, saved_groups)
        # Validated: now commit.
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            group.update(saved)
        self._copy_moments(new_state)
        self._step_count = max(steps)
        self._group_offsets = [self._step_count - k for k in steps]
        self._load_run_state(search)
        self._load_extra_state(extra)
        # What this optimizer last wrote into "lr" (_publish_lr): a scheduler's value saved before a step read it
        # differs from it, and still counts as new after loading.
        self._lr_written = [self._capped(i, float(g["step_size"])) for i, g in enumerate(self.param_groups)]
        self._sync_state()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
