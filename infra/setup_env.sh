#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project's pinned dependencies (if pyproject.toml changed).
# Sourced by infra/quickstart.sh and infra/test.sh; safe to run again. Nothing of this repository is
# installed into site-packages: the repository root stays the import root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EQFACE_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.eqface-deps"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing dependencies into $VENV (first time: a few minutes)" >&2
  # torch first and pinned: 2.13.0 is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0
  # `.[test]` installs only the dependencies: pyproject declares no packages.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$ROOT[test]"
  "$VENV/bin/python" -m pip uninstall --quiet --yes eqface-ray >/dev/null 2>&1 || true
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
