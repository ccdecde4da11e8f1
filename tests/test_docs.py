"""The README and docs/ stay true to the repository: every relative link and #anchor resolves to a
file and a heading, and every command they show (`loraserve ...`, `loraserve-client ...`,
`make ...`) names a real subcommand, a real flag of it and a real Makefile target. The command
trees are read from the argparse parsers themselves, so nothing is started."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from loraserve.clients.cli import build_parser as client_parser
from loraserve.server.settings import reference
from loraserve.tools.cli import build_parser as server_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE = re.compile(r"`([^`\n]+)`")
# Where a command starts on a shell line: after these, the next word is a program.
SEPARATORS = re.compile(r"&&|\|\|?|;|\$\(|\$'|`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def prose(text: str) -> str:
    return FENCE.sub("", text)


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in prose(path.read_text()).splitlines():
        if line.startswith("#"):
            base = slug(line.lstrip("#"))
            n = seen.get(base, 0)
            seen[base] = n + 1
    return {base if i == 0 else f"{base}-{i}" for base, count in seen.items() for i in range(count)}


def test_the_readme_fits_its_reader():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
    assert {p.name for p in DOCS} >= {"README.md", "api.md", "operations.md", "adapters.md", "architecture.md",
                                      "performance.md"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(doc):
    broken = []
    for href in LINK.findall(prose(doc.read_text())):
        if re.match(r"[a-z]+:", href):
            continue
        file, _, anchor = href.partition("#")
        target = (doc.parent / file).resolve() if file else doc
        if not target.exists():
            broken.append(f"{href}: no file {target.relative_to(REPO)}")
        elif anchor and (target.suffix != ".md" or anchor not in anchors(target)):
            broken.append(f"{href}: no heading #{anchor} in {target.relative_to(REPO)}")
    assert not broken, f"{doc.name}: {broken}"


CODE = sorted(p for room in ("server", "scheduler", "runner", "registry", "tools", "pyclient", "tests")
              for p in (REPO / room).rglob("*.py") if "build" not in p.relative_to(REPO).parts)


def test_no_issue_numbers_or_seed_references():
    found = [doc.name for doc in DOCS if re.search(r"\bissues? ?\d|\bissue\b|seed[- ]0\d\d", doc.read_text(), re.I)]
    found += [path.name for path in CODE if path != Path(__file__)
              and re.search(r"\bissues? ?\d|\(issue\b|seed[- ]?0\d\d|\bseeds/", path.read_text(), re.I)]
    assert not found, found


def test_python_in_the_docs_imports_from_loraserve():
    """Snippets a reader copies: every room imports as loraserve.<room>."""
    bare = re.compile(r"^\s*(from|import) (server|scheduler|runner|registry|tools|clients)\b", re.M)
    found = [f"{doc.name}: {m.group(0).strip()}" for doc in [*DOCS, REPO / "pyclient" / "README.md"]
             for block in FENCE.findall(doc.read_text()) for m in bare.finditer(block)]
    assert not found, found


def shell_lines(text: str):
    """Every command line the docs show: code blocks (continuations joined, comments dropped) and
    inline code spans."""
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines()[1:-1]:
            yield line.split(" # ")[0].split("  #")[0]
    for span in INLINE.findall(prose(text)):
        yield span


def commands(program: str):
    """(doc, words) for each invocation of `program` (by itself or by a path ending in it)."""
    for doc in DOCS:
        for line in shell_lines(doc.read_text()):
            for part in SEPARATORS.split(line):
                try:
                    words = shlex.split(part, comments=False)
                except ValueError:  # an unbalanced quote: a span quoting part of a command
                    words = part.split()
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                    words = words[1:]
                if words and words[0].rsplit("/", 1)[-1] == program:
                    yield doc.name, words[1:]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def check(parser: argparse.ArgumentParser, words: list[str]) -> str | None:
    """Why `words` is not a command of `parser` (None when it is): each subcommand level must name a
    real subcommand, and every --flag must be one of the innermost command's options."""
    while (choices := subcommands(parser)) and words:
        if words[0] not in choices:
            return f"no subcommand {words[0]!r} (has {sorted(choices)})"
        parser, words = choices[words[0]], words[1:]
    options = {o for a in parser._actions for o in a.option_strings}
    flags = [w.strip("[]").split("=")[0] for w in words if w.strip("[").startswith("--")]
    unknown = [flag for flag in flags if flag not in options]
    return f"unknown options {unknown}" if unknown else None


@pytest.mark.parametrize("program, parser", [("loraserve", server_parser), ("loraserve-client", client_parser)])
def test_every_command_shown_is_a_real_subcommand_with_real_flags(program, parser):
    tree = parser()
    shown = list(commands(program))
    assert shown, f"the docs show no {program} command"
    wrong = [f"{doc}: {program} {' '.join(words)}: {why}" for doc, words in shown if (why := check(tree, words))]
    assert not wrong, "\n".join(wrong)


def options(parser: argparse.ArgumentParser) -> set[str]:
    found = {o for a in parser._actions for o in a.option_strings}
    for child in subcommands(parser).values():
        found |= options(child)
    return found


# Flags the docs name that belong to other programs: vLLM, docker, envoy, pytest, and the modules
# run with `python -m` (tools.bench.guided, tools.bench.lora_step, tools.gpu_check).
FOREIGN = {"--lora-modules", "--gpus", "--mode", "--junitxml", "--tokenizer", "--rounds", "--limit", "--budget-s",
           "--kvcap-model"}


def test_every_flag_the_prose_names_is_an_option_of_a_command():
    known = options(server_parser()) | options(client_parser()) | FOREIGN
    wrong = {(doc.name, flag) for doc in DOCS for span in INLINE.findall(prose(doc.read_text()))
             for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", span) if flag not in known}
    assert not wrong, sorted(wrong)


def test_every_make_target_shown_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):(?!=)", makefile, re.M))
    shown = [(doc, words[0]) for doc, words in commands("make") if words and not words[0].startswith("-")]
    assert shown
    wrong = [f"{doc}: make {target}" for doc, target in shown
             if target not in targets and not re.fullmatch(r"[A-Z_]+=.*", target)]
    assert not wrong, wrong


def test_every_serve_flag_in_the_configuration_table_is_a_serve_option():
    serve = subcommands(server_parser())["serve"]
    options = {o for a in serve._actions for o in a.option_strings}
    operations = (REPO / "docs" / "operations.md").read_text()
    section = operations[operations.index("\n## Configuration\n") + 1:]
    table = section[:section.index("\n## ")]
    flags = {flag for row in table.splitlines() if row.startswith("| `--")
             for flag in re.findall(r"`(--[\w-]+)`", row.split("|")[1])}
    assert flags and flags <= options, flags - options


def test_the_configuration_section_is_the_one_generated_from_the_config_tree():
    operations = (REPO / "docs" / "operations.md").read_text()
    start = operations.index("\n## Configuration\n") + 1
    section = operations[start:operations.index("\n## ", start) + 1]
    assert section == reference() + "\n", ("docs/operations.md's configuration section differs from "
                                          "loraserve.server.settings.reference(): write that in its place")
