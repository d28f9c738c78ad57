"""The README and the guides under docs/ stay true to the code.

- every ```python block of README.md and docs/*.md runs as it stands (on CPU, in a temporary directory);
- every ``lsfused ...`` / ``python -m lsfused ...`` line of their ```bash blocks parses with the CLI's own parser
  (the subcommands are replaced by a recorder, so nothing is trained);
- every relative link resolves to a file, and every ``#anchor`` to a heading of its target;
- measurements are cited by the file that holds them, not by how the work was organised.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import lsfused.cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    page: Path
    heading: str
    lang: str
    code: str
    id: str


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _split(page: Path) -> tuple[list[tuple[int, str]], list[Block]]:
    """(headings as (level, text), fenced blocks) of a Markdown page; '#' lines inside fences are not headings."""
    headings, blocks, counts = [], [], {}
    heading, fence, lang, body = "", None, "", []
    for line in page.read_text().splitlines():
        if fence is None:
            match = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", line)
            if match:
                fence, lang, body = match.group(1), match.group(2).lower(), []
                continue
            match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
            if match:
                heading = match.group(2)
                headings.append((len(match.group(1)), heading))
        elif line.strip() == fence:
            counts[heading, lang] = counts.get((heading, lang), 0) + 1
            name = f"{_rel(page)}:{heading} #{counts[heading, lang]}"
            blocks.append(Block(page, heading, lang, "\n".join(body) + "\n", name))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{_rel(page)}: unclosed code fence"
    return headings, blocks


def _blocks(lang: str) -> list[Block]:
    return [b for page in PAGES for b in _split(page)[1] if b.lang == lang]


PYTHON = _blocks("python")


def test_the_pages_have_snippets():
    assert {b.page.name for b in PYTHON} >= {"README.md", "integrations.md"}
    assert any(b.page.name == "README.md" and b.heading == "Quickstart" for b in PYTHON)


def test_the_integrations_page_covers_every_stack():
    headings = " ".join(b.heading for b in PYTHON if b.page.name == "integrations.md")
    stacks = ("Plain PyTorch", "schedulers", "Hugging Face", "Lightning", "accelerate", "PEFT", "Mixed precision")
    for stack in (*stacks, "Saving", "Checkpointing"):
        assert stack in headings


def _quickstart_loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The README's quickstart iterates over ``loader``: two batches of the shapes its model takes."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 64, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(2)]


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_snippet_runs(block, tmp_path, monkeypatch):
    code = block.code
    for module in ("transformers", "pytorch_lightning", "peft", "accelerate", "safetensors"):
        if re.search(rf"^\s*(import|from) {module}\b", code, re.M):
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)  # snippets write files
    from lsfused.apps import registry

    registered = dict(registry.OPTIMIZERS)
    scope = {"__name__": "docs_snippet", "loader": _quickstart_loader()}
    try:
        exec(compile(code, f"<{block.id}>", "exec"), scope)
    finally:
        registry.OPTIMIZERS.clear()
        registry.OPTIMIZERS.update(registered)
        if "from accelerate" in code:  # its settings live in process-wide singletons: leave none behind
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()


# ---------------------------------------------------------------------------------------------- command lines


def _commands() -> list[tuple[str, list[str]]]:
    """Every lsfused invocation of the pages' bash blocks, as (id, argv after the program name)."""
    out = []
    for block in _blocks("bash") + _blocks("sh") + _blocks("shell") + _blocks("console"):
        text = re.sub(r"\\\n\s*", " ", block.code)
        for line in text.splitlines():
            words = shlex.split(line.lstrip("$ "), comments=True)
            for start, word in enumerate(words):
                if word == "lsfused" or word.endswith("/lsfused"):
                    argv = words[start + 1 :]
                elif word == "-m" and start + 1 < len(words) and words[start + 1] == "lsfused":
                    argv = words[start + 2 :]
                else:
                    continue
                out.append((f"{block.id}: {' '.join(words)}", argv))
                break
    return out


