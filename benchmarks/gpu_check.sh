#!/usr/bin/env bash
# The GPU check on a 1-GPU host: a venv with the CUDA build of the torch that pyproject.toml pins and the
# project's pinned dependencies (as infra/docker/Dockerfile installs them), then benchmarks/gpu_check.py,
# which prints one table. Arguments go to the script.
#
#   bash benchmarks/gpu_check.sh [--json figures.json] [--work DIR]
#   bash benchmarks/gpu_check.sh --dry-run      # print what it would install and run; installs nothing
#
# Environment:
#   EQFACE_GPU_VENV   the venv (default: <repo>/.venv-gpu; created once, reused)
#   PYTHON            the interpreter that creates it (default: python3, 3.11 or newer)
#   TORCH_INDEX_URL   PyTorch's index of a CUDA variant, e.g. https://download.pytorch.org/whl/cu128 (default:
#                     PyPI, whose torch 2.13.0 is the CUDA 13.0 build: NVIDIA driver >= 580)
#   WHEELS            a folder of wheels to install from instead of any index (a host without internet:
#                     `pip download` them elsewhere for its Python and platform)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EQFACE_GPU_VENV:-$ROOT/.venv-gpu}"
PYTHON_BIN="${PYTHON:-python3}"
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi

# The pins, read from pyproject.toml (one place): torch, and the test extras the check uses (onnx, onnxruntime).
read_pins() {
  "$PYTHON_BIN" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
name = lambda req: re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower()
torch = [r for r in project["dependencies"] if name(r) == "torch"]
extras = [r for r in project["optional-dependencies"]["test"] if name(r) in ("onnx", "onnxruntime")]
print(torch[0], *extras)
EOF
}
read -r -a PINS <<<"$(read_pins)"
TORCH_PIN="${PINS[0]}"
EXTRA_PINS=("${PINS[@]:1}")
SOURCE=()
if [ -n "${WHEELS:-}" ]; then SOURCE=(--no-index --find-links "$WHEELS")
elif [ -n "${TORCH_INDEX_URL:-}" ]; then SOURCE=(--index-url "$TORCH_INDEX_URL"); fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

run() { echo "+ $*" >&2; [ "$DRY_RUN" = 1 ] || "$@"; }

if [ ! -x "$VENV/bin/python" ]; then run "$PYTHON_BIN" -m venv "$VENV"; fi
STAMP="$VENV/.eqface-gpu-deps"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  # torch first, from the chosen source; then pyproject's dependencies with torch held at that build
  # (a local version such as 2.13.0+cu128 satisfies ==2.13.0), the project itself removed again.
  run "${PIP[@]}" "${SOURCE[@]}" "$TORCH_PIN"
  [ "$DRY_RUN" = 1 ] || echo "$TORCH_PIN" > "$VENV/constraints.txt"
  run "${PIP[@]}" ${WHEELS:+--no-index --find-links "$WHEELS"} --constraint "$VENV/constraints.txt" "$ROOT" \
    "${EXTRA_PINS[@]}"
  run "$VENV/bin/python" -m pip uninstall --quiet --yes eqface-ray
  [ "$DRY_RUN" = 1 ] || echo "$WANT" > "$STAMP"
fi
run "$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'torch ' + torch.__version__ + \
' sees no CUDA device'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
cd "$ROOT"
export PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then echo "+ $VENV/bin/python -m benchmarks.gpu_check $*" >&2; exit 0; fi
exec "$VENV/bin/python" -m benchmarks.gpu_check "$@"
