"""MLflow as in production: infra/mlflow/run_server.sh with a PostgreSQL backend store (the auth app's users and
permissions in the same database) and artifacts proxied to S3 (the local S3-compatible server), used through
MlflowClient by a client that holds no S3 credentials, only its MLflow user's, and by the flow itself submitted
to a Ray head that holds none either.

PostgreSQL comes from Debian's packages (infra/postgres.py); the module skips, with the reason, where it
cannot be started here.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from infra.postgres import PostgresUnavailable, start_postgres
from infra.stack import HOST, LOCAL_S3_KEY_ID, LOCAL_S3_SECRET, Stack
from tests.mlflow_server import RUN_SERVER, as_user, create_user, http_status, start_run_server

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "eqface"
ALLOWED_HOST = "mlflow.internal"
USER = "trainer"


def _s3_client(services: dict):
    """The test's own view of the server's bucket (the MLflow clients under test hold no S3 keys)."""
    import boto3

    return boto3.client("s3", endpoint_url=f"http://{HOST}:{services['stack'].services['s3'].port}",
                        region_name="us-east-1", aws_access_key_id=LOCAL_S3_KEY_ID,
                        aws_secret_access_key=LOCAL_S3_SECRET)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver of SQLAlchemy 2.1) is not installed")
    try:
        pg = start_postgres()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL cannot be started here: {exc}")
    state = tmp_path_factory.mktemp("mlflow_pg")
    stack = Stack.load(state)
    server = None
    try:
        stack.start_s3(buckets=(BUCKET,))
        server = start_run_server(state, {
            **stack.env(),  # S3 endpoint + the local server's fake keys: for the server only
            "MLFLOW_BACKEND_STORE_URI": pg.uri.replace("postgresql://", "postgresql+psycopg://"),
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow-artifacts",
            "MLFLOW_ALLOWED_HOSTS": f"{ALLOWED_HOST},{HOST}:*,localhost:*",
        })
        password = create_user(server, USER)
        with as_user(USER, password):  # the clients of these tests, and the Ray head they start
            yield {"url": server.url, "pg": pg, "stack": stack, "log": server.log, "password": password}
    finally:
        if server is not None:
            server.stop()
        stack.stop_all()
        pg.stop()


@pytest.mark.integration
def test_run_round_trip_through_postgres_and_proxied_s3(services, tmp_path, monkeypatch):
    import psycopg
    from mlflow.tracking import MlflowClient

    # The client has no way to reach S3 itself: artifacts must go through the server's proxy.
    for key in [k for k in os.environ if k.startswith("AWS_") or k == "MLFLOW_S3_ENDPOINT_URL"]:
        monkeypatch.delenv(key)
    client = MlflowClient(tracking_uri=services["url"])
    experiment_id = client.create_experiment("eqface-pg-test")
    run = client.create_run(experiment_id, run_name="r100-smoke")
    run_id = run.info.run_id
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri

    client.log_param(run_id, "loss.m2", "0.5")
    client.log_param(run_id, "model.backbone", "r100")
    for step, loss in enumerate([2.5, 1.75, 1.25]):
        client.log_metric(run_id, "loss", loss, step=step)
    notes = tmp_path / "notes.txt"
    notes.write_text("quality-aware face recognition\n")
    client.log_artifact(run_id, str(notes), artifact_path="reports")
    client.set_terminated(run_id)

    stored = client.get_run(run_id)
    assert stored.data.params == {"loss.m2": "0.5", "model.backbone": "r100"}
    assert stored.data.metrics["loss"] == 1.25
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.5), (1, 1.75), (2, 1.25)]
    assert stored.info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(run_id, "reports")] == ["reports/notes.txt"]
    downloaded = client.download_artifacts(run_id, "reports/notes.txt", str(tmp_path / "down"))
    assert Path(downloaded).read_text() == "quality-aware face recognition\n"

    # The params really live in PostgreSQL ...
    with psycopg.connect(services["pg"].uri) as conn:
        query = "SELECT key, value FROM params WHERE run_uuid = %s ORDER BY key"
        rows = conn.execute(query, (run_id,)).fetchall()
    assert rows == [("loss.m2", "0.5"), ("model.backbone", "r100")]
    # ... and the artifact in the S3 bucket, under the server's --artifacts-destination.
    s3 = _s3_client(services)
    key = f"mlflow-artifacts/{experiment_id}/{run_id}/artifacts/reports/notes.txt"
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"quality-aware face recognition\n"

    # The auth app's tables live in the same database; the user's password is not in it (only its hash).
    with psycopg.connect(services["pg"].uri) as conn:
        users = [row[0] for row in conn.execute("SELECT username FROM users ORDER BY username")]
        hashes = [row[0] for row in conn.execute("SELECT password_hash FROM users")]
    assert users == ["admin", USER] and not any(services["password"] in h for h in hashes)

    # The server's S3 secret never reaches its log or the tracking store.
    assert LOCAL_S3_SECRET not in services["log"].read_text(errors="replace")
    with psycopg.connect(services["pg"].uri) as conn:
        query = "SELECT count(*) FROM params WHERE value LIKE %s"
        leaked = conn.execute(query, (f"%{LOCAL_S3_SECRET}%",)).fetchone()
    assert leaked == (0,)


@pytest.mark.integration
def test_the_flow_tracks_into_postgres_with_artifacts_proxied_to_s3(services, tmp_path, monkeypatch):
    """The tiny flow (steps 1 and 2) through `ray job submit` against this server: runs, params and metrics
    land in PostgreSQL, plots and the final model in the server's S3 bucket, and the model loads back
    through the server alone."""
    import mlflow.pyfunc
    import numpy as np
    import psycopg
    from mlflow.tracking import MlflowClient

    from flows.tracking import TAG_COMPLETE, TAG_FINAL_MODEL, TAG_FLOW, TAG_ROLE
    from tests.conftest import submit_flow

    for key in [k for k in os.environ if k.startswith("AWS_") or k == "MLFLOW_S3_ENDPOINT_URL"]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", services["url"])
    ray_stack = Stack.load(tmp_path / "ray")  # a Ray head of its own: no S3 server in its stack, so no keys
    name = f"pg-{os.getpid()}"
    try:
        ray_stack.start_ray(num_cpus=2)
        proc = submit_flow(ray_stack, [
            "--config", "configs/default.yaml", "--config", "configs/tiny.yaml", f"flow.name={name}",
            f"flow.storage={tmp_path / 'runs'}", f"data.cache_root={tmp_path / 'data'}", "flow.loops=0",
            "step1.epochs=2", "scaling.num_workers=1"], timeout=600)
    finally:
        ray_stack.stop_all()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    client = MlflowClient(services["url"])
    experiment = client.get_experiment_by_name("eqface")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{TAG_FLOW}` = '{name}'")
    parent = next(r for r in runs if r.data.tags[TAG_ROLE] == "flow")
    steps = sorted((r for r in runs if r.data.tags[TAG_ROLE] == "step"), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in steps] == ["0-step1-loop0", "1-step2-loop0"]
    assert all(r.info.status == "FINISHED" for r in runs) and all(r.data.tags[TAG_COMPLETE] == "true" for r in steps)
    assert [m.step for m in client.get_metric_history(steps[0].info.run_id, "loss")] == [1, 2]

    with psycopg.connect(services["pg"].uri) as conn:
        flow_param = conn.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'flow.name'",
                                  (parent.info.run_id,)).fetchone()
        step_metrics = {row[0] for row in conn.execute(
            "SELECT DISTINCT key FROM metrics WHERE run_uuid = %s", (steps[1].info.run_id,))}
    assert flow_param == (name,)
    assert {"loss", "top1", "lr", "images_per_s", "quality_mean", "quality_std", "quality_p05",
            "quality_p50", "quality_p95"} <= step_metrics

    s3 = _s3_client(services)
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"mlflow-artifacts/{experiment.experiment_id}/")
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    assert any(steps[1].info.run_id in k and k.endswith("plots/quality_histogram.png") for k in keys), keys
    assert any(k.endswith("/MLmodel") for k in keys), keys

    mlflow.set_tracking_uri(services["url"])
    out = mlflow.pyfunc.load_model(parent.data.tags[TAG_FINAL_MODEL]).predict(np.zeros((2, 3, 32, 32), np.float32))
    assert out["embedding"].shape == (2, 32) and out["quality"].shape == (2,)
    assert client.get_model_version_by_alias("eqface", "candidate").run_id == parent.info.run_id


@pytest.mark.integration
def test_allowed_hosts_guard_the_api(services):
    api = f"{services['url']}/api/2.0/mlflow/experiments/search?max_results=1"
    user = (USER, services["password"])
    assert http_status(api, host=ALLOWED_HOST, auth=user) == 200
    assert http_status(api, host=ALLOWED_HOST) == 401  # the name is allowed, the caller still has to log in
    assert http_status(api, host="attacker.example.com", auth=user) == 403
    # Setting --allowed-hosts replaces MLflow's default list, private IPs included.
    assert http_status(api, host="10.0.0.5:5000", auth=user) == 403


@pytest.mark.integration
def test_run_server_refuses_a_password_in_the_uri(tmp_path):
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow:hunter2@db:5432/mlflow",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path), "MLFLOW_BIN": "/bin/false"}
    done = subprocess.run(["bash", str(RUN_SERVER)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "MLFLOW_DB_PASSWORD_FILE" in done.stderr
    assert "hunter2" not in done.stderr


@pytest.mark.integration
def test_run_server_refuses_to_start_without_authentication(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path / 'db'}", MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path),
               MLFLOW_BIN="/bin/false")
    done = subprocess.run(["bash", str(RUN_SERVER)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == ("run_server.sh: set MLFLOW_FLASK_SERVER_SECRET_KEY or "
                                   "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE (e.g. openssl rand -hex 32)")
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.integration
def test_run_server_names_a_missing_setting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_ARTIFACTS_DESTINATION"] = str(tmp_path)
    done = subprocess.run(["bash", str(RUN_SERVER)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "MLFLOW_BACKEND_STORE_URI" in done.stderr


def test_compose_file_keeps_secrets_out_and_services_private():
    compose = yaml.safe_load((ROOT / "infra" / "mlflow" / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert "ports" not in services["postgres"]  # the database is on the compose network only
    assert "POSTGRES_PASSWORD" not in services["postgres"]["environment"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    mlflow_env = services["mlflow"]["environment"]
    user_info = mlflow_env["MLFLOW_BACKEND_STORE_URI"].split("://", 1)[1].split("@")[0]
    assert user_info == "mlflow", "the backend URI must name the user only, no password"
    assert mlflow_env["MLFLOW_DB_PASSWORD_FILE"].startswith("/run/secrets/")
    assert mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # Authentication: its secrets come from secret files only, never as values in the compose file.
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert name not in mlflow_env and mlflow_env[f"{name}_FILE"].startswith("/run/secrets/"), name
        secret = mlflow_env[f"{name}_FILE"].removeprefix("/run/secrets/")
        assert secret in services["mlflow"]["secrets"] and compose["secrets"][secret]["file"].startswith("./secrets/")
    for service in ("mlflow", "proxy"):
        for mapping in services[service]["ports"]:  # published on loopback unless the operator says otherwise
            assert mapping.startswith("${") and ":-127.0.0.1}:" in mapping, mapping
    assert services["proxy"]["profiles"] == ["proxy"]
    # The server image pins the same MLflow as the project, with its authentication app.
    version = re.search(r'"mlflow==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f'"mlflow[auth]=={version}"' in (ROOT / "infra" / "mlflow" / "Dockerfile").read_text()
