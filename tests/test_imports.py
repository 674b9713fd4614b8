"""The import graph of the engine and the adapter: no circles, and imports at the top of each module.

Every import statement of ``uniba/`` and ``nodes/`` (at any depth, so an import hidden in a function
counts) becomes an edge between modules; a circle among them fails. An import inside a function is
allowed only in the CLI entry points (start-up time) and the scripts that boot ComfyUI first, or for an
optional dependency (:data:`OPTIONAL`), with a comment on its line saying so.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Files that may import inside functions: the command line's entry points keep `python -m uniba --help` fast.
ENTRY_POINTS = ("uniba/cli.py", "uniba/__main__.py", "uniba/*/cli.py", "nodes/comfy/*_benchmark.py")
# Optional or host-provided dependencies that may be imported on first use (with a comment).
OPTIONAL = ("comfy", "comfy_api", "folder_paths", "server", "latent_preview", "aiohttp", "transformers", "tqdm")


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in sorted([*(root / "uniba").rglob("*.py"), *(root / "nodes").rglob("*.py")]):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """Dotted names an import statement may load (``from .x import y``: ``pkg.x.y``, a module or a name)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    stem = node.module or ""
    if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        stem = ".".join(base + ([node.module] if node.module else []))
    return [f"{stem}.{alias.name}" for alias in node.names]


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """``{module: modules of the pack it imports}``; a parent package imported on the way is no edge."""
    modules = _modules(root)

    def resolve(name: str) -> str | None:
        name = name.removeprefix("uniba_pack.")
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in modules.items():
        package = module if is_package else module.rpartition(".")[0]
        edges = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, package):
                    found = resolve(target)
                    if found and found != module and not module.startswith(found + "."):
                        edges.add(found)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def function_level_imports(root: Path = REPO) -> list[str]:
    """Imports inside functions that the rules do not allow, as ``file:line name``."""
    entry = {p for pattern in ENTRY_POINTS for p in root.glob(pattern)}
    bad = []
    for module, (path, is_package) in _modules(root).items():
        if path in entry:
            continue
        package = module if is_package else module.rpartition(".")[0]
        source = path.read_text()
        lines = source.splitlines()
        for function in ast.walk(ast.parse(source, filename=str(path))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                names = _targets(node, package) if isinstance(node, ast.ImportFrom) and node.level else \
                    ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
                optional = all(n.split(".")[0] in OPTIONAL for n in names)
                if not (optional and "#" in lines[node.lineno - 1]):
                    bad.append(f"{path.relative_to(root)}:{node.lineno} {', '.join(names)}")
    return bad


def test_no_import_circles() -> None:
    graph = import_graph()
    assert "uniba.infdit.blockwise" in graph["uniba.infdit.upscale"]  # the graph is real
    assert circles(graph) == []


def test_imports_sit_at_the_top_of_modules() -> None:
    assert function_level_imports() == []


def test_the_checks_find_a_circle_and_a_hidden_import(tmp_path: Path) -> None:
    """A circle hidden behind a function-level import is found twice: as a circle and as the import."""
    family = tmp_path / "uniba" / "fam"
    family.mkdir(parents=True)
    (tmp_path / "nodes").mkdir()
    for folder in (tmp_path / "uniba", family, tmp_path / "nodes"):
        (folder / "__init__.py").write_text("")
    (family / "model.py").write_text("def denoise():\n    from .blockwise import run\n    return run()\n")
    (family / "blockwise.py").write_text("from .model import denoise\n\n\ndef run():\n    return 1\n")
    (family / "text.py").write_text("def load():\n    import transformers  # optional, heavy\n")
    (family / "cli.py").write_text("def main():\n    from .model import denoise\n")
    assert circles(import_graph(tmp_path)) == [["uniba.fam.blockwise", "uniba.fam.model"]]
    assert function_level_imports(tmp_path) == ["uniba/fam/model.py:2 uniba.fam.blockwise.run"]
