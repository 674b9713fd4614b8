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

REPO = Path(__file__).resolve().parents[1]


# ComfyUI's top-level modules. Only nodes/comfy/ may name them. Exempt besides: the integration tier and
# tiny_unets.py (its ComfyUI twins of the test UNets serve that tier), which drive ComfyUI on purpose,
# and this file, which names the modules to look for them.
HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config", "folder_paths", "server",
                "execution", "latent_preview", "node_helpers")
ADAPTER = REPO / "nodes" / "comfy"
GUARD_EXEMPT = (ADAPTER, REPO / "tests" / "integration", REPO / "tests" / "tiny_unets.py", Path(__file__).resolve())
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


def _guarded_files() -> list[Path]:
    return [p for p in REPO.rglob("*.py") if ".git" not in p.parts and ".venv" not in p.parts
            and not any(p == e or e in p.parents for e in GUARD_EXEMPT)]


def test_only_the_adapter_touches_comfyui() -> None:
    files = _guarded_files()
    assert REPO / "uniba" / "checkpoint.py" in files and REPO / "nodes" / "sana_nodes.py" in files
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


def test_node_files_are_declarations_and_calls() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "nodes").glob("*.py")}
    assert sizes and max(sizes.values()) <= 200, sizes  # well under 250: the work lives in the engine/adapter


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
                  "SanaVAEDecode", "SanaVAEEncode", "HiDiffusionPatch", "HiDiffusionPatchAdvanced")


def test_cli_help_runs_headless() -> None:
    out = subprocess.run([sys.executable, "-m", "uniba", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "bench" in out.stdout


def test_host_fallbacks_outside_comfyui(tmp_path, monkeypatch) -> None:
    from uniba_pack.nodes.comfy import host

    assert not host.IN_COMFYUI
    assert host.free_memory(torch.device("cpu")) > 0
    assert host.choose_dtype("auto", torch.device("cpu")) is torch.float32
    assert host.choose_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="auto, bf16, fp16 or fp32"):
        host.choose_dtype("fp8")
    host.check_interrupt()  # no-op headless
    monkeypatch.setenv("UNIBA_QUIET", "0")  # a disabled tqdm bar counts nothing
    progress = host.Progress(3)
    for i in range(1, 3):
        progress(i, 3, torch.rand(3, 8, 8))
    assert (progress._tqdm.n, progress._tqdm.total) == (2, 3)  # the bar follows the engine's counts

    def cancelled() -> None:
        raise KeyboardInterrupt("cancel")

    monkeypatch.setattr(host, "check_interrupt", cancelled)
    with pytest.raises(KeyboardInterrupt):  # every update checks Cancel before reporting
        progress(3, 3)
    assert progress._tqdm.n == 2
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
