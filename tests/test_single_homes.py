"""Facts with one home stay there: the dtype name table (uniba/devices.py) and Sana's latent constants and
default shift (uniba/sana/config.py, the scaling factor in uniba/dcae/config.py). A second definition in the
engine or the adapter fails here; tests may restate a value as an oracle."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPE_HOME = "uniba/devices.py"
SANA_HOME = "uniba/sana/config.py"
SCALE_HOME = "uniba/dcae/config.py"
DTYPE_NAMES = {"bf16", "fp16", "fp32", "bfloat16", "float16", "float32", "fp8_e4m3fn"}
TORCH_DTYPES = {"bfloat16", "float16", "float32", "half", "float", "float8_e4m3fn"}
SANA_FACTS = {"LATENT_CHANNELS", "LATENT_DOWNSCALE", "LATENT_SCALE", "CAPTION_CHANNELS", "DEFAULT_SHIFT", "SHIFT_4K",
              "SANA_LATENT_CHANNELS", "SANA_DOWNSCALE", "SANA_CAPTION_CHANNELS", "SCALING_FACTOR"}


def _is_torch_dtype(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr in TORCH_DTYPES and isinstance(node.value, ast.Name) \
        and node.value.id == "torch"


def _is_name(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value in DTYPE_NAMES


def second_homes(path: Path, rel: str) -> list[str]:
    """Definitions in one file that belong to a single home elsewhere."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Dict) and rel != DTYPE_HOME:
            pairs = list(zip(node.keys, node.values))
            if any((_is_name(k) and _is_torch_dtype(v)) or (_is_torch_dtype(k) and _is_name(v)) for k, v in pairs):
                found.append(f"{where} a dtype name table")
        elif isinstance(node, ast.Constant) and node.value == 0.41407 and rel != SCALE_HOME:
            found.append(f"{where} the DC-AE scaling factor 0.41407")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and rel not in (SANA_HOME, SCALE_HOME):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {t.id for t in targets if isinstance(t, ast.Name)}
            if names & SANA_FACTS and isinstance(node.value, ast.Constant):
                found.append(f"{where} {', '.join(sorted(names & SANA_FACTS))} = {node.value.value!r}")
        elif isinstance(node, ast.keyword) and node.arg == "shift" and isinstance(node.value, ast.Constant) \
                and node.value.value not in (0, 0.0, 1, 1.0):
            found.append(f"{where} shift={node.value.value!r} (use DEFAULT_SHIFT)")
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value in ("shift", "flow_shift") \
                        and isinstance(value, ast.Constant) and value.value not in (0, 0.0, 1, 1.0):
                    found.append(f"{where} {key.value!r}: {value.value!r} (use DEFAULT_SHIFT)")
        elif isinstance(node, ast.arguments):
            params = node.posonlyargs + node.args
            defaults = list(zip(params[len(params) - len(node.defaults):], node.defaults))
            defaults += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None]
            for arg, default in defaults:
                if arg.arg == "shift" and isinstance(default, ast.Constant) and default.value not in (0, 0.0, 1, 1.0):
                    found.append(f"{rel}:{default.lineno} shift: float = {default.value!r} (use DEFAULT_SHIFT)")
    return found


def test_dtype_table_and_sana_facts_have_one_home() -> None:
    files = sorted(p for folder in ("uniba", "nodes") for p in (REPO / folder).rglob("*.py")
                   if "__pycache__" not in p.parts)
    offenders = [hit for p in files for hit in second_homes(p, p.relative_to(REPO).as_posix())]
    assert offenders == []


def test_the_check_sees_each_kind_of_second_home(tmp_path: Path) -> None:
    copy = tmp_path / "copy.py"
    copy.write_text(
        "import torch\n"
        "_DTYPES = {'bf16': torch.bfloat16, 'fp32': torch.float32}\n"
        "NAMES = {torch.float16: 'fp16'}\n"
        "SANA_DOWNSCALE = 32\n"
        "scale = 0.41407\n"
        "settings = {'shift': 3.0, 'multiplier': 1000}\n"
        "def flow_sigmas(steps, shift=3.0):\n"
        "    return get(model, 'shift', 3.0), sigmas(steps, shift=3.0)\n")
    assert sorted(second_homes(copy, "uniba/x.py")) == sorted([
        "uniba/x.py:2 a dtype name table", "uniba/x.py:3 a dtype name table", "uniba/x.py:4 SANA_DOWNSCALE = 32",
        "uniba/x.py:5 the DC-AE scaling factor 0.41407", "uniba/x.py:6 'shift': 3.0 (use DEFAULT_SHIFT)",
        "uniba/x.py:7 shift: float = 3.0 (use DEFAULT_SHIFT)", "uniba/x.py:8 shift=3.0 (use DEFAULT_SHIFT)"])
    assert second_homes(copy, DTYPE_HOME)[:1] == ["uniba/devices.py:4 SANA_DOWNSCALE = 32"]
