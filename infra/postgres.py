"""A throwaway PostgreSQL server on 127.0.0.1 from Debian's packages, for tests of MLflow's production store.

    with start_postgres() as pg:          # raises PostgresUnavailable when it cannot run here
        print(pg.uri)                     # postgresql://mlflow@127.0.0.1:PORT/mlflow

`initdb` makes a cluster in a fresh temp dir; the `postgres` server process itself is started (so its pid
is the one we stop) with `listen_addresses=127.0.0.1`, a unix socket inside that dir, trust authentication
(loopback only, data thrown away) and fsync off. PostgreSQL refuses to run as root: as root the server
runs as the `postgres` system user that Debian's package creates. `stop()` asks for a fast shutdown
(SIGINT), kills what is left of its process group, and deletes the dir.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from infra.stack import HOST, free_port

# Debian puts the server binaries here, not on PATH; EQFACE_PG_BIN overrides.
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
REQUIRED = ("initdb", "postgres", "pg_isready", "createdb")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started on this machine (binaries or a non-root user missing)."""


def find_bin_dir() -> Path | None:
    """The directory holding initdb, postgres, pg_isready and createdb, or None."""
    candidates: list[Path] = []
    if os.environ.get("EQFACE_PG_BIN"):
        candidates.append(Path(os.environ["EQFACE_PG_BIN"]))
    if DEBIAN_PG_ROOT.is_dir():
        versions = [p for p in DEBIAN_PG_ROOT.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: int(p.name), reverse=True)]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if all((directory / name).is_file() for name in REQUIRED):
            return directory
    return None


def _run_as() -> pwd.struct_passwd:
    """Whom the server runs as: ourselves, or `postgres` when we are root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(
            "running as root and there is no 'postgres' user to run the server as "
            "(Debian's postgresql package creates it: apt-get install -y postgresql)"
        ) from None


@dataclass
class Postgres:
    bin_dir: Path
    root: Path
    port: int
    pid: int
    user: str
    database: str
    log: Path
    _proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"postgresql://{self.user}@{HOST}:{self.port}/{self.database}"

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        try:
            os.kill(self.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown by pid, then SIGKILL its process group if anything is left; remove the data dir."""
        try:
            os.kill(self.pid, signal.SIGINT)  # "fast" shutdown: roll back open transactions, exit
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            os.killpg(self.pid, signal.SIGKILL)  # its own session: pgid == pid; catches stray backends
        except ProcessLookupError:
            pass
        if self._proc is not None:
            self._proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_postgres(database: str = "mlflow", user: str = "mlflow", timeout: float = 60) -> Postgres:
    """initdb + postgres on a free port of 127.0.0.1 in a new temp dir; returns once it takes connections."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailable(
            "PostgreSQL server binaries (initdb, postgres, pg_isready, createdb) not found under "
            f"{DEBIAN_PG_ROOT}/*/bin or on PATH (install them with: apt-get install -y postgresql)"
        )
    account = _run_as()
    # Not under pytest's tmp dirs: those are private to root, and the server may run as another user.
    root = Path(tempfile.mkdtemp(prefix="eqface-pg-"))
    data, log = root / "data", root / "postgres.log"
    as_owner = {}
    if os.geteuid() == 0:
        os.chown(root, account.pw_uid, account.pw_gid)
        as_owner = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root), "LC_ALL": "C"}

    def run(*cmd: str) -> None:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
                              **as_owner)
        if done.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            message = done.stderr.strip()[-800:]
            raise PostgresUnavailable(f"{Path(cmd[0]).name} failed ({done.returncode}): {message}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-locale")
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
             "-c", f"listen_addresses={HOST}", "-c", "fsync=off", "-c", "full_page_writes=off"],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, **as_owner,
        )
    server = Postgres(bin_dir, root, port, proc.pid, user, database, log, proc)
    deadline = time.monotonic() + timeout
    while True:
        ready = subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", HOST, "-p", str(port)], env=env)
        if ready.returncode == 0:
            break
        if not server.alive() or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-1500:]
            server.stop()
            raise PostgresUnavailable(f"postgres did not come up on {HOST}:{port}; log:\n{tail}")
        time.sleep(0.2)
    try:
        run(str(bin_dir / "createdb"), "-h", HOST, "-p", str(port), "-U", user, database)
    except PostgresUnavailable:
        server.stop()
        raise
    return server
