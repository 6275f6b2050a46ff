"""A multi-node rehearsal on one machine: a Ray head plus a second Ray node (`infra.stack add-node`, a separate
`ray start --address <head>` with its own CPU and a marker resource), token authentication on, the tiny flow
submitted with `ray job submit`, its 2 Ray Train workers spread over both nodes (`scaling.placement_strategy=
SPREAD`), dataset, Ray Train checkpoints and MLflow artifacts on S3 (moto_server): shared storage, since Ray
no longer syncs files to the head node.

Where each worker ran comes from Ray's state API after the run (`ray list actors`; Ray keeps dead actors
there): node id per RayTrainWorker actor, grouped by placement group (one per Ray Train step).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import boto3
import pytest
import torch
from mlflow.tracking import MlflowClient

from flows import checkpoints
from flows.tracking import TAG_CHECKPOINT, TAG_COMPLETE, TAG_FLOW, TAG_KIND
from infra.ray_loopback import LOOPBACK_ENV, ray_start_command
from infra.stack import LOCAL_S3_KEY_ID, LOCAL_S3_SECRET, Stack, _http_ok, free_port
from tests.conftest import submit_flow

pytestmark = pytest.mark.integration
BUCKET = "eqface"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Its own stack (state dir, ports). Logical CPUs: 2 on the head, 1 on the added node, 0.5 per Train worker.
    A Ray Data read/decode task asks for a whole CPU: with 1 per node and a worker on each, no node has it
    and the dataset never starts; here the head keeps 1.5."""
    stack = Stack.load(tmp_path_factory.mktemp("multinode"))
    try:
        stack.start_s3(buckets=(BUCKET,))
        stack.start_mlflow(artifacts_destination=f"s3://{BUCKET}/mlflow")
        stack.start_ray(num_cpus=2)
        stack.add_node(num_cpus=1)
        yield stack
    finally:
        stack.stop_all()


