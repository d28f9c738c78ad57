"""Options that training stacks expect from an optimizer: gradient clipping, decoupled weight decay, "lr" and LR
schedulers (a step-size cap), dynamic loss scaling for fp16, saving parts of a model at their own size."""

import math
import os
import warnings

import pytest
import torch
from conftest import batches, closure_for, mlp
from torch import nn

import lsfused
from lsfused.backends import resolve as resolve_backend

OPTIMIZERS = {
    "sgdsls": lambda params, **kw: lsfused.SGDSLS(params, **kw),
    "adamsls": lambda params, **kw: lsfused.AdamSLS(params, **kw),
    "plasls": lambda params, **kw: lsfused.PLASLS([list(params)], **kw),
    "salsa": lambda params, **kw: lsfused.SaLSa(params, **kw),
}


def _regression(seed: int = 0):
    """A float64 linear least-squares problem with gradients large enough for clipping to bind."""
    torch.manual_seed(seed)
    model = nn.Linear(5, 3).double()
    x = torch.randn(32, 5, dtype=torch.float64)
    y = torch.randn(32, 3, dtype=torch.float64) * 10

    def closure():
        return ((model(x) - y) ** 2).mean()

    return model, x, y, closure


def _gradient(model: nn.Module, x, y) -> torch.Tensor:
    """The flat float64 gradient at the current weights, from a separate copy of the model."""
    copy = nn.Linear(5, 3).double()
    copy.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    ((copy(x) - y) ** 2).mean().backward()
    return torch.cat([p.grad.reshape(-1) for p in copy.parameters()])


def test_torch_backend_grad_check_against_fsum():
    ops = resolve_backend("torch")
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        g = (torch.randn(10_001) * 3).to(dtype)
        count, sumsq = ops.grad_check(g)
        assert count == 0
        assert sumsq == pytest.approx(math.fsum(v * v for v in g.double().tolist()), rel=1e-12)
        g[[3, 77]] = torch.tensor([math.nan, -math.inf], dtype=dtype)
        assert ops.grad_check(g)[0] == 2
    assert ops.grad_check(torch.zeros(0)) == (0, 0.0)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_clipping_and_weight_decay_match_the_float64_equations(name, max_grad_norm, weight_decay, backend):
    model, x, y, closure = _regression()
    init = 0.05 if name == "sgdsls" else 0.1
    kw = {"init_step_size": init, "max_grad_norm": max_grad_norm, "backend": backend}
    if name != "salsa" or weight_decay:
        kw["weight_decay"] = weight_decay
    opt = OPTIMIZERS[name](model.parameters(), **kw)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    g = _gradient(model, x, y)
    norm = math.sqrt(math.fsum(v * v for v in g.tolist()))
    opt.step(closure)
    rec = opt.last_step
    assert rec.outcome == "accepted"
    assert rec.grad_norm == pytest.approx(norm, rel=1e-12)
    # Equations, in float64: clip, decay the snapshot by the previous step size, one step along the direction.
    coef = max_grad_norm / (norm + 1e-6) if max_grad_norm is not None and norm > max_grad_norm else 1.0
    if max_grad_norm is not None:
        assert coef < 1.0  # the problem is built so that clipping binds
    gc = g * coef
    w0 = w * (1.0 - weight_decay * init)
    if name == "sgdsls":
        d = -gc
    else:  # first Adam step: v = (1-b2) g^2, bias-corrected denominator |g| + eps
        b2, eps = 0.999, 1e-8
        d = -gc / (torch.sqrt((1 - b2) * gc * gc) / math.sqrt(1 - b2) + eps)
    expected = w0 + rec.step_sizes[0] * d
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_clipping_that_does_not_bind_changes_nothing():
    runs = []
    for max_grad_norm in (None, 1e9):
        model = mlp()
        opt = lsfused.AdamSLS(model.parameters(), max_grad_norm=max_grad_norm)
        for x, y in batches(3):
            opt.step(closure_for(model, x, y))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": math.nan}, "max_grad_norm"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"loss_scale": "static"}, "loss_scale"),
        ({"loss_scale": -1.0}, "loss_scale"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lsfused.AdamSLS(mlp().parameters(), **kwargs)


# ---------------------------------------------------------------------------------------------- "lr" and schedulers


def _linear_warmup(opt):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=8)


SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / 3)),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
    "hf_linear_warmup": _linear_warmup,
}


