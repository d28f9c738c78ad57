"""backtracking="interpolate" and init_step_size="auto" (issue 16).

The formulas are checked against hand-worked polynomials, the safeguards against adversarial trial losses, the
optimizers end to end on one-element problems worked out by hand, and the decisions across backends. The trajectories
of both rules against an independent float64 re-implementation are in ``test_equations.py`` (``*_interpolate``
cases; the geometric cases there pin the default rule to the equations of the paper).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lsfused
from lsfused import diagnostics
from lsfused.optim.interpolation import AIM, HI, HI_FAR, LO, Interpolator, auto_start, boundary_step

DTYPE = torch.float64


# ------------------------------------------------------------------------------------------------ the formulas


def test_boundary_step_of_a_hand_worked_parabola():
    # phi = 2 - 4x + 8x^2 (seen at a = 1: phi = 6, or at a = 0.5: phi = 2); the Armijo test with c = 0.1
    # (k = c*4 = 0.4): 2 - phi(x) >= 0.4x <=> 8x^2 <= 3.6x <=> x <= 0.45, 1.8 times the minimiser 0.25
    assert boundary_step(2.0, -4.0, 1.0, 6.0, 0.4) == pytest.approx(0.45, rel=1e-15)
    assert boundary_step(2.0, -4.0, 0.5, 2.0, 0.4) == pytest.approx(0.45, rel=1e-15)
    # k = 0: the model's own root 2 - phi(x) = 0, x = 0.5
    assert boundary_step(2.0, -4.0, 1.0, 6.0, 0.0) == 0.5
    # an offset (SaLSa's smoothed test): 2 - phi(x) >= 4.4x - 0.2 <=> 8x^2 + 0.4x - 0.2 <= 0, larger root
    # (-0.4 + sqrt(0.16 + 6.4)) / 16 = 0.1351...
    want = (-0.4 + math.sqrt(0.16 + 6.4)) / 16.0
    assert boundary_step(2.0, -4.0, 1.0, 6.0, 4.4, 0.2) == pytest.approx(want, rel=1e-14)


@pytest.mark.parametrize("s", [1e-200, 1e-170, 1e170])
def test_boundary_step_survives_extreme_scales(s):
    # the same parabola scaled to x ~ s: phi(x) = 2 - 4x/s + 8x^2/s^2 (b^2 would under- or overflow at these scales)
    assert boundary_step(2.0, -4.0 / s, s, 6.0, 0.4 / s) == pytest.approx(0.45 * s, rel=1e-14)
    assert boundary_step(2.0, -4.0 / s, s, 6.0, 4.4 / s, 0.2) == pytest.approx(
        (-0.4 + math.sqrt(0.16 + 6.4)) / 16.0 * s, rel=1e-13
    )
    # a negative offset (a test stricter than Armijo's): 8x^2 - 3.6x + 0.2 <= 0, larger root (3.6 + sqrt(6.56))/16
    assert boundary_step(2.0, -4.0 / s, s, 6.0, 0.4 / s, -0.2) == pytest.approx(
        (3.6 + math.sqrt(12.96 - 6.4)) / 16.0 * s, rel=1e-13
    )


def test_no_boundary_when_the_model_has_none():
    assert math.isnan(boundary_step(1.0, -1.0, 1.0, 0.0, 0.1))  # below the tangent: concave
    assert math.isnan(boundary_step(1.0, 1.0, 1.0, 5.0, 0.1))  # ascent slope
    assert math.isnan(boundary_step(1.0, -1.0, 1.0, 5.0, 2.0))  # the test asks for more than the slope gives
    assert math.isnan(boundary_step(1.0, -1.0, 1.0, 5.0, math.inf))


def test_interpolator_aims_inside_the_boundary_of_the_latest_trial():
    # phi(x) = 1 - x + 10x^2 - 6x^3, c*s = 0.1: from a = 1 (phi = 4) the quadratic has B = 4, boundary 0.9/4
    phi = lambda x: 1.0 - x + 10.0 * x * x - 6.0 * x**3  # noqa: E731
    it = Interpolator(1.0, -1.0, 0.1)
    eta1, rule1 = it.next(1.0, phi(1.0))
    assert rule1 == "quadratic" and eta1 == pytest.approx(AIM * 0.9 / 4.0, rel=1e-15)
    # the next rejection fits the quadratic through (eta1, phi(eta1)) alone
    eta2, rule2 = it.next(eta1, phi(eta1) + 0.05)
    b = (phi(eta1) + 0.05 - 1.0 + eta1) / eta1**2
    assert rule2 == "quadratic" and eta2 == pytest.approx(AIM * 0.9 / b, rel=1e-13)


# ------------------------------------------------------------------------------------------------ safeguards


@pytest.mark.parametrize(
    "ft, k, rule, factor",
    [
        (math.nan, 0.1, "safeguard", LO),
        (math.inf, 0.1, "safeguard", LO),
        (-math.inf, 0.1, "safeguard", LO),
        (1e300, 0.1, "safeguard", LO),  # rising far: the boundary is tiny -> clamped up
        (1.0, 0.1, "safeguard", HI_FAR),  # equal to f0, a far miss: boundary 0.9*AIM of the step -> clamped to 0.5
        (0.991, 0.1, "safeguard", HI_FAR),  # decrease 0.009 < NEAR * 0.02 asked: far, though the model says 0.9
        (0.985, 0.1, "safeguard", HI),  # a near miss (0.015 of 0.02): boundary 0.973*AIM of it -> clamped to 0.9
        (0.96, 0.3, "quadratic", AIM * 0.14 / 0.16),  # a near miss (0.04 of 0.06) inside the interval
    ],
)
def test_adversarial_first_trial_losses(ft, k, rule, factor):
    # f0 = 1, slope -1, a trial at 0.2: the test asks for a decrease of 0.2*k
    eta, got = Interpolator(1.0, -1.0, k).next(0.2, ft)
    assert got == rule and eta == pytest.approx(factor * 0.2, rel=1e-14)


@pytest.mark.parametrize("slope", [0.0, 1.0, math.nan, math.inf, -math.inf])
def test_unusable_slope_falls_back_to_the_upper_bound(slope):
    assert Interpolator(1.0, slope, 0.1).next(0.2, 0.5) == (HI * 0.2, "safeguard")  # the loss fell: a near miss
    assert Interpolator(1.0, slope, 0.1).next(0.2, 3.0) == (HI_FAR * 0.2, "safeguard")  # it rose: a far miss


def test_safeguards_never_shrink_less_than_the_geometric_factor():
    # SaLSa's shrink 0.8: a near miss is clamped to 0.8, not 0.9; a factor below LO lowers both bounds to it
    assert Interpolator(1.0, -1.0, 0.1, shrink=0.8).next(0.2, 0.985) == pytest.approx((0.8 * 0.2, "safeguard"))
    it = Interpolator(1.0, -1.0, 0.1, shrink=0.05)
    assert it.next(0.2, 1.0) == (0.05 * 0.2, "safeguard") and it.next(0.2, math.nan) == (0.05 * 0.2, "safeguard")


@settings(max_examples=300, deadline=None)
@given(
    f0=st.floats(-1e6, 1e6),
    slope=st.one_of(st.floats(-1e12, 1e12), st.sampled_from([math.nan, math.inf, -math.inf, 0.0])),
    k=st.one_of(st.floats(0.0, 1e12), st.sampled_from([math.inf, math.nan])),
    offset=st.one_of(st.floats(-1e6, 1e6), st.sampled_from([math.nan])),
    losses=st.lists(
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e3, 1e3)), min_size=1, max_size=8
    ),
    eta0=st.floats(1e-300, 1e3),
    shrink=st.floats(1e-3, 0.999),
)
def test_any_trial_losses_give_a_finite_positive_shrinking_step(f0, slope, k, offset, losses, eta0, shrink):
    it, eta = Interpolator(f0, slope, k, offset, shrink), eta0
    hi = min(HI, shrink)
    for ft in losses:
        new, rule = it.next(eta, ft)
        assert math.isfinite(new) and new > 0.0, (eta, ft, new)
        assert new <= hi * eta or new == 5e-324, (eta, ft, new)
        assert new >= min(LO, hi) * eta * (1 - 1e-15) or new == 5e-324
        assert rule in ("quadratic", "safeguard")
        eta = new


def test_step_never_reaches_zero():
    assert Interpolator(1.0, -1.0, 0.1).next(5e-324, math.nan)[0] == 5e-324


# ------------------------------------------------------------------------------------------------ end to end


def quadratic_problem(k: float, w_start: float):
    """``f(w) = 0.5*k*w^2`` on one float64 element: SGD direction -k*w, minimiser along it at eta = 1/k."""
    w = nn.Parameter(torch.tensor([w_start], dtype=DTYPE))
    return w, lambda: 0.5 * k * (w * w).sum()


def test_sgdsls_first_interpolated_step_is_inside_the_exact_boundary_and_is_accepted():
    # k = 4, w0 = 1: eta0 = 1 overshoots to w = -3 (f = 18 > 2); g·d = -16, so the quadratic through f(0) = 2,
    # slope -16 and f(1) = 18 is the loss itself, and its Armijo boundary (c = 0.1) is the loss's:
    # 2(1 - 4 eta)^2 <= 2 - 1.6 eta <=> eta <= 14.4/32 = 0.45. The next trial is AIM times it, accepted.
    w, closure = quadratic_problem(4.0, 1.0)
    opt = lsfused.SGDSLS([w], init_step_size=1.0, gamma=1.0, backtracking="interpolate", backend="torch")
    rec = diagnostics.Recorder(opt)
    opt.step(closure)
    assert (opt.last_step.outcome, opt.last_step.trials) == ("accepted", 2)
    assert opt.last_step.step_sizes[0] == pytest.approx(AIM * 0.45, rel=1e-15)
    assert w.item() == pytest.approx(1.0 - 4.0 * AIM * 0.45, rel=1e-14)
    assert [t["rule"] for t in rec.rows[0]["trials"]] == ["init", "quadratic"]
    # geometric backtracking tries 1, 0.9, 0.81, ... until the Armijo test holds (eta <= 1.8/k = 0.45)
    w2, closure2 = quadratic_problem(4.0, 1.0)
    geo = lsfused.SGDSLS([w2], init_step_size=1.0, gamma=1.0, backend="torch")
    rec2 = diagnostics.Recorder(geo)
    geo.step(closure2)
    want = next(j for j in range(100) if 0.5 * 4 * (1 - 4 * 0.9**j) ** 2 <= 2 - 0.1 * 0.9**j * 16) + 1
    assert geo.last_step.trials == want > 2
    assert [t["rule"] for t in rec2.rows[0]["trials"]] == ["init"] + ["geometric"] * (want - 1)


def test_nan_trials_shrink_by_lo_and_on_failure_reverts():
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=DTYPE))
    calls = []

    def closure():
        calls.append(1)
        loss = (w * w).sum()
        return loss if len(calls) == 1 else loss * math.nan

    opt = lsfused.SGDSLS([w], init_step_size=1.0, gamma=1.0, max_backtracks=3, backtracking="interpolate")
    rec = diagnostics.Recorder(opt)
    before = w.detach().clone()
    opt.step(closure)
    assert opt.last_step.outcome == "failed" and torch.equal(w.detach(), before)
    assert [t["eta"] for t in rec.rows[0]["trials"]] == [1.0, LO, LO * LO]
    assert [t["rule"] for t in rec.rows[0]["trials"]] == ["init", "safeguard", "safeguard"]
    assert opt.last_step.step_sizes == (LO * LO,)


@pytest.mark.parametrize("backtracking", ["geometric", "interpolate"])
def test_noise_aware_ties_end_the_search_the_same_way(backtracking):
    # the loss is constant: the trials tie with f(w0) twice -> "unresolvable", step size kept at the first tie
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=DTYPE))
    opt = lsfused.SGDSLS([w], init_step_size=1.0, gamma=1.0, backtracking=backtracking)

    def closure_with_grad():  # f(w0) = 5 with a gradient; every trial returns 5 again
        loss = (w * w).sum()
        return loss if torch.is_grad_enabled() else torch.tensor(5.0, dtype=DTYPE)

    opt.step(closure_with_grad)
    assert (opt.last_step.outcome, opt.last_step.reason, opt.last_step.trials) == ("unresolvable", "noise", 2)
    assert opt.last_step.step_sizes == (1.0,) and torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=DTYPE))


def test_geometric_is_the_default_and_bit_identical_to_passing_it():
    def run(**kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
        opt = lsfused.AdamSLS(model.parameters(), init_step_size=3.0, **kw)
        recs = []
        for _ in range(6):
            opt.step(lambda: nn.functional.cross_entropy(model(x), y))
            recs.append(opt.last_step)
        return [p.detach().clone() for p in model.parameters()], recs

    pa, ra = run()
    pb, rb = run(backtracking="geometric")
    pc, rc = run(backtracking="interpolate")
    assert all(torch.equal(a, b) for a, b in zip(pa, pb, strict=True)) and ra == rb
    assert any(r.trials > 1 for r in ra) and ra != rc  # the option does change something


# ------------------------------------------------------------------------------------------------ init_step_size="auto"


def test_auto_start_is_the_armijo_bound_for_a_nonnegative_loss():
    assert auto_start(2.0, 0.1, 16.0) == 2.0 / 1.6
    assert auto_start(0.0, 0.1, 1.0) is None and auto_start(-1.0, 0.1, 1.0) is None
    assert auto_start(1.0, 0.1, 0.0) is None


def test_sgdsls_auto_first_trial_and_state():
    # f = 0.5*4*w^2 at w0 = 1: f0 = 2, s = ||g||^2 = 16, c = 0.1 -> first trial at 2/(0.1*16) = 1.25
    w, closure = quadratic_problem(4.0, 1.0)
    opt = lsfused.SGDSLS([w], init_step_size="auto", gamma=1.0)
    assert opt.param_groups[0]["step_size"] == 0.0  # not chosen yet
    state = opt.state_dict()
    rec = diagnostics.Recorder(opt)
    opt.step(closure)
    first = rec.rows[0]["trials"][0]
    assert (first["eta"], first["rule"]) == (2.0 / (0.1 * 16.0), "auto")
    chosen = opt.param_groups[0]["step_size"]
    assert chosen > 0.0
    opt.step(closure)
    assert rec.rows[1]["trials"][0]["rule"] == "grow"
    # a state saved before the first step restores the pending choice
    w2, closure2 = quadratic_problem(4.0, 1.0)
    opt2 = lsfused.SGDSLS([w2], init_step_size="auto", gamma=1.0)
    opt2.load_state_dict(state)
    opt2.step(closure2)
    assert opt2.param_groups[0]["step_size"] == chosen


def test_auto_with_a_negative_loss_warns_once_and_uses_the_default():
    w = nn.Parameter(torch.tensor([1.0], dtype=DTYPE))
    opt = lsfused.AdamSLS([w], init_step_size="auto")
    rec = diagnostics.Recorder(opt)
    with pytest.warns(UserWarning, match="auto"):
        opt.step(lambda: (w * w).sum() - 10.0)
    assert rec.rows[0]["trials"][0]["eta"] == 0.1


def test_plasls_auto_searches_the_whole_network_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)
    x, y = torch.randn(16, 4, dtype=DTYPE), torch.randint(0, 2, (16,))
    opt = lsfused.PLASLS([[p] for p in model.parameters()], init_step_size="auto", full_search_steps=0)
    opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    assert opt.last_step.searched == (0, 1, 2, 3)
    assert len(set(opt.last_step.step_sizes)) == 1 and opt.last_step.step_sizes[0] > 0.0
    opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    assert len(opt.last_step.searched) == 1


@pytest.mark.parametrize("cls", [lsfused.AdamSLS, lsfused.SGDSLS, lsfused.SaLSa])
def test_bad_options_are_refused(cls):
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="backtracking must be one of"):
        cls([w], backtracking="cubic")
    message = r"init_step_size must be a positive finite number, got 'automatic' \(or 'auto'\)"
    with pytest.raises(ValueError, match=message):
        cls([w], init_step_size="automatic")
    with pytest.raises(ValueError, match="init_step_size"):
        cls([w], init_step_size=-1.0)


def test_salsa_auto_and_interpolate_rules_recorded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    x, y = torch.randn(32, 4, dtype=DTYPE), torch.randint(0, 3, (32,))
    opt = lsfused.SaLSa(model.parameters(), init_step_size="auto", backtracking="interpolate", speed_up=False)
    rec = diagnostics.Recorder(opt)
    for _ in range(5):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    rules = [t["rule"] for r in rec.rows for t in r["trials"]]
    assert rules[0] == "auto" and "grow" in rules
    assert set(rules) <= {"auto", "grow", "quadratic", "safeguard"}
    summary = diagnostics.format_summary(diagnostics.summarize(rec.rows))
    assert "trials by the rule" in summary and "auto" in summary


# ------------------------------------------------------------------------------------------------ backends


def _backend_run(backend: str, name: str) -> tuple[list, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 6, generator=gen), torch.randint(0, 4, (32,), generator=gen)) for _ in range(3)]
    if name == "plasls":
        opt = lsfused.PLASLS(
            [[p] for p in model.parameters()],
            init_step_size=2.0,
            joint_check=True,
            backtracking="interpolate",
            backend=backend,
        )
    elif name == "salsa":
        opt = lsfused.SaLSa(model.parameters(), init_step_size=5.0, backtracking="interpolate", backend=backend)
    else:
        opt = lsfused.AdamSLS(model.parameters(), init_step_size="auto", backtracking="interpolate", backend=backend)
    rec = diagnostics.Recorder(opt)
    for k in range(9):
        x, y = data[k % 3]
        opt.step(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y))
    decisions = [
        (r["outcome"], r["step_sizes"], [(t["eta"], t["tau"], t["rule"]) for t in r["trials"]]) for r in rec.rows
    ]
    return decisions, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["adamsls", "plasls", "salsa"])
def test_decisions_agree_across_backends(name):
    if "cpp" not in lsfused.backends():
        pytest.skip("the C++ backend is not built here")
    want, wp = _backend_run("torch", name)
    got, gp = _backend_run("cpp", name)
    assert got == want
    assert all(torch.equal(a, b) for a, b in zip(gp, wp, strict=True))
    rules = {rule for _, _, trials in want for *_, rule in trials}
    assert rules & {"quadratic", "safeguard"}, rules


def test_warnings_are_not_raised_by_default_runs():
    w, closure = quadratic_problem(4.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lsfused.SGDSLS([w], init_step_size="auto", backtracking="interpolate").step(closure)
