"""Step semantics: what the closure sees, the returned loss, records, on_failure, backends."""

import pytest
import torch
from conftest import batches, mlp
from torch import nn

import lsfused


def test_deterministic_closure_same_dropout_in_a_step_and_rng_untouched():
    model = mlp(dropout=0.5)
    opt = lsfused.AdamSLS(model.parameters(), init_step_size=10.0, gamma=1.0)  # large: forces backtracking
    x, y = batches(1)[0]
    masks = []

    def closure():
        masks.append(torch.rand(3))  # any RNG use inside the closure sees the same stream within one step
        return nn.functional.cross_entropy(model(x), y)

    state = torch.get_rng_state()
    opt.step(closure)
    assert opt.last_step.trials > 1
    assert all(torch.equal(masks[0], m) for m in masks)
    assert torch.equal(torch.get_rng_state(), state)
    first = masks[0]
    masks.clear()
    opt.step(closure)
    assert not torch.equal(masks[0], first)  # a new step, a new seed (from the step counter)


def test_non_deterministic_closure_uses_global_rng():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters(), init_step_size=10.0, gamma=1.0, deterministic_closure=False)
    x, y = batches(1)[0]
    draws = []

    def closure():
        draws.append(torch.rand(1))
        return nn.functional.cross_entropy(model(x), y)

    opt.step(closure)
    assert len({float(d) for d in draws}) == len(draws) > 1


def test_returns_loss_at_start_and_records():
    model = mlp()
    opt = lsfused.SGDSLS(model.parameters())
    x, y = batches(1)[0]
    expected = nn.functional.cross_entropy(model(x), y).item()
    loss = opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    rec = opt.last_step
    assert loss.item() == expected == rec.loss
    assert rec.step == 1 and rec.outcome == "accepted"
    assert rec.closure_calls == rec.trials + 1
    assert rec.trial_loss < rec.loss


@pytest.mark.parametrize("on_failure", ["revert", "last"])
def test_on_failure(on_failure):
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = lsfused.SGDSLS([p], on_failure=on_failure, max_backtracks=4, beta_b=0.5, gamma=1.0)
    calls = [0]

    def closure():  # the loss only ever goes up away from w0: every trial is rejected
        calls[0] += 1
        return 10 * (p - torch.tensor([1.0, -2.0])).abs().sum() + (p * p).sum()

    before = p.detach().clone()
    opt.step(closure)
    rec = opt.last_step
    assert rec.outcome == "failed" and rec.trials == 4 and rec.closure_calls == 5
    assert rec.step_sizes == (1.0 * 0.5**3,)
    if on_failure == "revert":
        assert torch.equal(p.detach(), before)
    else:
        assert torch.equal(p.detach(), before - 0.125 * 2 * before)  # the last trial, w0 + eta*d with d = -g


def test_zero_gradient_is_skipped():
    p = nn.Parameter(torch.zeros(3))
    opt = lsfused.AdamSLS([p])
    opt.step(lambda: (p * p).sum())  # gradient 0 at w = 0
    assert opt.last_step.outcome == "skipped" and opt.last_step.trials == 0
    assert torch.equal(p.detach(), torch.zeros(3))


def test_backends_listing():
    assert lsfused.backends()["torch"] is None
    assert "torch" in lsfused.available_backends()
    opt = lsfused.AdamSLS(mlp().parameters(), backend="torch")
    assert opt.backend == "torch"
    assert lsfused.AdamSLS(mlp().parameters()).backend in lsfused.available_backends()


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("LSFUSED_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        lsfused.AdamSLS(mlp().parameters())


def test_param_groups_with_own_betas():
    model = mlp()
    params = list(model.parameters())
    opt = lsfused.AdamSLS([{"params": params[:2], "betas": (0.0, 0.99)}, {"params": params[2:]}])
    for x, y in batches(3):
        opt.step(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y))
    assert "exp_avg" in opt.state[params[0]] and "exp_avg" in opt.state[params[2]]
    assert opt.param_groups[0]["betas"] == (0.0, 0.99) and opt.param_groups[1]["betas"] == (0.9, 0.999)
    assert opt.last_step.step_sizes[0] == opt.last_step.step_sizes[1]
