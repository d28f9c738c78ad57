"""SaLSa / ALSALS: smoothed Armijo line search with Adam momentum (Kenneweg et al., arXiv 2403.18519)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lsfused.optim import acceptance, interpolation, validation
from lsfused.optim.acceptance import SearchResult
from lsfused.optim.base import LineSearchOptimizer
from lsfused.reference import MODE_ADAM

_GATE = 1e-8  # below this loss or smoothed decrease term the search is not run
_BIAS_CORRECTIONS = ("standard", "authors")


class SaLSa(LineSearchOptimizer):
    """SaLSa: stable Armijo line search adaptation with Adam (ALSALS of arXiv 2403.18519, as in the authors' SaLSA).

    Per step k, with Adam moments (standard bias correction), ``P = 1/(sqrt(v_hat) + eps)``, search direction
    ``d = -g*P`` (or ``d = -m_hat*P`` when ``use_momentum_direction``) and ``s = -g·d``:

    - decoupled weight decay on the snapshot: ``w0 = w * (1 - weight_decay*eta_prev)``;
    - ``eta0 = growth * eta_prev``;
    - smoothed decrease term ``G_k = a*G_{k-1} + (1-a)*s_k`` with ``a = smoothing``, updated on the steps that run
      the search decision (speed-up skips leave it unchanged);
    - trial ``w = w0 + eta*d``; smoothed observed decrease ``D = a*D_{k-1} + (1-a)*(f(w0) - f(w0 + eta*d))``;
    - accept when ``D >= c*eta*G_k`` (the smoothed Armijo condition of the paper, Section 3; the summary available to
      us numbers no equations), then ``D_k = D``; else ``eta *= shrink``. An observed decrease of exactly 0 is
      accepted without updating D (the authors' rule); a non-finite trial loss is rejected.
    - With ``speed_up`` the search is skipped once the step size is stable: with fast/slow EMAs (0.9/0.99, both
      starting at 1e-8) of the step size stored after every search (failed ones included) and
      ``r = max(fast/slow, slow/fast)``, a search runs once the steps since the last search reach
      ``min(10, 1/(r - 1 + 1e-8))`` (and always in the first 10 steps). A skipped step applies Adam's step
      ``w = w0 - eta0*m_hat*P`` without changing the stored step size (outcome ``"skipped"``); so does a step whose
      loss or ``G_k`` is below 1e-8.
    - When all ``max_backtracks`` trials fail the last trial is kept and the step size becomes ``shrink`` times the
      last one tried (outcome ``"failed"``), as in the authors' code.

    The EMAs ``G``, ``D`` are not bias-corrected (the authors' code). An accepted search keeps the trial point as the
    update.

    Differences from the authors' SaLSA (``SaLSA.py`` of their repository), as measured side by side with their code
    on the MiniLM demo task with dropout 0: final results are close (train loss 0.576 vs 0.579, test accuracy 0.920
    vs 0.9225 after 80 steps), but the trajectories part from step 1, only because of the first item:

    - Adam's bias correction: theirs divides by ``1 - b**(k+1)`` at step ``k`` (their step counter is incremented
      before the moments are scaled by ``step + 1``), one step off; ours by ``1 - b**k`` (torch.optim.Adam's).
      ``bias_correction="authors"`` reproduces theirs; with it their code and ours took the same decision at all 80
      steps, with bit-equal step sizes.
    - Forced searches: a search runs on every one of the first 10 steps here, on the first 9 in theirs (their
      ``step < 10`` after the increment).
    - Below the gate: when the loss is below 1e-8 (theirs: exactly 0) or ``G_k`` is below 1e-8, their code takes the
      momentum step at ``eta0`` and stores ``eta0 = growth * eta_prev`` as the new step size (and evaluates the
      closure once more); ours takes the same step as a skipped step, keeping the stored step size.
    With ``armijo="noise_aware"`` (default) a rejected trial whose instantaneous predicted decrease ``c*eta*s_k``
    and measured difference are both within the loss's rounding bound, or whose update is absorbed by rounding,
    ends the search as ``"unresolvable"``: w0 is kept and the step size is not shrunk further (see
    :class:`lsfused.SGDSLS`);
    ``armijo="classic"`` never does this.

    Args:
        params: parameters or param groups; search hyperparameters must match across groups, ``betas``, ``eps``
            and ``weight_decay`` may differ.
        init_step_size (float, default 1.0), c (float, default 0.5), betas (tuple, default (0.9, 0.999)),
        smoothing (float, default 0.9), growth (float, default 1.1), shrink (float, default 0.8),
        max_backtracks (int, default 100), use_momentum_direction (bool, default False), speed_up (bool, default
        True), weight_decay (float, default 0.0), deterministic_closure (bool, default True),
        backend (str, default "auto"): as described above.
        eps (float, default 1e-8): added to ``sqrt(v_hat)``.
        armijo (str, default "noise_aware"), estimate_noise (bool, default False), process_group (default None): as
            in :class:`lsfused.SGDSLS`.
        bias_correction (str, default "standard"): ``"standard"``: ``m_hat = m/(1 - b1**k)``,
            ``v_hat = v/(1 - b2**k)`` at step k; ``"authors"``: ``1 - b**(k+1)`` instead, as the authors' SaLSA does
            (for reproducing their runs).
        init_step_size may be ``"auto"``: the first search starts at ``(a*D_prev + (1-a)*f(w0))/(c*G)``, the largest
            step the smoothed test can accept when the loss is >= 0 (``f(w0)/(c*s)`` on the first step).
        backtracking (str, default "geometric"): ``"geometric"`` is ``eta *= shrink``; ``"interpolate"`` as in
            :class:`lsfused.SGDSLS`: the model is of the raw loss along the searched ray, ``phi(eta) = f(w0 +
            eta*d)``, built from ``f(w0)``, the slope ``g·d`` (``g·dm`` with ``use_momentum_direction``) and the
            latest rejected trial loss, and the next step aims at where that model meets the smoothed test
            ``a*D_prev + (1-a)*(f(w0) - phi(eta)) >= c*eta*G``. The acceptance test stays the smoothed one, and a
            failed search still ends at ``shrink`` times the last trial.
        armijo (str, default "noise_aware"), estimate_noise (bool, default False), process_group (default None),
        max_grad_norm (float, optional), loss_scale (optional), skip_trials (default False): as in
            :class:`lsfused.SGDSLS`, which also describes ``"lr"`` and the step-size cap (all groups share one step
            size: the smallest cap applies). ``skip_trials`` acts on the steps whose search runs (the speed-up
            rule's skips are not searches); a skipped trial is accepted as a first trial passing without an
            observed decrease (``D`` unchanged).
    """

    _mode = MODE_ADAM
    _search_keys = (
        "init_step_size",
        "c",
        "smoothing",
        "growth",
        "shrink",
        "max_backtracks",
        "use_momentum_direction",
        "speed_up",
        "backtracking",
    )

    def __init__(
        self,
        params: Iterable,
        init_step_size: float = 1.0,
        c: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        smoothing: float = 0.9,
        growth: float = 1.1,
        shrink: float = 0.8,
        max_backtracks: int = 100,
        use_momentum_direction: bool = False,
        speed_up: bool = True,
        weight_decay: float = 0.0,
        deterministic_closure: bool = True,
        backend: str = "auto",
        eps: float = 1e-8,
        armijo: str = "noise_aware",
        estimate_noise: bool = False,
        process_group: Any = None,
        bias_correction: str = "standard",
        backtracking: str = "geometric",
        max_grad_norm: float | None = None,
        loss_scale: str | float | None = None,
        skip_trials: bool | str = False,
    ):
        validation.choice("bias_correction", bias_correction, _BIAS_CORRECTIONS)
        self.bias_correction = bias_correction
        defaults = dict(
            init_step_size=init_step_size,
            c=c,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            smoothing=smoothing,
            growth=growth,
            shrink=shrink,
            max_backtracks=max_backtracks,
            use_momentum_direction=use_momentum_direction,
            speed_up=speed_up,
            weight_decay=weight_decay,
            backtracking=backtracking,
        )
        self._smoothed = {"G": 0.0, "D": 0.0, "fast": 1e-8, "slow": 1e-8, "since_search": 0, "s_now": 0.0}
        self._auto_warned = False
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

    def _validate_group(self, group: dict[str, Any]) -> None:
        interpolation.validate(group)
        validation.open_interval("c", group["c"], 0.0, 1.0)
        validation.betas(group["betas"])
        validation.in_range("smoothing", group["smoothing"], 0.0, 1.0)
        validation.finite_at_least("growth", group["growth"], 1.0)
        validation.open_interval("shrink", group["shrink"], 0.0, 1.0)
        validation.int_at_least("max_backtracks", group["max_backtracks"], 1)
        validation.boolean("use_momentum_direction", group["use_momentum_direction"])
        validation.boolean("speed_up", group["speed_up"])
        validation.finite_at_least("weight_decay", group["weight_decay"], 0.0)
        validation.finite_at_least("eps", group["eps"], 0.0)

    def _needs(self) -> tuple[bool, bool, bool]:
        return True, True, True

    def _hp(self, bucket, k: int) -> list[float]:
        # The authors' SaLSA bias-corrects step k with the factors of step k + 1.
        return super()._hp(bucket, k + 1 if self.bias_correction == "authors" else k)

    def _signature(self) -> str:
        return super()._signature() + repr(self.bias_correction)

    def _speed_up_search(self, since_search: int) -> bool:
        """Whether this step runs the search decision (speed-up rule), ``since_search`` counting this step."""
        g0, st = self.param_groups[0], self._smoothed
        r = st["fast"] / st["slow"]
        r = 1.0 / r if r < 1.0 else r
        needed = min(10.0, 1.0 / ((r - 1.0) + 1e-8))
        return not g0["speed_up"] or self._step_count + 1 <= 10 or since_search >= needed

    def _growth(self, search: bool) -> float:
        """``growth``; 1 on a step whose search skips its trial (``skip_trials``: it holds the step size)."""
        return 1.0 if search and self._skip_plan == "skip" else self.param_groups[0]["growth"]

    def _grown_step_size(self, search: bool) -> float:
        """This step's first step size, ``growth * eta_prev`` under every group's cap."""
        eta = self.param_groups[0]["step_size"] * self._growth(search)
        return min(self._capped(i, eta) for i in range(self.n_groups))

    def _first_trial(self) -> tuple[dict[int, float], str] | None:
        """``eta0 = growth * eta_prev`` (under the caps) on every group, for Pass A to write: along the search
        direction when the speed-up rule runs the search (the loss gate, decided after Pass A, may still turn it
        into a skip), else along ``dm``, the skipped step's update. None before the first search of
        ``init_step_size="auto"``, whose first step size needs Pass A's sums."""
        if self._auto_pending():
            return None
        g0 = self.param_groups[0]
        search = self._speed_up_search(self._smoothed["since_search"] + 1)
        eta0 = self._grown_step_size(search)
        direction = "dm" if not search or g0["use_momentum_direction"] else "d"
        return dict.fromkeys(range(self.n_groups), eta0), direction

    def _search(self, run, f0: float, sums: Tensor) -> tuple[SearchResult, tuple[int, ...], Any]:
        g0, st = self.param_groups[0], self._smoothed
        a = g0["smoothing"]
        first_rule = "init" if self._step_count == 0 else "grow"
        eta_prev = g0["step_size"]
        st["since_search"] += 1
        groups = tuple(range(self.n_groups))
        search = self._speed_up_search(st["since_search"])
        uncapped = eta_prev * self._growth(search)
        eta0 = self._grown_step_size(search)
        if search:
            st["since_search"] = 0
            # s = -g·d for the chosen direction: sum(g*g*P), or sum(g*m_hat*P) = -g·dm
            s = -float(sums[:, 4].sum()) if g0["use_momentum_direction"] else float(sums[:, 0].sum())
            st["G"] = a * st["G"] + (1.0 - a) * s
            st["s_now"] = s
            search = f0 >= _GATE and st["G"] >= _GATE
        auto = self._auto_pending()  # the first search picks the step size (eta_prev is still 0.0)
        if not search or (eta0 == 0.0 and not auto):
            self._apply(dict.fromkeys(groups, eta0), "dm")
            return SearchResult("skipped", eta0, 0, None, "cap" if search else None), (), None
        G, D_prev, c = st["G"], st["D"], g0["c"]
        if auto:
            # The smoothed test needs a*D_prev + (1-a)*(f0 - ft) >= c*eta*G; with ft >= 0 that bounds eta by
            # (a*D_prev + (1-a)*f0)/(c*G), which is f0/(c*s) on the first search.
            eta0, first_rule = interpolation.auto_start(a * D_prev + (1.0 - a) * f0, c, G), "auto"
            if eta0 is None:
                eta0 = 1.0
                if not self._auto_warned:
                    self._auto_warned = True
                    warnings.warn(
                        f'init_step_size="auto" needs a positive loss, but the loss is {f0!r}; starting from 1.0',
                        stacklevel=4,
                    )
            eta0 = min(self._capped(i, eta0) for i in groups)
        accepted_D = []

        def decrease(eta: float, ft: float) -> bool:
            raw = f0 - ft
            if raw == 0.0:
                return True
            dec = a * D_prev + (1.0 - a) * raw
            if dec >= c * eta * G:
                accepted_D.append(dec)
                return True
            return False

        direction = "dm" if g0["use_momentum_direction"] else "d"
        slope = float(sums[:, 4 if g0["use_momentum_direction"] else 2].sum())  # g·dm or g·d
        s_now = st["s_now"]
        result = self._armijo(
            run,
            f0,
            list(groups),
            eta0,
            decrease,
            lambda eta: c * eta * s_now,
            g0["shrink"],
            g0["max_backtracks"],
            direction,
            slope=slope,
            first_rule=first_rule,
            line=(c * G / (1.0 - a), a * D_prev / (1.0 - a)),  # the smoothed test as f0 - ft >= k*eta - offset
            may_skip=not auto,
        )
        if accepted_D:
            st["D"] = accepted_D[-1]
        if result.outcome == "unresolvable":
            self._restore()  # keep w0 and the current step size; the EMAs are left as they are
            for group in self.param_groups:
                group["step_size"] = result.eta
            return result, groups, None
        eta = acceptance.settled_step_size(eta_prev, eta0, uncapped, result)
        eta = eta if result.outcome == "accepted" else result.eta * g0["shrink"]
        for group in self.param_groups:
            group["step_size"] = eta
        st["fast"] = 0.9 * st["fast"] + 0.1 * eta
        st["slow"] = 0.99 * st["slow"] + 0.01 * eta
        return result, groups, None

    def _extra_state(self) -> dict[str, Any]:
        return dict(self._smoothed)

    def _check_extra_state(self, extra: dict[str, Any], saved_groups: list[dict[str, Any]]) -> None:
        missing = set(self._smoothed) - set(extra)
        if missing:
            raise ValueError(f"state_dict lacks SaLSa smoothing state {sorted(missing)}")
        for key in ("G", "D", "s_now"):
            validation.finite(f"state_dict SaLSa state {key}", extra[key])
        for key in ("fast", "slow"):
            validation.positive(f"state_dict SaLSa state {key}", extra[key])
        validation.int_at_least("state_dict SaLSa state since_search", extra["since_search"], 0)

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._smoothed = {key: extra[key] for key in self._smoothed}


ALSALS = SaLSa
