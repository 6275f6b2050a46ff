"""Bad input to the flow: one clear line on stderr, a non-zero exit, and nothing tracked or written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from infra.stack import free_port
from tests.conftest import ROOT


def run_flow(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "flows/eqface.py", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.integration
def test_unknown_backbone():
    proc = run_flow(["model.backbone=resnet9000", "tracking.uri=http://127.0.0.1:9"])
    assert proc.returncode == 2
    assert last_line(proc).startswith("eqface: error: model.backbone: unknown backbone 'resnet9000'")
    assert "r100" in last_line(proc)


@pytest.mark.integration
def test_malformed_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  m2: [0.5\n")
    proc = run_flow(["--config", str(bad)])
    assert proc.returncode == 2
    assert f"{bad}: not valid YAML" in last_line(proc)


@pytest.mark.integration
def test_missing_value(tmp_path):
    bad = tmp_path / "missing.yaml"
    bad.write_text("loss:\n  m2:\n")
    proc = run_flow(["--config", str(bad)])
    assert proc.returncode == 2
    assert "loss.m2 is missing a value" in last_line(proc)


@pytest.mark.integration
def test_unreachable_mlflow():
    port = free_port()
    proc = run_flow([f"tracking.uri=http://127.0.0.1:{port}"])
    assert proc.returncode == 2
    assert f"MLflow tracking server at http://127.0.0.1:{port} is unreachable" in last_line(proc)


@pytest.fixture()
def mlflow_only(stack):
    uri = stack.env()["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    runs_before = {r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    yield uri
    runs_after = {r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    assert runs_after == runs_before  # nothing tracked


@pytest.mark.integration
def test_unreachable_ray(mlflow_only, tmp_path):
    port = free_port()
    proc = run_flow([f"tracking.uri={mlflow_only}", f"flow.storage={tmp_path / 'runs'}"],
                    env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert proc.returncode == 2
    assert f"Ray cluster at RAY_ADDRESS=127.0.0.1:{port} is unreachable" in last_line(proc)
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_dataset_without_shards(mlflow_only, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_flow([f"tracking.uri={mlflow_only}", f"data.train={empty}", f"data.val={empty}"])
    assert proc.returncode == 2
    line = last_line(proc)
    assert line.startswith("eqface: error: ") and str(empty) in line
    assert "manifest" in line