def _ray_list(stack: Stack, what: str, *options: str) -> list[dict]:
    """`ray list WHAT --format json` against this stack's head, as a user runs it (token from the env)."""
    env = {**stack.env()}
    cmd = [str(Path(sys.executable).parent / "ray"), "list", what, "--address", env["RAY_ADDRESS"],
           "--format", "json", "--limit", "1000", *options]
    proc = subprocess.run(cmd, env={**_base_env(), **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}


@pytest.fixture(scope="module")
def flow(cluster):
    name = f"mn-{uuid.uuid4().hex[:6]}"
    args = ["--config", "configs/default.yaml", "--config", "configs/tiny.yaml", f"flow.name={name}",
            f"flow.storage=s3://{BUCKET}/runs", f"data.cache_root=s3://{BUCKET}/datasets",
            "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.placement_strategy=SPREAD"]
    start = time.monotonic()
    proc = submit_flow(cluster, args, timeout=900)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    nodes = _ray_list(cluster, "nodes", "--detail")
    workers = _ray_list(cluster, "actors", "--detail", "--filter", "class_name=RayTrainWorker")
    client = MlflowClient(cluster.env()["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("eqface")
    steps = client.search_runs([experiment.experiment_id],
                               f"tags.`{TAG_FLOW}` = '{name}' and tags.`eqface.role` = 'step'",
                               order_by=["tags.`eqface.step_index` ASC"])
    result = {"proc": proc, "wall_s": wall, "nodes": nodes, "workers": workers, "steps": steps}
    print(f"\nmulti-node flow: {wall:.0f} s wall; {_rank_report(result)}")
    return result


def _node_names(nodes: list[dict]) -> dict[str, str]:
    """node id -> "head" or the added node's marker resource (eqface_node_<n>)."""
    names = {}
    for node in nodes:
        markers = [r for r in node["resources_total"] if r.startswith("eqface_node_")]
        names[node["node_id"]] = "head" if node["is_head_node"] else ",".join(markers) or "?"
    return names


def _rank_report(result: dict) -> str:
    """Which node each rank ran on, per step: Ray Train's own "world_rank=" start-up lines give rank -> pid,
    the state API gives pid -> node (both nodes share this machine's IP, so only the pid tells them apart).
    A figure for the log, not asserted: the line's format is Ray's, not an API."""
    names = _node_names(result["nodes"])
    node_of_pid = {w["pid"]: names.get(w["node_id"], "?") for w in result["workers"]}
    starts = re.findall(r"pid=(\d+)\) world_rank=(\d+)", result["proc"].stdout)
    if not starts:
        return "no Ray Train start-up lines in the job log"
    ranks = [f"rank {rank} {node_of_pid.get(int(pid), '?')}" for pid, rank in starts]
    return "; ".join(", ".join(ranks[i:i + 2]) for i in range(0, len(ranks), 2))


def test_two_nodes_joined_with_the_token(cluster):
    nodes = [n for n in _ray_list(cluster, "nodes", "--detail") if n["state"] == "ALIVE"]
    names = _node_names(nodes)
    assert sorted(names.values()) == ["eqface_node_1", "head"]
    assert {names[n["node_id"]]: n["resources_total"]["CPU"] for n in nodes} == {"head": 2, "eqface_node_1": 1}
    assert len({n["node_id"] for n in nodes}) == 2
    # Token authentication is on for the cluster the node joined: the API answers with the token only.
    api = f"{cluster.env()['RAY_ADDRESS']}/api/version"
    assert _http_ok(api, Path(cluster.services["ray"].info["token_path"]))
    assert not _http_ok(api)


def test_a_node_with_another_token_is_refused(cluster, tmp_path):
    """The second node needs the head's token: `ray start --address` with another one fails at the GCS."""
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    wrong.chmod(0o600)
    head = cluster.services["ray"].info
    temp_dir = f"{head['temp_dir']}-refused"
    cmd = ray_start_command(f"--address=127.0.0.1:{head['gcs_port']}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                            "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
                            f"--temp-dir={temp_dir}")
    env = {**_base_env(), **LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        _kill_group(proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode != 0
    assert "InvalidAuthToken" in out, out[-2000:]
    alive = [n for n in _ray_list(cluster, "nodes") if n["state"] == "ALIVE"]
    assert len(alive) == 2


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_each_step_trained_on_both_nodes(flow):
    names = _node_names(flow["nodes"])
    by_group = defaultdict(list)
    for worker in flow["workers"]:
        by_group[worker["placement_group_id"]].append(worker)
    # One placement group per Ray Train step (4 on the tiny flow). A worker group Ray Train had to start again
    # because its start-up timed out or failed (the controller's retries, e.g. a worker process slow to start
    # on a loaded 2-core CI machine) adds a group; a restart after a training failure may not.
    retries = _failure_policy_reports(flow["proc"].stdout)
    assert not [r for r in retries if "Source: controller" not in r], _worker_errors(flow["proc"].stdout)
    assert len(by_group) == 4 + len(retries), (by_group.keys(), retries)
    for group, workers in by_group.items():
        assert len(workers) == 2, group
        assert sorted(names[w["node_id"]] for w in workers) == ["eqface_node_1", "head"], group
        assert all(w["state"] == "DEAD" for w in workers)  # the steps are over


def _failure_policy_reports(log: str) -> list[str]:
    """Ray Train's "[FailurePolicy] RETRY|RAISE" reports in a job log: decision, source, count, error. Ray may
    echo an actor's log line twice; a report's error count tells two real ones apart."""
    lines = log.splitlines()
    reports = ["\n".join(lines[i:i + 4]) for i, line in enumerate(lines) if "[FailurePolicy]" in line]
    return list(dict.fromkeys(reports))


def _worker_errors(log: str) -> str:
    """Each worker-group failure with the worker's traceback that follows it, for the assertion message."""
    lines = log.splitlines()
    return "\n\n".join("\n".join(lines[i:i + 40]) for i, line in enumerate(lines) if "Source: worker group" in line)


def test_flow_completes_with_checkpoints_on_s3_that_load(flow, cluster, monkeypatch):
    steps = flow["steps"]
    assert [s.data.tags[TAG_KIND] for s in steps] == ["1", "2", "3", "2"]
    env = cluster.env()
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=LOCAL_S3_KEY_ID, aws_secret_access_key=LOCAL_S3_SECRET)
    keys = [obj["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for obj in page.get("Contents", [])]
    assert any(k.startswith("datasets/") and k.endswith("manifest.json") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("MLmodel") for k in keys)
    for key, value in env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    for run in steps:
        assert run.info.status == "FINISHED" and run.data.tags[TAG_COMPLETE] == "true"
        uri = run.data.tags[TAG_CHECKPOINT]
        assert uri.startswith(f"s3://{BUCKET}/runs/")
        assert any(k.startswith(uri.removeprefix(f"s3://{BUCKET}/")) for k in keys)
        emb, quality = checkpoints.load_net(checkpoints.from_uri(uri))(torch.zeros(2, 3, 32, 32))
        assert emb.shape == (2, 32) and quality.shape == (2,)
