#!/usr/bin/env bash
# The production MLflow tracking server: PostgreSQL backend store, artifacts proxied to S3.
# Configured by environment only (no secret on the command line, none in this file); `exec`s mlflow,
# so the pid you started is the server's (it forks its uvicorn workers into the same process group).
#
#   MLFLOW_BACKEND_STORE_URI      postgresql://mlflow@db-host:5432/mlflow   (no password in it)
#   MLFLOW_DB_PASSWORD_FILE       file holding the database password -> PGPASSWORD for libpq (optional)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/mlflow-artifacts (or a local path for tests)
#   MLFLOW_HOST / MLFLOW_PORT     bind address, default 127.0.0.1:5000
#   MLFLOW_WORKERS                uvicorn worker processes, default 2
#   MLFLOW_ALLOWED_HOSTS          Host headers accepted, e.g. mlflow.internal,10.0.*  (default: MLflow's
#                                 own: localhost and private IPs)
#   MLFLOW_CORS_ALLOWED_ORIGINS   origins of web apps allowed to call the API (default: MLflow's own)
#   MLFLOW_S3_ENDPOINT_URL        S3-compatible endpoint (MinIO, moto, ...); unset for AWS S3
#   S3 credentials come from the instance profile / task role (boto3's chain), never from this script.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow@db:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://my-bucket/mlflow-artifacts}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-2}"

case "$MLFLOW_BACKEND_STORE_URI" in
  *://*:*@*) echo "run_server.sh: MLFLOW_BACKEND_STORE_URI carries a password; use MLFLOW_DB_PASSWORD_FILE" >&2
             exit 2 ;;
esac
if [ -n "${MLFLOW_DB_PASSWORD_FILE:-}" ]; then
  [ -r "$MLFLOW_DB_PASSWORD_FILE" ] || { echo "run_server.sh: cannot read $MLFLOW_DB_PASSWORD_FILE" >&2; exit 2; }
  # libpq (psycopg2) reads PGPASSWORD: the password never appears in argv, the URI or MLflow's logs.
  PGPASSWORD="$(tr -d '\n' < "$MLFLOW_DB_PASSWORD_FILE")"
  export PGPASSWORD
fi

# The job-execution pool serves MLflow's GenAI jobs, which this project does not use; off, the server
# runs 2 processes in ~0.5 GB instead of 9 in ~2.4 GB.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

args=(
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --host "$HOST" --port "$PORT" --workers "$WORKERS"
)
[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ] && args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
[ -n "${MLFLOW_CORS_ALLOWED_ORIGINS:-}" ] && args+=(--cors-allowed-origins "$MLFLOW_CORS_ALLOWED_ORIGINS")

MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"
exec "$MLFLOW_BIN" server "${args[@]}"
