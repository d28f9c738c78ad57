"""Conformance with torch's optimizer conventions, for every optimizer (in the spirit of torch's OptimizerInfo
tests): hooks, repr, deepcopy and pickle, the state_dict's shape and determinism, the format before it, LR
schedulers, SWA/EMA, named parameters, add_param_group, torch.distributed.checkpoint at world size 1. The FSDP2 DCP
save/resume on 2 ranks and resharding are in test_distributed.py (slow)."""

import copy
import io
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import batches, closure_for, mlp
from data.make_state_dict_v1 import CONFIGS as V1_CONFIGS
from torch import nn
from torch.optim import lr_scheduler, swa_utils
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import lsfused
from lsfused.diagnostics import Recorder

CONFIGS = {
    "adamsls": lambda params, model: lsfused.AdamSLS(params),
    "adamsls_b1_0": lambda params, model: lsfused.AdamSLS(params, betas=(0.0, 0.999), loss_scale="dynamic"),
    "sgdsls": lambda params, model: lsfused.SGDSLS(params),
    "plasls": lambda params, model: lsfused.PLASLS(
        lsfused.components.by_layers(model, 2), schedule="random", merge_threshold=0.3
    ),
    "salsa": lambda params, model: lsfused.SaLSa(params, weight_decay=0.01),
}
#: what users read or set on an optimizer; must survive a copy
PUBLIC = ("armijo", "backend", "deterministic_closure", "estimate_noise", "loss_scale", "max_grad_norm", "last_step")
DATA = batches(5)


def build(name, seed=0):
    torch.manual_seed(1000 + seed)  # the optimizer's closure seed (and PLASLS's generator) come from the global seed
    model = mlp(seed, dropout=0.2)
    return model, CONFIGS[name](model.parameters(), model)


def run(model, opt, lo, hi):
    records = []
    for i in range(lo, hi):
        x, y = DATA[i % len(DATA)]
        opt.step(closure_for(model, x, y))
        records.append(opt.last_step)
    return records


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    """Equal nested state: tensors bit for bit, everything else with ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# ---------------------------------------------------------------------- hooks and repr


@pytest.mark.parametrize("name", CONFIGS)
def test_repr_names_the_optimizer_and_its_groups(name):
    model, opt = build(name)
    text = repr(opt)
    assert text.startswith(type(opt).__name__ + " (") and "Parameter Group 0" in text and "step_size" in text


def _log_hooks(opt, log):
    """Register every hook kind of torch's optimizer API; each appends what it saw to ``log``."""
    handles = [
        opt.register_step_pre_hook(lambda o, args, kwargs: log.append("step_pre")),
        opt.register_step_post_hook(lambda o, args, kwargs: log.append("step_post")),
        opt.register_state_dict_pre_hook(lambda o: log.append("sd_pre")),
        opt.register_state_dict_pre_hook(lambda o: log.append("sd_pre_first"), prepend=True),
        opt.register_state_dict_post_hook(lambda o, sd: log.append(("sd_post", sorted(sd)))),
        opt.register_load_state_dict_pre_hook(lambda o, sd: log.append(("load_pre", sorted(sd)))),
        opt.register_load_state_dict_post_hook(lambda o: log.append("load_post")),
    ]
    handles.append(register_optimizer_step_pre_hook(lambda o, a, k: log.append("global_pre")))
    handles.append(register_optimizer_step_post_hook(lambda o, a, k: log.append("global_post")))
    return handles


@pytest.mark.parametrize("name", CONFIGS)
def test_hooks_run_in_torchs_order_with_torchs_arguments(name):
    """The same hooks on torch's Adam give the reference log."""
    model, opt = build(name)
    reference_model = mlp(0)
    reference = torch.optim.Adam(reference_model.parameters())
    logs = []
    for o, m in ((reference, reference_model), (opt, model)):
        log = []
        handles = _log_hooks(o, log)
        try:
            x, y = DATA[0]
            if isinstance(o, torch.optim.Adam):
                nn.functional.cross_entropy(m(x), y).backward()
            o.step(closure_for(m, x, y))
            o.load_state_dict(o.state_dict())
        finally:
            for h in handles:
                h.remove()
        logs.append(log)
    assert logs[1] == logs[0]
    assert logs[0][:4] == ["global_pre", "step_pre", "step_post", "global_post"]


