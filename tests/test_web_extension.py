"""The frontend extension: its pure logic under Node's built-in test runner, its files parse as ES modules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed (the web tests need `node`)")


def test_node_test_runner_passes() -> None:
    out = subprocess.run([NODE, "--test", "tests/web/"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "# fail 0" in out.stdout and "# pass 0" not in out.stdout


@pytest.mark.parametrize("script", sorted(p.relative_to(REPO).as_posix() for p in WEB.rglob("*.js")))
def test_extension_file_parses_as_module(script: str) -> None:
    # ComfyUI imports every .js file under WEB_DIRECTORY as an ES module; a syntax error breaks the page
    out = subprocess.run([NODE, "--input-type=module", "--check"], input=(REPO / script).read_text(encoding="utf-8"),
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_extension_imports_only_what_comfyui_serves() -> None:
    source = (WEB / "js" / "uniba.js").read_text(encoding="utf-8")
    # served at /extensions/<pack>/js/uniba.js: the frontend's shims are three levels up
    assert 'from "../../../scripts/app.js"' in source
    assert 'from "../../../scripts/api.js"' in source
    assert 'from "./uniba_logic.js"' in source
    logic = (WEB / "js" / "uniba_logic.js").read_text(encoding="utf-8")
    assert "import " not in logic.split("export", 1)[0], "the pure logic must not import anything"
