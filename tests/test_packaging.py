"""Packaging: `pip install .` gives the engine and the `uniba` command only; the registry archive is small.

The wheel is built from a copy of the checkout (so the repository gets no build/ or egg-info litter) with the
setuptools already installed (no network, no build isolation), then its file list is checked.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[str]:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    out = subprocess.run([git, "-C", str(REPO), "ls-files"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [line for line in out.stdout.splitlines() if line and (REPO / line).is_file()]


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("setuptools", minversion="61")
    src = tmp_path_factory.mktemp("src")
    for name in _tracked_files():
        if name.startswith("tests/data/"):
            continue  # large fixtures; never packaged anyway
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    out_dir = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out_dir), str(src)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out_dir.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel_names(wheel_path: Path) -> list[str]:
    with zipfile.ZipFile(wheel_path) as archive:
        return archive.namelist()


def test_wheel_holds_only_the_engine(wheel_names: list[str]) -> None:
    top_level = {name.split("/")[0] for name in wheel_names}
    dist_info = {t for t in top_level if t.endswith(".dist-info")}
    assert top_level - dist_info == {"uniba"}, sorted(top_level)
    engine_sources = {name for name in _tracked_files() if name.startswith("uniba/") and name.endswith(".py")}
    assert engine_sources <= set(wheel_names), sorted(engine_sources - set(wheel_names))


def test_wheel_declares_the_console_command_and_never_torch(wheel_names: list[str], tmp_path: Path) -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["scripts"] == {"uniba": "uniba.cli:main"}
    requirements = [r.split(";")[0].strip().lower() for r in meta["project"]["dependencies"]]
    assert not any(r.startswith(("torch", "torchvision", "torchaudio")) for r in requirements), requirements
    assert any(name.endswith(".dist-info/entry_points.txt") for name in wheel_names)


def test_console_entry_point_runs_from_any_directory(tmp_path: Path) -> None:
    # What the installed `uniba` script does: import uniba.cli and call main(); here from an unrelated cwd.
    code = "import sys; from uniba.cli import main; sys.exit(main(['--version']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("uniba ")


def test_registry_archive_leaves_out_developer_files() -> None:
    pathspec = pytest.importorskip("pathspec")  # comfy-cli's own matcher for .comfyignore
    lines = (REPO / ".comfyignore").read_text().splitlines()
    patterns = [x.strip() for x in lines if x.strip() and not x.startswith("#")]
    spec = pathspec.PathSpec.from_lines("gitwildmatch", patterns)
    tracked = _tracked_files()
    kept = [name for name in tracked if not spec.match_file(name)]
    assert not [name for name in kept if name.startswith(("tests/", ".ci/", "ci/"))]
    # Everything ComfyUI needs at run time stays in.
    needed = {"__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md"}
    needed |= {n for n in tracked if n.startswith(("uniba/", "nodes/", "web/", "workflows/", "subgraphs/"))}
    assert needed <= set(kept), sorted(needed - set(kept))
    size = sum((REPO / name).stat().st_size for name in kept)
    assert size < 2 * 1024 * 1024, f"registry archive input is {size / 2**20:.1f} MiB"


def _reaches_into_tests(path: Path) -> list[str]:
    """Code (not docstrings or prose) that names the tests folder: a path part, a path into it, an import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in ("tests", "tests/") or node.value.startswith(("tests/", "tests.", "../tests")):
                found.append(f"{path.name}:{node.lineno} {node.value!r}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tests":
            found.append(f"{path.name}:{node.lineno} from {node.module}")
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "tests" for a in node.names):
            found.append(f"{path.name}:{node.lineno} import tests")
    return found


def test_no_engine_file_reaches_into_tests(tmp_path: Path) -> None:
    offenders = [hit for path in sorted((REPO / "uniba").rglob("*.py")) for hit in _reaches_into_tests(path)]
    assert offenders == []
    bad = tmp_path / "bench.py"
    bad.write_text('"""Reads tests/data (prose is fine)."""\nfrom pathlib import Path\n'
                   'GOLDEN = Path(__file__).parents[2] / "tests" / "data" / "x.safetensors"\n'
                   'OTHER = "tests/integration/script.py"\n')
    assert sorted(_reaches_into_tests(bad)) == ["bench.py:3 'tests'", "bench.py:4 'tests/integration/script.py'"]


def test_installed_wheel_offers_every_benchmark(wheel_path: Path, tmp_path: Path) -> None:
    """The wheel alone (no checkout, no tests/) imports every benchmark and answers its --help."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel_path) as archive:
        archive.extractall(site)
    code = ("import contextlib, importlib, io\n"
            "from uniba.cli import BENCHMARKS\n"
            "for name, (module, _) in sorted(BENCHMARKS.items()):\n"
            "    out = io.StringIO()\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(out):\n"
            "            importlib.import_module(module).run(['--help'])\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, (name, exc.code)\n"
            "    assert 'usage:' in out.getvalue(), name\n"
            "    print(name, importlib.import_module(module).__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "UNIBA_QUIET": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines()]
    from uniba.cli import BENCHMARKS

    assert sorted(name for name, _ in rows) == sorted(BENCHMARKS)
    assert all(Path(file).is_relative_to(site) for _, file in rows), rows