@pytest.mark.parametrize("name", ["adamsls", "plasls"])
def test_state_dict_hooks_can_replace_what_they_are_given(name):
    model, opt = build(name)
    run(model, opt, 0, 2)
    seen = {}
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": "added by a hook"})
    sd = opt.state_dict()
    assert sd["note"] == "added by a hook"

    def strip(o, state_dict):
        seen["note"] = state_dict.pop("note")
        return state_dict

    opt.register_load_state_dict_pre_hook(strip)
    opt.load_state_dict(sd)  # the unknown key would be refused without the pre-hook
    assert seen["note"] == "added by a hook" and "note" in sd  # the hook got a shallow copy, as torch's do


# ---------------------------------------------------------------------- copies


def _deepcopy(pair):
    return copy.deepcopy(pair)


def _pickle(pair):
    return pickle.loads(pickle.dumps(pair))


def _torch_save(pair):
    buffer = io.BytesIO()
    torch.save(pair, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copier", [_deepcopy, _pickle, _torch_save])
@pytest.mark.parametrize("name", CONFIGS)
def test_a_copied_model_and_optimizer_step_exactly_as_the_original(name, copier):
    model, opt = build(name)
    run(model, opt, 0, 3)
    model2, opt2 = copier((model, opt))
    assert all(getattr(opt2, a) == getattr(opt, a) for a in PUBLIC)
    if isinstance(opt, lsfused.PLASLS):
        assert opt2.components == opt.components and opt2.merges == opt.merges
    assert same(opt2.state_dict(), opt.state_dict())
    expected, got = run(model, opt, 3, 8), run(model2, opt2, 3, 8)
    assert got == expected
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(model2), strict=True))
    assert same(opt2.state_dict(), opt.state_dict())
    # The copy owns its parameters: the original's did not move with it.
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), model2.parameters(), strict=True))


@pytest.mark.parametrize("name", ["adamsls", "salsa"])
def test_a_copied_optimizer_alone_steps_its_own_copied_parameters(name):
    model, opt = build(name)
    run(model, opt, 0, 2)
    opt2 = copy.deepcopy(opt)
    params2 = [p for g in opt2.param_groups for p in g["params"]]
    names = [n for n, _ in model.named_parameters()]
    before, before2 = params_of(model), [p.detach().clone() for p in params2]
    x, y = DATA[2]

    def closure():  # the model's forward over the copy's parameters
        out = torch.func.functional_call(model, dict(zip(names, params2, strict=True)), (x,))
        return nn.functional.cross_entropy(out, y)

    opt2.step(closure)
    assert opt2.last_step.outcome == "accepted"
    assert any(not torch.equal(a, b) for a, b in zip(before2, params2, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model), strict=True))


def test_hooks_and_recorders_are_not_copied_as_in_torch():
    model, opt = build("adamsls")
    opt.register_step_pre_hook(lambda *a: None)
    Recorder(opt)
    opt2 = copy.deepcopy(opt)
    assert not opt2._optimizer_step_pre_hooks and opt2._recorder is None


# ---------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_has_torchs_shape_and_round_trips(name, tmp_path):
    model, opt = build(name)
    run(model, opt, 0, 4)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert sorted(sd["state"]) == list(range(n))
    for st in sd["state"].values():
        assert st["step"].item() == 4.0 and all(isinstance(v, torch.Tensor) for v in st.values())
    assert same(sd, opt.state_dict())  # deterministic
    # Through a file, with torch.load's safe unpickler (what HF and Lightning use), into a fresh optimizer.
    torch.save({"model": model.state_dict(), "optimizer": sd}, tmp_path / "ckpt.pt")
    expected = run(model, opt, 4, 8)
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2, opt2 = build(name, seed=1)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    assert same(opt2.state_dict(), sd)
    assert run(model2, opt2, 4, 8) == expected
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(model2), strict=True))


