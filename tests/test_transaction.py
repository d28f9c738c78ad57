"""A step is all-or-nothing: whatever raises inside it leaves the parameters bit-exact at w0 and the state
consistent; ``loss=`` is comparable with the trials under dropout; closures that call backward are refused;
``load_state_dict`` validates every value before anything changes."""

import copy
import math
import os
import signal

import pytest
import torch
from conftest import assert_same, batches, closure_for, mlp, snapshot
from torch import nn

import lsfused

CONFIGS = {
    "adamsls": lambda m: lsfused.AdamSLS(m.parameters(), init_step_size=5.0),
    "adamsls_momentum": lambda m: lsfused.AdamSLS(m.parameters(), init_step_size=5.0, betas=(0.9, 0.999)),
    "sgdsls": lambda m: lsfused.SGDSLS(m.parameters(), init_step_size=50.0),
    "plasls": lambda m: lsfused.PLASLS(lsfused.components.by_layers(m, 2), init_step_size=5.0, full_search_steps=0),
    "plasls_joint": lambda m: lsfused.PLASLS(
        lsfused.components.by_layers(m, 2), init_step_size=5.0, full_search_steps=0, joint_check=True
    ),
    "salsa": lambda m: lsfused.SaLSa(m.parameters(), init_step_size=50.0, speed_up=False),
}


def raising_at(closure, call, exc):
    """A closure that raises ``exc`` at its ``call``-th evaluation (1-based) and evaluates normally otherwise."""
    count = [0]

    def wrapped():
        count[0] += 1
        if count[0] == call:
            if exc == "float":
                return 1.0  # not a tensor: refused by check_loss
            raise exc("raised by the test")
        return closure()

    return wrapped


def twin(name, model, opt):
    """An independent copy of model and optimizer with the same state (through state_dict)."""
    model2 = mlp(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = CONFIGS[name](model2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    return model2, opt2


def moments(opt):
    return [v.clone() for st in opt.state.values() for v in st.values()]


@pytest.mark.parametrize(
    "call, exc", [(2, RuntimeError), (3, KeyboardInterrupt), (2, torch.OutOfMemoryError), (3, "float")]
)
@pytest.mark.parametrize("name", CONFIGS)
def test_exception_inside_a_trial_leaves_w0_and_consistent_state(name, call, exc):
    data = batches(4)
    model = mlp()
    opt = CONFIGS[name](model)
    for x, y in data[:2]:
        opt.step(closure_for(model, x, y))
    x, y = data[2]
    for group in opt.param_groups:  # far too large: this step backtracks, so every call index is reached
        group["step_size"] *= 1e3
    model2, opt2 = twin(name, model, opt)
    w0 = [p.detach().clone() for p in model.parameters()]
    etas = [g["step_size"] for g in opt.param_groups]
    extra = copy.deepcopy(opt._extra_state())
    step_count = opt._step_count
    expected_error = TypeError if exc == "float" else exc

    with pytest.raises(expected_error):
        opt.step(raising_at(closure_for(model, x, y), call, exc))

    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters(), strict=True))
    assert [g["step_size"] for g in opt.param_groups] == etas
    assert opt.last_step.outcome == "interrupted" and opt._step_count == step_count + 1
    assert opt.last_step.reason == expected_error.__name__
    if name.startswith(("plasls", "salsa")):
        extra_now = opt._extra_state()
        for key, value in extra.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, extra_now[key]), key
            else:
                assert value == extra_now[key], key
    # The moments keep this step's gradient: the same as after an uninterrupted step from the same state.
    opt2.step(closure_for(model2, x, y))
    assert all(torch.equal(a, b) for a, b in zip(moments(opt), moments(opt2), strict=True))
    # Training simply continues.
    x, y = data[3]
    opt.step(closure_for(model, x, y))
    assert opt.last_step.outcome != "interrupted"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def stepped(name):
    """A model and optimizer after one step, a batch, and a snapshot of both."""
    model = mlp()
    opt = CONFIGS[name](model)
    x, y = batches(1)[0]
    opt.step(closure_for(model, x, y))
    return model, opt, x, y, snapshot(model, opt)


@pytest.mark.parametrize("name", CONFIGS)
def test_exception_at_the_first_call_changes_nothing(name):
    model, opt, x, y, before = stepped(name)
    record = opt.last_step
    with pytest.raises(KeyboardInterrupt):
        opt.step(raising_at(closure_for(model, x, y), 1, KeyboardInterrupt))
    assert_same(before, snapshot(model, opt))
    assert opt.last_step is record


