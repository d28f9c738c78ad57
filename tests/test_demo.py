"""The main job runs end to end on real data and prints its table."""

import pytest

from lsfused import cli
from lsfused.apps import demo


def test_digits_data_split_is_seeded():
    a, b = demo.load_digits(0), demo.load_digits(0)
    c = demo.load_digits(1)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not (a[1] == c[1]).all()
    assert len(a[0]) + len(a[2]) == 1797 and len(a[2]) == 449


def test_demo_cli_prints_table(capsys):
    assert (
        cli.main(["demo", "--task", "digits", "--epochs", "1", "--optimizers", "adam,adamsls,plasls,salsa,sgdsls"]) == 0
    )
    out = capsys.readouterr().out
    for name in ("adam", "adamsls", "plasls", "salsa", "sgdsls"):
        assert f"\n{name} " in out
    assert "test acc" in out


def test_line_search_beats_chance_in_one_epoch():
    results = demo.run_digits(("adamsls",), epochs=2, progress=False)
    assert results[0].test_accuracy > 0.5 and results[0].closure_calls_per_step >= 2.0


def test_demo_rejects_unknown_optimizer():
    with pytest.raises(SystemExit) as err:
        cli.main(["demo", "--task", "digits", "--optimizers", "adamw"])
    assert err.value.code == 2
