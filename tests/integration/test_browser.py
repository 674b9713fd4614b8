"""Real browser: ComfyUI with this pack and its real frontend on 127.0.0.1, driven by headless Chromium.

Needs ``COMFYUI_DIR`` (like the whole integration tier), Debian's ``chromium`` (``apt-get install chromium``)
and ``websocket-client``; skipped otherwise. The host's own pinned frontend is used unless
``UNIBA_FRONTEND_ROOT`` names another build (see ``chromium_cdp.frontend_root``). Elements are found by stable
means only — the ``app`` API and its commands, node ids, ARIA roles and visible text, never a frontend's CSS
classes — so the same checks pass on frontend 1.27 and 1.58. Screenshots go to ``$UNIBA_ARTIFACT_DIR`` (default
``tests/artifacts/browser``). With ``UNIBA_WRITE_SCREENSHOTS=1`` the per-workflow screenshots also go to
``docs/screenshots/`` and become the template browser's thumbnails (``workflows/<name>.jpg``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chromium_cdp as cdp  # noqa: E402
import workflow_tools as wt  # noqa: E402

REPO = cdp.REPO
PACK = cdp.PACK_FOLDER
WORKFLOW_NAMES = sorted(p.stem for p in wt.workflow_files())
ARTIFACTS = Path(os.environ.get("UNIBA_ARTIFACT_DIR", REPO / "tests" / "artifacts" / "browser"))
WRITE_DOCS = os.environ.get("UNIBA_WRITE_SCREENSHOTS") == "1"
OUR_SCRIPT = f"/extensions/{PACK}/"
TINY_INFDIT = "infdit_tiny.safetensors"


def _skip_reason() -> str | None:
    if not os.environ.get("COMFYUI_DIR"):
        return "COMFYUI_DIR is not set"
    if cdp.find_chromium() is None:
        return "chromium is not installed (apt-get install chromium)"
    try:
        import websocket  # noqa: F401
    except ImportError:
        return "websocket-client is not installed"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _write_input_image(path: Path) -> None:
    from PIL import Image

    img = Image.new("RGB", (256, 192))
    for x in range(256):
        for y in range(192):
            img.putpixel((x, y), (x, y, (x * y) % 256))
    img.save(path)


def _write_models(models: Path) -> None:
    """A tiny Inf-DiT for the real run. The workflows' own model names stay missing, so their readouts show
    the released model's plan (what a user sees before downloading), which is also what the README shows."""
    try:
        from tiny_infdit import write_tiny_infdit
    except ImportError:
        return
    write_tiny_infdit(models / "infdit", TINY_INFDIT)


def _template_input_images() -> set[str]:
    """The images the templates' Load Image nodes name (example.png, the ControlNet's HED map, ...)."""
    names = {"example.png"}
    for path in wt.workflow_files():
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "LoadImage":
                names.add(node["widgets_values"][0])
    return names


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("comfyui-browser")
    (base / "input").mkdir()
    for name in _template_input_images():  # what each template's note tells the user to put in ComfyUI/input
        _write_input_image(base / "input" / name)
    server = cdp.ComfyServer(os.environ["COMFYUI_DIR"], base, base / "comfyui.log")
    _write_models(base / "models")
    server.start()
    # readable screenshots: no minimap, no low-detail rendering when the whole workflow is in view
    # and no first-run template browser over the canvas
    for key, value in (("Comfy.Minimap.Visible", False), ("LiteGraph.Canvas.MinFontSizeForLOD", 0),
                       ("Comfy.TutorialCompleted", True)):
        cdp.http_json(f"{server.url}/settings/{key}", data=json.dumps(value).encode(), method="POST")
    browser = None
    try:
        browser = cdp.Chromium(cdp.find_chromium(), width=2400, height=1350)
        page = browser.page
        page.navigate(server.url)
        page.wait_for("!!(window.app && window.app.graph && window.app.canvas && app.extensionManager?.command)",
                      timeout=180)
        page.pump(2.0)
        page.evaluate(HELPERS)
        _close_dialogs(page)
        yield server, page
    finally:
        if browser:
            browser.close()
        server.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(base / "comfyui.log", ARTIFACTS / "comfyui.log")


