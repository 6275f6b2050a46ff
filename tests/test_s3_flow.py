"""The flow with everything on S3: dataset, Ray Train checkpoints and MLflow artifacts on a local
S3-compatible server (moto_server), submitted with `ray job submit`; read back from S3 afterwards.
Also: the S3 keys the services ran with appear nowhere in MLflow, its artifacts, or the logs; and the margin
search keeps its Tune state and its trials' checkpoints on S3, where a re-run finds them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import torch
from mlflow.tracking import MlflowClient

from flows import checkpoints
from flows.tracking import TAG_CHECKPOINT, TAG_FINAL_MODEL, TAG_FLOW
from infra.stack import LOCAL_S3_KEY_ID, LOCAL_S3_SECRET, Stack
from tests.conftest import ROOT, submit_flow

pytestmark = pytest.mark.integration
BUCKET = "eqface"


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory):
    stack = Stack.load(tmp_path_factory.mktemp("s3stack"))
    try:
        stack.start_s3(buckets=(BUCKET,))
        stack.start_mlflow(artifacts_destination=f"s3://{BUCKET}/mlflow")
        stack.start_ray(num_cpus=2)  # inherits the S3 endpoint and keys from its environment
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def s3_flow(s3_stack):
    name = f"s3-{uuid.uuid4().hex[:6]}"
    args = ["--config", "configs/default.yaml", "--config", "configs/tiny.yaml", f"flow.name={name}",
            f"flow.storage=s3://{BUCKET}/runs", f"data.cache_root=s3://{BUCKET}/datasets",
            "flow.loops=0", "step1.epochs=1", "scaling.num_workers=1"]
    proc = submit_flow(s3_stack, args)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    client = MlflowClient(s3_stack.env()["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("eqface")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{TAG_FLOW}` = '{name}'")
    return {"proc": proc, "client": client, "runs": runs, "name": name}


@pytest.fixture()
def s3_env(s3_stack, monkeypatch):
    for key, value in s3_stack.env().items():
        if key.startswith(("AWS_", "MLFLOW_S3_")):
            monkeypatch.setenv(key, value)
    return s3_stack.env()


def _s3(env):
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=LOCAL_S3_KEY_ID, aws_secret_access_key=LOCAL_S3_SECRET)


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_checkpoints_and_dataset_live_on_s3_and_load_back(s3_flow, s3_env):
    steps = [r for r in s3_flow["runs"] if r.data.tags.get("eqface.role") == "step"]
    assert len(steps) == 2  # loops=0: steps 1 and 2
    s3 = _s3(s3_env)
    assert any(k.endswith("manifest.json") for k in _keys(s3, "datasets/"))
    for run in steps:
        uri = run.data.tags[TAG_CHECKPOINT]
        assert uri.startswith(f"s3://{BUCKET}/runs/")
        net = checkpoints.load_net(checkpoints.from_uri(uri))
        emb, quality = net(torch.zeros(2, 3, 32, 32))
        assert emb.shape == (2, 32) and quality.shape == (2,)


def test_mlflow_artifacts_are_proxied_to_s3(s3_flow, s3_env, s3_stack, tmp_path):
    """The client only ever sees the MLflow server's `mlflow-artifacts:` URIs; every byte it gets back through the
    server is an S3 object of the server's artifact destination, and nothing is kept on the server's disk."""
    import mlflow.artifacts
    import mlflow.pyfunc
    import numpy as np

    s3 = _s3(s3_env)
    keys = _keys(s3, "mlflow/")
    assert any(k.endswith("plots/quality_histogram.png") for k in keys)
    parent = next(r for r in s3_flow["runs"] if r.data.tags.get("eqface.role") == "flow")
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")
    model_uri = parent.data.tags[TAG_FINAL_MODEL]
    model_id = model_uri.removeprefix("models:/")
    mlflow.set_tracking_uri(s3_flow["client"].tracking_uri)
    fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / "model")))
    files = [f for f in fetched.rglob("*") if f.is_file()]
    # The one file the client writes itself, beside what it downloaded (MLflow's ModelsArtifactRepository).
    client_meta = fetched / "registered_model_meta"
    assert client_meta in files and "model_name" in client_meta.read_text()
    files.remove(client_meta)
    assert {"MLmodel", "net.pt"} <= {f.name for f in files}
    mlmodel_keys = [k for k in keys if model_id in k and k.endswith("/MLmodel")]
    assert len(mlmodel_keys) == 1, mlmodel_keys
    prefix = mlmodel_keys[0].removesuffix("MLmodel")  # the model's folder in the artifact destination
    for file in files:
        rel = file.relative_to(fetched).as_posix()
        assert prefix + rel in keys, rel
        assert s3.get_object(Bucket=BUCKET, Key=prefix + rel)["Body"].read() == file.read_bytes(), rel
    local_store = s3_stack.state_dir / "mlflow" / "artifacts"
    assert not local_store.exists() or not any(p.is_file() for p in local_store.rglob("*"))

    # What loads through the proxy is the final step's network.
    final_step = max((r for r in s3_flow["runs"] if r.data.tags.get("eqface.role") == "step"),
                     key=lambda r: int(r.data.tags["eqface.step_index"]))
    net = checkpoints.load_net(checkpoints.from_uri(final_step.data.tags[TAG_CHECKPOINT])).eval()
    x = np.random.default_rng(0).random((2, 3, 32, 32), np.float32) * 2 - 1
    with torch.no_grad():
        expected = net(torch.from_numpy(x))[1].numpy()
    np.testing.assert_allclose(mlflow.pyfunc.load_model(model_uri).predict(x)["quality"], expected, atol=1e-6)


def test_margin_search_keeps_its_tune_state_and_trials_on_s3(s3_stack, s3_env, tmp_path):
    name = f"s3-search-{uuid.uuid4().hex[:6]}"
    space = tmp_path / "space.yaml"
    space.write_text("families: {arcface: {m2: 0.4}}\nforms: [outside]\nsteps: [1]\nnum_samples: 1\n"
                     "metric: val_acc\nmode: max\nasha: {grace_period: 1, reduction_factor: 2}\n")
    args = ["--space", str(space), "--config", "configs/default.yaml", "--config", "configs/tiny.yaml",
            "--name", name, "--out", str(tmp_path / "out"), "--storage", f"s3://{BUCKET}/tune",
            f"data.cache_root=s3://{BUCKET}/datasets", "scaling.num_workers=1", "step1.epochs=2"]
    proc = submit_flow(s3_stack, args, timeout=600, script="flows/tune_margins.py")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    s3 = _s3(s3_env)
    tune_keys = _keys(s3, f"tune/{name}/")
    assert any(k.endswith(".json") and "experiment_state" in k for k in tune_keys), tune_keys
    trial_checkpoints = [k for k in _keys(s3, f"tune/{name}.trials/") if k.endswith("/meta.json")]
    assert len(trial_checkpoints) == 1, trial_checkpoints  # one trial; its latest checkpoint is kept
    meta = json.loads(s3.get_object(Bucket=BUCKET, Key=trial_checkpoints[0])["Body"].read())
    assert meta["epoch"] == 2 and meta["kind"] == 1
    assert (tmp_path / "out" / "best.yaml").is_file()
    # Tune finds its own state on S3 again: the same command without --resume is refused, naming it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["MLFLOW_TRACKING_URI"] = s3_stack.env()["MLFLOW_TRACKING_URI"]
    again = subprocess.run([sys.executable, "flows/tune_margins.py", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2, again.stderr[-2000:]
    assert again.stderr.strip().splitlines()[-1] == (
        f"tune_margins: error: search '{name}' already exists (s3://{BUCKET}/tune/{name}); "
        "pass --resume to continue it or choose another --name")


def test_credentials_appear_nowhere(s3_flow, s3_stack, s3_env):
    """In the flow's runs, its artifacts, its job output, and every log of the Ray head; with the margin search
    above, in its Tune state and trial checkpoints on S3 and its job's logs too."""
    secrets = (LOCAL_S3_KEY_ID.encode(), LOCAL_S3_SECRET.encode())
    for run in s3_flow["runs"]:
        text = repr((run.data.params, run.data.tags, run.data.metrics)).encode()
        assert not any(s in text for s in secrets), run.info.run_id
    s3 = _s3(s3_env)
    # artifacts, checkpoints and Ray Train run state; the search's Tune state and trials
    for key in _keys(s3, "mlflow/") + _keys(s3, "runs/") + _keys(s3, "tune/"):
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert not any(s in body for s in secrets), key
    logs = (s3_flow["proc"].stdout + s3_flow["proc"].stderr).encode()
    assert not any(s in logs for s in secrets)
    ray_logs = Path(s3_stack.services["ray"].info["temp_dir"])
    for path in ray_logs.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err", ".txt", ".json"):
            data = path.read_bytes()
            assert not any(s in data for s in secrets), path
