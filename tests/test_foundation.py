"""The pack's shape: imports without ComfyUI, host fallbacks, CLI, packaging metadata."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib
import torch

REPO = Path(__file__).resolve().parents[1]


def _imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_engine_never_imports_comfy() -> None:
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "uniba").rglob("*.py")
                 if any(n == "comfy" or n.startswith(("comfy.", "comfy_", "folder_paths", "server"))
                        for n in _imports_of(p))]
    assert offenders == []


def test_only_the_host_adapter_imports_comfyui_internals() -> None:
    host_names = ("comfy", "folder_paths", "server", "execution", "latent_preview", "node_helpers")
    offenders = []
    for p in (REPO / "nodes").rglob("*.py"):
        if p.name == "host.py":
            continue
        if any(n.split(".")[0] in host_names or n.startswith("comfy_") for n in _imports_of(p)):
            offenders.append(p.name)
    assert offenders == []


def test_pack_and_engine_import_in_a_plain_interpreter() -> None:
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('comfy') is None\n"
        "import uniba, uniba.memory, uniba.checkpoint, uniba.cli\n"
        f"spec = importlib.util.spec_from_file_location('pack', r'{REPO / '__init__.py'}',"
        f" submodule_search_locations=[r'{REPO}'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m)\n"
        "assert m.WEB_DIRECTORY == './web'\n"
        "assert not any(k == 'comfy' or k.startswith('comfy.') for k in sys.modules)\n"
        "print(len(m.NODE_CLASS_MAPPINGS))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) >= 0


def test_cli_help_runs_headless() -> None:
    out = subprocess.run([sys.executable, "-m", "uniba", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "bench" in out.stdout


def test_host_fallbacks_outside_comfyui(tmp_path, monkeypatch) -> None:
    from uniba_pack.nodes import host

    assert not host.IN_COMFYUI
    assert host.free_memory(torch.device("cpu")) > 0
    assert host.choose_dtype("auto", torch.device("cpu")) is torch.float32
    assert host.choose_dtype("bf16") is torch.bfloat16
    host.check_interrupt()  # no-op headless
    seen = []
    progress = host.Progress(3)
    for i in range(1, 4):
        progress(i, 3, torch.rand(3, 8, 8))
        seen.append(i)
    progress.close()
    assert seen == [1, 2, 3]

    monkeypatch.setenv("UNIBA_MODELS_DIR", str(tmp_path))
    (tmp_path / "infdit").mkdir()
    (tmp_path / "infdit" / "a.safetensors").write_bytes(b"")
    (tmp_path / "infdit" / "notes.txt").write_text("x")
    assert host.list_models("infdit") == ["a.safetensors"]
    assert host.model_path("infdit", "a.safetensors").endswith("a.safetensors")
    try:
        host.model_path("infdit", "b.safetensors")
    except FileNotFoundError as exc:
        assert "models/infdit/" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("missing model file not reported")

    patcher = host.wrap_model(torch.nn.Linear(2, 2))
    assert host.load_to_device(patcher) is patcher.model


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
