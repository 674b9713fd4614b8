#!/usr/bin/env bash
# Prepare a Python venv in which a given ComfyUI checkout runs on a CPU-only machine, with this pack's
# integration tier (tests/integration) ready to run against it.
#
#   tests/integration/prepare_venv.sh /path/to/ComfyUI [/path/to/venv]     (venv default: <ComfyUI>/.venv-uniba)
#   COMFYUI_DIR=/path/to/ComfyUI /path/to/venv/bin/python -m pytest -q tests/integration
#
# What it does, and why (each step is safe to repeat):
#  1. CPU torch first, pinned by a constraints file for every later install: a plain `pip install -r
#     requirements.txt` lets torchvision drag in a newer CUDA torch and several GB of nvidia wheels.
#     PyTorch's CPU wheel index is used when it answers (TORCH_INDEX_URL; empty = PyPI/pip config only).
#  2. ComfyUI's requirements minus torch/torchvision/torchaudio/spandrel (comfy-kitchen, comfy-aimdo and the
#     pinned frontend come with them when the checkout lists them), plus `requests` (imported by
#     app/frontend_management.py, not listed by older checkouts).
#  3. torchvision (the release paired with the torch) and spandrel without dependencies, then the two
#     unconditional `@torch.library.register_fake("torchvision::nms"/"qnms")` decorators in the installed
#     torchvision/_meta_registrations.py are guarded by `torchvision.extension._has_ops()`: PyPI's wheel is a
#     CUDA build whose C ops cannot load, and without the guard `import torchvision` fails with
#     "operator torchvision::nms does not exist". Only this venv is edited.
#  4. torchaudio: no release exists for torch >= 2.12. A torchaudio that is installed but does not import is
#     removed. If `comfy.sd` then cannot import for lack of it (newer ComfyUI imports it at module level),
#     an importable stub package is put in this venv (test host only; audio nodes stay unusable).
#  5. The pack's runtime requirements and the integration tier's test tools (pytest, diffusers oracle,
#     websocket-client, aiohttp) and the HiDiffusion reference (hidiffusion 0.1.10, no dependencies).
#  6. A check that torch is the CPU build asked for and that ComfyUI's core imports in --cpu mode.
# Environment: PYTHON (interpreter for a new venv, default python3), TORCH_VERSION (default: ci/constraints.txt),
# TORCHVISION_VERSION (default: the release paired with TORCH_VERSION), TORCH_INDEX_URL.
set -euo pipefail

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
case "$1" in -h|--help) usage ;; esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
COMFY="$(cd "$1" && pwd)"
VENV="${2:-$COMFY/.venv-uniba}"
[ -f "$COMFY/main.py" ] && [ -f "$COMFY/requirements.txt" ] || {
  echo "error: $COMFY is not a ComfyUI checkout (no main.py/requirements.txt there)" >&2; exit 2; }

TORCH_VERSION="${TORCH_VERSION:-$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' "$REPO/ci/constraints.txt")}"
[ -n "$TORCH_VERSION" ] || { echo "error: no torch==X in ci/constraints.txt; set TORCH_VERSION" >&2; exit 2; }
if [ -z "${TORCHVISION_VERSION:-}" ]; then
  # torchvision 0.N pairs with torch 2.(N-15) since torch 2.0 / torchvision 0.15
  minor="$(echo "$TORCH_VERSION" | cut -d. -f2)"
  TORCHVISION_VERSION="0.$((minor + 15)).*"
fi
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"

say() { printf '\n== %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
CONSTRAINTS="$WORK/constraints.txt"
printf 'torch==%s\n' "$TORCH_VERSION" > "$CONSTRAINTS"

say "1. torch==$TORCH_VERSION (CPU)"
torch_index=()
if [ -n "$TORCH_INDEX_URL" ] && "$PY" - "$TORCH_INDEX_URL" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).close()
except Exception as exc:  # unreachable: say so and fall back to pip's own configuration
    print(f"   {sys.argv[1]} does not answer ({exc}); using pip's configured indexes", file=sys.stderr)
    sys.exit(1)
EOF
then
  torch_index=(--extra-index-url "$TORCH_INDEX_URL")
fi
"${PIP[@]}" "${torch_index[@]}" "torch==$TORCH_VERSION"

say "2. ComfyUI requirements (without torch/torchvision/torchaudio/spandrel) + requests"
grep -v -i -E '^[[:space:]]*(torch|torchvision|torchaudio|spandrel)([[:space:]]*[<>=!~;#].*)?[[:space:]]*$' \
  "$COMFY/requirements.txt" > "$WORK/comfy-requirements.txt"
