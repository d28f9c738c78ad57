"""Property-based: random optimizers and hyperparameters driven through random sequences of steps, closures that
raise at a random call, non-finite losses and gradients, and state_dict round trips through ``torch.save`` /
``torch.load(weights_only=True)``. After every action the invariants of the failure semantics must hold.

The default run tries ``DEFAULT_EXAMPLES`` sequences per optimizer; ``pytest -m thorough tests/test_properties.py``
tries ``THOROUGH_EXAMPLES``.
"""

import contextlib
import dataclasses
import io
import math
import warnings

import pytest
import torch
from conftest import assert_same, batches, mlp, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lsfused

DEFAULT_EXAMPLES = 12
THOROUGH_EXAMPLES = 300
DATA = batches(4)

common = {
    "c": st.floats(0.01, 0.9),
    "max_backtracks": st.integers(1, 12),
    "armijo": st.sampled_from(["noise_aware", "classic"]),
    "init_step_size": st.floats(1e-3, 50.0),
    "skip_trials": st.sampled_from([False, True, "measure"]),
}
armijo_sls = {
    **common,
    "beta_b": st.floats(0.1, 0.95),
    "gamma": st.floats(1.0, 10.0),
    "n_batches_per_epoch": st.integers(1, 5),
    "on_failure": st.sampled_from(["revert", "last"]),
}
HYPER = {
    "sgdsls": st.fixed_dictionaries(armijo_sls),
    "adamsls": st.fixed_dictionaries({**armijo_sls, "betas": st.tuples(st.sampled_from([0.0, 0.9]), st.just(0.999))}),
    "plasls": st.fixed_dictionaries(
        {
            **armijo_sls,
            "betas": st.tuples(st.sampled_from([0.0, 0.9]), st.just(0.999)),
            "full_search_steps": st.integers(0, 2),
            "joint_check": st.booleans(),
            "schedule": st.sampled_from(["cyclic", "random"]),
            "merge_threshold": st.sampled_from([0.0, 1e-12, 1e-2]),
        }
    ),
    "salsa": st.fixed_dictionaries(
        {
            **common,
            "smoothing": st.floats(0.0, 0.99),
            "growth": st.floats(1.0, 2.0),
            "shrink": st.floats(0.1, 0.95),
            "speed_up": st.booleans(),
            "weight_decay": st.sampled_from([0.0, 0.01]),
        }
    ),
}

ACTIONS = st.one_of(
    st.tuples(st.just("step"), st.integers(0, len(DATA) - 1)),
    st.tuples(st.just("step_loss"), st.integers(0, len(DATA) - 1)),
    st.tuples(st.just("own"), st.integers(0, len(DATA) - 1), st.sampled_from(["watch", "step_rng", "unmatched"])),
    st.tuples(st.just("own_capture"), st.integers(0, len(DATA) - 1), st.booleans()),
    st.tuples(st.just("raise"), st.integers(1, 6), st.sampled_from(["runtime", "keyboard", "float", "vector"])),
    st.tuples(st.just("nonfinite_start"), st.sampled_from([math.nan, math.inf, -math.inf])),
    st.tuples(st.just("nonfinite_trial"), st.integers(2, 6)),
    st.tuples(st.just("nonfinite_grad")),
    st.tuples(st.just("roundtrip")),
)


def build(name, hp, seed=0, dropout=0.0):
    model = mlp(seed=seed, dropout=dropout)
    if name == "sgdsls":
        return model, lsfused.SGDSLS(model.parameters(), **hp)
    if name == "adamsls":
        return model, lsfused.AdamSLS(model.parameters(), **hp)
    if name == "plasls":
        return model, lsfused.PLASLS(lsfused.components.by_layers(model, 2), **hp)
    return model, lsfused.SaLSa(model.parameters(), **hp)


def scripted(model, index, fail_at=None, kind=None):
    """The loss on batch ``index``; at call ``fail_at`` it raises or returns a bad value of the given kind."""
    x, y = DATA[index]
    count = [0]

    def closure():
        count[0] += 1
        loss = nn.functional.cross_entropy(model(x), y)
        if count[0] != fail_at:
            return loss
        if kind == "runtime":
            raise RuntimeError("raised at a random call")
        if kind == "keyboard":
            raise KeyboardInterrupt
        if kind == "float":
            return float(loss.detach())
        if kind == "vector":
            return loss.expand(3)
        return loss * math.nan  # "nan"

    return closure


def check_consistent(model, opt):
    """State that lets training go on: finite parameters and moments, positive finite step sizes."""
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(t).all() for st_ in opt.state.values() for t in st_.values())
    assert all(math.isfinite(g["step_size"]) and g["step_size"] > 0 for g in opt.param_groups)


