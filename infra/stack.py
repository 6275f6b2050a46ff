"""The local service stack: Ray head, MLflow tracking server, S3-compatible server, all on 127.0.0.1 only.

One place starts and stops them, by process id, for the README's quick start and for the tests:

    python -m infra.stack up [--s3] [--state-dir .stack]     # start what is not running yet
    python -m infra.stack env                                # `export ...` lines for a shell
    python -m infra.stack add-node [--num-cpus 1]            # one more Ray node joined to the head
    python -m infra.stack remove-node [--node ray-node-1]    # stop it (the newest one by default)
    python -m infra.stack down                               # stop them, by pid

Each service runs in its own process group; its pid, port and log live in <state-dir>/stack.json.
Ray keeps token authentication on: a random token is written to <state-dir>/ray_auth_token and clients find
it through RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH. The state dir is private (0700; the token, stack.json,
logs and MLflow's SQLite store 0600): the services run with umask 077.
Every Ray server listens on 127.0.0.1 only (infra/ray_loopback.py says how); the Ray Client server runs only
with `up --ray-client`. The ports of one start are picked together (infra/ports.py), so they never collide.
An added node (`add-node`) is a second `ray start --address <head>` process with the same token, its own
CPUs, object store, temp dir and a marker resource `eqface_node_<n>`: a multi-node rehearsal on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import boto3

from infra.ports import HOST, free_port, pick_ports
from infra.ray_loopback import LOOPBACK_ENV, ray_start_command

# Fake, well-known credentials for the local S3-compatible server only (moto accepts any).
LOCAL_S3_KEY_ID = "eqface-local-key"
LOCAL_S3_SECRET = "eqface-local-secret"
# What the services create (logs, MLflow's SQLite store and artifacts, Ray's session dirs) is theirs alone.
PRIVATE_UMASK = 0o077


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _bin(name: str) -> str:
    """Executables of the interpreter's own environment (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by us) is not alive.
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


@dataclass
class Service:
    name: str
    pid: int
    port: int
    log: str
    info: dict = field(default_factory=dict)


