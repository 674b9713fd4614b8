"""The frontend extension: its pure logic under Node's built-in test runner, its files parse as ES modules, and
it type-checks against the frontend's published TypeScript definitions (so frontend API drift fails here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"
NODE = shutil.which("node")
NPM = shutil.which("npm")
# The newest @comfyorg/comfyui-frontend-types whose npm dependencies all resolve (1.53-1.55 need an unpublished
# @comfyorg/comfyui-desktop-bridge-types); its API is the one frontend 1.45-1.58 ships.
FRONTEND_TYPES = os.environ.get("UNIBA_FRONTEND_TYPES", "1.45.6")
TYPESCRIPT = "5.9.3"
TYPES_CACHE = Path(os.environ.get("UNIBA_WEB_TYPES_CACHE", Path.home() / ".cache" / "uniba-web-types"))

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


def _typescript_with_frontend_types() -> Path:
    """tsc with the frontend types, installed once into a cache folder outside the repo; skip without a registry."""
    if NPM is None:
        pytest.skip("npm is not installed (the type check installs typescript and the frontend types with it)")
    target = TYPES_CACHE / f"frontend-types-{FRONTEND_TYPES}-ts-{TYPESCRIPT}"
    tsc = target / "node_modules" / ".bin" / "tsc"
    if tsc.is_file():
        return tsc
    TYPES_CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="install-", dir=TYPES_CACHE))
    packages = [f"typescript@{TYPESCRIPT}", f"@comfyorg/comfyui-frontend-types@{FRONTEND_TYPES}", "vue@3", "zod@3"]
    try:
        out = subprocess.run([NPM, "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(staging),
                              *packages], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.skip("npm install of the frontend types timed out (no registry?)")
    if out.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.skip(f"npm could not install {' '.join(packages)} (no registry?): {out.stderr.strip()[-400:]}")
    try:
        staging.rename(target)  # atomic: a concurrent run either sees the whole install or none
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another run won the race
    return tsc


def test_extension_type_checks_against_the_frontend_types(tmp_path: Path) -> None:
    tsc = _typescript_with_frontend_types()
    types = tsc.parents[1] / "@comfyorg" / "comfyui-frontend-types" / "index.d.ts"
    # the extension as ComfyUI serves it: /extensions/<pack>/js/*.js beside the app's /scripts/{app,api}.js shims
    js = tmp_path / "extensions" / "pack" / "js"
    js.mkdir(parents=True)
    for script in (WEB / "js").glob("*.js"):
        shutil.copy(script, js / script.name)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "app.d.ts").write_text('import type { ComfyApp } from "@comfyorg/comfyui-frontend-types";\n'
                                      "export declare const app: ComfyApp;\n")
    (scripts / "api.d.ts").write_text('import type { ComfyApi } from "@comfyorg/comfyui-frontend-types";\n'
                                      "export declare const api: ComfyApi;\n")
    config = {
        "compilerOptions": {
            "allowJs": True, "checkJs": True, "noEmit": True, "strict": False, "target": "ES2022",
            "module": "ESNext", "moduleResolution": "bundler", "skipLibCheck": True, "lib": ["ES2022", "DOM"],
            "types": [], "paths": {"@comfyorg/comfyui-frontend-types": [str(types)]},
        },
        "files": [str(p.relative_to(tmp_path)) for p in sorted(js.glob("*.js"))],
    }
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    out = subprocess.run([NODE, str(tsc), "-p", "tsconfig.json"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"tsc --checkJs against frontend types {FRONTEND_TYPES}:\n{out.stdout[-4000:]}"


def test_the_extension_reads_the_names_the_route_sends(tmp_path: Path, monkeypatch) -> None:
    """The route's real JSON (a chained 8x plan) through the extension's logic: every figure it shows is read from
    a field the plan has (no undefined, no NaN), so a renamed field on either side fails here."""
    from uniba_pack.nodes import routes

    monkeypatch.setenv("UNIBA_MODELS_DIR", str(tmp_path))
    answer = routes.plan_for_query({"width": "384", "height": "256", "scale": "8", "steps": "3"},
                                   free_bytes=lambda: 12 * 2**30)
    (tmp_path / "plan.json").write_text(json.dumps(answer))
    script = f"""
import {{ readFileSync }} from "node:fs";
import * as logic from {json.dumps((WEB / "js" / "uniba_logic.js").as_uri())};
const plan = JSON.parse(readFileSync({json.dumps(str(tmp_path / "plan.json"))}, "utf8"));
const calls = logic.modelCalls(plan), perPass = logic.batchesPerPass(plan);
const total = calls * perPass.reduce((a, b) => a + b, 0);
const mid = logic.progressState(plan, total - 1, total);
console.log(JSON.stringify({{
  lines: logic.formatPlan(plan).lines, calls, perPass, shape: logic.blockBatchShape(plan),
  order: logic.batchOrder(plan).length, cells: logic.gridLayout(plan, 240, 120).cells.length,
  pass: mid.pass, done: mid.done.flat().filter(Boolean).length,
}}));
"""
    out = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    last = answer["passes"][-1]
    text = "\n".join(seen["lines"])
    assert "undefined" not in text and "NaN" not in text and "?" not in text, text
    assert f"Output {last['out_width']}×{last['out_height']} px, 2 passes (4x + 2x)" in text
    assert f"Blocks {last['grid_cols']}×{last['grid_rows']} of {answer['block_px']} px" in text
    assert seen["calls"] == answer["evaluations"] == 5  # Heun, 3 steps
    assert seen["perPass"] == [p["batches_per_step"] for p in answer["passes"]]
    assert seen["shape"] == last["block_batch"] and seen["order"] == len(last["block_order"])
    assert seen["cells"] == last["grid_rows"] * last["grid_cols"] and seen["pass"] == 2
    # one batch before the end: every block but the last batch's is done
    _, _, rows, cols = last["block_order"][-1]
    assert seen["done"] == last["grid_rows"] * last["grid_cols"] - rows * cols