# The help panel asks for docs/<node id>/<locale>.md first and falls back to docs/<node id>.md (ours): the first
# request's 404 is the frontend's expected path, logged by the browser as a failed resource.
LOCALE_HELP_404 = re.compile(rf"{re.escape(OUR_SCRIPT)}docs/\w+/[\w-]+\.md$")


def _our_errors(page: cdp.Page) -> list[dict]:
    return [m for m in page.console
            if m["level"] in ("error", "exception", "assert")
            and (OUR_SCRIPT in m.get("url", "") or OUR_SCRIPT in m.get("text", "") or "uniba" in m["text"].lower())
            and not LOCALE_HELP_404.search(m.get("url", ""))]


# Page-side helpers: visible dialogs by ARIA role, elements by their exact visible text, a dialog's close button
# by its accessible name or icon (PrimeVue on 1.27, reka-ui on 1.58).
HELPERS = """window.__uniba_t = {
  visible: (e) => !!e && e.getClientRects().length > 0,
  dialogs: () => [...document.querySelectorAll('[role=dialog]')].filter((d) => window.__uniba_t.visible(d)),
  byText: (root, text) => {
    const hits = [...root.querySelectorAll('*')].filter((e) => window.__uniba_t.visible(e)
      && (e.innerText ?? '').trim() === text);
    return hits.find((e) => ![...e.children].some((c) => (c.innerText ?? '').trim() === text)) ?? null;
  },
  closeDialogs: () => {
    for (const d of window.__uniba_t.dialogs()) {
      const close = [...d.querySelectorAll('button')].find((b) => /close/i.test(b.getAttribute('aria-label') ?? '')
        || b.querySelector('.pi-times'));
      if (close) close.click();
      else d.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}));
    }
    return window.__uniba_t.dialogs().length;
  },
  nodes: () => app.graph.nodes ?? app.graph._nodes,
};"""
NODES = "window.__uniba_t.nodes()"


def _close_dialogs(page: cdp.Page) -> None:
    page.wait_for("window.__uniba_t.closeDialogs() === 0", timeout=15)


def _on_failure_screenshot(page: cdp.Page, name: str):
    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(ARTIFACTS / f"{name}-FAILED.png")
            try:
                _close_dialogs(page)
            except TimeoutError:
                pass
            return False

    return _Guard()


def test_page_loads_our_extension_without_console_errors(session) -> None:
    server, page = session
    assert page.evaluate("app.extensions.some(e => e.name === 'uniba.InfDiT')"), "the extension did not register"
    scripts = page.evaluate("window.comfyAPI.api.api.getExtensions()")
    assert f"{OUR_SCRIPT}js/uniba.js" in scripts and f"{OUR_SCRIPT}js/uniba_logic.js" in scripts
    assert _our_errors(page) == []
    failed = [line for line in server.log().splitlines() if "IMPORT FAILED" in line and PACK in line]
    assert failed == []


def test_templates_are_served_under_the_pack_name(session) -> None:
    server, _page = session
    listed = cdp.http_json(server.url + "/workflow_templates")
    assert sorted(listed.get(PACK, [])) == WORKFLOW_NAMES
    for name in WORKFLOW_NAMES:
        served = cdp.http_json(f"{server.url}/api/workflow_templates/{PACK}/{name}.json")
        assert served == wt.load_workflow(f"{name}.json")


def test_pack_nodes_are_in_the_node_library(session) -> None:
    server, page = session
    info = cdp.http_json(server.url + "/object_info")
    ours = {name: d for name, d in info.items() if d.get("python_module", "").endswith(PACK)}
    assert ours, "the server registered none of the pack's nodes"
    toggle = "app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library')"
    page.evaluate(toggle)
    search = ("[...document.querySelectorAll('input')].find(i => window.__uniba_t.visible(i)"
              " && /^search/i.test(i.placeholder ?? ''))")  # "Search Nodes..." (1.27), "Search..." (1.45+)
    page.wait_for(f"!!({search})", timeout=30)
    missing = []
    for name, node_def in sorted(ours.items()):
        title = node_def["display_name"] or name
        page.evaluate(f"""(() => {{ const i = {search};
            i.value = {json.dumps(title)}; i.dispatchEvent(new Event('input', {{bubbles: true}})); }})()""")
        try:  # the library lists the node under its title; newer frontends add the pack's badge: "Title (UniBA)"
            page.wait_for(f"[...document.querySelectorAll('*')].some(e => e.children.length === 0"
                          f" && window.__uniba_t.visible(e) && e.tagName !== 'INPUT'"
                          f" && ((t) => t === {json.dumps(title)} || t.startsWith({json.dumps(title + ' (')}))"
                          f"((e.textContent ?? '').trim()))", timeout=10)
        except TimeoutError:
            missing.append(title)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(ARTIFACTS / "node_library.png")
    page.evaluate(toggle)  # close the panel again
    assert missing == []