@pytest.mark.parametrize("name", V1_CONFIGS)
def test_a_state_dict_of_the_previous_format_loads(name):
    """tests/data/state_dict_v1.pt was written by the code before this format (6 steps; make_state_dict_v1.py).
    The same 6 steps now must give the state that loading the file gives, and the same next steps."""
    make_model, make_opt = V1_CONFIGS[name]
    saved = torch.load(Path(__file__).parent / "data" / "state_dict_v1.pt", weights_only=True)[name]
    assert "lsfused" in saved["optimizer"]
    torch.manual_seed(123)
    model = make_model()
    opt = make_opt(model)
    for i in range(6):
        x, y = DATA[i % 5]
        opt.step(closure_for(model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved["model"].values(), strict=True))
    torch.manual_seed(7)
    model2 = make_model()
    opt2 = make_opt(model2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    assert same(opt2.state_dict(), opt.state_dict())
    assert run(model2, opt2, 6, 9) == run(model, opt, 6, 9)


# ---------------------------------------------------------------------- LR schedulers, SWA and EMA


def _schedulers(opt):
    has_betas = "betas" in opt.param_groups[0]
    return {
        "LambdaLR": lambda: lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4)),
        "ReduceLROnPlateau": lambda: lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
        "OneCycleLR": lambda: lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=20, cycle_momentum=has_betas),
        "CyclicLR": lambda: lr_scheduler.CyclicLR(opt, 0.01, 0.5, step_size_up=2, cycle_momentum=has_betas),
        "SequentialLR": lambda: lr_scheduler.SequentialLR(
            opt, [lr_scheduler.LinearLR(opt, 0.1, total_iters=2), lr_scheduler.ExponentialLR(opt, 0.9)], [2]
        ),
        "ChainedScheduler": lambda: lr_scheduler.ChainedScheduler(
            [lr_scheduler.ConstantLR(opt, 0.5, total_iters=2), lr_scheduler.ExponentialLR(opt, 0.9)]
        ),
        "CosineAnnealingWarmRestarts": lambda: lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3),
        "PolynomialLR": lambda: lr_scheduler.PolynomialLR(opt, total_iters=4, power=2.0),
    }


def _scheduled_steps(model, opt, sched, lo, hi):
    """Steps under a scheduler; returns the betas each step used."""
    betas = []
    for i in range(lo, hi):
        betas.append(opt.param_groups[0].get("betas"))
        record = run(model, opt, i, i + 1)[0]
        # A scheduled "lr" becomes the cap (ReduceLROnPlateau writes one only on a plateau); "lr" shows the step size.
        assert all(g["max_step_size"] is None or g["lr"] <= g["max_step_size"] for g in opt.param_groups)
        sched.step(record.loss) if isinstance(sched, lr_scheduler.ReduceLROnPlateau) else sched.step()
    return betas


@pytest.mark.parametrize("name", ["adamsls", "sgdsls", "plasls", "salsa"])
@pytest.mark.parametrize("sched_name", list(_schedulers(build("adamsls")[1])))
def test_every_lr_scheduler_caps_the_step_size_and_resumes(name, sched_name):
    model, opt = build(name)
    sched = _schedulers(opt)[sched_name]()
    betas = _scheduled_steps(model, opt, sched, 0, 3)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    betas += _scheduled_steps(model, opt, sched, 3, 6)
    model2, opt2 = build(name, seed=1)
    sched2 = _schedulers(opt2)[sched_name]()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    _scheduled_steps(model2, opt2, sched2, 3, 6)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(model2), strict=True))
    if sched_name in ("OneCycleLR", "CyclicLR") and "betas" in opt.param_groups[0]:
        assert len({b[0] for b in betas}) > 1  # the momentum cycled through betas, and the steps took it


@pytest.mark.parametrize("name", ["adamsls", "salsa"])
def test_swa_and_ema_average_what_the_optimizer_produced(name):
    model, opt = build(name)
    swa = swa_utils.AveragedModel(model)
    ema = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))
    swalr = swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=2)
    history = []
    for i in range(4):
        run(model, opt, i, i + 1)
        swa.update_parameters(model)
        ema.update_parameters(model)
        swalr.step()
        history.append(params_of(model))
    for j, (p_swa, p_ema) in enumerate(zip(swa.module.parameters(), ema.module.parameters(), strict=True)):
        snaps = [h[j] for h in history]
        torch.testing.assert_close(p_swa, torch.stack(snaps).mean(0))
        expected = snaps[0]
        for s in snaps[1:]:
            expected = 0.9 * expected + 0.1 * s
        torch.testing.assert_close(p_ema, expected)
    assert all(g["max_step_size"] is not None for g in opt.param_groups)  # SWALR's "lr" caps the step size


