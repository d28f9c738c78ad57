"""state_dict round trips: resuming is bit-exact; a wrong state_dict is refused before anything changes."""

import copy

import pytest
import torch
from conftest import assert_same, batches, closure_for, mlp, snapshot

import lsfused

CONFIGS = {
    "adamsls": lambda m: lsfused.AdamSLS(m.parameters()),
    "adamsls_momentum": lambda m: lsfused.AdamSLS(m.parameters(), betas=(0.9, 0.999)),
    "sgdsls": lambda m: lsfused.SGDSLS(m.parameters()),
    "plasls_random": lambda m: lsfused.PLASLS(
        lsfused.components.by_layers(m, 2), schedule="random", merge_threshold=0.05, init_step_size=1.0
    ),
    "plasls": lambda m: lsfused.PLASLS(lsfused.components.by_layers(m, 2)),
    "salsa": lambda m: lsfused.SaLSa(m.parameters(), weight_decay=0.01),
}


def run(model, opt, data, start, n):
    for i in range(start, start + n):
        x, y = data[i % len(data)]
        opt.step(closure_for(model, x, y))


@pytest.mark.parametrize("name", CONFIGS)
def test_bit_exact_resume(name):
    data = batches(5)
    torch.manual_seed(123)
    model = mlp(dropout=0.2)
    opt = CONFIGS[name](model)
    run(model, opt, data, 0, 10)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    run(model, opt, data, 10, 10)
    expected = snapshot(model, opt)

    torch.manual_seed(999)  # a different global seed: the resumed run must not depend on it
    model2 = mlp(seed=7, dropout=0.2)
    opt2 = CONFIGS[name](model2)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    run(model2, opt2, data, 10, 10)
    assert_same(expected, snapshot(model2, opt2))
    if isinstance(opt, lsfused.PLASLS):
        assert opt.components == opt2.components and opt.merges == opt2.merges


def test_state_dict_is_a_copy_and_names_moments():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters(), betas=(0.9, 0.999))
    run(model, opt, batches(2), 0, 2)
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # torch's Adam's names
    assert sd["state"][0]["step"].item() == 2.0 and sd["state"][0]["step"].dtype == torch.float64
    sd["state"][0]["exp_avg"].add_(1.0)
    assert not torch.equal(sd["state"][0]["exp_avg"], opt.state[next(model.parameters())]["exp_avg"])


def _refused_load(model, opt, sd, match):
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(model, opt))


def test_load_from_other_optimizer_refused():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters())
    run(model, opt, batches(2), 0, 2)
    other = lsfused.SaLSa(mlp().parameters())
    _refused_load(model, opt, other.state_dict(), "saved by 'SaLSa', cannot load it into AdamSLS")
    torch_adam = torch.optim.Adam(mlp().parameters())
    _refused_load(model, opt, torch_adam.state_dict(), "not an lsfused state_dict")


def test_load_other_layout_refused():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters())
    run(model, opt, batches(2), 0, 2)
    other = lsfused.AdamSLS(list(mlp().parameters())[:2])
    _refused_load(model, opt, other.state_dict(), "parameter layout does not match")


def test_load_with_corrupt_state_refused():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters())
    run(model, opt, batches(2), 0, 2)
    sd = opt.state_dict()
    sd["state"][1]["exp_avg_sq"] = torch.zeros(5)
    _refused_load(model, opt, sd, "does not match its shape")
    sd = opt.state_dict()
    del sd["state"][2]
    _refused_load(model, opt, sd, "no complete state for parameter 2")


def test_plasls_layout_mismatch_refused():
    model = mlp()
    opt = lsfused.PLASLS(lsfused.components.by_layers(model, 2))
    sd = opt.state_dict()
    for group in sd["param_groups"]:  # search_state is the same in every group
        group["search_state"]["components"] = ((0,),)
    _refused_load(model, opt, sd, "component layout")