@dataclass
class Stack:
    state_dir: Path
    services: dict[str, Service] = field(default_factory=dict)

    # -- persistence ---------------------------------------------------------------------------
    @classmethod
    def load(cls, state_dir: str | Path) -> Stack:
        state_dir = Path(state_dir).resolve()
        stack = cls(state_dir)
        state = state_dir / "stack.json"
        if state.exists():
            for name, data in json.loads(state.read_text()).items():
                svc = Service(**data)
                if _alive(svc.pid):
                    stack.services[name] = svc
        return stack

    def save(self) -> None:
        self._private_dir()
        tmp = self.state_dir / "stack.json.tmp"
        _write_private(tmp, json.dumps({k: asdict(v) for k, v in self.services.items()}, indent=2))
        os.replace(tmp, self.state_dir / "stack.json")

    def _private_dir(self, *parts: str) -> Path:
        """The state dir (or a dir inside it), created or narrowed to mode 0700."""
        directory = self.state_dir.joinpath(*parts)
        for path in (self.state_dir, directory):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.chmod(0o700)
        return directory

    # -- environment for clients -----------------------------------------------------------------
    def _s3_env(self) -> dict[str, str]:
        return {k: v for k, v in self.env().items() if k.startswith(("AWS_", "MLFLOW_S3_"))}

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if "ray" in self.services:
            ray = self.services["ray"]
            env.update(
                RAY_ADDRESS=f"http://{HOST}:{ray.info['dashboard_port']}",
                RAY_AUTH_MODE="token",
                RAY_AUTH_TOKEN_PATH=ray.info["token_path"],
                **LOOPBACK_ENV,  # a driver started from this shell connects through 127.0.0.1 too
            )
        if "mlflow" in self.services:
            env["MLFLOW_TRACKING_URI"] = f"http://{HOST}:{self.services['mlflow'].port}"
        if "s3" in self.services:
            env.update(
                AWS_ENDPOINT_URL=f"http://{HOST}:{self.services['s3'].port}",
                MLFLOW_S3_ENDPOINT_URL=f"http://{HOST}:{self.services['s3'].port}",
                AWS_ACCESS_KEY_ID=LOCAL_S3_KEY_ID,
                AWS_SECRET_ACCESS_KEY=LOCAL_S3_SECRET,
                AWS_DEFAULT_REGION="us-east-1",
            )
        return env

    # -- starting ------------------------------------------------------------------------------
    def _ray_env(self, token_path: Path) -> dict[str, str]:
        """The environment of a Ray node's processes (head or added node), hence of the jobs and workers on it."""
        return {
            # With the S3 server up, Ray's processes (job drivers, workers) inherit its endpoint and keys from
            # the node's environment: no credential travels in a runtime env, where Ray would log it.
            **self._s3_env(),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            # The node's address stays 127.0.0.1 (not the machine's external one), hence every Ray server's.
            **LOOPBACK_ENV,
            # On SIGTERM `ray start --block` first drains the node (for Serve replicas); a head that has run a
            # job never finishes draining and `down` sat out Ray's 30 s default. Nothing here needs a drain.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            # The node's environment is the jobs' environment: the project venv first on PATH.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def _spawn(self, name: str, cmd: list[str], port: int, env: dict[str, str], info: dict) -> Service:
        self._private_dir()
        log = self.state_dir / f"{name}.log"
        with os.fdopen(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **env}, start_new_session=True, umask=PRIVATE_UMASK,
            )
        svc = Service(name, proc.pid, port, str(log), info)
        self.services[name] = svc
        self.save()
        return svc

    def _wait(self, svc: Service, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(svc.pid):
                tail = Path(svc.log).read_text(errors="replace")[-2000:]
                self.services.pop(svc.name, None)
                self.save()
                raise RuntimeError(f"{svc.name} exited during start-up; last log lines:\n{tail}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{svc.name} not ready after {timeout:.0f}s (log: {svc.log})")

    def start_ray(self, num_cpus: int | None = None, object_store_mb: int = 512, ray_client: bool = False) -> Service:
        """The Ray head; `ray_client`: also the Ray Client server (ray://127.0.0.1:<info['client_port']>)."""
        if "ray" in self.services:
            return self.services["ray"]
        token_path = self.state_dir / "ray_auth_token"
        if not token_path.exists():
            self._private_dir()
            _write_private(token_path, secrets.token_hex(32))
        gcs, dashboard, agent, client = pick_ports(4)
        cmd = ray_start_command(
            "--head", "--block", "--disable-usage-stats", f"--port={gcs}", f"--node-ip-address={HOST}",
            "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}", f"--object-store-memory={object_store_mb * 2**20}",
            # Its own temp dir: sessions and the "current cluster" file of two stacks never mix, and a
            # short path keeps Ray's unix socket names under the OS limit.
            f"--temp-dir=/tmp/eqface-ray-{gcs}",
        )
        if num_cpus:
            cmd.append(f"--num-cpus={num_cpus}")
        if ray_client:
            cmd.append(f"--ray-client-server-port={client}")
        env = self._ray_env(token_path)
        info = {"gcs_port": gcs, "dashboard_port": dashboard, "token_path": str(token_path),
                "temp_dir": f"/tmp/eqface-ray-{gcs}", **({"client_port": client} if ray_client else {})}
        svc = self._spawn("ray", cmd, dashboard, env, info)
        self._wait(svc, lambda: _http_ok(f"http://{HOST}:{dashboard}/api/version", token_path), 120)
        return svc

    def nodes(self) -> list[Service]:
        """The Ray nodes added to the head (`add_node`), oldest first."""
        return sorted((s for s in self.services.values() if s.name.startswith("ray-node-")),
                      key=lambda s: s.info["index"])

    def add_node(self, num_cpus: int = 1, resources: dict[str, float] | None = None,
                 object_store_mb: int = 256) -> Service:
        """One more Ray node, joined to this stack's head as `ray start --address` joins another machine's: its
        own raylet, object store, CPUs and temp dir, the head's token, joined through 127.0.0.1, its servers on
        127.0.0.1 like the head's. A marker resource `eqface_node_<n>: 1` tells it apart in `ray list nodes`."""
        head = self.services.get("ray")
        if head is None:
            raise RuntimeError("add-node needs the Ray head of this stack: run `python -m infra.stack up` first")
        index = 1 + max((s.info["index"] for s in self.nodes()), default=0)
        marker = f"eqface_node_{index}"
        resources = {marker: 1, **(resources or {})}
        temp_dir = f"{head.info['temp_dir']}-n{index}"
        cmd = ray_start_command(
            f"--address={HOST}:{head.info['gcs_port']}", "--block", "--disable-usage-stats",
            f"--node-ip-address={HOST}", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}",
            f"--object-store-memory={object_store_mb * 2**20}",
            # Ray's default agent port (52365) would collide with the head's and other clusters' on this host.
            f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}",
        )
        info = {"index": index, "marker": marker, "num_cpus": num_cpus, "resources": resources,
                "head_gcs_port": head.info["gcs_port"], "temp_dir": temp_dir}
        svc = self._spawn(f"ray-node-{index}", cmd, 0, self._ray_env(Path(head.info["token_path"])), info)
        self._wait(svc, lambda: any(n["state"] == "ALIVE" and marker in n.get("resources_total", {})
                                    for n in self.ray_nodes()), 120)
        return svc

    def ray_nodes(self) -> list[dict]:
        """The head's view of its nodes (Ray's state API over HTTP, with the token): node_id, state,
        is_head_node, resources_total, ..."""
        head = self.services["ray"]
        url = f"http://{HOST}:{head.info['dashboard_port']}/api/v0/nodes?limit=1000&detail=1"
        request = urllib.request.Request(url)
        request.add_header("Authorization", f"Bearer {Path(head.info['token_path']).read_text().strip()}")
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return json.loads(resp.read())["data"]["result"]["result"]
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            return []

    def start_mlflow(self, artifacts_destination: str | None = None, backend_store_uri: str | None = None) -> Service:
        """MLflow server with proxied artifacts: on local disk by default, or e.g. s3://eqface/mlflow (start the
        S3 server first); SQLite backend store by default, or a postgresql:// URI."""
        if "mlflow" in self.services:
            return self.services["mlflow"]
        root = self._private_dir("mlflow")
        self._private_dir("mlflow", "artifacts")
        port = free_port()
        cmd = [
            _bin("mlflow"), "server",
            "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", artifacts_destination or str(root / "artifacts"),
            "--host", HOST, "--port", str(port), "--workers", "1",
        ]
        # Without this the server forks a job-execution pool: 9 processes and ~2.4 GB instead of 2 and ~0.5 GB.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self._s3_env()}
        svc = self._spawn("mlflow", cmd, port, env, {"root": str(root)})
        self._wait(svc, lambda: _http_ok(f"http://{HOST}:{port}/health"), 120)
        return svc

    def start_s3(self, buckets: tuple[str, ...] = ("eqface",)) -> Service:
        if "s3" not in self.services:
            port = free_port()
            svc = self._spawn("s3", [_bin("moto_server"), "-H", HOST, "-p", str(port)], port, {}, {})
            self._wait(svc, lambda: _port_open(port), 60)
        svc = self.services["s3"]
        self._create_buckets(svc.port, buckets)
        return svc

    def _create_buckets(self, port: int, buckets: tuple[str, ...]) -> None:

        s3 = boto3.client(
            "s3", endpoint_url=f"http://{HOST}:{port}", region_name="us-east-1",
            aws_access_key_id=LOCAL_S3_KEY_ID, aws_secret_access_key=LOCAL_S3_SECRET,
        )
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for bucket in buckets:
            if bucket not in existing:
                s3.create_bucket(Bucket=bucket)

    # -- stopping ------------------------------------------------------------------------------
    def stop(self, name: str, timeout: float = 30) -> None:
        if name == "ray":  # added nodes first: a node whose head is gone waits for it for a minute
            for node in self.nodes():
                self.stop(node.name, timeout)
        svc = self.services.pop(name, None)
        if svc is None:
            return
        _terminate_group(svc.pid, timeout)
        if svc.info.get("temp_dir"):
            shutil.rmtree(svc.info["temp_dir"], ignore_errors=True)
        self.save()

    def stop_all(self) -> None:
        for name in list(self.services):
            self.stop(name)


