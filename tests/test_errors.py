"""Every refused call raises a clear error and leaves parameters and optimizer state bit-identical."""

import copy
import math

import pytest
import torch
from conftest import assert_same, batches, closure_for, mlp, snapshot
from torch import nn

import lsfused

ALL = [lsfused.AdamSLS, lsfused.SGDSLS, lsfused.SaLSa]


def make(cls, model):
    if cls is lsfused.PLASLS:
        return cls(lsfused.components.by_layers(model, 2))
    return cls(model.parameters())


def warm(opt, model, steps=2):
    for x, y in batches(steps):
        opt.step(closure_for(model, x, y))


@pytest.fixture(params=[*ALL, lsfused.PLASLS], ids=lambda c: c.__name__)
def setup(request):
    model = mlp()
    opt = make(request.param, model)
    warm(opt, model)
    return model, opt


def refused(model, opt, exc, match, **call):
    before = snapshot(model, opt)
    with pytest.raises(exc, match=match):
        opt.step(**call)
    assert_same(before, snapshot(model, opt))


def test_missing_closure(setup):
    model, opt = setup
    refused(model, opt, ValueError, "requires a closure")


def test_closure_returns_non_tensor(setup):
    model, opt = setup
    refused(model, opt, TypeError, "must return the loss as a torch.Tensor, got float", closure=lambda: 1.0)


def test_closure_returns_non_scalar(setup):
    model, opt = setup
    x, y = batches(1)[0]
    refused(
        model,
        opt,
        ValueError,
        r"scalar loss, got a tensor of shape \(16,\)",
        closure=lambda: nn.functional.cross_entropy(model(x), y, reduction="none"),
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_at_w0(setup, bad):
    model, opt = setup
    x, y = batches(1)[0]
    refused(
        model,
        opt,
        ValueError,
        "loss at the starting point is not finite",
        closure=lambda: nn.functional.cross_entropy(model(x), y) * bad,
    )


def test_non_finite_loss_argument(setup):
    model, opt = setup
    x, y = batches(1)[0]
    refused(model, opt, ValueError, "not finite", closure=closure_for(model, x, y), loss=torch.tensor(math.nan))


def test_non_finite_gradient(setup):
    model, opt = setup
    x, y = batches(1)[0]
    handle = next(model.parameters()).register_hook(lambda g: g * math.nan)  # finite loss, NaN gradient
    try:
        refused(model, opt, ValueError, "gradient entries are not finite", closure=closure_for(model, x, y))
    finally:
        handle.remove()


def test_sparse_gradient(setup):
    model, opt = setup
    x, y = batches(1)[0]
    p = next(model.parameters())
    p.grad = torch.zeros_like(p).to_sparse()
    refused(model, opt, ValueError, "sparse gradients", closure=closure_for(model, x, y), loss=torch.tensor(1.0))


def test_complex_gradient(setup):
    model, opt = setup
    x, y = batches(1)[0]
    p = next(model.parameters())
    p.grad_dtype = None  # torch refuses a complex grad on a real parameter unless told otherwise
    p.grad = torch.zeros(p.shape, dtype=torch.complex64)
    refused(model, opt, ValueError, "complex", closure=closure_for(model, x, y), loss=torch.tensor(1.0))


def test_loss_without_grad(setup):
    model, opt = setup
    refused(model, opt, ValueError, "does not require grad", closure=lambda: torch.tensor(1.0))


def test_model_moved_after_construction(setup):
    model, opt = setup
    x, y = batches(1)[0]
    p = next(model.parameters())
    p.data = p.data.clone()  # what model.to(...) / model.double() do to every parameter
    with pytest.raises(RuntimeError, match="moved or replaced after the optimizer was created"):
        opt.step(closure_for(model, x, y))


def test_trial_nan_is_rejected_not_an_error():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters(), max_backtracks=3)
    x, y = batches(1)[0]
    calls = [0]

    def closure():
        calls[0] += 1
        loss = nn.functional.cross_entropy(model(x), y)
        return loss if calls[0] == 1 else loss * math.nan

    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert opt.last_step.outcome == "failed" and opt.last_step.trials == 3
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # reverted


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"init_step_size": 0.0}, "init_step_size must be a positive"),
        ({"init_step_size": math.nan}, "init_step_size must be a positive"),
        ({"c": -1.0}, r"c must be in \(0.0, 1.0\), got -1.0"),
        ({"c": 1.5}, r"c must be in \(0.0, 1.0\), got 1.5"),
        ({"c": True}, r"c must be in \(0.0, 1.0\), got True"),
        ({"c": math.nan}, r"c must be in \(0.0, 1.0\), got nan"),
        ({"init_step_size": math.inf}, "init_step_size must be a positive finite number, got inf"),
        ({"init_step_size": True}, "init_step_size must be a positive finite number, got True"),
        ({"gamma": math.inf}, "gamma must be a finite number >= 1.0, got inf"),
        ({"eps": math.inf}, "eps must be a finite number >= 0.0, got inf"),
        ({"betas": (0.9, math.nan)}, r"betas\[1\] must be in"),
        ({"betas": (False, 0.999)}, r"betas\[0\] must be in"),
        ({"max_backtracks": True}, "max_backtracks must be an integer >= 1, got True"),
        ({"armijo": "strict"}, "armijo must be one of"),
        ({"estimate_noise": "no"}, "estimate_noise must be a bool"),
        ({"beta_b": 1.0}, r"beta_b must be in"),
        ({"beta_b": 0.0}, r"beta_b must be in"),
        ({"gamma": 0.5}, "gamma must be a finite number >= 1"),
        ({"n_batches_per_epoch": 0}, "n_batches_per_epoch must be an integer >= 1"),
        ({"max_backtracks": 0}, "max_backtracks must be an integer >= 1"),
        ({"on_failure": "keep"}, "on_failure must be one of"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\] must be in"),
        ({"betas": (0.0,)}, "betas must be a pair"),
        ({"eps": -1.0}, "eps must be a finite number >= 0"),
        ({"backend": "cuda"}, "unknown backend 'cuda'; available backends: auto, torch"),
        ({"deterministic_closure": 1}, "deterministic_closure must be a bool"),
    ],
)
def test_invalid_hyperparameters_adamsls(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lsfused.AdamSLS(mlp().parameters(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"smoothing": 1.0}, "smoothing must be in"),
        ({"growth": 0.9}, "growth must be a finite number >= 1"),
        ({"growth": math.inf}, "growth must be a finite number >= 1.0, got inf"),
        ({"c": 1.0}, r"c must be in \(0.0, 1.0\)"),
        ({"eps": math.inf}, "eps must be a finite number >= 0.0, got inf"),
        ({"smoothing": math.nan}, "smoothing must be in"),
        ({"weight_decay": math.inf}, "weight_decay must be a finite number >= 0.0, got inf"),
        ({"shrink": 1.5}, "shrink must be in"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        ({"speed_up": "yes"}, "speed_up must be a bool"),
    ],
)
def test_invalid_hyperparameters_salsa(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lsfused.SaLSa(mlp().parameters(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"merge_threshold": -1.0}, "merge_threshold must be a finite number >= 0"),
        ({"merge_threshold": math.inf}, "merge_threshold must be a finite number >= 0.0, got inf"),
        ({"joint_check": 1}, "joint_check must be a bool"),
        ({"schedule": "greedy"}, r"schedule must be one of \('cyclic', 'random'\), got 'greedy'"),
        ({"full_search_steps": -1}, "full_search_steps must be an integer >= 0"),
    ],
)
def test_invalid_hyperparameters_plasls(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lsfused.PLASLS(lsfused.components.by_layers(mlp(), 2), **kwargs)


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda m: lsfused.AdamSLS([{"params": []}, {"params": list(m.parameters())}]),
            "param group 0 has no parameters",
        ),
        (
            lambda m: lsfused.AdamSLS([{"params": list(m.parameters())}, {"params": []}]),
            "param group 1 has no parameters",
        ),
        (lambda m: lsfused.SaLSa([{"params": []}]), "param group 0 has no parameters"),
        (lambda m: lsfused.PLASLS([[]]), "PLASLS component 0 has no parameters"),
        (lambda m: lsfused.PLASLS([list(m.parameters()), []]), "PLASLS component 1 has no parameters"),
        (lambda m: lsfused.PLASLS([]), "PLASLS needs at least one component"),
        (lambda m: lsfused.AdamSLS([]), "empty parameter list"),
    ],
)
def test_empty_groups_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build(mlp())


