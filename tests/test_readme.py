"""Every Python snippet of the README's "Using it with ..." section runs as it stands."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def snippets() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text[text.index("## Using it with ...") :]
    section = section[: section.index("\n## ", 1)]
    out, heading, count = [], "", 0
    for match in re.finditer(r"^### ([^\n]+)$|^```python\n(.*?)^```$", section, re.M | re.S):
        if match.group(1):
            heading, count = match.group(1), 0
        else:
            count += 1
            out.append((f"{heading} #{count}", match.group(2)))
    return out


SNIPPETS = snippets()


def test_the_section_covers_every_stack():
    headings = " ".join(name for name, _ in SNIPPETS)
    stacks = ("Plain PyTorch", "schedulers", "Hugging Face", "Lightning", "accelerate", "PEFT", "Mixed precision")
    for stack in (*stacks, "Saving"):
        assert stack in headings


@pytest.mark.parametrize("code", [code for _, code in SNIPPETS], ids=[name for name, _ in SNIPPETS])
def test_snippet_runs(code, tmp_path, monkeypatch):
    if "transformers" in code:
        pytest.importorskip("transformers")
    if "pytorch_lightning" in code:
        pytest.importorskip("pytorch_lightning")
    if "peft" in code:
        pytest.importorskip("peft")
    if "accelerate" in code:
        pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)  # snippets write files
    try:
        exec(compile(code, "<README.md snippet>", "exec"), {"__name__": "readme_snippet"})
    finally:
        if "from accelerate" in code:  # its settings live in process-wide singletons: leave none behind
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()
