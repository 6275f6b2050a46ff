#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py), three ways. Arguments after the mode go to the script.
#
# 1. The GPU host without network (its own python3 with CUDA torch, no Ray, no MLflow; 64 MiB travel with the
#    repository). Once, on an ordinary machine with the package index:
#      bash benchmarks/gpu_check.sh --prepare .gpu-host            # Ray + the few missing wheels, ~33 MiB
#    It prints the folder's size and the one command to paste on the host, from the repository root:
#      bash benchmarks/gpu_check.sh --host .gpu-host --results DIR [--smoke]
#    which unpacks the folder onto a fresh PYTHONPATH, runs the check with the host's python3 (torch 2.11 or
#    the pinned one) under EQFACE_GPU_CHECK_LIMIT_S (default 345 s) and writes log.txt, table.md, figures.json
#    and imports.txt into DIR as each check ends.
# 2. A 1-GPU host with network: a venv with the CUDA build of the torch that pyproject.toml pins and the
#    project's pinned dependencies (as infra/docker/Dockerfile installs them), then the check:
#      bash benchmarks/gpu_check.sh [--json figures.json] [--work DIR]
#      bash benchmarks/gpu_check.sh --dry-run      # print what it would install and run; installs nothing
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "${1:-}" = "--prepare" ]; then  # here: the project's venv (its installed versions are what travels)
  shift
  source "$ROOT/infra/setup_env.sh" >/dev/null
  cd "$ROOT"
  exec python -m benchmarks.gpu_host prepare "$@"
fi

if [ "${1:-}" = "--host" ]; then  # on the GPU host: no venv, no install, nothing from any index
  FOLDER="${2:?--host needs the prepared folder}"
  shift 2
  RESULTS=""
  ARGS=()
  while [ $# -gt 0 ]; do
    if [ "$1" = "--results" ]; then RESULTS="${2:?--results needs a folder}"; shift 2; else ARGS+=("$1"); shift; fi
  done
  [ -n "$RESULTS" ] || { echo "gpu_check.sh: --host needs --results DIR" >&2; exit 2; }
  PY="${PYTHON:-python3}"
  WORK="${EQFACE_GPU_WORK:-/tmp/eqface-gpu-check}"
  mkdir -p "$RESULTS" "$WORK"
  RESULTS="$(cd "$RESULTS" && pwd)"
  cd "$ROOT"
  export PYTHONUNBUFFERED=1 PYTHONNOUSERSITE=1
  {
    "$PY" -c "import sys, torch; print('[gpu-host] python', sys.version.split()[0], 'torch', torch.__version__, \
'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())" \
      && "$PY" -m benchmarks.gpu_host unpack "$FOLDER" "$WORK/site" \
      && PYTHONPATH="$WORK/site:$ROOT" timeout -k 15 "${EQFACE_GPU_CHECK_LIMIT_S:-345}" \
        "$PY" -m benchmarks.gpu_check --work "$WORK/work" --results "$RESULTS" "${ARGS[@]}"
  } 2>&1 | tee "$RESULTS/log.txt"
  exit "${PIPESTATUS[0]}"
fi
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