def _cap(group) -> float:
    return math.inf if group["max_step_size"] is None else group["max_step_size"]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lr_is_the_step_size_at_construction_and_after_each_step(name):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    assert [g["lr"] for g in opt.param_groups] == [g["step_size"] for g in opt.param_groups]
    for x, y in batches(3):
        opt.step(closure_for(model, x, y))
        assert [g["lr"] for g in opt.param_groups] == list(opt.last_step.step_sizes)


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_schedulers_cap_the_step_size(name, sched):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    scheduler = SCHEDULERS[sched](opt)
    for t, (x, y) in enumerate(batches(8)):
        scheduled = [g["lr"] for g in opt.param_groups]
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure_for(model, x, y))
        for g, lr in zip(opt.param_groups, scheduled, strict=True):
            assert g["lr"] == min(g["step_size"], _cap(g))
            if t > 0:  # from the second step on the scheduler has written a value of its own
                assert g["max_step_size"] == lr
                assert g["lr"] <= lr
        if t == 0 and sched != "cosine":  # warm-up from 0: the first step moves nothing
            assert opt.last_step.outcome == "skipped" and opt.last_step.reason == "cap"
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        scheduler.step()
    if sched != "lambda":  # both decay to 0 at step 8
        assert all(g["lr"] == 0.0 for g in opt.param_groups)


def test_cap_set_by_hand_applies_and_does_not_freeze_the_search():
    model, x, y, closure = _regression()
    opt = lsfused.SGDSLS(model.parameters(), init_step_size=1e-4, gamma=2.0, n_batches_per_epoch=1)
    for _ in range(3):
        opt.step(closure)
    assert opt.param_groups[0]["lr"] == pytest.approx(8e-4)  # our own writes never cap: Eq. 2's growth runs
    opt.param_groups[0]["lr"] = 1e-4
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    g = _gradient(model, x, y)
    opt.step(closure)
    moved = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - w
    assert float(moved.norm() / g.norm()) == pytest.approx(1e-4, rel=1e-9)  # the step applied is the cap
    assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["step_size"] >= 8e-4
    opt.param_groups[0]["max_step_size"] = None  # uncapped: the search continues from where it was
    opt.step(closure)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.6e-3)


def test_bad_lr_is_refused_before_anything_changes():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    for bad in (-1.0, math.nan, "0.1"):
        opt.param_groups[0]["lr"] = bad
        with pytest.raises(ValueError, match="lr"):
            opt.step(closure_for(model, *batches(1)[0]))
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_cap_and_pending_scheduler_value_survive_state_dict():
    def run(split: bool):
        model = mlp()
        opt = lsfused.AdamSLS(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** (t + 1))
        for i, (x, y) in enumerate(batches(6)):
            if split and i == 3:  # resume into fresh objects
                state = (model.state_dict(), opt.state_dict(), scheduler.state_dict())
                model = mlp(seed=5)
                model.load_state_dict(state[0])
                opt = lsfused.AdamSLS(model.parameters())
                scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** (t + 1))
                # torch's order (Lightning's too): build both, then load both; the saved "lr" is the scheduler's
                # value not yet read by a step, and it still counts as new after loading
                opt.load_state_dict(state[1])
                scheduler.load_state_dict(state[2])
            opt.step(closure_for(model, x, y))
            scheduler.step()
        return [p.detach().clone() for p in model.parameters()], [g["lr"] for g in opt.param_groups]

    (a, lr_a), (b, lr_b) = run(False), run(True)
    assert lr_a == lr_b
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------------------ loss scaling


def test_dynamic_loss_scaling_in_fp32_gives_the_unscaled_trajectory_bit_for_bit():
    # Scaling by a power of two and unscaling are exact (no overflow here), so the steps are the same.
    runs = []
    for loss_scale in (None, "dynamic"):
        model = mlp()
        opt = lsfused.AdamSLS(model.parameters(), loss_scale=loss_scale, max_grad_norm=0.5)
        for x, y in batches(4):
            opt.step(closure_for(model, x, y))
        runs.append(([p.detach().clone() for p in model.parameters()], opt.last_step.grad_norm))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0], strict=True))
    assert runs[0][1] == runs[1][1]


def test_dynamic_loss_scaling_fp16_overflow_skips_the_step_and_halves_the_scale():
    model = mlp(dtype=torch.float16)
    opt = lsfused.AdamSLS(model.parameters(), loss_scale="dynamic")
    data = batches(4, dtype=torch.float16)
    overflow = [False]
    first = next(iter(model.parameters()))
    first.register_hook(lambda g: g * math.inf if overflow[0] else g)  # inject inf into one gradient
    losses = []
    for x, y in data[:2]:
        losses.append(float(opt.step(closure_for(model, x, y))))
    scale = opt.loss_scale_value
    assert opt.last_step.outcome != "skipped"
    before = {"params": [p.detach().clone() for p in model.parameters()]}
    before["state"] = [v.clone() for st in opt.state.values() for v in st.values()]
    steps = opt._step_count
    overflow[0] = True
    opt.step(closure_for(model, *data[2]))
    assert (opt.last_step.outcome, opt.last_step.reason) == ("skipped", "overflow")
    assert opt.loss_scale_value == scale / 2
    assert all(torch.equal(a, p) for a, p in zip(before["params"], model.parameters(), strict=True))
    after = [v for st in opt.state.values() for v in st.values()]
    assert all(torch.equal(a, b) for a, b in zip(before["state"], after, strict=True))
    assert opt._step_count == steps
    overflow[0] = False
    opt.step(closure_for(model, *data[2]))
    assert opt.last_step.outcome != "skipped"
    # the scale travels in the state dict
    other = lsfused.AdamSLS(mlp(dtype=torch.float16).parameters(), loss_scale="dynamic")
    other.load_state_dict(opt.state_dict())
    assert other.loss_scale_value == opt.loss_scale_value == scale / 2