SEARCH = ("[...document.querySelectorAll('input')].find(i => window.__uniba_t.visible(i)"
          " && /^search/i.test(i.placeholder ?? ''))")  # "Search Nodes..." (1.27), "Search..." (1.45+)
LIBRARY = "app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library')"


def _pack_nodes(server: cdp.ComfyServer) -> dict[str, dict]:
    info = cdp.http_json(server.url + "/object_info")
    return {name: d for name, d in info.items() if d.get("python_module", "").endswith(PACK)}


def _library_search(page: cdp.Page, query: str) -> None:
    page.wait_for(f"!!({SEARCH})", timeout=30)
    page.evaluate(f"""(() => {{ const i = {SEARCH};
        i.value = {json.dumps(query)}; i.dispatchEvent(new Event('input', {{bubbles: true}})); }})()""")
    page.pump(1.5)


def _visible_texts(page: cdp.Page) -> set[str]:
    return set(page.evaluate("[...document.querySelectorAll('*')].filter(e => e.children.length === 0"
                             " && e.tagName !== 'INPUT' && window.__uniba_t.visible(e))"
                             ".map(e => (e.textContent ?? '').trim())"))


def test_search_finds_every_node_by_uniba_its_family_and_upscale(session) -> None:
    """The node library's search (frontend 1.27: name and display name; 1.58 also SEARCH_ALIASES)."""
    server, page = session
    ours = _pack_nodes(server)
    queries = {"UniBA": set(ours), "upscale": {"InfDiTUpscale"}}
    for name, node_def in ours.items():
        family = node_def["category"].split("/")[1]
        queries.setdefault(family, set()).add(name)
    page.evaluate(LIBRARY)
    missed = {}
    try:
        for query, expected in sorted(queries.items()):
            _library_search(page, query)
            texts = _visible_texts(page)
            lost = sorted(n for n in expected if ours[n]["display_name"] not in texts)
            if lost:
                missed[query] = lost
                page.screenshot(ARTIFACTS / f"search-{query}-FAILED.png")
    finally:
        page.evaluate(LIBRARY)
    assert {"UniBA", "Inf-DiT", "Sana", "HiDiffusion", "upscale"} <= set(queries)
    assert missed == {}


def _help_from_library(page: cdp.Page, title: str) -> bool:
    """Frontend 1.27: the help button next to the node in the node library opens the help view in the sidebar."""
    page.evaluate(LIBRARY)
    _library_search(page, title)
    return page.evaluate(f"""(() => {{
        const leaf = [...document.querySelectorAll('*')].find(e => e.children.length === 0
            && window.__uniba_t.visible(e) && (e.textContent ?? '').trim() === {json.dumps(title)});
        let r = leaf, button = null;
        for (let k = 0; k < 8 && r && !button; k++, r = r.parentElement)
            button = [...r.querySelectorAll('button')].find(b => /help/i.test(
                (b.getAttribute('aria-label') ?? '') + (b.title ?? '')) || b.querySelector('.pi-question'));
        button?.click(); return !!button; }})()""")


def _help_from_side_panel(page: cdp.Page, node_id: str) -> bool:
    """Frontend 1.5x: a node on the canvas, selected; the right side panel's Info tab shows its help."""
    page.evaluate(f"""(() => {{ const n = LiteGraph.createNode({json.dumps(node_id)}); n.pos = [100, 100];
        app.graph.add(n); app.canvas.deselectAll?.(); app.canvas.selectNode(n); window.__uniba_help_node = n;
        return app.extensionManager.setting.set('Comfy.RightSidePanel.IsOpen', true); }})()""")
    tab = ("[...document.querySelectorAll('[role=tab], button')].find(e => window.__uniba_t.visible(e)"
           " && (e.getAttribute('data-testid') === 'panel-tab-info' || (e.innerText ?? '').trim() === 'Info'))")
    try:
        page.wait_for(f"!!({tab})", timeout=15)
    except TimeoutError:
        return False
    page.evaluate(f"({tab}).click()")
    return True