def roundtrip(name, hp, model, opt):
    """Save model and optimizer through bytes, load into a fresh pair, step both: bit-identical."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, opt2 = build(name, hp, seed=3, dropout=dropout_of(model))
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for index in (0, 1):
        opt.step(scripted(model, index))
        opt2.step(scripted(model2, index))
    assert_same(snapshot(model, opt), snapshot(model2, opt2))
    assert repr(opt.last_step) == repr(opt2.last_step)


def dropout_of(model):
    return next((m.p for m in model.modules() if isinstance(m, nn.Dropout)), 0.0)


def own_backward(model, opt, closure, variant):
    """The caller's forward and backward, then ``step(closure, loss=loss)``. ``unmatched``: grads zeroed past the
    optimizer and a random draw before the forward, so nothing can match the loss (the step falls back)."""
    handle = opt.watch(model) if variant == "watch" else None
    if variant == "unmatched":
        model.zero_grad(set_to_none=False)
        torch.rand(1)
    else:
        opt.zero_grad()
    if variant == "noise":
        torch.rand(1)
    with torch.enable_grad(), opt.step_rng() if variant == "step_rng" else contextlib.nullcontext():
        loss = closure()
    with torch.enable_grad():
        loss.backward()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure, loss=loss)
    finally:
        if handle is not None:
            handle.remove()


def measured(opt):
    """1 when the last step evaluated its skipped trial (skip_trials="measure"): a closure call beyond its trials."""
    return int(opt.last_step.skipped_trial_passed is not None)


def apply(name, hp, model, opt, action):
    kind = action[0]
    before = snapshot(model, opt)
    if kind == "step":
        opt.step(scripted(model, action[1]))
        assert opt.last_step.outcome in ("accepted", "failed", "skipped", "unresolvable")
    elif kind == "step_loss":
        opt.zero_grad()
        closure = scripted(model, action[1])
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        opt.step(closure, loss=loss)
    elif kind == "own":
        # With the caller's forward under the step's random state (watch, step_rng) or a fallback under it
        # (unmatched), the step is bit-identical to step(closure) on a twin, dropout or not.
        twin_model, twin = build(name, hp, seed=3, dropout=dropout_of(model))
        twin_model.load_state_dict(model.state_dict())
        twin.load_state_dict(opt.state_dict())
        twin.step(scripted(twin_model, action[1]))
        own_backward(model, opt, scripted(model, action[1]), action[2])
        assert_same(snapshot(twin_model, twin), snapshot(model, opt))
        # the check's forward, and the fallback's when dropout makes the unmatched loss differ
        extra = {"watch": 1, "step_rng": 0, "unmatched": 2 if dropout_of(model) else 1}[action[2]]
        extra += measured(opt)
        assert opt.last_step == dataclasses.replace(twin.last_step, closure_calls=opt.last_step.trials + extra)
    elif kind == "own_capture":
        # zero_grad()'s capture replayed: it matches unless a random draw came between (then one fallback).
        own_backward(model, opt, scripted(model, action[1]), "noise" if action[2] else "capture")
        fell_back = action[2] and dropout_of(model) > 0
        assert opt.last_step.closure_calls == opt.last_step.trials + (2 if fell_back else 1) + measured(opt)
        assert opt.last_step.outcome != "interrupted"
    elif kind == "raise":
        call, what = action[1], action[2]
        expected = {"runtime": RuntimeError, "keyboard": KeyboardInterrupt, "float": TypeError, "vector": ValueError}
        record = opt.last_step
        try:
            opt.step(scripted(model, 0, call, what))
        except expected[what]:
            if call == 1:  # refused before anything changed
                assert_same(before, snapshot(model, opt))
                assert opt.last_step is record
            else:  # interrupted: parameters at w0, step sizes as before, the step counted
                # w0 is the snapshot Pass A took: with decoupled weight decay (SaLSa) the step's decay is kept,
                # like the moments, w0 = w * (1 - weight_decay * eta_prev).
                scale = 1.0 - hp.get("weight_decay", 0.0) * before["step_sizes"][0]
                params = {k: v * scale if scale != 1.0 else v for k, v in before.items() if k.startswith("p")}
                assert_same(params, {k: v for k, v in snapshot(model, opt).items() if k.startswith("p")})
                assert [g["step_size"] for g in opt.param_groups] == before["step_sizes"]
                assert opt._skipper.state() == before["trial_skipping"]
                assert opt.last_step.outcome == "interrupted"
                assert opt._step_count == before["step_count"] + 1
        else:
            assert opt.last_step.closure_calls < call  # the step ended before that call
    elif kind == "nonfinite_start":
        x, y = DATA[0]
        with pytest.raises(ValueError, match="not finite"):
            opt.step(lambda: nn.functional.cross_entropy(model(x), y) * action[1])
        assert_same(before, snapshot(model, opt))
    elif kind == "nonfinite_trial":
        opt.step(scripted(model, 0, action[1], "nan"))  # a rejected trial, not an error
        assert opt.last_step.outcome != "interrupted"
    elif kind == "nonfinite_grad":
        opt.zero_grad()
        closure = scripted(model, 0)
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        next(model.parameters()).grad.view(-1)[0] = math.nan
        with pytest.raises(ValueError, match="gradient entries are not finite"):
            opt.step(closure, loss=loss)
        snap = snapshot(model, opt)
        assert_same(before, snap)
        opt.zero_grad()
    elif kind == "roundtrip":
        roundtrip(name, hp, model, opt)
    check_consistent(model, opt)


def drive(name, hp, actions, dropout=0.0):
    model, opt = build(name, hp, dropout=dropout)
    opt.step(scripted(model, 0))
    for action in actions:
        apply(name, hp, model, opt, action)
    opt.step(scripted(model, 1))  # training simply continues
    check_consistent(model, opt)


def sequences(name, examples):
    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(hp=HYPER[name], actions=st.lists(ACTIONS, min_size=1, max_size=6), dropout=st.sampled_from([0.0, 0.5]))
    def run(hp, actions, dropout):
        drive(name, hp, actions, dropout)

    run()


@pytest.mark.parametrize("name", HYPER)
def test_random_sequences_keep_the_invariants(name):
    sequences(name, DEFAULT_EXAMPLES)


@pytest.mark.thorough
@pytest.mark.parametrize("name", HYPER)
def test_random_sequences_keep_the_invariants_thorough(name):
    sequences(name, THOROUGH_EXAMPLES)