def test_groups_must_share_search_hyperparameters():
    model = mlp()
    a, b = list(model.parameters())[:2], list(model.parameters())[2:]
    with pytest.raises(ValueError, match="param group 1 sets c=0.5 but group 0 has 0.1"):
        lsfused.AdamSLS([{"params": a}, {"params": b, "c": 0.5}])


def test_complex_parameters_refused():
    with pytest.raises(ValueError, match="complex"):
        lsfused.AdamSLS([nn.Parameter(torch.zeros(3, dtype=torch.complex64))])


def test_mixed_devices_in_one_component_refused():
    meta = nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="mixes devices"):
        lsfused.AdamSLS([nn.Parameter(torch.zeros(3)), meta])


def test_bad_param_group_added_later_is_refused_and_changes_nothing():
    model = mlp()
    params = list(model.parameters())
    opt = lsfused.AdamSLS(params[:2])
    x, y = batches(1)[0]
    opt.step(closure_for(model, x, y))
    before = snapshot(model, opt)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    cases = [
        ({"params": params[:1]}, "some parameters appear in more than one parameter group"),
        ({"params": []}, "param group 1 has no parameters"),
        ({"params": params[2:], "c": 2.0}, r"c must be in \(0.0, 1.0\), got 2.0"),
        ({"params": params[2:], "lr": -1.0}, "read as the step-size cap"),
        ({"params": params[2:], "beta_b": 0.5}, "line-search hyperparameters"),
        ([params[2]], "a param group must be a dict"),
    ]
    for group, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.add_param_group(group)
        assert_same(before, snapshot(model, opt))
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
