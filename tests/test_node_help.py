"""Help inside ComfyUI, for every node the pack registers (also nodes added later).

The convention, read from the frontend itself (1.27.10 and 1.58.1, ``NodeHelpService.fetchCustomNodeHelp``): a
custom node's help panel fetches ``/extensions/<pack folder>/docs/<node id>/<locale>.md``, then
``/extensions/<pack folder>/docs/<node id>.md``; ComfyUI serves ``/extensions/<pack folder>/`` from the
pack's ``WEB_DIRECTORY``. So each node's help page is ``web/docs/<node id>.md``.

Search: frontend 1.27.10 indexes only ``name`` and ``display_name`` (Fuse, threshold 0.3, match position
counted against a distance of 100); 1.58.1 adds ``search_aliases`` (``SEARCH_ALIASES``, sent by ComfyUI
v0.28, not by 0.3.64). So "UniBA" and the family name go into the display name, early enough to score,
and into ``SEARCH_ALIASES`` too. ``tests/integration/test_browser.py`` checks all of it in a real frontend.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELP = REPO / "web" / "docs"
# A Fuse match starting at character p costs p/100 of the 0.3 threshold; keep the word well inside it.
LATEST_START = 24


def _nodes() -> dict[str, type]:
    from uniba_pack.nodes import NODE_CLASS_MAPPINGS

    return dict(NODE_CLASS_MAPPINGS)


def _display(name: str) -> str:
    from uniba_pack.nodes import NODE_DISPLAY_NAME_MAPPINGS

    return NODE_DISPLAY_NAME_MAPPINGS[name]


def _family(cls: type) -> str:
    parts = cls.CATEGORY.split("/")
    assert parts[0] == "UniBA" and len(parts) > 1, f"{cls.__name__}: CATEGORY must be 'UniBA/<family>/...'"
    return parts[1]


def _inputs(cls: type) -> dict[str, tuple]:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


NODE_IDS = sorted(_nodes())


def test_the_pack_registers_nodes() -> None:
    assert len(NODE_IDS) >= 14


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_has_a_description_and_a_tooltip_on_every_input(node_id: str) -> None:
    cls = _nodes()[node_id]
    assert isinstance(getattr(cls, "DESCRIPTION", None), str) and len(cls.DESCRIPTION) > 20, \
        f"{node_id}: set DESCRIPTION (one or two sentences the node library shows)"
    missing = [name for name, spec in _inputs(cls).items()
               if not (len(spec) > 1 and isinstance(spec[1], dict) and str(spec[1].get("tooltip", "")).strip())]
    assert not missing, f"{node_id}: inputs without a tooltip: {missing}"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_has_a_help_page_naming_every_input(node_id: str) -> None:
    page = HELP / f"{node_id}.md"
    assert page.is_file(), f"{node_id}: write its help page web/docs/{node_id}.md (the frontend's help panel)"
    text = page.read_text(encoding="utf-8")
    assert text.splitlines()[0] == f"# {_display(node_id)}", f"{page.name}: first line must be '# <display name>'"
    undocumented = [name for name in _inputs(_nodes()[node_id]) if f"`{name}`" not in text]
    assert not undocumented, f"{page.name} does not describe inputs {undocumented}"


def test_every_help_page_belongs_to_a_node() -> None:
    orphans = sorted(p.name for p in HELP.glob("*.md") if p.stem not in _nodes())
    assert not orphans, f"help pages of no registered node (renamed or removed?): {orphans}"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_is_found_by_uniba_and_by_its_family(node_id: str) -> None:
    cls = _nodes()[node_id]
    family = _family(cls)
    display = _display(node_id)
    for word in ("UniBA", family):
        start = display.find(word)
        assert 0 <= start <= LATEST_START, \
            f"{node_id}: display name {display!r} must contain {word!r} within its first {LATEST_START} characters"
    aliases = getattr(cls, "SEARCH_ALIASES", None)
    assert isinstance(aliases, list) and all(isinstance(a, str) and a for a in aliases), \
        f"{node_id}: set SEARCH_ALIASES, a list of search words"
    assert {"uniba", family.lower()} <= {a.lower() for a in aliases}, f"{node_id}: SEARCH_ALIASES needs UniBA, {family}"


def test_upscalers_are_found_by_upscale() -> None:
    upscalers = [n for n in NODE_IDS if re.search("upscale", n, re.I)]
    assert "InfDiTUpscale" in upscalers
    for node_id in upscalers:
        words = [_display(node_id).lower()] + [a.lower() for a in _nodes()[node_id].SEARCH_ALIASES]
        assert any("upscale" in w for w in words), node_id


def test_help_pages_name_our_nodes_by_their_current_display_names() -> None:
    """A page that says **Sana Text Encoder Loader** after a rename sends users searching for a node that is gone."""
    from uniba_pack.nodes import NODE_DISPLAY_NAME_MAPPINGS

    current = {name.removesuffix(" (UniBA)") for name in NODE_DISPLAY_NAME_MAPPINGS.values()}
    ours = re.compile(r"\*\*((?:Sana|Inf-DiT|Load Inf-DiT|HiDiffusion)\b[^*]*)\*\*")
    stale = sorted(f"{page.name}: {name}" for page in HELP.glob("*.md")
                   for name in ours.findall(page.read_text(encoding="utf-8")) if name not in current)
    assert not stale, f"help pages naming nodes by names no node has (use the display name): {stale}"