def test_exception_in_the_joint_check_restores_every_component():
    """PLASLS joint check: the component search passes, then the joint trial raises."""
    model = mlp()
    opt = CONFIGS["plasls_joint"](model)
    data = batches(3)
    for x, y in data[:2]:
        opt.step(closure_for(model, x, y))
    x, y = data[2]
    model2, opt2 = twin("plasls_joint", model, opt)
    opt2.step(closure_for(model2, x, y))
    joint_call = opt2.last_step.closure_calls  # the last call of an uninterrupted step is a joint trial
    assert opt2.last_step.trials >= 2
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError):
        opt.step(raising_at(closure_for(model, x, y), joint_call, RuntimeError))
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters(), strict=True))
    assert opt.last_step.outcome == "interrupted"


def test_sigint_during_pass_a_is_held_until_pass_a_is_done(monkeypatch):
    """A real Ctrl-C arriving inside Pass A is delivered right after it: the moments are fully updated (never half)
    and the step ends as interrupted with the parameters at w0."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default here (a background job ignores it): no Ctrl-C to hold")
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters())
    model2 = mlp()
    opt2 = lsfused.AdamSLS(model2.parameters())
    x, y = batches(1)[0]
    original = opt._ops.direction_and_norms
    seen = []

    def pass_a_with_sigint(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        seen.append("sent")  # still running: the signal did not stop Pass A
        return original(*args, **kwargs)

    monkeypatch.setattr(opt._ops, "direction_and_norms", pass_a_with_sigint)
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure_for(model, x, y))
    assert seen == ["sent"]
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters(), strict=True))
    assert opt.last_step.outcome == "interrupted"
    opt2.step(closure_for(model2, x, y))
    assert all(torch.equal(a, b) for a, b in zip(moments(opt), moments(opt2), strict=True))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------------------------- loss= and dropout


def dropout_run(path, steps=30):
    torch.manual_seed(0)  # wide enough and dropout high enough that two masks give clearly different losses
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 3))
    opt = lsfused.AdamSLS(model.parameters())
    data = batches(5)
    etas, outcomes = [], []
    for i in range(steps):
        x, y = data[i % len(data)]
        closure = closure_for(model, x, y)
        if path == "closure":
            opt.step(closure)
        elif path == "loss":  # the caller's own forward, with its own dropout mask
            opt.zero_grad()
            loss = closure()
            loss.backward()
            opt.step(closure, loss=loss)
        elif path == "step_rng":
            opt.zero_grad()
            with opt.step_rng():
                loss = closure()
            loss.backward()
            opt.step(closure, loss=loss)
        etas.append(opt.param_groups[0]["step_size"])
        outcomes.append(opt.last_step.outcome)
    return model, etas, outcomes


def test_loss_argument_keeps_step_sizes_with_dropout():
    _, etas_closure, _ = dropout_run("closure")
    _, etas_loss, outcomes = dropout_run("loss")
    assert min(etas_loss) > 0.1 * min(etas_closure)
    assert 0.1 < etas_loss[-1] / etas_closure[-1] < 10
    assert outcomes.count("accepted") >= 20


def test_loss_argument_compared_as_before_would_collapse(monkeypatch):
    """The scenario above is sensitive: comparing the trials with the caller's loss (the old behaviour, emulated by
    claiming the forward ran under the step's seed) collapses the step size by orders of magnitude."""
    rng_step = property(lambda self: self._step_count, lambda self, v: None)
    monkeypatch.setattr(lsfused.AdamSLS, "_rng_step", rng_step, raising=False)
    _, etas_closure, _ = dropout_run("closure")
    _, etas_old, _ = dropout_run("loss")
    assert min(etas_old) < 1e-6 * min(etas_closure)


def test_step_rng_makes_the_loss_path_identical_to_the_closure_path():
    model_a, etas_a, _ = dropout_run("closure", steps=10)
    model_b, etas_b, _ = dropout_run("step_rng", steps=10)
    assert etas_a == etas_b
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True))