COMMANDS = _commands()


def test_the_pages_show_commands():
    programs = {argv[0] for _, argv in COMMANDS if argv}
    assert programs >= {"demo", "diagnose", "bench"}


def _is_subcommand(obj) -> bool:
    if not inspect.isfunction(obj) or obj.__module__ != lsfused.cli.__name__:
        return False
    return list(inspect.signature(obj).parameters) == ["args"]


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[name for name, _ in COMMANDS])
def test_command_line_parses(argv, monkeypatch):
    from lsfused.apps import registry

    calls = []

    def record(args):
        calls.append(args)
        return 0

    # The subcommands are module functions taking the parsed namespace; the parser binds them when main() builds
    # it, so replacing them here means nothing runs but the parse itself.
    for name, obj in list(vars(lsfused.cli).items()):
        if name.startswith("_") and _is_subcommand(obj):
            monkeypatch.setattr(lsfused.cli, name, record)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = lsfused.cli.main(list(argv))
        except SystemExit as exit_:
            pytest.fail(f"lsfused {' '.join(argv)} does not parse (exit {exit_.code}): {err.getvalue()}")
    assert rc == 0 and len(calls) == 1, f"lsfused {' '.join(argv)} did not reach a subcommand"
    optimizers = getattr(calls[0], "optimizers", None)
    if argv[0] == "demo" and optimizers:
        unknown = {o.strip() for o in optimizers.split(",") if o.strip()} - set(registry.names())
        assert not unknown, f"unknown --optimizers {sorted(unknown)}"


# ---------------------------------------------------------------------------------------------- links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, heading in _split(page)[0]:
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def _prose(page: Path) -> str:
    """The page without its fenced blocks and inline code spans (the code of a link's text is kept)."""
    text, inside = [], False
    for line in page.read_text().splitlines():
        if re.match(r"^\s*(`{3,}|~{3,})", line):
            inside = not inside
            continue
        if not inside:
            text.append(line)
    prose = re.sub(r"\[`([^`\]]*)`\]\(", r"[\1](", "\n".join(text))
    return re.sub(r"`[^`]*`", "", prose)


def _links() -> list[tuple[str, Path, str]]:
    out = []
    for page in PAGES:
        for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", _prose(page)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked here
                out.append((f"{_rel(page)} -> {target}", page, target))
    return list(dict.fromkeys(out))  # each link of a page once


LINKS = _links()


def test_the_pages_link_their_guides():
    readme = {target.split("#")[0] for name, page, target in LINKS if page.name == "README.md"}
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("page,target", [(p, t) for _, p, t in LINKS], ids=[name for name, _, _ in LINKS])
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{_rel(page)}: {target} does not exist"
    assert ROOT in dest.parents or dest == ROOT, f"{_rel(page)}: {target} leaves the repository"
    if anchor:
        assert dest.suffix == ".md", f"{_rel(page)}: {target}: an anchor into a file that is not Markdown"
        assert anchor in _anchors(dest), f"{_rel(page)}: {target}: no such heading in {_rel(dest)}"


# ---------------------------------------------------------------------------------------------- citations

BANNED = (
    r"\bissues? \d+",
    r"\bissue \d+'s",
    r"\b(this|that|the same|the previous|an earlier|the earlier) session\b",
    r"\b(earlier|previous) (run|runs|defaults|default|table|session)\b",
    r"\bwaves?\b",
)


@pytest.mark.parametrize("page", PAGES, ids=[_rel(p) for p in PAGES])
def test_measurements_are_cited_by_file_not_by_history(page):
    text = page.read_text()
    for pattern in BANNED:
        hits = [m.group(0) for m in re.finditer(pattern, text, re.I)]
        assert not hits, f"{_rel(page)}: {hits} (cite the committed file that holds the number)"
