"""The ``torch-fast`` backend (no compiler needed) against the ``torch`` reference: the same quantities within a
few ulps, float64 sums within 1e-6 relative, the snapshot and reverts bit-exact, the same decisions on small
training runs, and ``auto``'s choice when the extension is missing."""

import math

import pytest
import torch
from conftest import batches, closure_for, mlp
from test_ops import BERT_LAYER, HP, inputs, ranges_for

import lsfused
from lsfused import reference as ref
from lsfused.backends import resolve
from lsfused.kernels import torch_fast

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def pass_a(impl, g, w, v, m, ranges, mode, with_dm, eta=None, trial_dm=False):
    n, sdt = g.numel(), v.dtype
    w, v, m = w.clone(), v.clone(), m.clone()
    w0 = torch.full((n,), math.nan, dtype=sdt)
    if mode == ref.MODE_SGD:
        v, m = None, None
    hp = HP * (len(ranges) // 2)
    sums = impl.direction_and_norms(g, w, w0, v, m, ranges, hp, mode, with_dm, eta, trial_dm)
    return sums, {"w": w, "w0": w0, "v": v, "m": m}


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(torch_fast, "CHUNK", 1000)  # several chunks per range, a short last one


TOL = {torch.float64: {"rtol": 1e-13, "atol": 1e-14}, torch.float32: {"rtol": 4e-6, "atol": 1e-6}}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", [ref.MODE_SGD, ref.MODE_ADAM], ids=["sgd", "adam"])
@pytest.mark.parametrize("with_dm", [False, True], ids=["no_dm", "dm"])
def test_pass_a_close_to_reference(dtype, mode, with_dm, small_chunks):
    g, w, v, m = inputs(BERT_LAYER, dtype)
    ranges = ranges_for(BERT_LAYER, per_tensor_ranges=True)
    eta = torch.tensor([0.5 if i % 3 else math.nan for i in range(len(ranges) // 2)], dtype=torch.float64)
    with_dm = with_dm and mode == ref.MODE_ADAM
    sums, out = pass_a(torch_fast, g, w, v, m, ranges, mode, with_dm, eta, trial_dm=with_dm)
    ref_sums, ref_out = pass_a(ref, g, w, v, m, ranges, mode, with_dm, eta, trial_dm=with_dm)
    assert torch.equal(out["w0"], ref_out["w0"])  # the snapshot is an exact copy
    # A few ulps of the values' scale (sqrt and the rounding order differ; w = w0 + eta*d can cancel); fp16/bf16
    # parameters: an ulp after the cast.
    tol = TOL.get(dtype, {"rtol": 1e-2, "atol": 1e-3})
    for key in ("w", "v", "m"):
        if ref_out[key] is None:
            continue
        if key == "w":  # ranges without a trial keep w bit for bit
            for r, (a, b) in enumerate(ref.pairs(ranges)):
                if math.isnan(eta[r]):
                    assert torch.equal(out["w"][a:b], w[a:b])
        torch.testing.assert_close(out[key], ref_out[key], **tol)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-9)  # chunk sums in the state dtype
    # The trials recompute this backend's direction from what Pass A left: bit for bit its fused first trial.
    hp = HP * (len(ranges) // 2)
    again = w.clone()
    torch_fast.trial_step(again, out["w0"], g, out["v"], out["m"], ranges, hp, mode, eta.nan_to_num(0.0), with_dm)
    fused = [r for r in range(len(eta)) if not math.isnan(eta[r])]
    for r, (a, b) in enumerate(ref.pairs(ranges)):
        if r in fused:
            assert torch.equal(again[a:b], out["w"][a:b])


@pytest.mark.parametrize("along_dm", [False, True], ids=["d", "dm"])
def test_trial_step_absorbed_and_restore_against_reference(small_chunks, along_dm):
    g, w, v, m = inputs(BERT_LAYER, torch.float32, seed=3)
    ranges = ranges_for(BERT_LAYER, per_tensor_ranges=True)
    hp = HP * (len(ranges) // 2)
    eta = torch.linspace(1e-3, 2.0, len(ranges) // 2, dtype=torch.float64)
    w0 = w.clone()
    a, b = w.clone(), w.clone()
    ref.trial_step(a, w0, g, v, m, ranges, hp, ref.MODE_ADAM, eta, along_dm)
    torch_fast.trial_step(b, w0, g, v, m, ranges, hp, ref.MODE_ADAM, eta, along_dm)
    torch.testing.assert_close(b, a, rtol=4e-6, atol=1e-6)  # one rounding fewer
    counts = torch_fast.absorbed_counts(b, w0, g, v, m, ranges, hp, ref.MODE_ADAM, along_dm)
    assert torch.equal(counts, ref.absorbed_counts(b, w0, g, v, m, ranges, hp, ref.MODE_ADAM, along_dm))
    torch_fast.restore(b, w0, ranges)
    assert torch.equal(b, w0)


CONFIGS = {
    "adamsls": lambda model, b: lsfused.AdamSLS(model.parameters(), init_step_size=3.0, backend=b),
    "adamsls_b0": lambda model, b: lsfused.AdamSLS(
        model.parameters(), init_step_size=3.0, betas=(0.0, 0.999), backend=b
    ),
    "sgdsls": lambda model, b: lsfused.SGDSLS(model.parameters(), init_step_size=30.0, backend=b),
    "plasls": lambda model, b: lsfused.PLASLS(lsfused.components.by_layers(model, 2), init_step_size=3.0, backend=b),
    "salsa": lambda model, b: lsfused.SaLSa(model.parameters(), weight_decay=0.01, backend=b),
}


def trajectory(name, backend):
    model = mlp()
    opt = CONFIGS[name](model, backend)
    assert opt.backend == backend
    records = []
    for x, y in batches(4) * 3:
        opt.step(closure_for(model, x, y))
        records.append(opt.last_step)
    return records, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", CONFIGS)
def test_same_decisions_as_the_reference(name):
    """Small runs take the same trials and outcomes and, to rounding, the same step sizes and parameters."""
    fast, fast_p = trajectory(name, "torch-fast")
    slow, slow_p = trajectory(name, "torch")
    assert [(r.trials, r.outcome, r.searched) for r in fast] == [(r.trials, r.outcome, r.searched) for r in slow]
    for a, b in zip(fast, slow, strict=True):
        assert a.step_sizes == pytest.approx(b.step_sizes, rel=1e-9)
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
    for a, b in zip(fast_p, slow_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # 12 steps of rounding differences, amplified
    assert any(r.trials > 1 for r in slow), "the run should exercise backtracking"


def test_a_rejected_step_reverts_bit_exactly():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters(), backend="torch-fast", max_backtracks=2)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    calls = []

    def closure():
        calls.append(1)
        loss = closure_for(model, x, y)()
        return loss if len(calls) == 1 else loss + 1e6  # every trial is rejected

    opt.step(closure)
    assert opt.last_step.outcome == "failed"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_auto_prefers_the_extension_and_never_picks_the_reference():
    opt = lsfused.AdamSLS(mlp().parameters())
    expected = "cpp" if lsfused.backends()["cpp"] is None else "torch-fast"
    assert opt.backend == expected and lsfused.backends()["torch-fast"] is None


def test_grad_check_counts_non_finite_and_survives_fp32_overflow():
    ops = resolve("torch-fast")
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    count, sumsq = ops.grad_check(g)
    assert count == 0 and sumsq == pytest.approx(math.fsum(x * x for x in g.double().tolist()), rel=1e-5)
    big = torch.full((4,), 1e20)  # squares overflow fp32 but not float64
    assert ops.grad_check(big) == (0, pytest.approx(4e40))
    g[[3, 500]] = torch.tensor([math.nan, math.inf])
    assert ops.grad_check(g)[0] == 2
