#!/usr/bin/env bash
# The production MLflow tracking server: PostgreSQL backend store, artifacts proxied to S3, and MLflow's
# authentication app (`--app-name basic-auth`): every API call needs a user name and password, every
# experiment is readable only by the users given permission on it.
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
#
# Authentication (required; each secret from the environment or, with _FILE, from a file such as a
# Docker/Kubernetes secret or one written from the secrets manager):
#   MLFLOW_AUTH_ADMIN_USERNAME      the admin user, default admin
#   MLFLOW_AUTH_ADMIN_PASSWORD[_FILE]   its password: creates the admin on the first start (ignored after)
#   MLFLOW_FLASK_SERVER_SECRET_KEY[_FILE]   signs the UI's CSRF tokens; the same on every server
#   MLFLOW_AUTH_DATABASE_URI        where users and permissions live, default the backend store's database
#                                   (its own tables: users, roles, role_permissions, ...; no password in it)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what a user may do on an experiment nobody gave them: default
#                                   NO_PERMISSIONS (creators get MANAGE on what they create)
set -euo pipefail

die() { echo "run_server.sh: $*" >&2; exit 2; }

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow@db:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://my-bucket/mlflow-artifacts}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-2}"
AUTH_DATABASE_URI="${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}"

for uri_name in MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DATABASE_URI; do
  case "${!uri_name:-}" in
    *://*:*@*) die "$uri_name carries a password; use MLFLOW_DB_PASSWORD_FILE" ;;
  esac
done
if [ -n "${MLFLOW_DB_PASSWORD_FILE:-}" ]; then
  [ -r "$MLFLOW_DB_PASSWORD_FILE" ] || die "cannot read $MLFLOW_DB_PASSWORD_FILE"
  # libpq (psycopg) reads PGPASSWORD: the password never appears in argv, the URI or MLflow's logs.
  PGPASSWORD="$(tr -d '\n' < "$MLFLOW_DB_PASSWORD_FILE")"
  export PGPASSWORD
fi

# NAME from NAME_FILE when that is given (a secret file), else from NAME itself; exported for MLflow.
secret_from_file() {
  local name="$1" file_name="$1_FILE"
  if [ -n "${!file_name:-}" ]; then
    [ -r "${!file_name}" ] || die "cannot read ${!file_name} ($file_name)"
    printf -v "$name" '%s' "$(tr -d '\n' < "${!file_name}")"
  fi
  [ -n "${!name:-}" ] || return 1
  export "$name"
}
secret_from_file MLFLOW_FLASK_SERVER_SECRET_KEY \
  || die "set MLFLOW_FLASK_SERVER_SECRET_KEY or MLFLOW_FLASK_SERVER_SECRET_KEY_FILE (e.g. openssl rand -hex 32)"
# Needed only until the admin user exists; MLflow itself refuses to create it without one.
secret_from_file MLFLOW_AUTH_ADMIN_PASSWORD || true
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"

# MLflow reads the auth app's settings from an ini file only: written here, private, with no secret in it.
umask 077
MLFLOW_AUTH_CONFIG_PATH="$(mktemp -t mlflow-auth.XXXXXX.ini)"
export MLFLOW_AUTH_CONFIG_PATH
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-NO_PERMISSIONS}
database_uri = ${AUTH_DATABASE_URI//%/%%}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF

# The job-execution pool serves MLflow's GenAI jobs, which this project does not use; off, the server
# runs 2 processes in ~0.5 GB instead of 9 in ~2.4 GB.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

args=(
  --app-name basic-auth
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --host "$HOST" --port "$PORT" --workers "$WORKERS"
)
[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ] && args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
[ -n "${MLFLOW_CORS_ALLOWED_ORIGINS:-}" ] && args+=(--cors-allowed-origins "$MLFLOW_CORS_ALLOWED_ORIGINS")

MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"
exec "$MLFLOW_BIN" server "${args[@]}"
