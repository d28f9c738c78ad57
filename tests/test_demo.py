"""The demos' comparison machinery: digits runs end to end, mean and spread over seeds, the tuned-Adam sweep."""

import math
import statistics

import pytest

from lsfused import cli
from lsfused.apps import compare, demo, registry


def test_digits_data_split_is_seeded():
    a, b = demo.load_digits(0), demo.load_digits(0)
    c = demo.load_digits(1)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not (a[1] == c[1]).all()
    assert len(a[0]) + len(a[2]) == 1797 and len(a[2]) == 449


def test_demo_cli_prints_table(capsys, tmp_path):
    names = "adam,adamsls,plasls,salsa,sgdsls"
    args = ["demo", "--task", "digits", "--epochs", "1", "--optimizers", names, "--no-progress", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert (tmp_path / "table.txt").read_text().count("\n") == 8 and (tmp_path / "demo.png").exists()
    out = capsys.readouterr().out
    for name in names.split(","):
        assert f"\n{name} " in out
    assert "test acc" in out and "--seeds 3" in out  # one seed: says how to get the full comparison


def test_line_search_beats_chance_in_one_epoch():
    results, _ = demo.run_digits(("adamsls",), epochs=2, progress=False)
    assert results[0].test_accuracy > 0.5 and results[0].closure_calls_per_step >= 2.0


def test_demo_rejects_unknown_optimizer():
    with pytest.raises(SystemExit) as err:
        cli.main(["demo", "--task", "digits", "--optimizers", "adamw"])
    assert err.value.code == 2


def _run(name, seed, loss, acc, forwards=10, wall=1.0):
    return compare.RunResult(name, seed, 2.0, loss, acc, 5, forwards, 5, wall)


def test_aggregate_gives_mean_and_sample_spread_per_optimizer_in_order():
    runs = [_run("b", 0, 0.5, 0.8), _run("a", 0, 1.0, 0.5, 20), _run("b", 1, 0.7, 0.9), _run("b", 2, 0.3, 0.6)]
    rows = compare.aggregate(runs, {"a": "note"})
    assert [r.name for r in rows] == ["b", "a"]
    b, a = rows
    assert b.seeds == 3 and a.seeds == 1
    # written out: mean of (0.5, 0.7, 0.3) = 0.5, sample variance ((0)^2 + 0.2^2 + 0.2^2) / 2 = 0.04
    assert b.train_loss == pytest.approx((0.5, 0.2))
    assert b.test_accuracy == pytest.approx((0.7666666666666666, math.sqrt(((0.8 - 23 / 30) ** 2 + (0.9 - 23 / 30) ** 2
                                                                         + (0.6 - 23 / 30) ** 2) / 2)))  # fmt: skip
    assert a.train_loss == (1.0, 0.0) and a.calls_per_step == (4.0, 0.0) and a.note == "note"
    table = compare.format_table(rows)
    assert "0.5000 ± 0.2000" in table and table.splitlines()[3].rstrip().endswith("note")


def test_select_lr_takes_the_lowest_mean_training_loss():
    sweep = {
        1e-4: [_run("x", 0, 0.40, 0.0), _run("x", 1, 0.20, 0.0)],  # mean 0.30
        1e-3: [_run("x", 0, 0.25, 0.0), _run("x", 1, 0.25, 0.0)],  # mean 0.25: best
        1e-2: [_run("x", 0, math.nan, 0.0), _run("x", 1, 0.0, 0.0)],  # diverged on one seed: loses
    }
    assert compare.select_lr(sweep) == 1e-3
    assert compare.select_lr({3e-4: [_run("x", 0, 0.1, 0)], 1e-4: [_run("x", 0, 0.1, 0)]}) == 1e-4  # tie: smaller
    with pytest.raises(ValueError, match="empty"):
        compare.select_lr({})


def test_tuned_adam_sweeps_on_the_first_seed_and_runs_the_best_on_every_seed():
    calls = []

    def trainer(name, factory, seed):
        calls.append((name, seed))
        return demo.train(name, factory, demo.load_digits(seed), 1, 128, seed, progress=False)

    results, sweep, notes = compare.run(trainer, ["adam-tuned", "adamsls"], seeds=(0, 1), sweep_lrs=(1e-4, 3e-2))
    # seed by seed, so that the rows of one seed run close together in time
    assert calls == [("adam lr 0.0001", 0), ("adam lr 0.03", 0), ("adamsls", 0), ("adam-tuned", 1), ("adamsls", 1)]
    losses = {lr: runs[0].train_loss for lr, runs in sweep.items()}
    best = min(losses, key=losses.get)
    tuned = [r for r in results if r.name == "adam-tuned"]
    assert [r.seed for r in tuned] == [0, 1] and tuned[0].train_loss == losses[best]
    steps = sum(r.steps for runs in sweep.values() for r in runs)  # Adam: one forward and one backward per step
    assert f"lr {best:g}," in notes["adam-tuned"] and f"{steps} forward + {steps} backward" in notes["adam-tuned"]
    rows = compare.aggregate(results, notes)
    assert [r.seeds for r in rows] == [2, 2]
    assert rows[1].train_loss[0] == pytest.approx(statistics.fmean(r.train_loss for r in results[2:]))


def test_registry_is_extensible_and_checks_names():
    registry.register(
        "adamsls-c05", lambda model, ctx: (__import__("lsfused").AdamSLS(model.parameters(), c=0.5), None)
    )
    try:
        assert "adamsls-c05" in registry.names()
        results, table = demo.run_digits(("adamsls-c05",), epochs=1, progress=False)
        assert results[0].name == "adamsls-c05" and "adamsls-c05" in table
    finally:
        del registry.OPTIMIZERS["adamsls-c05"]
    for bad in ("", "a,b", "adam-tuned"):
        with pytest.raises(ValueError, match="invalid optimizer name"):
            registry.register(bad, registry.adam)


def test_multi_seed_cli_run_with_curves(capsys, tmp_path):
    args = ["demo", "--task", "digits", "--epochs", "2", "--seeds", "2", "--optimizers", "adam,plasls", "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seeds (0, 1)" in out and "\nadam " in out and "\nplasls " in out
    results, _ = demo.run_digits(("plasls",), epochs=2, seeds=(0,), progress=False)
    curve = results[0].curve
    assert [c[1] for c in curve] == sorted(c[1] for c in curve) and curve[0][:2] == (0.0, 0) and len(curve) == 3
    assert curve[-1][2] == results[0].test_accuracy
    path = compare.plot(results, tmp_path / "f.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wall_ratio_and_time_to_the_reference_loss():
    def run(name, seed, losses, wall, times):
        return compare.RunResult(name, seed, 9.0, 0.1, 0.5, 4, 8, 4, wall, losses=losses, times=times)

    # adam's last running means: (3+1+2+2)/4 = 2 and 4: the target is their mean, 3.
    runs = [
        run("adam", 0, [3.0, 1.0, 2.0, 2.0], 4.0, [1.0, 2.0, 3.0, 4.0]),
        run("adam", 1, [4.0] * 4, 4.0, [1.0, 2.0, 3.0, 4.0]),
        run("x", 0, [5.0, 1.0, 1.0, 1.0], 10.0, [2.5, 5.0, 7.5, 10.0]),  # running means 5, 3 (reached at 5 s), ...
        run("x", 1, [6.0] * 4, 10.0, [2.5, 5.0, 7.5, 10.0]),  # never
    ]
    adam, x = compare.aggregate(runs)
    assert adam.wall_ratio == 1.0 and x.wall_ratio == 2.5
    assert adam.to_reference == (1.0, 1) and x.to_reference == (5.0, 1)
    assert compare.time_to_loss(runs[3], 3.0) is None and compare.time_to_loss(runs[3], 6.0) == 2.5
    table = compare.format_table([adam, x])
    assert "x adam" in table and "2.50x" in table and " 5 (1/2)" in table
    # without the reference (or without per-step times) the columns are left out
    rows = compare.aggregate(runs[2:])
    assert rows[0].wall_ratio is None and rows[0].to_reference is None
    assert "x adam" not in compare.format_table(rows)
