"""``skip_trials``: steps that accept their first step size without evaluating the trial (issue 25).

References: the rule written again here from its docstring (``lsfused.optim.skipping``) and replayed on the records
of a run; ``skip_trials="measure"``, which must take the same decisions while evaluating every skipped trial; and
the update a skipped step must make, ``w0 + eta * d`` from the gradient, computed with torch.
"""

import copy
import io
import json
import math

import pytest
import torch
from conftest import assert_same, batches, mlp, snapshot
from torch import nn

import lsfused
from lsfused.optim import skipping

DATA = batches(6)
STEPS = 24


def make(name, model, mode, **kw):
    if name == "sgdsls":
        return lsfused.SGDSLS(model.parameters(), skip_trials=mode, **kw)
    if name == "adamsls":
        return lsfused.AdamSLS(model.parameters(), skip_trials=mode, **kw)
    if name == "adamsls_b0":
        return lsfused.AdamSLS(model.parameters(), skip_trials=mode, betas=(0.0, 0.999), **kw)
    if name == "plasls":
        return lsfused.PLASLS(lsfused.components.by_layers(model, 2), skip_trials=mode, full_search_steps=3, **kw)
    return lsfused.SaLSa(model.parameters(), skip_trials=mode, **kw)


NAMES = ["sgdsls", "adamsls", "adamsls_b0", "plasls", "salsa"]


def closure_for(model, i):
    x, y = DATA[i % len(DATA)]
    return lambda: nn.functional.cross_entropy(model(x), y)


def train(name, mode, steps=STEPS, dropout=0.0, **kw):
    model = mlp(dropout=dropout)
    opt = make(name, model, mode, **kw)
    records = []
    for i in range(steps):
        opt.step(closure_for(model, i))
        records.append(opt.last_step)
    return model, opt, records


def replay_rule(records):
    """The rule from its docstring, driven by the tested steps' outcomes: the plan of every step whose search ran."""
    streak = since = 0
    plans = []
    for r in records:
        if r.skip_rule is None:  # no search ran (SaLSa's speed-up, a zero decrease term): the rule is not asked
            plans.append(None)
            continue
        plan = "unproven" if streak < skipping.AFTER else ("due" if since >= skipping.MAX_SKIPS else "skip")
        plans.append(plan)
        if plan == "skip":
            since += 1
        else:
            # MARGIN 0: a pass is a search that the acceptance test ended within SETTLED_TRIALS trials
            passed = r.outcome == "accepted" and r.trials <= skipping.SETTLED_TRIALS
            since, streak = 0, (streak + 1 if passed else 0)
    return plans


@pytest.mark.parametrize("name", NAMES)
def test_decisions_follow_the_rule_and_skipped_steps_call_the_closure_once(name):
    assert skipping.MARGIN == 0.0  # replay_rule reads a pass off the records under this setting
    _, _, records = train(name, True, dropout=0.5 if name == "salsa" else 0.0)
    assert [r.skip_rule for r in records] == replay_rule(records)
    skipped = [r for r in records if r.trial_skipped]
    assert skipped, "the run must skip some trials for this test to mean anything"
    for r in skipped:
        assert (r.outcome, r.trials, r.closure_calls, r.trial_loss, r.skip_rule) == ("accepted", 0, 1, None, "skip")
        assert r.skipped_trial_passed is None  # only measured with "measure"
    assert all(not r.trial_skipped for r in records if r.skip_rule != "skip")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backtracking", ["geometric", "interpolate"])
def test_measure_takes_the_same_decisions_and_evaluates_each_skipped_trial(name, backtracking):
    dropout = 0.5 if name in ("adamsls", "salsa") else 0.0  # masks: the measuring forward must not shift the RNG
    model_a, opt_a, rec_a = train(name, True, dropout=dropout, backtracking=backtracking)
    model_b, opt_b, rec_b = train(name, "measure", dropout=dropout, backtracking=backtracking)
    assert_same(snapshot(model_a, opt_a), snapshot(model_b, opt_b))
    for a, b in zip(rec_a, rec_b, strict=True):
        measured = b.skipped_trial_passed is not None
        assert measured == b.trial_skipped
        assert b.closure_calls == a.closure_calls + measured
        assert (a.step_sizes, a.outcome, a.trials, a.skip_rule) == (b.step_sizes, b.outcome, b.trials, b.skip_rule)


def test_measured_outcome_is_the_acceptance_test_at_the_skipped_point():
    """The measured flag against the loss recomputed here at w0 + eta*d (SGD: d = -g, no moments involved)."""
    model = mlp()
    opt = lsfused.SGDSLS(model.parameters(), skip_trials="measure", c=0.5, init_step_size=1.0)
    seen = 0
    for i in range(STEPS):
        closure = closure_for(model, i)
        w0 = [p.detach().clone() for p in model.parameters()]
        with torch.enable_grad():
            model.zero_grad()
            loss = closure()
            loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        eta = opt.param_groups[0]["step_size"]  # a skipped step holds it (no growth)
        opt.step(closure)
        r = opt.last_step
        if not r.trial_skipped:
            continue
        seen += 1
        with torch.no_grad():
            for p, w, g in zip(model.parameters(), w0, grads, strict=True):
                torch.testing.assert_close(p, w - eta * g, rtol=0, atol=1e-6)  # the skipped step's update
            ft = float(closure())
        s = math.fsum(float((g.double() ** 2).sum()) for g in grads)
        f0 = float(loss.detach())
        assert r.skipped_trial_passed == (f0 - ft >= 0.5 * eta * s)
        assert r.trial_loss == ft  # the measured loss is recorded
    assert seen