def test_loss_argument_reevaluation_counts_as_a_closure_call():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters())
    x, y = batches(1)[0]
    loss = closure_for(model, x, y)()
    loss.backward()
    opt.step(closure_for(model, x, y), loss=loss)
    assert opt.last_step.closure_calls == opt.last_step.trials + 1
    opt2 = lsfused.AdamSLS(mlp().parameters(), deterministic_closure=False)
    model2 = mlp()
    opt2 = lsfused.AdamSLS(model2.parameters(), deterministic_closure=False)
    loss = closure_for(model2, x, y)()
    loss.backward()
    opt2.step(closure_for(model2, x, y), loss=loss)
    assert opt2.last_step.closure_calls == opt2.last_step.trials


# ---------------------------------------------------------------------------------------------- closures with backward


def lightning_style(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("name", CONFIGS)
def test_closure_calling_backward_is_refused_and_changes_nothing(name):
    model, opt, x, y, before = stepped(name)
    with pytest.raises(ValueError, match=r"the closure called backward\(\).*without calling backward"):
        opt.step(lightning_style(model, x, y))
    assert_same(before, snapshot(model, opt))
    loss = closure_for(model, x, y)()
    loss.backward()
    with pytest.raises(ValueError, match=r"the closure called backward\(\)"):
        opt.step(lightning_style(model, x, y), loss=loss)
    assert_same(before, snapshot(model, opt))


def test_closure_calling_backward_at_a_trial_with_step_rng_is_interrupted():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters())
    x, y = batches(1)[0]
    with opt.step_rng():
        loss = closure_for(model, x, y)()
    loss.backward()
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"the closure called backward\(\)"):
        opt.step(lightning_style(model, x, y), loss=loss)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters(), strict=True))
    assert opt.last_step.outcome == "interrupted"
    assert torch.autograd.backward.__name__ == "backward"  # the guard is gone after the step


# The trials recompute the direction from the flat gradient (no direction buffer): a closure that zeroes or changes
# the gradient between them would silently turn every trial into w0. It is refused instead, the step undone.
GRADIENT_CHANGERS = {
    "opt.zero_grad": lambda model, opt: opt.zero_grad(),
    "model.zero_grad(set_to_none=False)": lambda model, opt: model.zero_grad(set_to_none=False),
    "grad.mul_": lambda model, opt: next(model.parameters()).grad.mul_(2.0),
}


@pytest.mark.parametrize("change", GRADIENT_CHANGERS)
@pytest.mark.parametrize("name", CONFIGS)
def test_closure_changing_the_gradient_during_the_trials_is_refused(name, change):
    model, opt, x, y, _ = stepped(name)
    w0 = [p.detach().clone() for p in model.parameters()]
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] > 1:  # a trial: the gradient Pass A read is in use
            GRADIENT_CHANGERS[change](model, opt)
        return closure_for(model, x, y)()

    with pytest.raises(ValueError, match=r"changed the gradient in place.*zero_grad"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters(), strict=True))
    assert opt.last_step.outcome == "interrupted"


def test_zero_grad_in_the_closure_before_the_gradient_is_taken_is_harmless():
    model = mlp()
    twin_model = copy.deepcopy(model)
    opt, twin_opt = lsfused.AdamSLS(model.parameters()), lsfused.AdamSLS(twin_model.parameters())
    x, y = batches(1)[0]

    def zeroing():
        if not torch.is_grad_enabled():  # trials run without grad: only the first call zeroes
            return closure_for(model, x, y)()
        opt.zero_grad()
        return closure_for(model, x, y)()

    opt.step(zeroing)
    twin_opt.step(closure_for(twin_model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters(), strict=True))


def test_detached_loss_gets_the_right_diagnosis():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters())
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match=r"does not require grad.*without calling backward"):
        opt.step(lambda: closure_for(model, x, y)().detach())


# ---------------------------------------------------------------------------------------------- load_state_dict


def saved(name="plasls"):
    model = mlp()
    opt = CONFIGS[name](model)
    for x, y in batches(3):
        opt.step(closure_for(model, x, y))
    return model, opt, opt.state_dict()


def corrupt_group(key, value):
    def edit(sd):
        sd["param_groups"][0][key] = value

    return edit


def corrupt_moment(index):
    def edit(sd):
        sd["state"][0]["exp_avg_sq"].view(-1)[index] = -1.0 if index == 0 else math.nan

    return edit


def corrupt_step(value):
    def edit(sd):
        sd["state"][0]["step"] = torch.tensor(value)

    return edit


def corrupt_search_state(key, value):
    def edit(sd):
        for group in sd["param_groups"]:  # the same in every group
            group["search_state"][key] = value

    return edit


def corrupt_first_state(key, value):
    def edit(sd):
        sd["state"][0][key] = value

    return edit