@pytest.mark.parametrize("name", ["adamsls", "sgdsls", "salsa"])
def test_named_parameters_keep_their_names_through_a_state_dict(name):
    torch.manual_seed(1000)
    model = mlp(0, dropout=0.2)
    opt = CONFIGS[name](model.named_parameters(), model)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    run(model, opt, 0, 3)
    sd, saved_model = opt.state_dict(), copy.deepcopy(model.state_dict())
    assert sd["param_groups"][0]["param_names"] == opt.param_groups[0]["param_names"]
    expected = run(model, opt, 3, 6)
    torch.manual_seed(1)
    model2 = mlp(1, dropout=0.2)
    opt2 = CONFIGS[name](model2.named_parameters(), model2)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(sd)
    assert run(model2, opt2, 3, 6) == expected


# ---------------------------------------------------------------------- add_param_group


def _split_build(name, seed=0):
    """The model with only its first layer in the optimizer (the second frozen for now); no dropout, so that
    autograd's gradient outside the step is the step's."""
    torch.manual_seed(1000 + seed)
    model = mlp(seed)
    first, second = list(model[0].parameters()), list(model[-1].parameters())
    if name == "plasls":
        return model, lsfused.PLASLS([first]), second
    return model, CONFIGS[name](first, model), second


@pytest.mark.parametrize("name", ["adamsls", "sgdsls", "salsa", "plasls"])
def test_add_param_group_after_steps(name):
    model, opt, second = _split_build(name)
    reference_model, reference, _ = _split_build(name)
    assert run(model, opt, 0, 3) == run(reference_model, reference, 0, 3)  # same decisions up to the addition
    kept = {k: v.clone() for k, v in opt.state[opt.param_groups[0]["params"][0]].items()}
    opt.add_param_group({"params": second})
    assert opt.n_groups == 2 and opt.param_groups[1]["step_size"] > 0.0
    st = opt.state[second[0]]
    assert st["step"].item() == 0.0 and all(not v.any() for k, v in st.items() if k != "step")  # fresh moments
    assert same(dict(opt.state[opt.param_groups[0]["params"][0]]), kept)  # the old ones are kept
    if name == "plasls":
        assert opt.components == [[0], [1]]
    # The new group's first step: its moments are those of Adam's first step (independent: autograd's gradient).
    x, y = DATA[3]
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), second)
    before = [p.detach().clone() for p in second]
    run(model, opt, 3, 4)
    assert opt.state[second[0]]["step"].item() == 1.0 and opt.state[opt.param_groups[0]["params"][0]]["step"] == 4.0
    group = opt.param_groups[1]
    if "betas" in group:
        b1, b2 = group["betas"]
        for p, g in zip(second, grads, strict=True):
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], (1 - b2) * g * g, rtol=1e-6, atol=1e-12)
            if b1 > 0:
                torch.testing.assert_close(opt.state[p]["exp_avg"], (1 - b1) * g, rtol=1e-6, atol=1e-12)
    assert any(not torch.equal(a, p) for a, p in zip(before, second, strict=True))  # the new layer trains
    # The grown optimizer checkpoints and resumes like any other.
    sd = copy.deepcopy(opt.state_dict())
    model_sd = copy.deepcopy(model.state_dict())
    expected = run(model, opt, 4, 7)
    model2, opt2, second2 = _split_build(name, seed=1)
    opt2.add_param_group({"params": second2})
    model2.load_state_dict(model_sd)
    opt2.load_state_dict(sd)
    assert run(model2, opt2, 4, 7) == expected


def test_add_param_group_reads_a_given_lr_as_the_cap():
    model, opt, second = _split_build("adamsls")
    run(model, opt, 0, 2)
    opt.add_param_group({"params": second, "lr": 1e-3})
    run(model, opt, 2, 3)
    assert opt.param_groups[1]["max_step_size"] == 1e-3 and opt.param_groups[1]["lr"] == 1e-3


