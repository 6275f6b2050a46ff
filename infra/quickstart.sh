#!/usr/bin/env bash
# The embedded default, end to end: set up .venv, start a local Ray head and MLflow server on 127.0.0.1
# (they keep running for the MLflow UI; stop them with `python -m infra.stack down`), submit
# flows/eqface.py with `ray job submit --working-dir .`, follow its logs, and say where to look.
#
#   bash infra/quickstart.sh [key.sub=value ...]      # extra args go to flows/eqface.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/infra/setup_env.sh"
cd "$ROOT"

python -m infra.stack up
eval "$(python -m infra.stack env)"   # RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH, MLFLOW_TRACKING_URI

ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"$MLFLOW_TRACKING_URI\"}}" \
  -- python flows/eqface.py "$@"

python -m flows.summary "$@"
echo "[quickstart] services still running (MLflow UI above); stop them with: .venv/bin/python -m infra.stack down"
