"""MLflow with authentication, as production runs it: infra/mlflow/run_server.sh (MLflow's basic-auth app,
NO_PERMISSIONS by default) on 127.0.0.1, SQLite store and local artifacts here (tests/test_mlflow_postgres.py
runs the same script on PostgreSQL + S3).

- every API call without credentials, or with a wrong password, gets 401;
- the tiny flow, submitted with `ray job submit` to a Ray head whose environment holds the trainer's
  MLFLOW_TRACKING_USERNAME/PASSWORD (as S3 keys reach jobs: never in a runtime env), tracks into it;
- a second user, without permission on the flow's experiment, cannot read its runs, params or artifacts;
- the trainer's and the admin's passwords appear in no param, tag, metric or artifact (the store and artifact
  files themselves are searched), in no log line (the server's, every file of Ray's session dirs, the
  submission's output) and in no Ray runtime env (the Jobs API's record of the job);
- a tracking URI with credentials in it is refused in one line, without them in the message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.model_registry import load_net
from flows.tracking import TAG_COMPLETE, TAG_FINAL_MODEL, TAG_FLOW, TAG_ROLE
from infra.stack import Stack
from tests.conftest import submit_flow
from tests.mlflow_server import ADMIN, as_user, create_user, http_status, start_run_server

ROOT = Path(__file__).resolve().parents[1]
# Every kind of call the flow and the CLIs make (tracking, artifacts, registry) and the auth app's own.
API_CALLS = [
    ("GET", "/api/2.0/mlflow/experiments/search?max_results=10", None),
    ("GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=eqface", None),
    ("POST", "/api/2.0/mlflow/experiments/create", b'{"name": "intruder"}'),
    ("POST", "/api/2.0/mlflow/runs/search", b'{"experiment_ids": ["0"]}'),
    ("GET", "/api/2.0/mlflow/runs/get?run_id=0123456789abcdef0123456789abcdef", None),
    ("POST", "/api/2.0/mlflow/runs/log-parameter", b'{"run_id": "x", "key": "k", "value": "v"}'),
    ("GET", "/api/2.0/mlflow/registered-models/search", None),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts?path=0", None),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts/0/x/artifacts/model/MLmodel", None),
    ("POST", "/api/2.0/mlflow/users/create", b'{"username": "intruder", "password": "intruder-pass-123"}'),
    ("GET", "/ajax-api/2.0/mlflow/experiments/search?max_results=10", None),
    ("GET", "/", None),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_auth")
    started = time.monotonic()
    server = start_run_server(root, {"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}",
                                     "MLFLOW_ARTIFACTS_DESTINATION": str(root / "artifacts")})
    try:
        users = {name: create_user(server, name) for name in ("trainer", "reader")}
        yield {"server": server, "root": root, "users": users, "start_s": time.monotonic() - started}
    finally:
        server.stop()


@pytest.mark.integration
def test_calls_without_credentials_or_with_a_wrong_password_get_401(server):
    url, users = server["server"].url, server["users"]
    for method, path, body in API_CALLS:
        assert http_status(url + path, method=method, body=body) == 401, (method, path)
        assert http_status(url + path, method=method, body=body, auth=("trainer", "not-the-password")) == 401
        assert http_status(url + path, method=method, body=body, auth=("nobody", users["trainer"])) == 401
    assert http_status(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", auth=("trainer", users["trainer"])) \
        == 200
    assert http_status(f"{url}/health") == 200  # the one public path (load balancers' health checks)
    print(f"\n[auth] server healthy after {server['start_s']:.1f} s; {len(API_CALLS)} API calls x 3 "
          f"(no credentials, wrong password, unknown user): all 401")


@pytest.fixture(scope="module")
def flow(server, tmp_path_factory):
    """The tiny flow (steps 1 and 2) as the trainer; Ray's session logs and the job record are collected
    before the head stops."""
    work = tmp_path_factory.mktemp("auth_flow")
    url, users = server["server"].url, server["users"]
    name = f"auth-{uuid.uuid4().hex[:6]}"
    ray_stack = Stack.load(work / "ray")
    with pytest.MonkeyPatch.context() as env:
        # The Ray node's own environment: its jobs and workers inherit the trainer's credentials from it.
        env.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        env.setenv("MLFLOW_TRACKING_PASSWORD", users["trainer"])
        try:
            ray_stack.start_ray(num_cpus=2)
            env.delenv("MLFLOW_TRACKING_USERNAME")
            env.delenv("MLFLOW_TRACKING_PASSWORD")
            env.setenv("MLFLOW_TRACKING_URI", url)  # the job's runtime env gets the URI only
            started = time.monotonic()
            proc = submit_flow(ray_stack, [
                "--config", "configs/default.yaml", "--config", "configs/tiny.yaml", f"flow.name={name}",
                f"flow.storage={work / 'runs'}", f"data.cache_root={work / 'data'}", "flow.loops=0",
                "step1.epochs=2", "scaling.num_workers=1"], timeout=900)
            wall = time.monotonic() - started
            jobs = _jobs(ray_stack)
            ray_files = _files_under(Path(ray_stack.services["ray"].info["temp_dir"]))
        finally:
            ray_stack.stop_all()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"name": name, "proc": proc, "wall_s": wall, "jobs": jobs, "ray_files": ray_files,
            "work_files": _files_under(work)}  # checkpoints, Ray Train's run state, the stack's logs


def _jobs(stack: Stack) -> list[dict]:
    """The Jobs API's records (entrypoint, runtime_env, metadata) of every job on the head, with the token."""
    info = stack.services["ray"].info
    request = urllib.request.Request(f"http://127.0.0.1:{info['dashboard_port']}/api/jobs/")
    request.add_header("Authorization", f"Bearer {Path(info['token_path']).read_text().strip()}")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def _files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def _runs(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name("eqface")
    return experiment, client.search_runs([experiment.experiment_id], f"tags.`{TAG_FLOW}` = '{name}'")


@pytest.mark.integration
def test_the_flow_tracks_with_the_trainers_credentials(server, flow):
    import torch

    url, users = server["server"].url, server["users"]
    with as_user("trainer", users["trainer"]):
        client = MlflowClient(url)
        _, runs = _runs(client, flow["name"])
        parent = next(r for r in runs if r.data.tags[TAG_ROLE] == "flow")
        steps = [r for r in runs if r.data.tags[TAG_ROLE] == "step"]
        assert len(steps) == 2 and all(r.data.tags[TAG_COMPLETE] == "true" for r in steps)
        assert all(r.info.status == "FINISHED" for r in runs)
        mlflow.set_tracking_uri(url)
        model = load_net(parent.data.tags[TAG_FINAL_MODEL])
    embedding, quality = model(torch.zeros(2, 3, 32, 32))
    assert embedding.shape == (2, 32) and quality.shape == (2,)
    print(f"\n[auth] tiny flow (2 steps) tracked as 'trainer' in {flow['wall_s']:.0f} s: {len(runs)} runs")


@pytest.mark.integration
def test_a_user_without_permission_cannot_read_the_flow(server, flow):
    url, users = server["server"].url, server["users"]
    with as_user("trainer", users["trainer"]):
        experiment, runs = _runs(MlflowClient(url), flow["name"])
    run_id = runs[0].info.run_id
    with as_user("reader", users["reader"]):
        client = MlflowClient(url)
        assert experiment.name not in [e.name for e in client.search_experiments()]
        assert client.search_runs([experiment.experiment_id]) == []
        for read in (lambda: client.get_experiment(experiment.experiment_id), lambda: client.get_run(run_id),
                     lambda: client.list_artifacts(run_id), lambda: client.get_metric_history(run_id, "loss"),
                     lambda: client.log_param(run_id, "intruder", "1")):
            with pytest.raises(MlflowException, match="403"):
                read()
    artifacts = f"{url}/api/2.0/mlflow-artifacts/artifacts/{experiment.experiment_id}/{run_id}/artifacts"
    assert http_status(f"{artifacts}/plots/quality_histogram.png", auth=("reader", users["reader"])) == 403


@pytest.mark.integration
def test_no_password_in_params_tags_artifacts_logs_or_runtime_envs(server, flow):
    secrets = {"trainer": server["users"]["trainer"], "reader": server["users"]["reader"],
               ADMIN: server["server"].admin_password}
    root = server["root"]
    places = {
        # params, tags and metrics are rows of this file; the artifacts are files under the destination
        **{p: p.read_bytes() for p in root.rglob("*") if p.is_file() and "secrets" not in p.parts},
        **flow["ray_files"], **flow["work_files"],
        Path("<ray job submit output>"): (flow["proc"].stdout + flow["proc"].stderr).encode(),
        Path("<Jobs API: runtime env, entrypoint, metadata>"): json.dumps(flow["jobs"]).encode(),
    }
    assert any(p.name == "mlflow.db" for p in places) and any(p.name == "MLmodel" for p in places)
    assert any(p.name.startswith("runtime_env") for p in places)  # Ray's runtime env agent log
    leaks = [f"{who} in {path}" for path, data in places.items() for who, secret in secrets.items()
             if secret.encode() in data]
    assert leaks == []
    runtime_envs = [job.get("runtime_env") or {} for job in flow["jobs"]]
    assert [sorted(env.get("env_vars", {})) for env in runtime_envs] == [["MLFLOW_TRACKING_URI", "RAY_ADDRESS"]]
    with_config = [p for p in root.glob("mlflow-auth.*.ini")]
    assert len(with_config) == 1 and with_config[0].stat().st_mode & 0o077 == 0
    print(f"\n[auth] searched {len(places)} files and records, {sum(map(len, places.values())) / 2**20:.1f} MiB, "
          f"for 3 passwords: none found")


@pytest.mark.integration
def test_without_credentials_the_flow_stops_in_one_line(server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env.update(MLFLOW_TRACKING_URI=server["server"].url, RAY_ADDRESS="local")
    done = subprocess.run([sys.executable, "flows/eqface.py", "--config", "configs/default.yaml", "--config",
                           "configs/tiny.yaml", f"data.cache_root={tmp_path}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("eqface: error:") and "401" in last, done.stderr[-2000:]


@pytest.mark.integration
def test_a_tracking_uri_with_credentials_is_refused_without_echoing_them(tmp_path):
    password = "pw-" + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    for where in ("config", "environment"):
        uri = f"http://trainer:{password}@127.0.0.1:9"
        args = [f"tracking.uri={uri}"] if where == "config" else []
        run_env = {**env, "MLFLOW_TRACKING_URI": uri} if where == "environment" else env
        done = subprocess.run([sys.executable, "flows/eqface.py", "--config", "configs/default.yaml", "--config",
                               "configs/tiny.yaml", f"data.cache_root={tmp_path}", *args], cwd=ROOT, env=run_env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, (where, done.stderr[-2000:])
        assert done.stderr.strip().splitlines() == [
            "eqface: error: tracking URI http://***@127.0.0.1:9 carries credentials: put them in "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead, where the "
            "MLflow client reads them"], where
        assert password not in done.stdout + done.stderr