@pytest.mark.parametrize("name", ["adamsls", "plasls", "salsa"])
def test_resume_from_state_dict_is_bit_identical(name):
    model, opt, _ = train(name, True, steps=9)
    state = copy.deepcopy(opt.state_dict())
    assert state["param_groups"][0]["search_state"]["trial_skipping"] == opt._skipper.state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    model2 = mlp(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = make(name, model2, True)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for i in range(9, 20):
        opt.step(closure_for(model, i))
        opt2.step(closure_for(model2, i))
        assert opt.last_step == opt2.last_step
    assert_same(snapshot(model, opt), snapshot(model2, opt2))


def test_state_dicts_load_with_or_without_the_rule_state():
    model, opt, _ = train("adamsls", True, steps=6)
    plain = lsfused.AdamSLS(mlp().parameters())
    plain.load_state_dict(opt.state_dict())  # the rule's state is ignored by an optimizer without the option
    assert "trial_skipping" not in plain.state_dict()["param_groups"][0]["search_state"]
    fresh = lsfused.AdamSLS(mlp().parameters(), skip_trials=True)
    fresh.load_state_dict(plain.state_dict())  # a checkpoint without it starts the rule afresh
    assert fresh._skipper.state() == {"streak": 0, "since_test": 0}


@pytest.mark.parametrize("bad", [{"streak": -1, "since_test": 0}, {"streak": 1}, {"streak": 1.5, "since_test": 0}, 3])
def test_bad_rule_state_is_refused_without_changing_anything(bad):
    model, opt, _ = train("adamsls", True, steps=6)
    state = copy.deepcopy(opt.state_dict())
    for group in state["param_groups"]:
        group["search_state"]["trial_skipping"] = bad
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="trial_skipping"):
        opt.load_state_dict(state)
    assert_same(before, snapshot(model, opt))


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, "True"])
def test_bad_option_is_refused(bad):
    with pytest.raises(ValueError, match="skip_trials"):
        lsfused.AdamSLS(mlp().parameters(), skip_trials=bad)


@pytest.mark.parametrize("mode", [True, "measure"])
def test_an_interrupted_step_leaves_the_rule_state_as_before(mode):
    """A closure raising at a tested trial, or (measure) at the evaluation of a skipped one: parameters back at
    w0, step sizes and the rule's state as before the step."""
    model, opt, records = train("sgdsls", mode, steps=3)
    hit = 0
    for i in range(3, 20):
        calls = [0]
        inner = closure_for(model, i)

        def closure(calls=calls, inner=inner):
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("raised at the first trial")
            return inner()

        before = snapshot(model, opt)
        plan = opt._skipper.plan()
        if plan == "skip" and mode is True:
            opt.step(closure)  # nothing to raise at: one closure call
            assert opt.last_step.trial_skipped
            continue
        with pytest.raises(RuntimeError):
            opt.step(closure)
        hit += 1
        after = snapshot(model, opt)
        assert opt.last_step.outcome == "interrupted"
        assert after["trial_skipping"] == before["trial_skipping"]
        assert after["step_sizes"] == before["step_sizes"]
        assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("p"))
        opt.step(inner)  # training goes on
    assert hit


def test_recorder_and_summary_count_skipped_trials(tmp_path):
    from lsfused import diagnostics

    model = mlp()
    opt = lsfused.AdamSLS(model.parameters(), skip_trials="measure")
    recorder = diagnostics.Recorder(opt, tmp_path / "d.jsonl")
    records = []
    for i in range(STEPS):
        opt.step(closure_for(model, i))
        records.append(opt.last_step)
    recorder.detach()
    rows = recorder.rows
    assert [r["trial_skipped"] for r in rows] == [r.trial_skipped for r in records]
    assert [r["skip_rule"] for r in rows] == [r.skip_rule for r in records]
    summary = diagnostics.summarize(rows)
    skipped = [r for r in records if r.trial_skipped]
    assert summary["skipped_trials"] == len(skipped) > 0
    assert summary["skipped_trials_failing"] == sum(not r.skipped_trial_passed for r in skipped)
    assert "skipped trials" in diagnostics.format_summary(summary)


def test_measured_outcome_is_salsas_smoothed_test():
    """SaLSa's measured flag against its smoothed test recomputed from its state: a skipped step leaves ``D`` as it
    was and keeps the trial point, so ``f(trial)`` is the loss at the parameters after the step."""
    model = mlp()
    opt = lsfused.SaLSa(model.parameters(), skip_trials="measure", speed_up=False)
    a, c, seen = opt.param_groups[0]["smoothing"], opt.param_groups[0]["c"], 0
    for i in range(STEPS):
        closure = closure_for(model, i)
        d_prev = opt._smoothed["D"]
        opt.step(closure)
        r = opt.last_step
        if not r.trial_skipped:
            continue
        seen += 1
        assert opt._smoothed["D"] == d_prev
        with torch.no_grad():
            ft = float(closure())
        eta, big_g = r.step_sizes[0], opt._smoothed["G"]
        assert r.skipped_trial_passed == (a * d_prev + (1 - a) * (r.loss - ft) >= c * eta * big_g)
    assert seen


def test_diagnose_cli_reports_skipped_trials(tmp_path, capsys):
    from lsfused import cli

    out = tmp_path / "report"
    args = ["diagnose", "--optimizer", "adamsls", "--epochs", "1", "--skip-trials", "measure", "--out", str(out)]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["trial_skipped"]]
    assert skipped and all(r["skipped_trial_passed"] is not None for r in skipped)
    summary = (out / "summary.txt").read_text()
    failing = sum(not r["skipped_trial_passed"] for r in skipped)
    assert f"skipped trials (skip_trials): {len(skipped)} of {len(rows)} steps" in summary
    assert f"of which {failing} would have failed" in summary
    assert "skipped trials (skip_trials)" in capsys.readouterr().out
