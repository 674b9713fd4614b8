"""The pack's shape: imports without ComfyUI, host fallbacks, CLI, packaging metadata."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from uniba.devices import torch_dtype_support

REPO = Path(__file__).resolve().parents[1]


# ComfyUI's top-level modules. Only nodes/comfy/ may name them. Exempt besides: the integration tier and
# tiny_unets.py (its ComfyUI twins of the test UNets serve that tier), which drive ComfyUI on purpose,
# and this file and test_imports.py, which name the modules to look for them.
HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config", "folder_paths", "server",
                "execution", "latent_preview", "node_helpers")
ADAPTER = REPO / "nodes" / "comfy"
GUARD_EXEMPT = (ADAPTER, REPO / "tests" / "integration", REPO / "tests" / "tiny_unets.py", Path(__file__).resolve(),
                REPO / "tests" / "test_imports.py")
_IMPORT_IN_CODE = re.compile(r"\b(?:import|from)\s+(" + "|".join(HOST_MODULES) + r")\b")
_MODULE_NAME = re.compile(r"[A-Za-z_][\w.]*")


def _is_host_module(name: str) -> bool:
    return name.split(".")[0] in HOST_MODULES


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def host_references(path: Path) -> list[str]:
    """Every way a file reaches ComfyUI: import statements, and strings naming its modules (what
    ``importlib``/``__import__`` or a table of module names would use) or importing them (code run elsewhere)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if _is_host_module(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_host_module(node.module):
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value.strip()
            if (_MODULE_NAME.fullmatch(text) and _is_host_module(text)) or _IMPORT_IN_CODE.search(node.value):
                found.append(f"{where} string {text[:60]!r}")
    return found


# Folders that hold no project code: hidden ones (.git, any .venv*, caches) and installed packages.
NOT_PROJECT = {"node_modules", "site-packages", "__pycache__"}


def _is_project_file(path: Path) -> bool:
    parts = path.relative_to(REPO).parts[:-1]
    return not any(part.startswith(".") or part in NOT_PROJECT for part in parts)


def _guarded_files() -> list[Path]:
    return [p for p in REPO.rglob("*.py") if _is_project_file(p)
            and not any(p == e or e in p.parents for e in GUARD_EXEMPT)]


def test_only_the_adapter_touches_comfyui() -> None:
    files = _guarded_files()
    assert REPO / "uniba" / "checkpoint" / "readers.py" in files and REPO / "nodes" / "sana_nodes.py" in files
    assert not any(ADAPTER in p.parents for p in files)
    offenders = [ref for p in files for ref in host_references(p)]
    assert offenders == []


BAD_FILES = {
    "import comfy.model_management as mm\n": "import comfy.model_management",
    "from folder_paths import get_filename_list\n": "from folder_paths import",
    "def f():\n    import server\n": "import server",
    "import importlib\nm = importlib.import_module('comfy.sd')\n": "string 'comfy.sd'",
    "m = __import__('latent_preview')\n": "string 'latent_preview'",
    "import importlib\nNEEDED = {'vae': ('comfy.sd', 'VAE')}\nm = importlib.import_module(NEEDED['vae'][0])\n":
        "string 'comfy.sd'",
    "CODE = 'import sys\\nfrom comfy.cli_args import args\\n'\n": "string 'import sys",
    "from comfy_api.latest import io\n": "from comfy_api.latest import",
}


@pytest.mark.parametrize("source", sorted(BAD_FILES))
def test_the_guard_fails_on_each_way_of_reaching_comfyui(tmp_path, source: str) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    refs = host_references(bad)
    assert len(refs) == 1 and BAD_FILES[source] in refs[0], refs


def test_the_guard_passes_what_is_allowed(tmp_path) -> None:
    good = tmp_path / "good.py"
    good.write_text(
        '"""Wraps ``comfy.sd.VAE``; see server.py."""\n'
        "import importlib\n"
        "from .comfy import host\n"
        "from . import server_side\n"
        "NAME = 'ComfyUI server'\n"
        "mod = importlib.import_module('.model', __name__)\n"
        "bench = importlib.import_module('uniba.hidiffusion.bench')\n")
    assert host_references(good) == []


_PACK_MODULE = re.compile(r"(uniba|nodes)(\.\w+)*")
_TICKED = re.compile(r"`([^`]+)`")


def _import_rules() -> dict[str, set[str]]:
    """ARCHITECTURE.md's "What each folder may import" table: ``{area: allowed areas}``."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    section = text.split("## What each folder may import", 1)[1].split("\n## ", 1)[0]
    rules: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            areas = _TICKED.findall(cells[0])
            for area in areas:  # the areas of one row may also import one another
                rules[area] = set(_TICKED.findall(cells[1])) | set(areas)
    return rules


# Packages of the shared engine (not model families): they belong to the area ``uniba``.
SHARED_PACKAGES = {"checkpoint"}


def _area(module: str, file_areas: set[str]) -> str | None:
    """The area of a dotted module name: ``uniba``, ``uniba/<family>``, ``uniba/<entry>.py``, ``nodes``..."""
    parts = module.split(".")
    if _is_host_module(module):
        return "ComfyUI"
    if parts[0] == "uniba":
        if len(parts) > 1 and (REPO / "uniba" / parts[1]).is_dir() and parts[1] not in SHARED_PACKAGES:
            return f"uniba/{parts[1]}"
        if len(parts) > 1 and f"uniba/{parts[1]}.py" in file_areas:
            return f"uniba/{parts[1]}.py"
        return "uniba"
    if parts[0] == "nodes":
        return "nodes/comfy" if len(parts) > 1 and parts[1] == "comfy" else "nodes"
    return None


def import_graph(file_areas: set[str]) -> dict[str, set[str]]:
    """``{area: areas it imports}`` from every import statement and every string naming a module."""
    graph: dict[str, set[str]] = {}
    for path in sorted([*(REPO / "uniba").rglob("*.py"), *(REPO / "nodes").rglob("*.py")]):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = parts[:-1]
        src = _area(module, file_areas)
        if f"uniba/{path.name}" in file_areas and package == ["uniba"]:
            src = f"uniba/{path.name}"
        targets = []
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                    targets += [stem] if node.module else [f"{stem}.{a.name}" for a in node.names]
                else:
                    targets.append(node.module)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if _PACK_MODULE.fullmatch(node.value) or (_MODULE_NAME.fullmatch(node.value)
                                                         and _is_host_module(node.value)):
                    targets.append(node.value)
        for target in targets:
            dst = _area(target, file_areas)
            if dst is not None and dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def test_architecture_import_rules_match_the_import_graph() -> None:
    rules = _import_rules()
    file_areas = {a for a in rules if a.endswith(".py")}
    families = {f"uniba/{p.name}" for p in (REPO / "uniba").iterdir()
                if (p / "__init__.py").is_file() and p.name not in SHARED_PACKAGES}
    assert {"uniba", "uniba/*", "nodes", "nodes/comfy"} <= set(rules) and families
    for area in rules:  # the table names real code
        assert area == "uniba/*" or area in families | {"uniba", "nodes", "nodes/comfy"} \
            or (REPO / area).is_file(), area

    def allowed(src: str, dst: str) -> bool:
        own = rules.get(src, rules["uniba/*"] if src in families else set())
        return dst in own or (dst in families and "uniba/*" in own)

    graph = import_graph(file_areas)
    assert graph["nodes"] >= {"nodes/comfy", "uniba"} and "ComfyUI" in graph["nodes/comfy"]  # the graph is real
    violations = sorted(f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts if not allowed(src, dst))
    assert violations == []


def test_the_import_graph_catches_a_forbidden_edge(tmp_path, monkeypatch) -> None:
    """An engine family importing the adapter is found (the check is not vacuous)."""
    fake_repo = tmp_path / "repo"
    for folder in ("uniba/infdit", "nodes/comfy"):
        (fake_repo / folder).mkdir(parents=True)
        (fake_repo / folder / "__init__.py").write_text("")
    (fake_repo / "uniba" / "__init__.py").write_text("")
    loader = fake_repo / "uniba" / "infdit" / "loader.py"
    loader.write_text("from ...nodes.comfy import host\nfrom .. import memory\n")
    (fake_repo / "nodes" / "__init__.py").write_text("X = 'uniba.infdit.loader'\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake_repo)
    graph = import_graph(set())
    assert graph == {"uniba/infdit": {"nodes/comfy", "uniba"}, "nodes": {"uniba/infdit"}}


def test_node_files_are_declarations_and_calls() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "nodes").glob("*.py")}
    assert sizes and max(sizes.values()) <= 220, sizes  # well under 250: the work lives in the engine/adapter


def test_pack_and_engine_import_in_a_plain_interpreter() -> None:
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('comfy') is None\n"
        "import uniba, uniba.memory, uniba.checkpoint, uniba.cli\n"
        f"spec = importlib.util.spec_from_file_location('pack', r'{REPO / '__init__.py'}',"
        f" submodule_search_locations=[r'{REPO}'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m)\n"
        "assert m.WEB_DIRECTORY == './web'\n"
        "assert not any(k.split('.')[0] in ('comfy', 'folder_paths', 'server') for k in sys.modules)\n"
        "print(' '.join(sorted(m.NODE_CLASS_MAPPINGS)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == sorted(EXPECTED_NODES)


EXPECTED_NODES = ("InfDiTLoader", "InfDiTUpscale", "SanaDiTLoader", "FlowDPMSolverSampler", "SanaFlowSigmas",
                  "SanaSampler", "SanaEmptyLatent", "SanaTextEncoderLoader", "SanaTextEncode", "SanaVAELoader",
                  "SanaVAEDecode", "SanaVAEEncode", "HiDiffusionPatch", "HiDiffusionPatchAdvanced",
                  "SanaSprintSampler", "SanaSprintSigmas", "SanaSprintGuidance", "SanaPipelineLoader",
                  "SanaLoraLoader", "SanaControlNetLoader", "SanaPAG")


def test_cli_help_runs_headless() -> None:
    out = subprocess.run([sys.executable, "-m", "uniba", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "bench" in out.stdout


def test_host_fallbacks_outside_comfyui(tmp_path, monkeypatch) -> None:
    from uniba_pack.nodes.comfy import host

    assert not host.IN_COMFYUI
    assert host.free_memory(torch.device("cpu")) > 0
    assert host.dtype_support(torch.device("cpu")) == torch_dtype_support(torch.device("cpu"))
    host.check_interrupt()  # no-op headless
    monkeypatch.setenv("UNIBA_QUIET", "0")  # a disabled tqdm bar counts nothing
    progress = host.Progress(3)
    for i in range(1, 3):
        progress(i, 3, torch.rand(3, 8, 8))
    assert (progress._terminal.bar.n, progress._terminal.bar.total) == (2, 3)  # the bar follows the engine's counts

    def cancelled() -> None:
        raise KeyboardInterrupt("cancel")

    monkeypatch.setattr(host, "check_interrupt", cancelled)
    with pytest.raises(KeyboardInterrupt):  # every update checks Cancel before reporting
        progress(3, 3)
    assert progress._terminal.bar.n == 2
    progress.close()
    with pytest.raises(host.NeedsComfyUI, match="inside ComfyUI only"):
        host.require_comfyui("SanaSampler")

    monkeypatch.setenv("UNIBA_MODELS_DIR", str(tmp_path))
    (tmp_path / "infdit").mkdir()
    (tmp_path / "infdit" / "a.safetensors").write_bytes(b"")
    (tmp_path / "infdit" / "notes.txt").write_text("x")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "other.safetensors").write_bytes(b"")
    assert host.list_models("infdit") == ["a.safetensors"]
    assert host.model_path("infdit", "a.safetensors") == str(tmp_path / "infdit" / "a.safetensors")
    assert host.model_path("infdit", "a.safetensors", listed_only=True).endswith("a.safetensors")
    missing = None
    for name in ("b.safetensors", str(tmp_path / "vae" / "other.safetensors"), "../vae/other.safetensors",
                 "sub/../../vae/other.safetensors", "notes.txt"):
        for listed_only in ((True, False) if name != "notes.txt" else (True,)):  # loaders too: no way out
            with pytest.raises(FileNotFoundError) as info:
                host.model_path("infdit", name, listed_only=listed_only)
            message = str(info.value).replace(repr(name), "NAME")
            assert "models/infdit/" in message
            assert missing in (None, message)  # a path outside the folder answers exactly like a missing file
            missing = message

    patcher = host.wrap_model(torch.nn.Linear(2, 2))
    assert host.load_to_device(patcher) is patcher.model


def test_patchers_may_assign_device_to_any_model() -> None:
    """ComfyUI's ModelPatcher assigns ``model.device``; wrap_model's one fix makes read-only properties accept it."""
    from uniba_pack.nodes.comfy import host

    class ReadOnlyDevice(torch.nn.Linear):
        @property
        def device(self) -> torch.device:
            return self.weight.device

    model = ReadOnlyDevice(2, 2)
    with pytest.raises(AttributeError):
        model.device = torch.device("meta")
    host._allow_device_assignment(model)
    model.device = torch.device("meta")  # what the patcher does; the weights still tell the truth
    assert model.device == torch.device("cpu") and type(model).__name__ == "ReadOnlyDevice"
    assert isinstance(model, ReadOnlyDevice) and isinstance(model, torch.nn.Linear)


def test_every_node_class_is_well_formed() -> None:
    from uniba_pack.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    core = {"KSampler", "CheckpointLoaderSimple", "VAEDecode", "UNETLoader"}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert name not in core
        inputs = cls.INPUT_TYPES()
        assert "required" in inputs
        assert isinstance(cls.RETURN_TYPES, tuple)
        assert callable(getattr(cls, cls.FUNCTION))
        assert cls.CATEGORY.startswith("UniBA")
        assert name in NODE_DISPLAY_NAME_MAPPINGS


def test_packaging_metadata() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = meta["project"]
    for key in ("name", "version", "description", "license", "dependencies"):
        assert project[key]
    assert project["urls"]["Repository"].startswith("https://")
    assert meta["tool"]["comfy"]["PublisherId"] and meta["tool"]["comfy"]["DisplayName"]
    assert (REPO / "LICENSE").read_text().strip().startswith("Apache License")
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    assert not any(line.strip().startswith("torch") for line in requirements)


def test_comfy_registry_validation_passes_without_warnings() -> None:
    import shutil

    import pytest

    comfy = shutil.which("comfy") or shutil.which("comfy", path=str(Path(sys.executable).parent))
    if comfy is None:
        pytest.skip("comfy-cli is not installed (pip install -r requirements-test.txt)")
    out = subprocess.run([comfy, "--skip-prompt", "node", "validate"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "DO_NOT_TRACK": "1"})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "passed" in text and "warning" not in text.lower(), text