def test_help_panel_shows_our_page(session) -> None:
    """ComfyUI's node-help panel shows web/docs/<node id>.md, one node per family."""
    server, page = session
    ours = _pack_nodes(server)
    for node_id in ("InfDiTUpscale", "SanaSampler", "HiDiffusionPatch"):
        title = ours[node_id]["display_name"]
        page_md = (REPO / "web" / "docs" / f"{node_id}.md").read_text(encoding="utf-8").splitlines()
        first_line = re.sub(r"[*`]", "", page_md[2])[:40]  # the description paragraph, as rendered
        with _on_failure_screenshot(page, f"help-{node_id}"):
            try:
                opened = _help_from_library(page, title) or _help_from_side_panel(page, node_id)
                assert opened, f"found no help button for {title} (node library) nor an Info tab (side panel)"
                page.wait_for(f"document.body.innerText.includes({json.dumps(first_line)})", timeout=30)
                page.screenshot(ARTIFACTS / f"help-{node_id}.png")
            finally:
                page.evaluate("""(() => { const b = [...document.querySelectorAll('button')].find(b =>
                    window.__uniba_t.visible(b) && (/back/i.test(b.getAttribute('aria-label') ?? '')
                    || b.querySelector('.pi-arrow-left'))); b?.click();
                    if (window.__uniba_help_node) { app.graph.remove(window.__uniba_help_node);
                        window.__uniba_help_node = null; }
                    app.extensionManager.setting.set('Comfy.RightSidePanel.IsOpen', false); })()""")
                if page.evaluate(f"!!({SEARCH})"):
                    page.evaluate(LIBRARY)
                page.pump(0.5)
    assert _our_errors(page) == []


BLUEPRINTS = sorted(p.stem for p in (REPO / "subgraphs").glob("*.json"))


def test_blueprints_are_in_the_node_library(session) -> None:
    """ComfyUI v0.28 serves subgraphs/*.json (/global_subgraphs); frontend 1.5x lists them as blueprints."""
    server, page = session
    try:
        served = cdp.http_json(server.url + "/api/global_subgraphs")
    except OSError:
        pytest.skip("this ComfyUI has no /global_subgraphs (added in v0.8)")
    ours = {e["name"] for e in served.values() if e["info"]["node_pack"] == f"custom_nodes.{PACK}"}
    assert ours == set(BLUEPRINTS)
    if not page.evaluate("!!window.comfyAPI.api.api.getGlobalSubgraphs"):
        pytest.skip("this frontend does not load global blueprints (1.27)")
    page.evaluate(LIBRARY)
    missing = []
    try:  # listed under their file names; found by the start of the name, as a user types it (v0.28 sends no
        # search aliases for a pack's blueprints, and Fuse scores whole 48-character queries out)
        for name in BLUEPRINTS:
            _library_search(page, name[:26])
            if name not in _visible_texts(page):
                missing.append(name)
                page.screenshot(ARTIFACTS / f"blueprint-{name[:26]}-FAILED.png")
    finally:
        page.evaluate(LIBRARY)
    assert missing == []
    # each blueprint opened as the frontend opens one: its node shows the proxied widgets, and the prompt the
    # frontend flattens from it is the one the integration tier runs (tests/workflow_tools.blueprint_to_api)
    defs = cdp.http_json(server.url + "/object_info")
    for name in BLUEPRINTS:
        blueprint = wt.load_workflow(REPO / "subgraphs" / f"{name}.json")
        page.evaluate(f"app.loadGraphData({json.dumps(blueprint)})")
        page.wait_for(f"{NODES}.length === 1 && {NODES}[0].title === {json.dumps(name)}", timeout=30)
        shown = page.evaluate(f"{NODES}[0].widgets?.map(w => w.name) ?? []")
        assert shown == [w for _node, w in blueprint["nodes"][0]["properties"]["proxyWidgets"]], (name, shown)
        outer = page.evaluate(f"String({NODES}[0].id)")
        flat = page.evaluate("app.graphToPrompt().then(p => p.output)")
        ours, _outputs = wt.blueprint_to_api(blueprint, defs, {"image": ["boundary", 0]})
        expected = {f"{outer}:{k}": {i: ([f"{outer}:{v[0]}", v[1]] if isinstance(v, list) else v)
                                     for i, v in n["inputs"].items() if v != ["boundary", 0]}
                    for k, n in ours.items()}
        assert {k: v["inputs"] for k, v in flat.items()} == expected, name


