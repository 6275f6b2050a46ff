#!/usr/bin/env bash
# The whole test suite. Sets up .venv if needed; the tests start (and stop, by pid) every service they
# need: Ray heads, MLflow servers, an S3-compatible server, all on 127.0.0.1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/infra/setup_env.sh"
cd "$ROOT"
ruff check .
exec python -m pytest "$@"
