"""Real labeled English text that works offline: WordNet 3.0 noun glosses labeled by lexicographer category.

Debian's ``wordnet-base`` package installs ``/usr/share/wordnet/data.noun`` (Princeton WordNet 3.0, WordNet 3.0
licence: permissive, see ``/usr/share/doc/wordnet-base/copyright``). Each noun synset has a human-written definition
(its gloss) and an expert-assigned lexicographer category (``man 5 lexnames``). Classifying a definition into its
category is a real text classification task. We take four categories, the definition only (example sentences after
the first ``; "`` are dropped, they often name the word itself), and sample a balanced small-data split by seed.
A user's own data comes as a CSV with ``text,label`` columns.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
# lexicographer file number -> label (man 5 lexnames)
CATEGORIES = {5: "animal", 13: "food", 18: "person", 20: "plant"}


@dataclass
class TextData:
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _glosses(path: Path) -> dict[int, list[str]]:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the text demo uses WordNet's noun glosses from Debian's wordnet-base package "
            "(sudo apt-get install wordnet-base; `make demo` installs it when run as root), or pass --data FILE.csv"
        )
    out: dict[int, list[str]] = {k: [] for k in CATEGORIES}
    seen: set[str] = set()
    with path.open(encoding="latin-1") as f:
        for line in f:
            if line.startswith("  ") or "| " not in line:
                continue  # the licence header
            lex = int(line.split(" ", 2)[1])
            if lex not in out:
                continue
            gloss = line.split("| ", 1)[1].strip()
            definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
            if len(definition) >= 10 and definition not in seen:
                seen.add(definition)
                out[lex].append(definition)
    return out


def _split(by_label: list[list[str]], n_train: int, n_test: int, seed: int) -> tuple[list, list, list, list]:
    rng = random.Random(seed)
    k = len(by_label)
    per_train, per_test = n_train // k, n_test // k
    train, test = [], []
    for label, texts in enumerate(by_label):
        if len(texts) < per_train + per_test:
            raise ValueError(f"label {label} has {len(texts)} examples, fewer than the {per_train + per_test} needed")
        picked = rng.sample(texts, per_train + per_test)
        train += [(t, label) for t in picked[:per_train]]
        test += [(t, label) for t in picked[per_train:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return [t for t, _ in train], [y for _, y in train], [t for t, _ in test], [y for _, y in test]


def load_wordnet(n_train: int = 500, n_test: int = 400, seed: int = 0, path: Path = WORDNET_NOUNS) -> TextData:
    """A balanced split of WordNet noun definitions in four categories (animal, food, person, plant)."""
    glosses = _glosses(Path(path))
    lexes = sorted(CATEGORIES)
    parts = _split([glosses[k] for k in lexes], n_train, n_test, seed)
    return TextData(*parts, label_names=[CATEGORIES[k] for k in lexes], source=f"WordNet 3.0 ({path})")


def load_csv(path: str | Path, n_train: int | None = None, n_test_fraction: float = 0.3, seed: int = 0) -> TextData:
    """A user's CSV with ``text,label`` columns (labels are any strings), split into train/test by seed."""
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = list(csv.DictReader(raw.splitlines()))
    if not rows:
        raise ValueError(f"{path} has no data rows (expected a header 'text,label' and at least one row)")
    missing = {"text", "label"} - set(rows[0])
    if missing:
        raise ValueError(f"{path} lacks column(s) {sorted(missing)}; expected 'text,label', found {list(rows[0])}")
    names = sorted({r["label"] for r in rows})
    if len(names) < 2:
        raise ValueError(f"{path} has a single label {names}; classification needs at least two")
    by_label = [[r["text"] for r in rows if r["label"] == name] for name in names]
    n_test = max(len(names), int(len(rows) * n_test_fraction))
    n_train = n_train or (min(len(t) for t in by_label) * len(names) - n_test)
    parts = _split(by_label, n_train, n_test, seed)
    return TextData(*parts, label_names=names, source=str(path))