BAD = {
    "step_size_nan": ("plasls", corrupt_group("step_size", math.nan), "step_size must be a positive finite number"),
    "step_size_inf": ("adamsls", corrupt_group("step_size", math.inf), "step_size must be a positive finite"),
    "step_size_negative": ("sgdsls", corrupt_group("step_size", -0.1), "step_size must be a positive finite"),
    "c_negative": ("adamsls", corrupt_group("c", -1.0), r"c must be in \(0.0, 1.0\), got -1.0"),
    "c_bool": ("salsa", corrupt_group("c", True), r"c must be in \(0.0, 1.0\), got True"),
    "gamma_inf": ("adamsls", corrupt_group("gamma", math.inf), "gamma must be a finite number >= 1.0, got inf"),
    "growth_inf": ("salsa", corrupt_group("growth", math.inf), "growth must be a finite number >= 1.0, got inf"),
    "betas": ("adamsls", corrupt_group("betas", (0.9, 1.5)), r"betas\[1\] must be in"),
    "unknown_key": ("adamsls", corrupt_group("colour", 1), r"unknown \['colour'\]"),
    "lr_nan": ("adamsls", corrupt_group("lr", math.nan), r"param group 0's \"lr\" must be a finite number >= 0.0"),
    "v_negative": ("adamsls", corrupt_moment(0), "'exp_avg_sq' of parameter 0 must be finite and >= 0, holds -1.0"),
    "v_nan": ("salsa", corrupt_moment(1), "'exp_avg_sq' of parameter 0 must be finite and >= 0, holds nan"),
    "step_negative": ("adamsls", corrupt_step(-1.0), "step of parameter 0 must be a whole number >= 0, got -1.0"),
    "step_float": ("adamsls", corrupt_step(2.5), "step of parameter 0 must be a whole number >= 0, got 2.5"),
    "step_group": ("adamsls", corrupt_step(2.0), r"param group 0 holds different steps \[2, 3\]"),
    "seed": ("adamsls", corrupt_search_state("seed", -3), "state_dict seed must be an integer >= 0, got -3"),
    "cursor": ("plasls", corrupt_search_state("cursor", 7), "cursor 7 is past the last of 2 components"),
    "generator": ("plasls", corrupt_first_state("generator", torch.zeros(3)), "'generator' is not a generator state"),
    "salsa_G": ("salsa", corrupt_search_state("G", math.nan), "SaLSa state G must be a finite number, got nan"),
    "salsa_slow": ("salsa", corrupt_search_state("slow", 0.0), "SaLSa state slow must be a positive finite number"),
}


@pytest.mark.parametrize("case", BAD)
def test_load_state_dict_refuses_bad_values_and_changes_nothing(case):
    name, edit, match = BAD[case]
    model, opt, sd = saved(name)
    before = snapshot(model, opt)
    extra = copy.deepcopy(opt._extra_state())
    bad = copy.deepcopy(sd)
    edit(bad)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_same(before, snapshot(model, opt))
    assert repr(opt._extra_state()) == repr(extra)
    opt.load_state_dict(sd)  # the good one still loads
    assert_same(before, snapshot(model, opt))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("param_groups"), r"state_dict lacks \['param_groups'\]"),
        (lambda sd: sd.pop("state"), r"state_dict lacks \['state'\]"),
        (lambda sd: [g["search_state"].pop("seed") for g in sd["param_groups"]], r"search_state lacks \['seed'\]"),
        (lambda sd: sd["param_groups"][1]["search_state"].update(seed=1), "disagree on search_state"),
        (lambda sd: sd["param_groups"][0].pop("c"), r"missing \['c'\]"),
        (lambda sd: sd["param_groups"].pop(), "state_dict has 1 param groups, this optimizer has 2"),
        (lambda sd: sd.update(param_groups="x"), "state_dict has str param groups"),
        (lambda sd: sd["state"].pop(0), "no complete state for parameter 0"),
    ],
)
def test_malformed_state_dicts_get_clear_errors(edit, match):
    model, opt, sd = saved("plasls")
    before = snapshot(model, opt)
    bad = copy.deepcopy(sd)
    edit(bad)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_same(before, snapshot(model, opt))


def test_state_dict_that_is_not_a_dict_is_refused():
    model, opt, _ = saved("adamsls")
    with pytest.raises(ValueError, match="a state_dict must be a dict, got list"):
        opt.load_state_dict([])
