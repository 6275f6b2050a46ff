#!/usr/bin/env bash
# The whole test suite. Sets up .venv if needed; the tests start (and stop, by pid) every service they
# need: Ray heads, MLflow servers, an S3-compatible server, all on 127.0.0.1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/infra/setup_env.sh"
cd "$ROOT"
# PostgreSQL from Debian's packages for the MLflow-on-PostgreSQL test (it skips, saying why, without it).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
    || echo "[test] could not install postgresql; its test will skip" >&2
fi
ruff check .
exec python -m pytest "$@"
