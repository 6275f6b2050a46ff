"""infra/mlflow/run_server.sh (the production MLflow server, authentication on) started for a test module: its
own dir, 127.0.0.1, a free port, a generated admin password and secret key in private files; stopped by pid."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra.stack import HOST, free_port

ROOT = Path(__file__).resolve().parents[1]
RUN_SERVER = ROOT / "infra" / "mlflow" / "run_server.sh"
ADMIN = "admin"


@dataclass
class AuthServer:
    url: str
    proc: subprocess.Popen
    log: Path
    admin_password: str

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the server (its pid), then SIGKILL whatever is left of its process group (uvicorn workers)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def _private_file(path: Path, text: str) -> Path:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)
    return path


def start_run_server(root: Path, env: dict[str, str], timeout: float = 240) -> AuthServer:
    """run_server.sh with `env` (the backend store and artifact settings) on a free port; returns once /health
    answers (the first start against PostgreSQL runs MLflow's schema migrations: tens of seconds)."""
    secret_dir = root / "secrets"
    secret_dir.mkdir(mode=0o700)
    admin_password = secrets.token_urlsafe(24)
    port = free_port()
    log = root / "mlflow.log"
    full_env = {
        **os.environ,
        "MLFLOW_HOST": HOST,
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow"),
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(_private_file(secret_dir / "admin_password", admin_password)),
        "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": str(_private_file(secret_dir / "flask_key", secrets.token_hex(32))),
        "TMPDIR": str(root),  # where run_server.sh writes the auth app's ini file
        **env,
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(RUN_SERVER)], env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = AuthServer(f"http://{HOST}:{port}", proc, log, admin_password)
    deadline = time.monotonic() + timeout
    while http_status_or_none(f"{server.url}/health") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"MLflow server not healthy: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    return server


def http_status(url: str, host: str | None = None, auth: tuple[str, str] | None = None, method: str = "GET",
                body: bytes | None = None) -> int:
    headers = {"Host": host} if host else {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def http_status_or_none(url: str) -> int | None:
    try:
        return http_status(url)
    except (urllib.error.URLError, OSError):
        return None


@contextmanager
def as_user(user: str, password: str):
    """MLflow clients in this process authenticate as `user` (MLflow reads these per request)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def create_user(server: AuthServer, user: str) -> str:
    """A new non-admin user with a generated password (the admin creates it); returns the password."""
    from mlflow.server import get_app_client

    password = secrets.token_urlsafe(24)
    with as_user(ADMIN, server.admin_password):
        get_app_client("basic-auth", tracking_uri=server.url).create_user(user, password)
    return password
