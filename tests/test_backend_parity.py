"""Each optimizer on every available backend against the torch backend: identical decisions and step sizes."""

import pytest
import torch
from conftest import batches, closure_for, mlp

import lsfused

OTHER = [b for b in lsfused.available_backends() if b not in ("torch", "torch-fast")]  # torch-fast: not bit-exact
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CONFIGS = {
    "adamsls": lambda params, model, backend: lsfused.AdamSLS(params, init_step_size=3.0, backend=backend),
    "adamsls_momentum": lambda params, model, backend: lsfused.AdamSLS(
        params, init_step_size=3.0, betas=(0.9, 0.999), backend=backend
    ),
    "sgdsls": lambda params, model, backend: lsfused.SGDSLS(params, init_step_size=30.0, backend=backend),
    "plasls": lambda params, model, backend: lsfused.PLASLS(
        lsfused.components.by_layers(model, 2), init_step_size=3.0, backend=backend
    ),
    "salsa": lambda params, model, backend: lsfused.SaLSa(params, weight_decay=0.01, backend=backend),
}


def trajectory(name, backend, steps=24):
    model = mlp(dropout=0.1).to(DEVICE)
    opt = CONFIGS[name](list(model.parameters()), model, backend)
    assert opt.backend == backend
    data = [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches(4)]
    records = []
    for i in range(steps):
        x, y = data[i % len(data)]
        opt.step(closure_for(model, x, y))
        records.append(opt.last_step)
    return records, [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("backend", OTHER)
@pytest.mark.parametrize("name", CONFIGS)
def test_same_decisions_as_torch_backend(name, backend):
    ref_records, ref_params = trajectory(name, "torch")
    records, params = trajectory(name, backend)
    assert any(r.trials > 1 for r in ref_records), "the run should exercise backtracking"
    for a, b in zip(ref_records, records, strict=True):
        assert (a.outcome, a.trials, a.searched, a.merged) == (b.outcome, b.trials, b.searched, b.merged)
        assert b.step_sizes == pytest.approx(a.step_sizes, rel=1e-6)
        assert b.loss == pytest.approx(a.loss, rel=1e-6)
    # The ops are bit-identical across backends, so the whole trajectory is too.
    assert all(torch.equal(a, b) for a, b in zip(ref_params, params, strict=True))


def test_triton_backend_end_to_end_via_auto_env(monkeypatch):
    if "triton" not in lsfused.available_backends():
        pytest.skip(lsfused.backends()["triton"])
    monkeypatch.setenv("LSFUSED_BACKEND", "triton")
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters())
    assert opt.backend == "triton"
    x, y = batches(1)[0]
    opt.step(closure_for(model, x, y))
    assert opt.last_step.outcome == "accepted"