"${PIP[@]}" -c "$CONSTRAINTS" -r "$WORK/comfy-requirements.txt" requests

say "3. torchvision==$TORCHVISION_VERSION and spandrel without dependencies; guard torchvision's register_fake"
"${PIP[@]}" --no-deps "${torch_index[@]}" "torchvision==$TORCHVISION_VERSION" spandrel
"$PY" - <<'EOF'
import importlib.util
import pathlib

spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
changed = 0
for op in ("nms", "qnms"):
    plain = f'@torch.library.register_fake("torchvision::{op}")'
    guarded = (f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() '
               f'else (lambda fn: fn))  # guarded by prepare_venv.sh: CPU-only torch')
    if guarded in text:
        continue
    if plain not in text:
        raise SystemExit(f"   {path}: {plain} not found; this torchvision may not need the guard")
    text = text.replace(plain, guarded)
    changed += 1
if changed:
    tmp = path.with_suffix(".py.uniba-tmp")
    tmp.write_text(text)
    tmp.replace(path)
print(f"   {path}: {changed} decorator(s) guarded" if changed else f"   {path}: already guarded")
EOF
"$PY" -c "import torchvision, torchvision.transforms; print('   torchvision', torchvision.__version__, 'imports')"

say "4. torchaudio"
STUB_MARK="UNIBA_TEST_STUB"
site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -f "$site/torchaudio/$STUB_MARK" ]; then
  echo "   stub already in place ($site/torchaudio)"
elif "$PY" -c "import torchaudio" 2>/dev/null; then
  echo "   torchaudio $("$PY" -c 'import torchaudio; print(torchaudio.__version__)') imports; kept"
else
  if "$PY" -m pip show -q torchaudio 2>/dev/null; then
    echo "   torchaudio is installed but does not import: removing it"
    "$PY" -m pip uninstall -y -q torchaudio
  fi
  probe=(env -C "$COMFY" "$PY" -c "import sys; sys.argv = [sys.argv[0], '--cpu']; import comfy.options; \
comfy.options.enable_args_parsing(); import comfy.sd")
  if err="$("${probe[@]}" 2>&1)"; then
    echo "   absent; ComfyUI core imports without it (its audio nodes will log an import failure)"
  elif echo "$err" | grep -q "No module named 'torchaudio'"; then
    echo "   ComfyUI core imports torchaudio at module level: installing a stub package (this venv only)"
    mkdir -p "$site/torchaudio"
    touch "$site/torchaudio/$STUB_MARK"
    cat > "$site/torchaudio/__init__.py" <<'EOF'
"""Test-host stub written by ComfyUI-UniBA tests/integration/prepare_venv.sh: no torchaudio exists for this torch.

It only lets ComfyUI modules that `import torchaudio` at module level load; any use raises."""

__version__ = "0.0.0+uniba.stub"


def __getattr__(name: str):
    raise AttributeError(f"torchaudio.{name}: torchaudio is a test stub in this venv (no release for this torch)")
EOF
  else
    echo "$err" | tail -5 >&2
    echo "error: ComfyUI core does not import in this venv (see above)" >&2
    exit 1
  fi
fi

say "5. the pack's requirements and the integration tier's tools"
grep -v -i -E '^[[:space:]]*(comfy-cli|ruff)\b' "$REPO/requirements-test.txt" > "$WORK/test-requirements.txt"
"${PIP[@]}" -c "$CONSTRAINTS" -r "$REPO/requirements.txt" -r "$WORK/test-requirements.txt"
"${PIP[@]}" --no-deps "hidiffusion==0.1.10"

say "6. check"
env -C "$COMFY" "$PY" - "$TORCH_VERSION" <<'EOF'
import sys

want = sys.argv[1]
sys.argv = [sys.argv[0], "--cpu"]
import torch

assert torch.__version__.split("+")[0] == want, f"torch {torch.__version__} installed, {want} wanted"
assert not torch.version.cuda, f"torch {torch.__version__} is a CUDA build; expected the CPU build"
import comfy.options

comfy.options.enable_args_parsing()
import comfy.model_management as mm
import comfy.sd  # noqa: F401

import comfyui_version

print(f"   ComfyUI {comfyui_version.__version__} core imports on {mm.get_torch_device()} with torch {torch.__version__}")
EOF
cat <<EOF

Ready. Run the integration tier from the pack folder ($REPO):
  COMFYUI_DIR=$COMFY $PY -m pytest -q tests/integration
EOF