def test_fp16_training_with_dynamic_loss_scaling_lowers_the_loss():
    model = mlp(dtype=torch.float16)
    opt = lsfused.AdamSLS(model.parameters(), loss_scale="dynamic")
    x, y = batches(1, dtype=torch.float16)[0]
    losses = [float(opt.step(closure_for(model, x, y))) for _ in range(15)]
    assert losses[-1] < losses[0] - 0.05


def test_loss_scale_with_loss_argument_is_refused():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters(), loss_scale="dynamic")
    x, y = batches(1)[0]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    with pytest.raises(ValueError, match="loss_scale"):
        opt.step(closure_for(model, x, y), loss=loss)


# ------------------------------------------------------------------------------------------------------ saving


def test_unshared_saves_a_layer_at_its_own_size(tmp_path):
    model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 10))
    lsfused.AdamSLS(model.parameters())
    own = sum(p.numel() * p.element_size() for p in model[1].parameters())
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.save(model[1].state_dict(), tmp_path / "plain.pt")
    torch.save(lsfused.utils.unshared(model[1].state_dict()), tmp_path / "own.pt")
    assert os.path.getsize(tmp_path / "plain.pt") > whole  # the whole flat buffer
    assert own < os.path.getsize(tmp_path / "own.pt") < own + 2000  # its own bytes plus the pickle
    loaded = nn.Linear(200, 10)
    loaded.load_state_dict(torch.load(tmp_path / "own.pt"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model[1].parameters(), strict=True))
    plain = torch.ones(3)  # a tensor that owns its storage is not copied
    assert lsfused.utils.unshared({"x": plain})["x"] is plain


def test_safetensors_savers(tmp_path):
    from safetensors.torch import load_file, save_file, save_model

    model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 10))
    lsfused.AdamSLS(model.parameters())
    own = sum(p.numel() * p.element_size() for p in model[1].parameters())
    save_file(model[1].state_dict(), tmp_path / "layer.safetensors")  # writes each view's own bytes
    assert own < os.path.getsize(tmp_path / "layer.safetensors") < own + 1000
    with pytest.raises(RuntimeError, match="entire storage"):
        save_model(model, tmp_path / "refused.safetensors")
    lsfused.utils.save_model(model, tmp_path / "model.safetensors")
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    assert whole < os.path.getsize(tmp_path / "model.safetensors") < whole + 1000
    fresh = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 10))
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))


def test_save_model_writes_tied_weights_once(tmp_path):
    from safetensors.torch import load_file

    emb = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    lsfused.AdamSLS(model.parameters())
    lsfused.utils.save_model(model, tmp_path / "tied.safetensors")
    assert set(load_file(tmp_path / "tied.safetensors")) == {"emb.weight"}


def test_grad_scaler_recipe_with_fp16_autocast():
    model = mlp()
    x, y = batches(1)[0]
    opt = lsfused.AdamSLS(model.parameters())
    scaler = torch.amp.GradScaler("cpu")

    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.functional.cross_entropy(model(x), y)

    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # in particular, no "still scaled" warning
        for _ in range(5):
            opt.zero_grad()
            loss = closure()
            scaler.scale(loss).backward()
            scaler.step(opt, closure, loss=loss)  # unscales .grad first, then the line search
            scaler.update()
            losses.append(float(loss.detach()))
            assert opt.last_step.outcome == "accepted"
    assert losses[-1] < losses[0]


def test_still_scaled_gradient_with_loss_argument_is_named():
    model = mlp()
    x, y = batches(1)[0]
    opt = lsfused.AdamSLS(model.parameters())
    closure = closure_for(model, x, y)
    loss = closure()
    (loss * 2.0**16).backward()  # scaler.scale(loss).backward() without unscaling
    with pytest.warns(UserWarning, match="still scaled"):
        opt.step(closure, loss=loss)
    assert opt.last_step.outcome in ("failed", "unresolvable")


def test_peft_adapter_saves_at_its_own_size(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2
    )
    model = peft.get_peft_model(
        transformers.BertForSequenceClassification(config),
        peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    lsfused.AdamSLS(model.parameters())  # all of them: the adapter is a view of a buffer holding the whole model
    saved = peft.get_peft_model_state_dict(model)
    own = sum(t.numel() * t.element_size() for t in saved.values())
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path / "adapter")  # safetensors: each tensor's own bytes
    assert own < os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors") < own + 4000
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert os.path.getsize(tmp_path / "pickled" / "adapter_model.bin") > whole  # the whole buffer
    torch.save(lsfused.utils.unshared(saved), tmp_path / "unshared.pt")
    assert own < os.path.getsize(tmp_path / "unshared.pt") < own + 8000
