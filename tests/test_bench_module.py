"""``lsfused.apps.bench``: the forced scenarios measure what they say, the ratios use a reference timed around each row,
and every step measurement is reported while the run goes on."""

import csv
import logging

import pytest
import torch

import lsfused
from lsfused.apps import bench
from lsfused.apps.baselines import PaperStyleAdamSLS

CPU = torch.device("cpu")


@pytest.mark.parametrize("rejections", [0, 3])
@pytest.mark.parametrize("name", ["AdamSLS", "SaLSa"])
def test_scripted_step_rejects_exactly_the_first_trials(name, rejections):
    params = bench._make_params([(16, 4), (4,)], CPU)
    opt = lsfused.AdamSLS(params) if name == "AdamSLS" else lsfused.SaLSa(params, speed_up=False)
    step = bench._lsfused_step(opt, bench._Script(rejections))
    for _ in range(2):  # every timed step starts over: same step size, same number of trials
        step()
        assert opt.last_step.outcome == "accepted"
        assert opt.last_step.trials == rejections + 1


def test_scripted_paper_style_step_backtracks_three_times():
    params = bench._make_params([(16, 4)], CPU)
    baseline = PaperStyleAdamSLS(params)
    script = bench._Script(3)
    baseline.step(script, script.loss)
    assert script.calls == 4


def test_timeit_against_times_the_reference_right_before_and_after():
    calls = []
    med, p20, p80, ref_med = bench.timeit_against(lambda: calls.append("fn"), lambda: calls.append("ref"), repeats=3)
    block = 1 + 3  # warm-up + repeats
    assert calls == ["ref"] * block + ["fn"] * block + ["ref"] * block
    assert 0 < p20 <= med <= p80 and ref_med > 0


def test_bench_steps_reports_every_step_row_with_its_ratio(caplog):
    with caplog.at_level(logging.INFO, logger="lsfused.apps.bench"):
        rows = bench.bench_steps("tiny", [(32, 8), (8,)], CPU, repeats=1)
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(caplog.records) == len(steps)
    for r, record in zip(steps, caplog.records, strict=True):
        assert r["name"] in record.getMessage() and r["scenario"] in record.getMessage()
        assert r["ratio_to_fused_adam"] > 0
        assert r["name"].startswith(("Adam (", "paper-style")) or r["bytes_per_element"] > 0
    scenarios = {(r["name"], r["backend"], r["scenario"]) for r in steps}
    for backend in bench._backends(CPU):
        for name in ("AdamSLS b1=0", "AdamSLS", "PLASLS", "SaLSa"):
            assert {(name, backend, "tiny/accepted"), (name, backend, "tiny/3 backtracks")} <= scenarios
    # Memory per parameter (fp32 state, the default beta1 = 0.9): AdamSLS keeps w0, v, m, 3 x 4 bytes (no direction
    # buffer); Adam m and v, 8 bytes.
    memory = {r["name"]: r["ratio_to_fused_adam"] for r in rows if r["kind"] == "memory"}
    assert memory["AdamSLS"] == 12.0 and memory["Adam (fused)"] == 8.0


# Bytes per fp32 element, from the buffers each op touches: the non-finite check reads g (4); Pass A reads g, w, v
# (and m) and writes v (and m), w0 and, with the first trial fused in, w; each further trial (Pass B) reads w0, and
# g, v to recompute d, and writes w (16); with momentum the accepted step is applied along dm (Pass B reading w0,
# m, v: 16).
@pytest.mark.parametrize(
    ("name", "rejections", "expected"),
    [
        ("AdamSLS b1=0", 0, 4 + 12 + 12),
        ("AdamSLS b1=0", 3, 4 + 12 + 12 + 3 * 16),
        ("AdamSLS", 0, 4 + 16 + 16 + 16),
        ("SaLSa", 0, 4 + 16 + 16),
    ],
)
def test_step_bytes_per_element_count_the_buffers_touched(name, rejections, expected):
    params = bench._make_params([(16, 4), (4,)], CPU)
    if name == "SaLSa":
        opt = lsfused.SaLSa(params, speed_up=False)
    else:
        opt = lsfused.AdamSLS(params, betas=(0.0, 0.999) if "b1=0" in name else (0.9, 0.999))
    step = bench._lsfused_step(opt, bench._Script(rejections))
    assert bench.step_bytes_per_element(opt, step) == expected
    assert opt.last_step.trials == rejections + 1
    assert not isinstance(opt._ops, bench.ByteCounter)  # the counter is removed again


def test_append_csv_rewrites_an_older_header(tmp_path):
    path = tmp_path / "r.csv"
    old_fields = [f for f in bench.CSV_FIELDS if f != "bytes_per_element"]
    path.write_text(",".join(old_fields) + "\n" + ",".join("x" if f == "name" else "" for f in old_fields) + "\n")
    bench.append_csv([{"kind": "step", "name": "new", "bytes_per_element": 32.0}], path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == bench.CSV_FIELDS
    assert [r["name"] for r in rows] == ["x", "new"] and rows[1]["bytes_per_element"] == "32.0"
    assert rows[0]["bytes_per_element"] == "" and all(None not in r for r in rows)  # no shifted columns
