"""Every command the documents cite still exists: each `iomm ...` line names real sub-commands and options, each
`python -m MODULE` an importable module, each `scripts/...` or `bench/...` file a file of this repository. A result
file is only as reproducible as the command its document gives for it."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from iomm.cli import build_parser

ROOT = Path(__file__).parents[1]
DOCUMENTS = sorted({ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md"),
                    *(ROOT / "docs" / "results").glob("*.md")})
GROUPS = ("eval", "bench", "mllm", "vae", "data", "world", "study", "recipe")  # sub-commands that take a second word


def snippets(text: str) -> list[str]:
    """Shell lines of the fenced blocks (continuations joined) and inline code spans."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [part.strip() for line in [*lines, *spans] for part in re.split(r"&&|;|\|\||(?<![|])\|(?![|])", line)]


def cited(kind: str) -> list[tuple[str, str]]:
    """(document, snippet) pairs: `iomm` commands, `python -m` modules or repository paths."""
    found = []
    for path in DOCUMENTS:
        for snippet in snippets(path.read_text(encoding="utf-8")):
            if kind == "iomm":
                words = snippet.split()
                while words and re.fullmatch(r"[A-Z_]+=\S*|env|nohup|time", words[0]):
                    words = words[1:]
                if words[:1] in (["iomm"], [".venv/bin/iomm"]) and len(words) > 1:
                    found.append((path.name, " ".join(["iomm", *words[1:]])))
            elif kind == "module":
                found += [(path.name, module) for module in
                          re.findall(r"python3?\s+-m\s+(iomm(?:\.[a-z_]+)*)(?![\w.])", snippet)]
            else:
                found += [(path.name, name) for name in
                          re.findall(r"(?<![\w/.])((?:scripts|bench)/[a-z0-9_./-]+\.(?:sh|py))", snippet)]
    return sorted(set(found))


@cache
def help_text(*words: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*words, "--help"])
    return out.getvalue()


def test_the_documents_cite_commands_at_all():
    assert len(cited("iomm")) > 100 and len(cited("module")) > 3 and len(cited("path")) > 5


@pytest.mark.parametrize(("document", "command"), cited("iomm"))
def test_every_cited_iomm_command_and_option_exists(document: str, command: str):
    try:
        words = shlex.split(command)[1:]
    except ValueError:
        words = command.split()[1:]
    names = [words[0]] + ([words[1]] if words[0] in GROUPS and len(words) > 1 and
                                      re.fullmatch(r"[a-z][a-z-]*", words[1]) else [])
    text = help_text(*names[:1])
    assert re.search(rf"[{{,\s]{re.escape(names[0])}[}},\s]", help_text()), f"{document}: `{command}`: no command"
    if len(names) > 1 and words[0] not in ("study", "recipe"):  # study and recipe take a name, not a sub-command
        assert re.search(rf"[{{,\s]{re.escape(names[1])}[}},\s]", text), f"{document}: `{command}`: no sub-command"
        text = help_text(*names)
    elif len(names) > 1:
        assert names[1] in text, f"{document}: `{command}`: {names[1]} is not among its choices"
    for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", command):
        assert option in text, f"{document}: `{command}`: `iomm {' '.join(names)}` has no {option}"


@pytest.mark.parametrize(("document", "module"), cited("module"))
def test_every_cited_module_exists(document: str, module: str):
    assert importlib.util.find_spec(module) is not None, f"{document}: python -m {module}: no such module"


@pytest.mark.parametrize(("document", "path"), cited("path"))
def test_every_cited_script_exists(document: str, path: str):
    assert (ROOT / path).is_file(), f"{document}: {path}: no such file"
