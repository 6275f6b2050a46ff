"""The local stack lets no one in: every server of `infra.stack` (up with --s3 and --ray-client, plus add-node)
listens on 127.0.0.1 only, Ray's refuse a request without the Ray token, and its secret files are private.

A job holds actors on both Ray nodes while the test lists the listening TCP sockets of every process of the
stack: the process trees of the services it started (psutil), and any other process whose environment names
this stack's token file (a Ray process that left its tree). Requests go to 127.0.0.1 only, never to another
address of this machine.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import psutil
import pytest

from infra.stack import Stack

pytestmark = pytest.mark.integration

JOB = """\
import time
import ray

ray.init()


@ray.remote(num_cpus=0.25)
class Holder:
    def node(self):
        return ray.get_runtime_context().get_node_id()


holders = [Holder.options(scheduling_strategy="SPREAD").remote() for _ in range(2)]
print("NODES", len(set(ray.get([h.node.remote() for h in holders]))))
print("GCS", ray.get_runtime_context().gcs_address)
print("READY", flush=True)
time.sleep(900)
"""
# One read-only call of every gRPC service a Ray process of the stack serves: a server refuses it without the
# token (UNAUTHENTICATED) or does not serve it (UNIMPLEMENTED).
GRPC_CALLS = (
    "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",  # GCS
    "/ray.rpc.NodeManagerService/GetNodeStats",  # raylet: node manager
    "/ray.rpc.ObjectManagerService/Pull",  # raylet: object manager
    "/ray.rpc.CoreWorkerService/NumPendingTasks",  # every core worker: drivers, actors, idle workers, agents
    "/ray.rpc.ReporterService/ReportOCMetrics",  # dashboard agent (metrics agent)
    "/ray.rpc.RayletDriver/ClusterInfo",  # Ray Client server
)
HTTP_PATH = "/api/version"  # on every Ray HTTP server: the dashboard, its agents, the runtime env agents


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    stack = Stack.load(tmp_path_factory.mktemp("secured"))
    work = tmp_path_factory.mktemp("holder")
    (work / "holder.py").write_text(JOB)
    job_id = None
    try:
        stack.start_mlflow()
        stack.start_s3()
        stack.start_ray(num_cpus=2, ray_client=True)
        stack.add_node(num_cpus=1)
        job_id = f"holder-{uuid.uuid4().hex[:8]}"
        _ray_job(stack, "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(work), "--", "python",
                 "holder.py")
        deadline = time.monotonic() + 300
        while "READY" not in (log := _ray_job(stack, "logs", job_id)):
            assert time.monotonic() < deadline, log[-3000:]
            time.sleep(2)
        yield {"stack": stack, "job_log": log}
    finally:
        if job_id:
            _ray_job(stack, "stop", job_id, check=False)
        stack.stop_all()


def _ray_job(stack: Stack, *args: str, check: bool = True) -> str:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **stack.env()}
    done = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", *args[:1], "--address",
                           env["RAY_ADDRESS"], *args[1:]], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 or not check, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr


def stack_processes(stack: Stack) -> dict[int, psutil.Process]:
    """Every process of the stack: the services' process trees, and any process carrying its Ray token path."""
    found: dict[int, psutil.Process] = {}
    for svc in stack.services.values():
        root = psutil.Process(svc.pid)
        found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
    token_path = stack.services["ray"].info["token_path"]
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_AUTH_TOKEN_PATH") == token_path:
                found.setdefault(proc.pid, proc)
        except psutil.Error:
            continue
    return found