def _terminate_group(pid: int, timeout: float) -> None:
    """SIGTERM the service's leader (`ray start --block` tears its children down in order on it; signalling
    the whole group at once leaves Ray's raylet waiting on a dead GCS), then SIGKILL whatever is left of
    its process group."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_alive(pgid):
        _alive(pid)  # reaps the leader when it is our own child
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read, from its first byte on."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    path.chmod(0o600)  # a file that existed keeps its old mode through O_CREAT


def _http_ok(url: str, token_path: Path | None = None) -> bool:
    request = urllib.request.Request(url)
    if token_path is not None:
        request.add_header("Authorization", f"Bearer {Path(token_path).read_text().strip()}")
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "env", "status", "add-node", "remove-node"])
    parser.add_argument("--state-dir", default=os.environ.get("EQFACE_STACK_DIR", ".stack"))
    parser.add_argument("--s3", action="store_true", help="also start the S3-compatible server (moto_server)")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--ray-client", action="store_true",
                        help="up: also start the Ray Client server (ray://127.0.0.1:PORT); off by default")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the head (up) or node (add-node)")
    parser.add_argument("--resources", type=json.loads, default=None,
                        help='add-node: extra custom resources as JSON, e.g. \'{"big_mem": 1}\'')
    parser.add_argument("--node", default=None, help="remove-node: which one (default: the newest)")
    args = parser.parse_args(argv)
    stack = Stack.load(args.state_dir)
    if args.command == "up":
        if not args.no_mlflow:
            stack.start_mlflow()
        if args.s3:
            stack.start_s3()
        if not args.no_ray:
            stack.start_ray(num_cpus=args.num_cpus, ray_client=args.ray_client)
        for name, svc in stack.services.items():
            print(f"{name:10s} pid {svc.pid:<8d} port {svc.port:<6d} log {svc.log}", file=sys.stderr)
        ray = stack.services.get("ray")
        if ray is not None and "client_port" in ray.info:
            print(f"Ray Client: ray://{HOST}:{ray.info['client_port']}", file=sys.stderr)
    elif args.command == "add-node":
        svc = stack.add_node(num_cpus=args.num_cpus or 1, resources=args.resources)
        print(f"{svc.name} pid {svc.pid} resources {json.dumps(svc.info['resources'])} log {svc.log}",
              file=sys.stderr)
    elif args.command == "remove-node":
        nodes = stack.nodes()
        name = args.node or (nodes[-1].name if nodes else None)
        if name not in {n.name for n in nodes}:
            parser.error(f"no added Ray node{' ' + name if name else ''} running in {stack.state_dir} (running: "
                         f"{', '.join(n.name for n in nodes) or 'none'})")
        stack.stop(name)
    elif args.command == "down":
        stack.stop_all()
    elif args.command == "env":
        for key, value in stack.env().items():
            print(f"export {key}={value}")
    else:
        for name, svc in stack.services.items():
            print(f"{name:10s} pid {svc.pid:<8d} port {svc.port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