def _open_template(page: cdp.Page, name: str) -> None:
    """Through the template browser as a user does: the pack's category by its text, the card by its title."""
    _close_dialogs(page)
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    category = f"window.__uniba_t.dialogs().map(d => window.__uniba_t.byText(d, {json.dumps(PACK)})).find(Boolean)"
    page.wait_for(f"!!({category})", timeout=30)
    page.evaluate(f"({category}).click()")
    card = (f"window.__uniba_t.dialogs().map(d => [...d.querySelectorAll('[title]')]"
            f".find(e => e.getAttribute('title') === {json.dumps(name)} && window.__uniba_t.visible(e)))"
            f".find(Boolean)")
    page.wait_for(f"!!({card})", timeout=30)
    page.evaluate(f"({card}).click()")
    page.wait_for(f"!window.__uniba_t.dialogs().some(d => window.__uniba_t.byText(d, {json.dumps(PACK)}))",
                  timeout=60)


def _fit_view(page: cdp.Page) -> None:
    page.evaluate("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.pump(1.0)


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_loads_from_the_template_browser(session, name: str) -> None:
    _server, page = session
    workflow = wt.load_workflow(f"{name}.json")
    with _on_failure_screenshot(page, name):
        _check_template(_server, page, name, workflow)


def _check_template(server: cdp.ComfyServer, page: cdp.Page, name: str, workflow: dict) -> None:
    _open_template(page, name)
    page.wait_for(f"{NODES}.length === {len(workflow['nodes'])}", timeout=30)
    page.pump(1.0)
    # the models are not installed here: a missing-model notice may name them, never a missing node type
    # (frontend 1.27 lists them in a "Missing Models" dialog, newer ones in an alert and a side panel)
    dialogs = page.evaluate("window.__uniba_t.dialogs().map(d => d.innerText)")
    assert not [d for d in dialogs if ("missing" in d.lower() or "not found" in d.lower())
                and "missing models" not in d.lower()], dialogs
    _close_dialogs(page)
    # newer frontends summarise problems in an alert ("2 ERRORS / 1 required model is missing / ..."): only the
    # absent model files may be named there (the templates declare them in properties.models)
    alerts = page.evaluate("[...document.querySelectorAll('[role=alert]')].map(t => t.innerText)")
    problems = [line for text in alerts for line in text.splitlines()
                if any(word in line.lower() for word in ("missing", "invalid", "not found", "failed"))
                and not re.search(r"models? (is|are) missing|missing models?\b", line.lower())]
    assert problems == [], alerts
    unknown = page.evaluate(f"{NODES}.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)")
    assert unknown == []
    types = page.evaluate(f"{NODES}.map(n => n.type).sort()")
    assert types == sorted(n["type"] for n in workflow["nodes"])

    if any(n["type"] == "InfDiTUpscale" for n in workflow["nodes"]):
        text = page.wait_for("(() => { const t = document.querySelector('.uniba-plan-text');"
                             " return t && /Blocks \\d+×\\d+/.test(t.textContent) && t.textContent; })()", timeout=60)
        assert "Peak" in text and ("Fits" in text or "Does not fit" in text), text
    # the queued prompt the frontend builds matches our own UI -> API conversion (widget order, seed controls)
    api_prompt = page.evaluate("app.graphToPrompt().then(p => p.output)")
    for node_id, node in api_prompt.items():
        ui = next(n for n in workflow["nodes"] if str(n["id"]) == node_id)
        assert node["class_type"] == ui["type"]
    defs = cdp.http_json(server.url + "/object_info")
    ours = wt.to_api(workflow, defs)
    assert {k: v["inputs"] for k, v in api_prompt.items()} == {k: v["inputs"] for k, v in ours.items()}

    # no node covers another as the frontend lays them out (its own sizes, title bars included)
    boxes = page.evaluate(f"{NODES}.map(n => [n.id, n.title, Array.from(n.getBounding ? n.getBounding()"
                          f" : n.boundingRect)])")
    covered = [f"{a[1]} / {b[1]}" for i, a in enumerate(boxes) for b in boxes[i + 1:]
               if a[2][0] < b[2][0] + b[2][2] and b[2][0] < a[2][0] + a[2][2]
               and a[2][1] < b[2][1] + b[2][3] and b[2][1] < a[2][1] + a[2][3]]
    assert covered == [], covered
    _fit_view(page)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(ARTIFACTS / f"{name}.png")
    if WRITE_DOCS:
        shot = page.screenshot(REPO / "docs" / "screenshots" / f"{name}.png")
        _thumbnail(shot, wt.WORKFLOWS / f"{name}.jpg")
    assert _our_errors(page) == []


def _thumbnail(png: Path, jpg: Path) -> None:
    from PIL import Image

    with Image.open(png) as img:
        img = img.convert("RGB")
        img.thumbnail((640, 400))
        img.save(jpg, quality=85)


def test_plan_readout_updates_and_shows_block_progress(session) -> None:
    _server, page = session
    with _on_failure_screenshot(page, "plan_readout"):
        _check_readout(page)


def _check_readout(page: cdp.Page) -> None:
    _open_template(page, "upscale_render_4x")
    read = f"{NODES}.find(n => n.type === 'InfDiTUpscale')"
    # LoadImage's 256x192 example, once its preview has loaded (before that: the assumed 1024x1024) -> 4x
    plan = page.wait_for(f"{read}?.__uniba?.plan?.passes?.[0]?.in_width === 256 && {read}.__uniba.plan", timeout=60)
    last = plan["passes"][-1]
    assert (last["out_width"], last["out_height"]) == (1024, 768), plan
    assert plan["passes"][0]["in_width"] == 256 and plan["passes"][0]["in_height"] == 192
    # a widget change re-plans
    page.evaluate(f"(() => {{ const n = {read}; const w = n.widgets.find(w => w.name === 'scale');"
                  f" w.value = '2'; n.onWidgetChanged?.('scale', '2', '4', w);"
                  f" const b = n.widgets.find(w => w.name === 'block_batch'); b.value = '1';"
                  f" n.onWidgetChanged?.('block_batch', '1', 'auto', b); }})()")
    page.wait_for(f"{read}.__uniba.plan.passes.at(-1).out_width === 512"
                  f" && {read}.__uniba.plan.passes.at(-1).batches_per_step > 1", timeout=30)
    # a progress_state event (as ComfyUI sends during a run, by node id) marks finished blocks in the grid
    node_id = page.evaluate(f"{read}.id")
    page.evaluate(f"(() => {{ const n = {read}; const p = n.__uniba.plan; const calls = 2 * 20 - 1;"
                  f" const per = p.passes.at(-1).batches_per_step;"
                  f" window.comfyAPI.api.api.dispatchCustomEvent('progress_state',"
                  f" {{prompt_id: 'x', nodes: {{'{node_id}': {{value: Math.floor(per / 2) + per * 3,"
                  f" max: calls * per, state: 'running', node_id: '{node_id}', display_node_id: '{node_id}',"
                  f" prompt_id: 'x'}}}}}}); }})()")
    text = page.wait_for("(() => { const t = document.querySelector('.uniba-plan-text');"
                         " return t && t.textContent.includes('Running') && t.textContent; })()", timeout=10)
    assert "model call 4/39" in text, text
    green = page.evaluate("(() => { const c = document.querySelector('.uniba-plan-grid');"
                          " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let g = 0;"
                          " for (let i = 0; i < d.length; i += 4) if (d[i+1] > 150 && d[i] < 120) g++; return g; })()")
    assert green > 0, "no finished block drawn"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    _fit_view(page)
    page.screenshot(ARTIFACTS / "plan_readout_progress.png")
    assert _our_errors(page) == []


def test_real_run_reports_block_progress(session) -> None:
    """Queue upscale_render_4x (tiny Inf-DiT) from the page: the readout follows the server's progress events."""
    server, page = session
    if not (Path(server.base) / "models" / "infdit" / TINY_INFDIT).is_file():
        pytest.skip("tests/tiny_infdit.py is not available")
    with _on_failure_screenshot(page, "real_run"):
        _open_template(page, "upscale_render_4x")
        read = f"{NODES}.find(n => n.type === 'InfDiTUpscale')"
        page.wait_for(f"{read}?.__uniba?.plan?.passes?.[0]?.in_width === 256", timeout=60)
        page.evaluate(f"""(() => {{ const n = {read};
            for (const [name, value] of [['steps', 1], ['block_batch', '4'], ['scale', '2']]) {{
                const w = n.widgets.find(w => w.name === name); const old = w.value; w.value = value;
                n.onWidgetChanged?.(name, value, old, w); }}
            const loader = {NODES}.find(m => m.type === 'InfDiTLoader');
            loader.widgets.find(w => w.name === 'model_name').value = '{TINY_INFDIT}';
            window.__unibaSeen = [];
            // what the readout itself follows: progress_state where the server sends it, else progress
            const record = (value, max) => setTimeout(() => window.__unibaSeen.push({{value, max,
                done: n.__uniba.progress?.doneBatches, call: n.__uniba.progress?.call}}), 0);
            window.comfyAPI.api.api.addEventListener('progress_state', (e) => {{
                const entry = e.detail?.nodes?.[String(n.id)];
                if (entry) {{ window.__unibaStateSeen = true; record(entry.value, entry.max); }} }});
            window.comfyAPI.api.api.addEventListener('progress', (e) => {{
                if (!window.__unibaStateSeen && String(e.detail.node) === String(n.id))
                    record(e.detail.value, e.detail.max); }});
            window.__unibaFinished = false;
            window.comfyAPI.api.api.addEventListener('execution_success', () => {{ window.__unibaFinished = true; }});
            window.comfyAPI.api.api.addEventListener('execution_error', (e) => {{
                window.__unibaFinished = 'error: ' + JSON.stringify(e.detail).slice(0, 2000); }});
        }})()""")
        page.wait_for(f"{read}.__uniba.plan.passes.at(-1).out_width === 512"
                      f" && {read}.__uniba.plan.passes.at(-1).block_batch[0] === 4", 30)
        plan = page.evaluate(f"{read}.__uniba.plan.passes.at(-1)")
        page.evaluate("app.queuePrompt(0, 1)")
        finished = page.wait_for("window.__unibaFinished", timeout=300)
        assert finished is True, finished
        page.pump(0.5)
        seen = page.evaluate("window.__unibaSeen")
        calls = 1  # one Heun step: a single model call
        assert seen and seen[-1]["value"] == seen[-1]["max"] == calls * plan["batches_per_step"], seen[-3:]
        partial = [s for s in seen if 0 < s["done"] < plan["batches_per_step"]]
        assert partial, "the grid never showed a partly finished model call"
        assert all(s["call"] <= calls for s in seen)
        done = page.evaluate(f"{read}.__uniba.progress.done.flat().every(Boolean)")
        assert done
        page.wait_for(f"{NODES}.find(n => n.type === 'SaveImage')?.imgs?.[0]?.naturalWidth === 512", 60)
        _fit_view(page)
        page.screenshot(ARTIFACTS / "real_run_done.png")
        assert _our_errors(page) == []


def test_node_warning_shows_as_a_toast(session) -> None:
    """host.warn in a running node reaches the browser that queued the prompt as a toast (web/js/uniba_warnings.js):
    SanaEmptyLatent asked for 1000 px makes a 992 px latent and says so."""
    _server, page = session
    expected = "1000x1024 px is not a multiple of 32 on each side: the latent makes a 992x1024 px image"
    prompt = {"1": {"class_type": "SanaEmptyLatent",
                    "inputs": {"width": 1000, "height": 1024, "preset": "custom", "batch_size": 1}},
              "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "uniba/warning"}}}
    with _on_failure_screenshot(page, "warning_toast"):
        # queued as the frontend does (POST /prompt with this page's client id), so the server answers this page
        queued = page.evaluate(f"""fetch('/prompt', {{method: 'POST', headers: {{'Content-Type': 'application/json'}},
            body: JSON.stringify({{prompt: {json.dumps(prompt)}, client_id: window.comfyAPI.api.api.clientId}})}})
            .then(r => r.json())""")
        assert "prompt_id" in queued, queued
        toast = ("[...document.querySelectorAll('[role=alert]')].filter(t => window.__uniba_t.visible(t))"
                 f".map(t => t.innerText).find(t => t.includes({json.dumps(expected)}))")
        text = page.wait_for(toast, timeout=60)
        assert "UniBA" in text and "SanaEmptyLatent" in text, text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(ARTIFACTS / "warning_toast.png")
        page.evaluate("app.extensionManager.toast.removeAll?.()")
        assert _our_errors(page) == []
