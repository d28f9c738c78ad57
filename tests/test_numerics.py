"""The noise-aware Armijo test and the precision diagnostics, on constructed cases with known answers."""

import json
import math
import struct

import pytest
import torch
from conftest import batches, closure_for, mlp
from torch import nn

import lsfused
from lsfused import cli, diagnostics


def ulp32(x):
    """Spacing of float32 at |x|, from the bit pattern (independent of the library's helper)."""
    bits = struct.unpack("<I", struct.pack("<f", abs(x)))[0]
    nxt = struct.unpack("<f", struct.pack("<I", bits + 1))[0]
    return nxt - struct.unpack("<f", struct.pack("<I", bits))[0]


def test_exactly_reproducible_loss_accepts_and_rejects_by_the_classic_rule():
    # f(w) = sum(w^2) in float64, w0 = (1, 1); SGD: d = -g = -2w, s = 8. f(w0 + eta d) = 2(1 - 2 eta)^2.
    # Armijo: 2(1-2eta)^2 <= 2 - 0.1*eta*8  <=>  eta <= 0.8. From 1.0 with beta_b 0.5: reject 1.0, accept 0.5.
    for armijo in ("classic", "noise_aware"):
        p = nn.Parameter(torch.ones(2, dtype=torch.float64))
        opt = lsfused.SGDSLS([p], init_step_size=1.0, gamma=1.0, beta_b=0.5, armijo=armijo)
        opt.step(lambda p=p: (p * p).sum())
        assert (opt.last_step.outcome, opt.last_step.trials, opt.last_step.step_sizes) == ("accepted", 2, (0.5,))
        assert torch.equal(p.detach(), torch.zeros(2, dtype=torch.float64))


def absorbed_problem(armijo, **kw):
    # w = 1e8 in float32 (ulp 8): any update smaller than 4 is absorbed, so f(trial) == f(w0) == 4 exactly.
    # g = 2e-4, s = 1.6e-7: the predicted decrease c*eta*s = 1.6e-11 is below float32's ulp of the loss (4.8e-7)
    # but above float64's, so the classic test (in float64) rejects every trial.
    p = nn.Parameter(torch.full((4,), 1e8))
    target = torch.full((4,), 1e8 - 1e4)
    opt = lsfused.SGDSLS([p], init_step_size=1e-3, gamma=1.0, armijo=armijo, **kw)
    return p, opt, lambda: ((p - target) * 1e-4).pow(2).sum()


def test_absorbed_update_stops_instead_of_backtracking_100_times():
    p, opt, closure = absorbed_problem("noise_aware")
    calls = [0]

    def counted():
        calls[0] += 1
        return closure()

    opt.step(counted)
    rec = opt.last_step
    assert rec.outcome == "unresolvable" and rec.trials == 1 and calls[0] == 2
    assert rec.reason == "noise"
    assert rec.step_sizes == (1e-3,)  # not shrunk
    assert torch.equal(p.detach(), torch.full((4,), 1e8))  # kept w0


def test_absorbed_update_collapses_under_the_classic_rule():
    p, opt, closure = absorbed_problem("classic")
    opt.step(closure)
    rec = opt.last_step
    assert rec.outcome == "failed" and rec.trials == 100
    assert rec.step_sizes[0] == pytest.approx(1e-3 * 0.9**99, rel=1e-12)


def test_absorbed_reason_when_the_predicted_decrease_is_measurable():
    # The loss is steep (s large) but the weights are huge: the predicted decrease exceeds the loss's ulp, yet the
    # trial cannot move any weight. The rule "absorbed" must fire, not "noise".
    p = nn.Parameter(torch.full((4,), 1e8))
    opt = lsfused.SGDSLS([p], init_step_size=1e-9, gamma=1.0, armijo="noise_aware")
    opt.step(lambda: (p * 1e-6).sum().double() * 1e3 - 4e5)
    rec = opt.last_step
    assert rec.outcome == "unresolvable" and rec.reason == "absorbed" and rec.trials == 1
    assert opt.absorbed_fraction([0]) == 1.0


def test_genuine_rejection_still_backtracks():
    p = nn.Parameter(torch.ones(2))
    opt = lsfused.SGDSLS([p], init_step_size=10.0, gamma=1.0, armijo="noise_aware")
    opt.step(lambda: (p * p).sum())
    assert opt.last_step.outcome == "accepted" and opt.last_step.trials > 1


