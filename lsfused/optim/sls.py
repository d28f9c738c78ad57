"""Armijo line search on the SGD and Adam directions: SGDSLS, AdamSLS (ADAMSLS), and the driver PLASLS shares.

Reference: Kenneweg et al., "Faster Convergence for Transformer Fine-tuning with Line Search Methods",
arXiv 2403.18506 (equation numbers below are that paper's), building on Vaswani et al., arXiv 1905.09997.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lsfused.optim import acceptance, interpolation, validation
from lsfused.optim.acceptance import SearchResult
from lsfused.optim.base import LineSearchOptimizer
from lsfused.reference import MODE_ADAM, MODE_SGD

_ON_FAILURE = ("revert", "last")


class _ArmijoSLS(LineSearchOptimizer):
    """Shared driver of SGDSLS, AdamSLS and PLASLS.

    The param groups are the components: a step either searches all of them jointly with one step size (the
    "full search" used by SGDSLS and AdamSLS on every step, and by PLASLS on its first ``full_search_steps``
    steps) or one component (PLASLS afterwards).
    """

    _search_keys = (
        "c",
        "beta_b",
        "gamma",
        "n_batches_per_epoch",
        "max_backtracks",
        "on_failure",
        "init_step_size",
        "backtracking",
    )
    #: where init_step_size="auto" starts when its bound does not exist (the class's default init_step_size)
    _auto_fallback = 0.1
    joint_check = False  # a PLASLS option, see _joint_check
    trial_point = "w0"  # a PLASLS option, see _before_trials

    def __init__(self, params: Iterable, defaults: dict[str, Any], **options: Any):
        # PLASLS state (a single component holding every group for SGDSLS/AdamSLS).
        self.components: list[list[int]] = []
        self._cursor = 0
        self._auto_warned = False
        self._searched: list[int] = []
        super().__init__(params, defaults, **options)
        self.components = [list(range(self.n_groups))]

    def _validate_group(self, group: dict[str, Any]) -> None:
        interpolation.validate(group)
        validation.open_interval("c", group["c"], 0.0, 1.0)
        validation.open_interval("beta_b", group["beta_b"], 0.0, 1.0)
        validation.finite_at_least("gamma", group["gamma"], 1.0)
        validation.int_at_least("n_batches_per_epoch", group["n_batches_per_epoch"], 1)
        validation.int_at_least("max_backtracks", group["max_backtracks"], 1)
        validation.choice("on_failure", group["on_failure"], _ON_FAILURE)
        validation.finite_at_least("weight_decay", group["weight_decay"], 0.0)
        if "betas" in group:
            validation.betas(group["betas"])
            validation.finite_at_least("eps", group["eps"], 0.0)

    @property
    def _has_momentum(self) -> bool:
        return any(g.get("betas", (0.0, 0.0))[0] > 0.0 for g in self.param_groups)

    def _full_search(self, step_index: int) -> bool:
        return True

    def _choose_component(self) -> int:
        return 0

    def _auto_start(self, f0: float, c: float, s: float) -> float:
        eta = interpolation.auto_start(f0, c, s)
        if eta is None:
            eta = self._auto_fallback
            if not self._auto_warned:
                self._auto_warned = True
                warnings.warn(
                    f'init_step_size="auto" bounds the first step by f(w0)/(c*s), which needs a positive loss, '
                    f"but the loss is {f0!r}; starting from {eta} instead",
                    stacklevel=4,
                )
        return eta

    def _growth(self) -> float:
        if self._skip_plan == "skip":  # a step that skips its trial (skip_trials) holds the step sizes
            return 1.0
        g0 = self.param_groups[0]
        return g0["gamma"] ** (1.0 / g0["n_batches_per_epoch"])  # Eq. 2, applied to every component

    def _first_trial(self) -> tuple[dict[int, float], str] | None:
        """Chooses the part to search this step (PLASLS: a component; ``_search`` uses that choice) and returns the
        search's first trial for Pass A to write: ``eta0 = eta_prev * growth`` (under the cap) on the searched
        groups along ``d``. None when the first trial is not known before Pass A: the first search of
        ``init_step_size="auto"`` (it needs Pass A's sums) and PLASLS's sequential trial point (the components
        before the searched one move first)."""
        auto = self._auto_pending()
        if auto or self._full_search(self._step_count):
            self._searched = list(range(self.n_groups))
        else:
            self._searched = list(self.components[self._choose_component()])
        if auto or (self.trial_point == "sequential" and len(self._searched) < self.n_groups):
            return None
        first = self._searched[0]
        eta0 = self._capped(first, self.param_groups[first]["step_size"] * self._growth())
        # A skipped trial (skip_trials) is the step: with momentum Pass A writes the step's point, w0 + eta0*dm.
        skip = self._skip_plan == "skip" and self.skip_trials is True and len(self._searched) == self.n_groups
        return dict.fromkeys(self._searched, eta0), "dm" if skip and self._has_momentum else "d"

    def _search(self, run, f0: float, sums: Tensor) -> tuple[SearchResult, tuple[int, ...], Any]:
        g0 = self.param_groups[0]
        auto = self._auto_pending()
        growth = self._growth()
        prev = [group["step_size"] for group in self.param_groups]
        for group in self.param_groups:
            group["step_size"] = group["step_size"] * growth
        s = sums[:, 0].tolist()
        gd = sums[:, 2].tolist()  # g·d per group: the loss's slope along d
        searched = self._searched  # chosen by _first_trial, before Pass A
        s_searched = math.fsum(s[i] for i in searched)
        c = g0["c"]
        final_dir = "dm" if self._has_momentum else "d"
        # The step sizes applied in this step: each group's grown step size under its cap (max_step_size, "lr").
        step_sizes = {i: self._capped(i, self.param_groups[i]["step_size"]) for i in range(self.n_groups)}
        uncapped = self.param_groups[searched[0]]["step_size"]
        start = min(step_sizes[i] for i in searched)
        others = {i: e for i, e in step_sizes.items() if i not in searched}
        joint = bool(others) and self.joint_check
        if others:
            self._before_trials(searched, step_sizes, final_dir)
        capped_out = start == 0.0 and not auto  # a cap of 0 (a warm-up's first step); "auto" starts at 0.0 too
        if not s_searched > 0.0 or capped_out:
            # Zero decrease term: no gradient on the searched part, so no trial can be judged; or a cap of 0.
            # Everything takes its step (a zero step for the searched part, or its momentum step when beta1 > 0).
            result = SearchResult("skipped", start, 0, None, "cap" if s_searched > 0.0 else None)
            if capped_out:
                for i in searched:  # the cap, not a test, stopped this step: the search's own step size stays
                    self.param_groups[i]["step_size"] = prev[i]
            if not joint:
                self._apply(step_sizes, final_dir)
                return result, tuple(searched), None
        else:
            eta0, first_rule = step_sizes[searched[0]], ("init" if self._step_count == 0 else "grow")
            if auto:
                auto_eta = self._auto_start(f0, c, s_searched)
                eta0, first_rule = min(self._capped(i, auto_eta) for i in searched), "auto"
            result = self._armijo(
                run,
                f0,
                searched,
                eta0,
                lambda eta, ft: ft <= f0 - c * eta * s_searched,
                lambda eta: c * eta * s_searched,
                g0["beta_b"],
                g0["max_backtracks"],
                slope=math.fsum(gd[i] for i in searched),
                first_rule=first_rule,
                may_skip=not auto,
            )
            for i in searched:
                self.param_groups[i]["step_size"] = acceptance.settled_step_size(prev[i], start, uncapped, result)
        if joint:  # the joint check can shrink every step size, so a merge may follow, as after any search
            result = self._joint_check(run, f0, s, searched, others, result, final_dir, gd)
            return result, tuple(searched), self._after_search(False)
        # The search decides the searched part only; the other components (PLASLS) always take their step (Eq. 7).
        if result.outcome == "accepted":
            if final_dir != "d":  # Adam momentum step (b1 > 0): w = w0 + eta ⊙ dm on every component (Eq. 7)
                self._apply({**others, **dict.fromkeys(searched, result.eta)}, final_dir)
            elif others:  # the searched part already holds its accepted trial w0 + eta*d: step the others (Eq. 7)
                self._apply(others, final_dir)
        else:
            # unresolvable: a decision that cannot be measured does not move the weights -> w0; failed: w0 with
            # on_failure="revert", the last trial with "last".
            if result.outcome == "unresolvable" or g0["on_failure"] == "revert":
                self._restore(searched)
            if others:
                self._apply(others, final_dir)
        merged = self._after_search(len(searched) == self.n_groups)
        return result, tuple(searched), merged

    def _joint_check(
        self,
        run,
        f0: float,
        s: list[float],
        searched: list[int],
        others: dict[int, float],
        result: SearchResult,
        final_dir: str,
        gd: list[float],
    ) -> SearchResult:
        """PLASLS ``joint_check=True``: test the whole update ``w0 + tau * eta ⊙ d`` against
        ``f(w0) - c*tau*sum_k eta_k*s_k``, backtracking the common factor ``tau`` from 1
        (``backtracking="interpolate"``: interpolating along ``tau``, whose slope is ``sum_k eta_k*(g·d)_k``), and
        scale every moving component's step size by the last ``tau`` tried. A check that fails (reason ``"joint"``)
        or cannot be judged keeps ``w0`` (``on_failure="last"``: the last joint trial, after a failure); the step sizes
        still shrink by the rejections before it, which is 1 when the first trial already could not be judged."""
        g0 = self.param_groups[0]
        moving = dict(others)
        last = result.outcome == "failed" and g0["on_failure"] == "last"
        if result.outcome in ("accepted", "skipped") or last:
            moving.update(dict.fromkeys(searched, result.eta))
        else:
            self._restore(searched)
        s_joint = math.fsum(eta * s[i] for i, eta in moving.items())
        if not s_joint > 0.0:
            self._apply(moving, final_dir)
            return result
        c = g0["c"]
        joint = self._armijo(
            run,
            f0,
            list(moving),
            1.0,
            lambda tau, ft: ft <= f0 - c * tau * s_joint,
            lambda tau: c * tau * s_joint,
            g0["beta_b"],
            g0["max_backtracks"],
            scale=moving,
            slope=math.fsum(eta * gd[i] for i, eta in moving.items()),
            first_rule="joint",
        )
        for i, eta in moving.items():
            self.param_groups[i]["step_size"] = eta * joint.eta
        if joint.outcome == "accepted":
            if final_dir != "d":
                self._apply({i: eta * joint.eta for i, eta in moving.items()}, final_dir)
            outcome, reason = result.outcome, result.reason
        else:
            if joint.outcome == "unresolvable" or g0["on_failure"] == "revert":
                self._restore()
            outcome, reason = joint.outcome, joint.reason or "joint"
        return SearchResult(outcome, result.eta, result.trials + joint.trials, joint.trial_loss, reason)

    def _after_search(self, full: bool) -> tuple[int, int] | None:
        return None

    def _before_trials(self, searched: list[int], step_sizes: dict[int, float], final_dir: str) -> None:
        """Set the components that are not searched before the trials (PLASLS ``trial_point``); default: w0."""

    def _after_group_added(self) -> None:
        self.components = [list(range(self.n_groups))]  # one search over every group


class SGDSLS(_ArmijoSLS):
    """Stochastic Armijo line search on the SGD direction (SLS, Vaswani et al. 2019; SGDSLS in arXiv 2403.18506).

    Each step: ``d = -g``; starting from ``eta0 = eta_prev * gamma**(1/n_batches_per_epoch)`` (Eq. 2), try
    ``w = w0 + eta*d`` and multiply eta by ``beta_b`` until ``f(w0 + eta*d) <= f(w0) - c*eta*||g||^2`` (Eq. 1).

    Args:
        params: parameters or param groups. Line-search hyperparameters must be equal in every group; all
            groups share one step size.
        init_step_size (float or "auto", default 1.0): step size the first search starts from (before the Eq. 2
            growth). ``"auto"``: the first search starts at ``f(w0)/(c*s)``, the largest step size the Armijo test
            can accept when the loss is >= 0 (``f(w0) - c*eta*s`` must stay >= 0); trials above it are wasted
            whatever the loss does. The step size reads 0.0 until that search; with a loss <= 0 it falls back to the
            class's default (with a warning).
        c (float, default 0.1): Armijo sufficient-decrease constant.
        beta_b (float, default 0.9): backtracking factor (the paper's delta).
        gamma (float, default 2.0): step-size growth per epoch (Eq. 2).
        n_batches_per_epoch (int, default 500): batches per epoch in Eq. 2.
        max_backtracks (int, default 100): maximum number of trials in one step.
        on_failure (str, default "revert"): when no trial passes, ``"revert"`` keeps w0 (no update) and
            ``"last"`` keeps the last trial; the step is recorded as ``"failed"`` either way and the step size
            becomes the last one tried.
        deterministic_closure (bool, default True): run every closure call of a step under the same RNG seed
            (derived from the step counter), restoring the caller's RNG state afterwards.
        backend (str, default "auto"): fused-op backend (see ``lsfused.backends()``).
        armijo (str, default "noise_aware"): ``"classic"`` is the paper's test, bit for bit. ``"noise_aware"``
            accepts exactly what the classic test accepts, but when a trial is rejected and it cannot be judged
            (the predicted decrease ``c*eta*s`` and the measured ``|f(trial) - f(w0)|`` are both within the
            rounding bound of the loss, or two trials in a row left the loss exactly unchanged, or (nearly) all of the
            update is absorbed by rounding), backtracking stops:
            the step is recorded as ``"unresolvable"``, the step size is not shrunk further, and the searched
            parameters keep ``w0``. Keeping ``w0`` is the conservative choice: a decision that the loss cannot
            measure should not move the weights, and the next step (with Eq. 2's growth) starts from a step size
            whose decrease may be measurable, instead of collapsing eta toward 0 (the paper's Fig. 1).
        estimate_noise (bool, default False): evaluate the closure once more at ``w0`` per step and use the
            difference as the evaluation noise (for nondeterministic kernels) in the rounding bound.
        process_group (default None): under ``torch.distributed`` every loss that decides acceptance is the
            float64 mean over this group's ranks (None: the default group when initialized), so every rank takes
            the same decision and DDP replicas stay bit-identical. Ranks must build identical optimizers (checked
            at the first step).
        backtracking (str, default "geometric"): the next step size after a rejected trial. ``"geometric"``:
            ``eta *= beta_b`` (the paper's rule). ``"interpolate"``: 0.95 times the largest step the Armijo test
            accepts on the quadratic model of the loss along the ray through ``f(w0)``, the slope ``g·d`` (known
            from Pass A) and the latest rejected trial, kept in ``[0.1, 0.9]`` times the last step (both bounds at
            most ``beta_b``), and in ``[0.1, 0.5]`` after a far miss (a decrease under half of what the test asks):
            Nocedal & Wright,
            Sec. 3.5, aimed at the test's boundary instead of the model's minimiser (formulas and safeguards in
            ``lsfused.optim.interpolation``). A trial that overshoots by far costs one forward per factor 2-10
            instead of one per ``beta_b``, and a rejection never shrinks the step less than ``beta_b`` would. See
            ``docs/backtracking.md`` for measurements.
        weight_decay (float, default 0.0): decoupled weight decay (as AdamW and SaLSa): the snapshot every trial
            starts from is ``w0 = w * (1 - weight_decay * eta_prev)``, ``eta_prev`` the step size after the last
            step (``group["lr"]``); may differ per param group.
        max_grad_norm (float, optional): clip the gradient to this global L2 norm before anything uses it (the
            moments, the direction and the decrease term): ``g *= max_grad_norm / (norm + 1e-6)`` when ``norm``
            exceeds it, as ``torch.nn.utils.clip_grad_norm_`` does. The norm is computed in float64 in the pass that
            checks the gradient for non-finite values (FSDP2: summed over the shards of every rank) and recorded,
            unclipped, in ``last_step.grad_norm``.
        loss_scale (None, "dynamic" or a float): loss scaling for float16 training in ``step(closure)``: backward
            runs on ``loss * scale`` and the gradient is unscaled before Pass A; with ``"dynamic"`` (GradScaler's
            rules: initial scale 2**16, halved on overflow, doubled after 2000 clean steps) a step whose gradient
            has inf/NaN entries is skipped (outcome ``"skipped"``, reason ``"overflow"``: parameters and moments
            unchanged) and the scale halved; the scale is part of ``state_dict()`` (``opt.loss_scale_value``).
        skip_trials (bool or "measure", default False): accept a step's step size without evaluating its trial
            when the recent tested steps predict that it passes (one closure call for such a step instead of two or
            more): after 2 tested steps in a row whose search accepted within two trials, up to 3 steps in a row
            skip, holding the step size, and a search that needs more brings back a test on every step.
            ``"measure"`` takes the same decisions and also evaluates each skipped trial, to record whether it would
            have passed (``last_step``). The rule, its measured error rate and cost: ``lsfused.optim.skipping`` and
            docs/skip_trials.md.

    Step-size cap and ``"lr"``: every param group has ``"lr"``, equal after each step (and at construction) to
    ``min(step_size, max_step_size)``, the step size the next search starts from before its growth. A value written
    into ``group["lr"]`` by anything else (an LR scheduler, a LightningModule, by hand) becomes the group's
    ``max_step_size``: the search starts at ``min(eta_prev * growth, max_step_size)``, so a scheduled learning
    rate acts as a cap on top of the line search (warm-up, decay). A cap that limits an accepted first trial does
    not shrink the search's own ``step_size`` (it would never grow back after a warm-up); a cap of 0 skips the
    search (outcome ``"skipped"``, reason ``"cap"``). ``group["max_step_size"] = None`` removes the cap.
    """

    _mode = MODE_SGD
    _auto_fallback = 1.0

    def __init__(
        self,
        params: Iterable,
        init_step_size: float | str = 1.0,
        c: float = 0.1,
        beta_b: float = 0.9,
        gamma: float = 2.0,
        n_batches_per_epoch: int = 500,
        max_backtracks: int = 100,
        on_failure: str = "revert",
        deterministic_closure: bool = True,
        backend: str = "auto",
        armijo: str = "noise_aware",
        estimate_noise: bool = False,
        process_group: Any = None,
        backtracking: str = "geometric",
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        loss_scale: str | float | None = None,
        skip_trials: bool | str = False,
    ):
        defaults = dict(
            init_step_size=init_step_size,
            c=c,
            beta_b=beta_b,
            gamma=gamma,
            n_batches_per_epoch=n_batches_per_epoch,
            max_backtracks=max_backtracks,
            on_failure=on_failure,
            backtracking=backtracking,
            weight_decay=weight_decay,
        )
        super().__init__(
            params,
            defaults,
            backend=backend,
            deterministic_closure=deterministic_closure,
            armijo=armijo,
            estimate_noise=estimate_noise,
            process_group=process_group,
            max_grad_norm=max_grad_norm,
            loss_scale=loss_scale,
            skip_trials=skip_trials,
        )


class AdamSLS(_ArmijoSLS):
    """ADAMSLS: Armijo line search on the Adam direction (arXiv 2403.18506, Eq. 3-5).

    Each step, with Adam moments ``m, v`` (bias-corrected ``m_hat, v_hat``) and ``P = 1/(sqrt(v_hat) + eps)``:

    - search direction ``d = -g*P`` (Adam with beta1 = 0, as Eq. 5 prescribes);
    - decrease term ``s = sum(g*g*P)``: the elementwise form of the paper's ``||g||^2/sqrt(v_hat + eps)``, as the
      authors' code computes it;
    - starting from ``eta0 = eta_prev * gamma**(1/n_batches_per_epoch)`` (Eq. 2), accept the first eta in
      ``eta0 * beta_b**j`` with ``f(w0 + eta*d) <= f(w0) - c*eta*s``.

    With ``betas[0] > 0`` the search still uses the momentum-free ``d``, and after acceptance the applied step is
    ``w = w0 + eta * (-m_hat*P)``, as in the authors' code (``on_failure="last"`` keeps the last trial along ``d``).

    Default ``betas=(0.9, 0.999)``: what the authors' experiments ran (their code's ``momentum=0.9``); chosen by
    measurement over seeds on the two demo tasks (``benchmarks/results/defaults.md``). The paper's text (Eq. 5)
    reads as ``betas=(0.0, 0.999)``: the searched point is then the update, and no first-moment buffer is allocated
    (4 bytes of state per parameter less).

    State per fp32 parameter: the moments and the snapshot ``w0``, 12 bytes (8 with ``betas[0] == 0``: torch's fused
    Adam keeps 8); the search direction is not stored but recomputed at every trial from the gradient and the moments,
    bit for bit as Pass A computed it (``benchmarks/results/memory.md``: the accepted step got faster, each extra trial
    reads 16 bytes per element instead of 12).

    Args:
        params: parameters or param groups. Line-search hyperparameters must be equal in every group (all groups
            share one step size); ``betas`` and ``eps`` may differ per group.
        init_step_size (float, default 0.1), c (float, default 0.1), beta_b (float, default 0.9),
        gamma (float, default 2.0), n_batches_per_epoch (int, default 500), max_backtracks (int, default 100),
        on_failure (str, default "revert"), deterministic_closure (bool, default True), backend (str, "auto"),
        armijo (str, default "noise_aware"), estimate_noise (bool, default False), process_group (default None),
            backtracking (str, default "geometric"): as in :class:`SGDSLS` (``init_step_size`` may be ``"auto"``).
        weight_decay (float, default 0.0), max_grad_norm (float, optional), loss_scale (optional), skip_trials
            (default False): as in :class:`SGDSLS`, which also describes ``"lr"`` and the step-size cap.
        betas (tuple, default (0.9, 0.999)): Adam's beta1 (of the applied step; the search uses 0), beta2.
        eps (float, default 1e-8): added to ``sqrt(v_hat)``.
    """

    _mode = MODE_ADAM

    def __init__(
        self,
        params: Iterable,
        init_step_size: float | str = 0.1,
        c: float = 0.1,
        beta_b: float = 0.9,
        gamma: float = 2.0,
        n_batches_per_epoch: int = 500,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_backtracks: int = 100,
        on_failure: str = "revert",
        deterministic_closure: bool = True,
        backend: str = "auto",
        armijo: str = "noise_aware",
        estimate_noise: bool = False,
        process_group: Any = None,
        backtracking: str = "geometric",
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        loss_scale: str | float | None = None,
        skip_trials: bool | str = False,
    ):
        defaults = dict(
            init_step_size=init_step_size,
            c=c,
            beta_b=beta_b,
            gamma=gamma,
            n_batches_per_epoch=n_batches_per_epoch,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            max_backtracks=max_backtracks,
            on_failure=on_failure,
            backtracking=backtracking,
            weight_decay=weight_decay,
        )
        super().__init__(
            params,
            defaults,
            backend=backend,
            deterministic_closure=deterministic_closure,
            armijo=armijo,
            estimate_noise=estimate_noise,
            process_group=process_group,
            max_grad_norm=max_grad_norm,
            loss_scale=loss_scale,
            skip_trials=skip_trials,
        )

    def _needs(self) -> tuple[bool, bool, bool]:
        return True, self._has_momentum, self._has_momentum


def __getattr__(name: str) -> Any:
    # PLASLS lives in lsfused.optim.plasls; this name keeps imports and pickles from before the move working.
    if name == "PLASLS":
        from lsfused.optim.plasls import PLASLS

        return PLASLS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
