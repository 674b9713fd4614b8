"""ARCHITECTURE.md's file list stays in step with the tree: every Python file of the engine and the nodes and
every top-level folder is named, and every name it lists exists.

The list is the first fenced block: a tree by indentation (a ``name/`` line opens a folder for the lines
indented below it), one or more names before the description (``cli.py, cli_io.py``; ``infdit/ sana/``); a
name with a slash is relative to the enclosing folder (``sana/lora.py, pag.py`` names uniba/sana/pag.py too).
A folder's ``__init__.py`` is named by its folder line.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def listed_paths(text: str) -> set[str]:
    """The repository paths the first fenced block of ``text`` names (folders end with ``/``)."""
    block = text.split("```", 2)[1].split("\n", 1)[1]
    paths: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        base = stack[-1][1] if stack else ""
        names = [n for n in re.split(r",\s*|\s+", head) if n]
        folder = base
        for name in names:
            if "/" in name.rstrip("/"):
                folder = base + name.rstrip("/").rpartition("/")[0] + "/"
                paths.add(base + name)
            else:
                paths.add(folder + name)
        if len(names) == 1 and names[0].endswith("/"):
            stack.append((indent, base + names[0]))
    return paths


def _tracked() -> list[str]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [name for name in out.stdout.splitlines() if (REPO / name).exists()]


def required_paths(tracked: list[str]) -> set[str]:
    """Every .py under uniba/ and nodes/ (a package's __init__.py as its folder) and every top-level folder."""
    needed = {name.split("/")[0] + "/" for name in tracked if "/" in name and not name.startswith(".")}
    for name in tracked:
        if name.startswith(("uniba/", "nodes/")) and name.endswith(".py"):
            needed.add(name[:-len("__init__.py")] if name.endswith("/__init__.py") else name)
    return needed


def test_architecture_names_every_file_and_folder() -> None:
    listed = listed_paths((REPO / "ARCHITECTURE.md").read_text())
    assert sorted(required_paths(_tracked()) - listed) == []


def test_architecture_names_nothing_that_does_not_exist() -> None:
    listed = listed_paths((REPO / "ARCHITECTURE.md").read_text())
    assert sorted(p for p in listed if "<" not in p and not (REPO / p).exists()) == []


def test_the_list_parser_reads_each_style() -> None:
    text = ("x\n```\n__init__.py     entry\nuniba/          engine\n  cli.py, cli_io.py   entry points\n"
            "  infdit/ sana/   families\n  sana/lora.py, pag.py   adapters\n  checkpoint/     reading\n"
            "    keys.py       keys\n  memory.py       budgets\nweb/js/a.js     toasts\n```\n")
    assert listed_paths(text) == {
        "__init__.py", "uniba/", "uniba/cli.py", "uniba/cli_io.py", "uniba/infdit/", "uniba/sana/",
        "uniba/sana/lora.py", "uniba/sana/pag.py", "uniba/checkpoint/", "uniba/checkpoint/keys.py",
        "uniba/memory.py", "web/js/a.js"}
    assert required_paths(["uniba/__init__.py", "uniba/sana/__init__.py", "uniba/sana/pag.py", "nodes/x.py",
                           "docs/a.md", "README.md", ".ci/x"]) == {
        "uniba/", "uniba/sana/", "uniba/sana/pag.py", "nodes/", "nodes/x.py", "docs/"}