def test_rounding_bound_is_one_ulp_of_the_loss():
    p = nn.Parameter(torch.ones(2))
    opt = lsfused.SGDSLS([p])
    opt.step(lambda: (p * p).sum() + 1000.0)
    assert opt.rounding_bound(1000.5, 1000.25) == ulp32(1000.5)


def test_estimate_noise_uses_a_repeated_evaluation():
    p = nn.Parameter(torch.ones(2))
    opt = lsfused.SGDSLS([p], estimate_noise=True)
    values = iter([3.0, 3.5, 2.0, 1.0, 1.0])

    def noisy():
        v = next(values)
        sq = (p * p).sum()
        return sq - sq.detach() + v  # gradient 2p, value v

    opt.step(noisy)
    assert opt._noise == 0.5 and opt.last_step.closure_calls == 3
    assert opt.rounding_bound(3.0, 2.0) == 0.5


def test_classic_reproduces_the_default_decisions_on_an_ordinary_run():
    """Away from the noise floor both tests take identical decisions."""
    runs = []
    for armijo in ("classic", "noise_aware"):
        model = mlp()
        opt = lsfused.PLASLS(lsfused.components.by_layers(model, 2), init_step_size=3.0, armijo=armijo)
        out = []
        for i in range(20):
            x, y = batches(4)[i % 4]
            opt.step(closure_for(model, x, y))
            out.append((opt.last_step.outcome, opt.last_step.trials, opt.last_step.step_sizes))
        runs.append((out, [q.detach().clone() for q in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_recorder_reports_fp32_discrepancy_in_ulps():
    # 4097 equal gradients of 0.1: the float64 sum of g*g is exact-ish, a float32 sum is not; compute both here.
    p = nn.Parameter(torch.zeros(4097))
    g_value = torch.tensor(0.1, dtype=torch.float32)
    opt = lsfused.SGDSLS([p])
    rec = diagnostics.Recorder(opt)
    target = torch.full((4097,), -0.05)
    opt.step(lambda: ((p - target) ** 2).sum())  # grad = 2(p - target) = 0.1
    row = rec.rows[0]
    g = torch.full((4097,), float(g_value))
    gg64 = math.fsum([float(g_value) ** 2] * 4097)
    gg32 = float((g * g).sum())
    assert row["groups"][0]["sums"]["gg"] == pytest.approx(gg64, rel=1e-12)
    # The backend's float64 sum may differ from fsum by 1e-12 relative (test_ops); carry that into ulps.
    slack = 1e-12 * gg64 / ulp32(gg64)
    assert row["groups"][0]["fp32_ulps"]["gg"] == pytest.approx(abs(gg32 - gg64) / ulp32(gg64), abs=slack)
    trial = row["trials"][0]
    assert trial["bound"] == ulp32(max(row["loss"], trial["loss"]))
    assert trial["margin"] == pytest.approx((row["loss"] - trial["predicted"] - trial["loss"]) / trial["bound"])


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp", "torch-fast") if b in lsfused.available_backends()])
@pytest.mark.parametrize("make", [lsfused.AdamSLS, lsfused.SaLSa], ids=["AdamSLS", "SaLSa"])
def test_a_recorder_changes_no_decision(backend, make):
    """Without a recorder Pass A skips the sums only the precision report reads (gg, dd): the trajectory is the
    recorded one bit for bit, and the recorder's gg and dd are the float64 sums of the step's gradient and
    direction."""
    runs = []
    for record in (False, True):
        model = mlp()
        opt = make(model.parameters(), backend=backend)
        rec = diagnostics.Recorder(opt) if record else None
        steps = []
        for i in range(8):
            x, y = batches(4)[i % 4]
            opt.step(closure_for(model, x, y))
            steps.append((opt.last_step.outcome, opt.last_step.trials, opt.last_step.step_sizes))
            if rec is not None:
                g = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
                assert rec.rows[-1]["groups"][0]["sums"]["gg"] == pytest.approx(math.fsum((g * g).tolist()), rel=1e-6)
        runs.append((steps, [q.detach().clone() for q in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_pass_a_computes_the_diagnostic_sums_only_for_a_recorder():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters())
    asked = []
    pass_a = opt._ops.direction_and_norms

    def spy(*args, **kwargs):
        asked.append(kwargs["all_sums"])
        return pass_a(*args, **kwargs)

    opt._ops.direction_and_norms = spy
    x, y = batches(1)[0]
    opt.step(closure_for(model, x, y))
    rec = diagnostics.Recorder(opt)
    opt.step(closure_for(model, x, y))
    rec.detach()
    opt.step(closure_for(model, x, y))
    assert asked == [False, True, False]


def test_recorder_round_trips_and_detaches(tmp_path):
    model = mlp()
    opt = lsfused.PLASLS(lsfused.components.by_layers(model, 2), init_step_size=3.0)
    path = tmp_path / "rec.jsonl"
    rec = diagnostics.Recorder(opt, path)
    for x, y in batches(4):
        opt.step(closure_for(model, x, y))
    assert diagnostics.Recorder.load(path) == rec.rows
    rec.save(tmp_path / "again.jsonl")
    assert diagnostics.Recorder.load(tmp_path / "again.jsonl") == rec.rows
    assert len(rec.rows) == 4 and rec.rows[0]["trials"][0]["absorbed"] == 0.0
    rec.detach()
    x, y = batches(1)[0]
    opt.step(closure_for(model, x, y))
    assert len(rec.rows) == 4
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="not a diagnostics record"):
        diagnostics.Recorder.load(tmp_path / "bad.jsonl")


def test_summary_finds_a_collapse():
    rows = [
        {
            "step": i + 1,
            "step_sizes": [0.1 * 0.01**i, 0.1],
            "trials": [{"eta": 0.1, "margin": 0.5 if i else 3.0, "accepted": True, "absorbed": 0.0}],
            "groups": [{"fp32_ulps": {"s": 1.0, "gg": 2.0, "gd": 0.5, "dd": 0.0}}] * 2,
            "outcome": "accepted",
            "merged": None,
        }
        for i in range(8)
    ]
    s = diagnostics.summarize(rows)
    assert [c["group"] for c in s["collapses"]] == [0]
    assert s["trials_within_noise_floor"] == 7 and s["max_fp32_ulps"]["ulps"] == 2.0


def test_diagnose_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["diagnose", "--epochs", "1", "--out", str(out)]) == 0
    png = (out / "diagnostics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "largest fp32-vs-fp64 disagreement" in (out / "summary.txt").read_text()
    lines = (out / "diagnostics.jsonl").read_text().splitlines()
    assert len(lines) == 22 and json.loads(lines[0])["step"] == 1
    redraw = tmp_path / "redraw"
    assert cli.main(["diagnose", "--from", str(out / "diagnostics.jsonl"), "--out", str(redraw)]) == 0
    assert (redraw / "diagnostics.png").exists()
    assert "steps: 22" in capsys.readouterr().out


def test_invalid_armijo_option():
    with pytest.raises(ValueError, match="armijo must be one of"):
        lsfused.AdamSLS(mlp().parameters(), armijo="strict")
    with pytest.raises(ValueError, match="estimate_noise must be a bool"):
        lsfused.AdamSLS(mlp().parameters(), estimate_noise="yes")


def quantized_problem(armijo):
    # The loss value is rounded to 0.1 (as a loss computed by cancellation is quantized), its gradient is exact:
    # small trials move the weights but leave the loss exactly unchanged, although c*eta*s is far above one ulp.
    p = nn.Parameter(torch.ones(2))
    opt = lsfused.SGDSLS([p], init_step_size=1e-3, gamma=1.0, armijo=armijo)

    def closure():
        q = (p * p).sum()
        return q + (torch.round(q * 10) / 10 - q).detach()

    return p, opt, closure


def test_loss_unchanged_twice_is_unresolvable():
    p, opt, closure = quantized_problem("noise_aware")
    opt.step(closure)
    rec = opt.last_step
    assert (rec.outcome, rec.reason, rec.trials) == ("unresolvable", "noise", 2)
    assert rec.step_sizes == (1e-3,)  # the step size where the unchanged run began
    assert torch.equal(p.detach(), torch.ones(2))
    p, opt, closure = quantized_problem("classic")
    opt.step(closure)
    assert (opt.last_step.outcome, opt.last_step.trials) == ("failed", 100)