def listening_sockets(stack: Stack) -> list[dict]:
    rows = []
    for pid, proc in stack_processes(stack).items():
        try:
            name, cmdline = proc.name(), " ".join(proc.cmdline())
            listening = [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:  # it ended meanwhile
            continue
        rows += [{"ip": c.laddr.ip, "port": c.laddr.port, "pid": pid, "owner": _owner(name, cmdline)}
                 for c in listening]
    return sorted(rows, key=lambda r: (r["owner"], r["port"]))


def _owner(name: str, cmdline: str) -> str:
    for marker, owner in (("gcs_server", "Ray GCS"), ("raylet", "raylet"), ("dashboard/dashboard.py", "Ray dashboard"),
                          ("ray.util.client.server", "Ray Client server"), ("uvicorn", "MLflow (uvicorn)"),
                          ("moto_server", "S3 (moto)"), ("holder.py", "job driver")):
        if marker in cmdline:
            return owner
    return cmdline.split()[0] if cmdline.startswith("ray::") else name  # ray::DashboardAgent, ray::Holder, ...


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


GONE = "gone"  # the process ended between the listing and the request (an idle worker Ray let go)


def refusal(port: int, token: str | None = None) -> str | None:
    """How the server on 127.0.0.1:`port` refuses a request without (or, given, with) the Ray token: 'HTTP 401',
    'gRPC UNAUTHENTICATED <call>', GONE, or None when it answered."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{HTTP_PATH}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5):
            return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}" if exc.code in (401, 403) else None
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        pass  # not HTTP/1 (a gRPC server), or nothing there any more
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for call in GRPC_CALLS:
            method = channel.unary_unary(call, request_serializer=bytes, response_deserializer=bytes)
            try:
                method(b"", timeout=5, metadata=metadata)
                return None
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return f"gRPC UNAUTHENTICATED {call.rsplit('/', 1)[1]}"
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    return GONE
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return None  # it took the call (and found the empty request lacking)
    return None


def _print(title: str, rows: list[dict], extra: str | None = None) -> None:
    print(f"\n{title}")
    for r in rows:
        print(f"  {r['ip']:>18}:{r['port']:<6} {r['owner']:<28} pid {r['pid']:<7} {r.get(extra, '') if extra else ''}")


def test_every_listening_socket_of_the_stack_is_on_loopback(secured):
    rows = listening_sockets(secured["stack"])
    owners = {r["owner"] for r in rows}
    # The listing is complete: every kind of server of the stack is in it, with the job's workers on both nodes.
    assert {"Ray GCS", "raylet", "Ray dashboard", "Ray Client server", "MLflow (uvicorn)", "S3 (moto)",
            "job driver", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::JobSupervisor",
            "ray::Holder"} <= owners, owners
    assert len({r["pid"] for r in rows if r["owner"] == "raylet"}) == 2  # the head's and the added node's
    _print(f"{len(rows)} listening sockets of {len({r['pid'] for r in rows})} processes:", rows)
    assert [r for r in rows if not is_loopback(r["ip"])] == []


def test_a_driver_inside_a_job_connects_through_loopback(secured):
    log = secured["job_log"]
    assert "NODES 2" in log
    gcs = next(line.split()[1] for line in log.splitlines() if line.startswith("GCS "))
    assert gcs == f"127.0.0.1:{secured['stack'].services['ray'].info['gcs_port']}"


def test_ray_servers_refuse_requests_without_the_token(secured):
    """Loopback is reachable by every user of this machine: the token is what keeps them out of Ray. Each Ray
    server refuses a request without it (and takes the same request with it), except the dashboard agents'
    Prometheus metrics endpoints, which Ray serves to anyone who can reach them (here: this machine)."""
    stack = secured["stack"]
    token = Path(stack.services["ray"].info["token_path"]).read_text().strip()
    ray_rows = [r for r in listening_sockets(stack) if r["owner"] not in ("MLflow (uvicorn)", "S3 (moto)")]
    for row in ray_rows:
        row["refusal"] = refusal(row["port"])
    _print("Ray servers, a request without the token:", ray_rows, "refusal")
    ray_rows = [r for r in ray_rows if r["refusal"] != GONE]
    assert {"Ray GCS", "raylet", "Ray dashboard", "Ray Client server", "ray::Holder"} <= {r["owner"] for r in ray_rows}
    answered = [r for r in ray_rows if r["refusal"] is None]
    assert {r["owner"] for r in answered} == {"ray::DashboardAgent"}
    assert len(answered) == len(stack.nodes()) + 1  # one metrics endpoint per node
    for row in answered:
        assert _body(row["port"]).startswith(b"# HELP"), row  # Prometheus text: metrics, no control
    for row in ray_rows:
        if row["refusal"] is not None:
            assert refusal(row["port"], token) in (None, GONE), row  # the token, not the request, was refused


def _body(port: int) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read(64)


def test_secret_files_are_private(secured):
    """The state dir is 0700, every dir in it 0700 and every file 0600: the Ray token, stack.json, the services'
    logs, MLflow's SQLite store and its artifacts. Ray makes its own temp dirs 0777 (on purpose, for shared
    machines); the files the stack's Ray processes write there (logs, sockets, port files) are still theirs
    alone. A job's unpacked working dir (runtime_resources/) keeps the modes its files had where it was packed."""
    stack = secured["stack"]
    state = stack.state_dir
    assert {p.name for p in state.iterdir()} >= {"ray_auth_token", "stack.json", "mlflow", "ray.log"}
    assert (state / "mlflow" / "mlflow.db").is_file()
    for path in [state, *state.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path}: {oct(mode)}"
    open_to_others = [p for svc in (stack.services["ray"], *stack.nodes())
                      for p in Path(svc.info["temp_dir"]).rglob("*")
                      if not p.is_symlink() and not p.is_dir() and p.stat().st_mode & 0o077
                      and "runtime_resources" not in p.parts]
    assert open_to_others == []
