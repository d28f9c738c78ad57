"""The shared driver of every lsfused optimizer: ``step()`` as a pipeline of stages (check, Pass A, search,
settle); each concern it orders lives in its own module (the map is in ``lsfused.optim``'s docstring). This class
holds the optimizer's state and decides in which order those run; subclasses implement ``_search``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lsfused.optim import acceptance, checkpoint, distributed, passes, rng, scaling, transaction, validation
from lsfused.optim.acceptance import SearchResult
from lsfused.optim.flat_optimizer import FlatOptimizer
from lsfused.optim.interpolation import Interpolator
from lsfused.optim.record import StepRecord
from lsfused.optim.skipping import SETTLED_TRIALS, TrialSkipper

__all__ = ["LineSearchOptimizer", "SearchResult", "StepRecord"]

Closure = Callable[[], Tensor]


class LineSearchOptimizer(FlatOptimizer):
    """Base class: subclasses declare which buffers they need and implement ``_search``.

    The optimizer layer holds no elementwise math: it drives the fused ops of the selected backend over flat
    buffers and keeps every scalar that decides acceptance in float64.
    """

    #: False: Pass A writes no trial and every trial runs Pass B (the unfused sequence; tests compare the two)
    _fuse_first_trial = True
    _not_copied = FlatOptimizer._not_copied | {"_recorder", "_process_group", "_watch_stack", "_in_closure"}

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
        validation.options(
            deterministic_closure=deterministic_closure, armijo=armijo, skip_trials=skip_trials,
            estimate_noise=estimate_noise, max_grad_norm=max_grad_norm, loss_scale=loss_scale,
        )  # fmt: skip
        self.armijo, self.deterministic_closure, self.skip_trials = armijo, deterministic_closure, skip_trials
        self._skipper = TrialSkipper()
        # this step's plan (skipping.TrialSkipper.plan; None: off); its first trial: ("skip"|"tested", passed)
        self._skip_plan: str | None = None
        self._skip_event: tuple[str, bool | None] | None = None
        self.estimate_noise, self.max_grad_norm, self.loss_scale = estimate_noise, max_grad_norm, loss_scale
        self._scaler = None
        if loss_scale is not None:
            self._scaler = scaling.LossScale(float(loss_scale) if validation.number(loss_scale) else scaling.INIT)
        self._decrease_ratio, self._warned_scaled = 0.0, False
        self._process_group = process_group
        self._dist_checked = False
        self._recorder = None
        self._seed = int(torch.initial_seed()) % (2**62)
        self._rng_step = -1  # the step whose RNG state step_rng() gave the caller's own forward
        # loss= path (see _loss_at_start): the step whose forward a watch() hook ran under the step's seed, the
        # generator states zero_grad() saw (step, states), the open hook contexts, and whether we warned already
        self._watched_step = -1
        self._captured: tuple[int, list[Tensor]] | None = None
        self._watch_stack: list[Any] = []
        self._in_closure = False  # a closure call of a step, or a step_rng() body, runs: the RNG is the step's
        self._warned_rng = False
        self._noise = 0.0
        self._loss_dtype = torch.float32
        self.last_step: StepRecord | None = None
        super().__init__(params, defaults, backend)

    def _add_group_later(self, param_group: dict[str, Any]) -> None:
        super()._add_group_later(param_group)
        self._dist_checked = False  # every rank must add the same group

    def _run_state(self) -> dict[str, Any]:
        """The closure seed and the loss scale, for ``search_state`` (``_search_state`` adds ``skip_trials``')."""
        scale, tracker = (None, None) if self._scaler is None else (self._scaler.scale, self._scaler.tracker)
        return {"seed": self._seed, "loss_scale": scale, "loss_scale_tracker": tracker}

    def _search_state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        plain, tensors = super()._search_state()
        if self.skip_trials:
            plain["trial_skipping"] = self._skipper.state()
        return plain, tensors

    def _check_run_state(self, search: dict[str, Any]) -> None:
        checkpoint.checked_run_state(search)

    def _state_moves_each_step(self) -> bool:  # the loss scale and skip_trials' counters do too
        return self._scaler is not None or bool(self.skip_trials) or super()._state_moves_each_step()

    def _load_run_state(self, search: dict[str, Any]) -> None:
        self._seed = search["seed"]
        if self._scaler is not None and search["loss_scale"] is not None:
            self._scaler = scaling.LossScale(float(search["loss_scale"]), int(search["loss_scale_tracker"]))
        self._skipper = TrialSkipper()
        if "trial_skipping" in search:
            self._skipper.load(search["trial_skipping"])
        self._dist_checked = False  # the ranks check again that they loaded the same

    def __getstate__(self) -> dict[str, Any]:
        """See ``FlatOptimizer.__getstate__``; an attached recorder is not carried either."""
        if any(b.sharded for b in self._buckets) or self._process_group is not None:
            what = "over FSDP2 (DTensor) parameters" if self._process_group is None else "with a process_group"
            raise TypeError(
                f"{type(self).__name__} {what} cannot be copied or pickled: save and load its state_dict "
                "(torch.distributed.checkpoint) instead"
            )
        return super().__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        reset = {"_recorder": None, "_process_group": None, "_dist_checked": False, "_in_closure": False}
        if isinstance(state.get("_scaler"), dict):  # pickled before the loss scale was a LossScale
            reset["_scaler"] = scaling.LossScale(**state["_scaler"])
        super().__setstate__({**state, **reset, "_watch_stack": []})

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat grad buffers. Grads stay allocated as views of them whatever ``set_to_none`` says, so
        backward keeps writing in place; a parameter without a gradient counts as a zero gradient.

        Also saves the RNG state (read only) that the next forward will start from, so that a following
        ``step(closure, loss=loss)`` can replay it for its trials (see :meth:`step`)."""
        for b in self._buckets:
            b.zero_grad()
        if self.deterministic_closure:
            self._captured = (self._step_count, rng.capture(self._generators()))

    # ------------------------------------------------------------------ Pass A, for subclasses

    def _auto_pending(self) -> bool:
        """init_step_size="auto" and no search has chosen the step size yet (it is 0.0 until then)."""
        g0 = self.param_groups[0]
        return g0["init_step_size"] == "auto" and g0["step_size"] == 0.0

    def _first_trial(self) -> tuple[dict[int, float], str] | None:
        """Subclasses: the first trial point of this step's search, known before Pass A: the step size per param
        group and the direction (``"d"`` or ``"dm"``), or None. Pass A then writes it in the same pass, and the
        search's first ``_apply`` of exactly these step sizes and direction costs nothing."""
        return None

    def _pass_a(self, f0: float, progress: list[str]) -> Tensor:
        """Pass A (``FlatOptimizer._run_pass_a``) with this step's first trial (``_first_trial``) fused in, never
        left half done (it updates the moments in place: Ctrl-C waits for it); ``progress`` records that it ran.
        ``gg`` and ``dd`` are summed only for a recorder (the precision report) and under FSDP2 (a rank without a
        recorder would add NaN into a recording rank's), whose shard sums are summed over ranks."""
        with transaction.sigint_deferred():
            self._pending = None
            plan = self._first_trial()  # always asked: PLASLS chooses the searched component there
            all_sums = self._recorder is not None or any(b.sharded for b in self._buckets)
            reduce = lambda v: self._reduce(v, average=False)  # noqa: E731
            sums = self._run_pass_a(plan if self._fuse_first_trial else None, all_sums, reduce)
        progress.append("pass A")
        if self._recorder is not None:
            self._recorder.begin_step(self, f0, sums)
        self._decrease_ratio = 0.0
        return sums

    @property
    def loss_scale_value(self) -> float | None:
        """The current loss scale (``loss_scale`` set), else None."""
        return None if self._scaler is None else self._scaler.scale

    # ------------------------------------------------------------------ distributed

    def _group(self) -> Any:
        """The process group decisions are shared over (None: this process decides alone)."""
        return distributed.active_group(self._process_group)

    def _reduce(self, values: list[float], average: bool = True) -> list[float]:
        """All-reduce float64 scalars (one packed tensor): the mean over ranks, or the sum."""
        return distributed.all_reduce(values, self._group(), self._buckets[0].device, average)

    def _signature(self) -> str:
        """Layout and hyperparameters every rank must agree on."""
        state_keys = ("params", "step_size", "lr", "search_state")  # search_state: the seed differs between ranks
        groups = [{k: v for k, v in g.items() if k not in state_keys} for g in self.param_groups]
        options = (self.armijo, self.max_grad_norm, self.skip_trials)
        return repr((type(self).__name__, self._layout(), groups, options, self._step_count))

    def _check_ranks_agree(self) -> None:
        group = self._group()
        self._dist_checked = True
        if group is not None:
            self._seed = distributed.agreed_seed(self._signature(), self._seed, group)
            self._sync_search_state()

    # ------------------------------------------------------------------ the acceptance test

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
        """Backtracking (``acceptance.backtrack``): trial ``w = w0 + eta*dir`` on ``groups`` (``eta*scale[g]`` when
        ``scale`` is given) until ``decrease(eta, f_trial)`` holds.

        With ``backtracking="interpolate"`` the next eta after a rejection is the safeguarded boundary of the
        acceptance test on a quadratic model of the loss along the ray built from ``f0``, ``slope`` (the loss's
        derivative with respect to ``eta`` at 0) and the latest rejected trial (``lsfused.optim.interpolation``);
        ``line = (k, offset)`` writes the acceptance test as ``f0 - f_trial >= k*eta - offset`` (default
        ``(predicted(1.0), 0.0)``, the Armijo test; SaLSa passes its smoothed test). ``first_rule`` names where
        ``eta0`` came from, for the recorder. With ``armijo="noise_aware"`` a rejected trial that cannot be judged
        (``acceptance.unresolvable``) ends the search. ``may_skip``: this is a step's search, whose first trial
        ``skip_trials`` may skip (``lsfused.optim.skipping``).
        """
        k, offset = line or (predicted(1.0), 0.0)
        if may_skip and self._skip_plan == "skip":
            points = {g: eta0 * (scale[g] if scale else 1.0) for g in groups}
            return self._skipped_trial(run, f0, points, direction, k, offset, eta0)
        interp = None
        if self.param_groups[0].get("backtracking", "geometric") == "interpolate" and slope is not None:
            interp = Interpolator(f0, slope, k, offset, shrink=shrink)

        def trial(eta: float) -> float:
            self._apply({g: eta * (scale[g] if scale else 1.0) for g in groups}, direction)
            ft = self._call(run, "at a trial point")[1]
            if math.isfinite(ft) and ft < f0 and predicted(eta) > 0.0:  # measured / predicted decrease (see step)
                self._decrease_ratio = max(self._decrease_ratio, (f0 - ft) / predicted(eta))
            return ft

        def judge(ft: float, pred: float, unchanged_twice: bool) -> str | None:
            absorbed = lambda: self.absorbed_fraction(groups, direction)  # noqa: E731
            return acceptance.unresolvable(f0, ft, pred, self.rounding_bound(f0, ft), unchanged_twice, absorbed)

        def observe(t: int, eta: float, ft: float, ok: bool, rule: str) -> None:
            if self._recorder is not None:
                self._recorder.trial(self, f0, ft, eta, predicted(eta), ok, groups, direction, scale, rule=rule)
            if may_skip and self._skip_plan is not None:  # a tested search: did it pass the rule's test (so far)?
                passed = ok and t <= SETTLED_TRIALS and TrialSkipper.passes(f0, ft, eta, k, offset)
                self._skip_event = ("tested", passed)

        noise_aware = judge if self.armijo == "noise_aware" else None
        return acceptance.backtrack(
            trial, f0, eta0, decrease, predicted, shrink, max_trials, noise_aware, observe, interp, first_rule
        )

    def _skipped_trial(
        self, run: Closure, f0: float, points: dict[int, float], direction: str, k: float, offset: float, eta0: float
    ) -> SearchResult:
        """``skip_trials``: accept ``eta0`` without evaluating its trial (``"measure"``: evaluated, and only
        recorded: the decisions are ``skip_trials=True``'s)."""
        passed = ft = None
        if self.skip_trials == "measure":
            self._apply(points, direction)
            ft = self._call(run, "at a skipped trial (measured)")[1]
            passed = TrialSkipper.passes(f0, ft, eta0, k, offset, margin=0.0)  # the acceptance test
        elif self._pending is None or self._pending[1] == direction:
            self._apply(points, direction)  # else Pass A wrote the step's final point, which the caller applies
        self._skip_event = ("skip", passed)
        return SearchResult("accepted", eta0, 0, ft)

    def rounding_bound(self, f0: float, ft: float) -> float:
        """The smallest loss difference this step can resolve: one ulp of the larger loss in the closure's dtype,
        or the measured evaluation noise (``estimate_noise=True``) when that is larger."""
        return acceptance.rounding_bound(f0, ft, self._loss_dtype, self._noise)

    def _search(self, run: Closure, f0: float, sums: Tensor) -> tuple[SearchResult, tuple[int, ...], Any]:
        """Subclasses: decide and apply the update. Return (result, searched groups, merge info)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the random state of a step's closure calls

    def _seeded(self, step: int, states: list[Tensor] | None = None) -> Any:
        """The RNG state every closure call of step ``step`` runs under (``states``: generator states to replay, else
        the step's seed); the caller's state is restored after."""
        return rng.seeded(self._generators(), (self._seed + step) % (2**62), states)

    def _generators(self) -> list[torch.Generator]:
        return rng.generators([b.device for b in self._buckets])

    @contextmanager
    def _step_random_state(self, step: int, states: list[Tensor] | None = None) -> Iterator[None]:
        """``_seeded``, marked as the step's own (``watch()`` hooks inside must not seed a second time)."""
        outer, self._in_closure = self._in_closure, True
        try:
            with self._seeded(step, states):
                yield
        finally:
            self._in_closure = outer

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
        with self._step_random_state(step):
            yield
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
        evaluated under that state must equal your loss within rounding (one forward without grad); when it does not
        (``module`` called twice for one loss, random numbers drawn outside it), the step falls back (see
        :meth:`step`). Nested watched modules: the outermost one seeds. Returns a handle whose ``remove()`` removes
        both hooks. The hooks hold the optimizer weakly, and a copy or pickle of ``module`` carries them detached:
        call ``watch()`` again for the copy with its own optimizer. Why a hook at the forward, measured against the
        alternatives: docs/integrations.md and ``benchmarks/own_backward.py``.
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

    # ------------------------------------------------------------------ step

    def _runner(self, closure: Closure, states: list[Tensor] | None = None) -> transaction.ClosureRunner:
        step = self._step_count
        random_state = (lambda: self._step_random_state(step, states)) if self.deterministic_closure else None
        return transaction.ClosureRunner(closure, random_state)

    def _call(self, run: Closure, where: str, grad: bool = False) -> tuple[Tensor, float]:
        """Evaluate the closure once (``transaction.evaluate``): its output and the float64 loss, averaged over
        ranks."""
        return transaction.evaluate(run, where, grad, self._group(), self._buckets[0].device)

    def _loss_at_start(self, run: Closure, loss: Tensor | None) -> tuple[Tensor, float]:
        """``f(w0)`` that the trials are compared with, and the loss tensor ``step()`` returns. Runs backward when
        the optimizer computes the loss itself (and in the ``loss=`` fallback). Changes no optimizer state."""
        if loss is None:
            loss, f0 = self._call(run, "at the starting point", grad=True)
            validation.finite_loss(f0)
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
                    (loss.float() * self._scaler.scale).backward()
            return loss, f0
        given = validation.loss(loss, "(the loss argument)")
        if not self.deterministic_closure or self._rng_step == self._step_count:
            # No matching asked for, or step_rng() vouched for the caller's forward: the trials are compared with it.
            f0 = self._reduce([given])[0]
            validation.finite_loss(f0)
            return loss, f0
        # Check that the caller's loss is the closure's f(w0) under the state the trials replay: its gradient is only
        # a valid direction for the losses the search compares when both saw the same random numbers (dropout).
        replayed = validation.loss(
            self._call(run, "at the starting point (replayed to check the loss argument)")[0], ""
        )
        tolerance = 4 * acceptance.loss_ulp(max(abs(given), abs(replayed)), loss.dtype)
        differs = not abs(replayed - given) <= tolerance  # NaN differs
        total, differing = self._reduce([given, float(differs)], average=False)  # every rank decides alike
        f0 = total / distributed.world_size(self._group())
        validation.finite_loss(f0)
        if not differing:
            return loss, f0
        if differs and not self._warned_rng:  # the ranks whose own loss differed say so; the others fall back too
            self._warned_rng = True
            step = self._step_count
            captured = self._captured is not None and self._captured[0] == step
            warning = rng.mismatch_warning(type(self).__name__, given, replayed, self._watched_step == step, captured)
            warnings.warn(warning, stacklevel=3)
        # Fallback: gradient, f(w0) and trials under the step's seed, as step(closure) runs them (one forward and
        # backward more): a guessed state that failed the check is no better than the seed.
        run.random_state = self._runner(run.closure).random_state
        return self._loss_at_start(run, None)

    @torch.no_grad()
    def step(self, closure: Closure | None = None, loss: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """One line-search step: check the input, Pass A (the direction, the moments and every sum the test needs),
        the search, settle (count, record, publish ``"lr"``).

        Args:
            closure: callable that evaluates the loss on the current batch and returns it as a scalar tensor. It
                must not call ``backward()`` nor change the gradient (``zero_grad()``; both refused with a ValueError):
                the optimizer runs backward once, then calls it under ``torch.no_grad()`` for every trial. Required.
            loss: the loss at the current parameters when the caller already ran forward and backward (as HF
                Trainer or Lightning do). The optimizer then uses the existing ``.grad`` and only runs trials. With
                ``deterministic_closure=True`` the gradient, ``f(w0)`` and the trials must share one random state
                (dropout masks). The trials replay the state of your forward: the step's seed when the forward ran
                under :meth:`watch`'s hook or inside :meth:`step_rng`, else the generator state ``zero_grad()`` saw
                for this step (or the step's seed when it saw none). Unless :meth:`step_rng` vouched for it, one
                forward without grad checks that the closure's ``f(w0)`` under that state equals ``loss`` within 4
                ulps; when it does not, the step falls back to one more forward and backward of the closure under
                the step's seed (your gradient is replaced: the step is then ``step(closure)``'s) and warns once,
                naming the cheap fix. Never a step whose
                gradient comes from other dropout masks than the losses it compares.

        Returns:
            The loss at the starting point. When ``loss`` is None, grads are zeroed before backward, so calling
            ``zero_grad()`` is not needed.

        Failure semantics (a step is all-or-nothing; the table is in docs/failure-semantics.md): refused input (no
        closure, a closure that calls ``backward()`` or returns no scalar tensor at the starting point, a non-finite
        loss or gradient, sparse or complex grads, moved parameters) raises before anything changes. Anything raised
        after the step started changing state (the closure at a trial, out of memory, ``KeyboardInterrupt``, a
        kernel error) puts the parameters back bit-exactly at ``w0`` (with this step's decoupled weight decay
        applied), the step sizes and the line-search state as before the step; the moments keep this step's
        gradient and the step counter advances with them; ``last_step.outcome`` is ``"interrupted"``; then the
        exception propagates (under ``torch.distributed`` on every rank at the same call).
        """
        run, start, f0, grad_norm = self._check(closure, loss)
        if grad_norm is None:  # loss-scale overflow: nothing changes but the (lowered) scale
            self._record(run, f0, SearchResult("skipped", 0.0, 0, None, "overflow"), grad_norm=math.inf)
            self._sync_search_state()
            return start.detach()
        with self._transaction(run, f0) as progress:
            sums = self._pass_a(f0, progress)
            found = self._search(run, f0, sums)
            if self._pending is not None:  # a search that never moved w assumed it at w0: not at Pass A's trial
                self._restore()
            self._skipper.update(self._skip_event)
        self._settle(run, f0, found, grad_norm, given_loss=loss is not None)
        return start.detach()

    def _check(self, closure: Closure | None, loss: Tensor | None) -> tuple[Any, Tensor, float, float | None]:
        """Refuse bad input before anything changes (closure, parameters, loss, gradient: unscaled and clipped here).
        Returns the closure runner, the loss tensor, ``f(w0)`` and the gradient's norm (None: a loss-scale overflow,
        the step is skipped); then commits what the checks accepted: a scheduled (or hand-set) ``"lr"`` caps this
        step and the next; the loss dtype and (``estimate_noise``) the evaluation noise set the rounding bound."""
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
        states = None
        if loss is not None:  # the caller's gradient is input: refused as such before a fallback could replace it
            states = rng.replay_states(self._step_count, self._rng_step, self._watched_step, self._captured)
            for b in self._buckets:
                b.check_grads()
        run = self._runner(closure, states)
        start, f0 = self._loss_at_start(run, loss)
        grad_norm = self._checked_gradient()
        if grad_norm is not None:
            for i, cap in caps.items():
                self.param_groups[i]["max_step_size"] = cap
            self._loss_dtype = start.dtype
            self._noise = 0.0
            if self.estimate_noise:  # a repeated evaluation at w0 measures the noise (nondeterministic kernels)
                repeat = self._call(run, "at the starting point (noise estimate)")[1]
                self._noise = abs(repeat - f0) if math.isfinite(repeat) else 0.0
        return run, start, f0, grad_norm

    def _checked_gradient(self) -> float | None:
        """Check the flat gradients (one read each: non-finite count and float64 squared norm), then unscale and
        clip them in place before Pass A. Returns the unscaled, unclipped global L2 norm, or None when loss scaling
        found an overflow (the step is then skipped and the scale lowered)."""
        for b in self._buckets:
            b.check_grads()
        for b in self._buckets:
            b.read_params()
            b.gather_grads()
        bad, sumsq, bad_sh, sumsq_sh = passes.grad_check(self._buckets, self._ops)
        if any(b.sharded for b in self._buckets):
            # FSDP2: each rank holds a disjoint shard, so the count and the squared norm are sums over ranks (every
            # rank refuses, skips or clips together). Plain buckets hold the full (DDP: already averaged) gradient.
            bad_sh, sumsq_sh = self._reduce([float(bad_sh), sumsq_sh], average=False)
        bad, sumsq = bad + int(bad_sh), sumsq + sumsq_sh
        if bad and self._scaler is not None:
            self._scaler.overflow()
            return None
        if bad:
            raise ValueError(f"{bad} gradient entries are not finite (NaN or inf); the step was refused")
        scale = None if self._scaler is None else self._scaler.scale
        norm, factor = scaling.unscale_and_clip(sumsq, scale, self.max_grad_norm)
        passes.scale_grads(self._buckets, self._ops, factor)
        if self._scaler is not None:
            self._scaler.clean()
        return norm

    @contextmanager
    def _transaction(self, run: transaction.ClosureRunner, f0: float) -> Iterator[list[str]]:
        """Pass A and the search as a transaction: whatever the block raises ends the step as ``"interrupted"`` (see
        ``step()``), then propagates. Yields the list in which ``_pass_a`` records that it ran."""
        before = (tuple(g["step_size"] for g in self.param_groups), self._extra_state(), self._skipper.state())
        progress, calls = [], run.calls
        run.freeze([b.g for b in self._buckets])  # the trials recompute the direction from it
        self._skip_plan = self._skipper.plan() if self.skip_trials else None
        self._skip_event = None
        with transaction.undone_on_error(
            lambda err: self._interrupted(before, bool(progress), run, f0, run.calls - calls, err)
        ):
            yield progress

    def _interrupted(self, before: tuple, pass_a_done: bool, run: Any, f0: float, trials: int, err: Any) -> None:
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
        interrupted = SearchResult("interrupted", 0.0, trials, None, type(err).__name__)
        self._record(run, f0, interrupted, step_sizes)
        if self._recorder is not None and pass_a_done:
            self._recorder.end_step(self, self.last_step)

    def _settle(self, run: Any, f0: float, found: tuple, grad_norm: float, given_loss: bool) -> None:
        """Count the step, record what the search ``found`` (result, searched groups, merge) in ``last_step``,
        publish the step sizes in ``"lr"``, and say once when the caller's gradient looks still scaled."""
        result, searched, merged = found
        self._count_step()
        skipped, passed = self._skip_event or (None, None)
        skip = {"trial_skipped": skipped == "skip", "skip_rule": self._skip_plan if skipped else None}
        skip["skipped_trial_passed"] = passed if skipped == "skip" else None
        self._record(run, f0, result, searched=searched, merged=merged, grad_norm=grad_norm, **skip)
        self._publish_lr()
        if given_loss and not self._warned_scaled:
            warning = scaling.scaled_gradient_warning(type(self).__name__, result.outcome, self._decrease_ratio)
            if warning is not None:
                self._warned_scaled = True
                warnings.warn(warning, stacklevel=3)
        if self._recorder is not None:
            self._recorder.end_step(self, self.last_step)

    def _record(self, run: Any, f0: float, result: SearchResult, sizes: tuple | None = None, searched=(), **fields):
        """``last_step``: the step just ended (``sizes``: its step sizes, default the current ones)."""
        sizes = sizes if sizes is not None else tuple(float(g["step_size"]) for g in self.param_groups)
        self.last_step = StepRecord(
            self._step_count, f0, result.trial_loss, sizes, searched, result.trials, result.outcome, run.calls,
            reason=result.reason, **fields,
        )  # fmt: skip