# ---------------------------------------------------------------------- torch.distributed.checkpoint, one process


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_distributed_checkpoint_at_world_size_1(name, flat, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flat)

    def state(model, opt):
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=options)}

    model, opt = build(name)
    run(model, opt, 0, 4)
    with _quiet():
        dcp.save(state(model, opt), checkpoint_id=tmp_path)
    expected = run(model, opt, 4, 8)
    model2, opt2 = build(name, seed=1)
    sd = state(model2, opt2)
    with _quiet():
        dcp.load(sd, checkpoint_id=tmp_path)
    set_model_state_dict(model2, sd["model"])
    set_optimizer_state_dict(model2, opt2, sd["optim"], options=options)
    assert run(model2, opt2, 4, 8) == expected
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(model2), strict=True))


@contextmanager
def _quiet():
    """DCP without a process group warns that it runs in one process: expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(process group|torch.distributed).*")
        yield


def test_an_optimizer_with_a_process_group_refuses_to_be_copied():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters(), process_group=object())  # never used: no step runs
    with pytest.raises(TypeError, match="with a process_group cannot be copied or pickled"):
        copy.deepcopy(opt)
    with pytest.raises(TypeError, match="with a process_group cannot be copied or pickled"):
        pickle.dumps(opt)


def test_a_shallow_copy_shares_the_optimizer_as_torchs_does():
    model, opt = build("adamsls")
    run(model, opt, 0, 2)
    shallow = copy.copy(opt)
    assert shallow.state is opt.state and shallow.param_groups is opt.param_groups
    run(model, shallow, 2, 3)
    assert run(model, opt, 3, 4)[0].outcome == "accepted"  # the original still steps: its parameters were not moved


def test_pickle_writes_each_moment_once():
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(20)])
    opt = lsfused.AdamSLS(model.parameters())
    moments = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")
    # The parameters are views of one buffer and pickle writes a storage per tensor (torch.save writes it once);
    # the moments travel as copies.
    assert len(pickle.dumps(opt)) < 1.5 * moments + 21 * len(pickle.dumps(model))


def test_a_copy_grows_groups_the_original_can_load():
    model, opt, second = _split_build("adamsls")
    model2, opt2 = copy.deepcopy((model, opt))
    second2 = list(model2[-1].parameters())
    opt.add_param_group({"params": second})
    opt2.add_param_group({"params": second2})
    opt2.load_state_dict(opt.state_dict())  # the same keys: the copy has no key the original lacks
    assert set(opt2.param_groups[1]) == set(opt.param_groups[1])


def test_step_counts_past_float32_resume_exactly():
    model, opt = build("adamsls")
    run(model, opt, 0, 1)
    sd = opt.state_dict()
    for st in sd["state"].values():
        st["step"] = torch.tensor(2.0**24 + 1, dtype=torch.float64)
    opt.load_state_dict(sd)
    assert opt._step_count == 2**24 + 1 and opt.state_dict()["state"][0]["step"].item() == 2**24 + 1


def test_keys_that_torchs_tools_add_to_groups_load_either_way():
    """torch's load_state_dict takes groups with keys that schedulers, SWALR or named parameters added."""
    model, opt = build("adamsls")
    lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10)  # adds initial_lr, max_lr, min_lr, momenta
    run(model, opt, 0, 2)
    sd = opt.state_dict()
    model2, opt2 = build("adamsls", seed=1)
    opt2.load_state_dict(sd)  # a fresh optimizer, no scheduler yet
    assert opt2.param_groups[0]["max_lr"] == 0.5
    opt.load_state_dict(build("adamsls", seed=2)[1].state_dict())  # and the other way round
    named = CONFIGS["adamsls"](mlp(3).named_parameters(), None)
    opt.load_state_dict(named.state_dict())
    assert opt.param_groups[0]["param_names"] == named.param_groups[0]["param_names"]
    assert opt.param_groups[0]["param_names"] is not named.param_groups[0]["param_names"]  # a copy, as torch's


def test_a_refused_add_param_group_leaves_the_parameters_where_they_were(monkeypatch):
    model, opt, second = _split_build("adamsls")
    run(model, opt, 0, 2)
    before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(lsfused.flat.FlatBucket, "__post_init__", out_of_memory)
    with pytest.raises(RuntimeError, match="simulated"):
        opt.add_param_group({"params": second})
    monkeypatch.undo()
    assert opt.n_groups == 1 and same(opt.state_dict()["state"][0], before)
    run(model, opt, 2, 3)  # the parameters still live in the optimizer's buffers
    assert opt.last_step.outcome == "accepted"
