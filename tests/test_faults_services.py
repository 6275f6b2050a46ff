"""Service faults during a step, with real processes.

MLflow: this module's own server (SQLite store) is stopped by pid mid-step and restarted on the same port
and store; the flow runs as `python flows/eqface.py` on its own local Ray. S3: moto behind a TCP proxy
(tests/faultproxy.py) that resets, then refuses, connections for a few seconds while `run_step` trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from unittest import mock

import boto3
import pytest
import torch
from mlflow.tracking import MlflowClient

import infra.stack
from flows import checkpoints
from flows.config import load_config
from flows.eqface import DEFAULT_CONFIG
from flows.runner import prepare_datasets, run_step
from flows.steps import PlannedStep, StepSpec
from flows.tracking import (
    TAG_CHECKPOINT,
    TAG_COMPLETE,
    TAG_FINAL_MODEL,
    TAG_FLOW,
    TAG_INDEX,
    FlowTracker,
    TrackingOutageError,
)
from infra.stack import LOCAL_S3_KEY_ID, LOCAL_S3_SECRET, Stack
from tests.conftest import ROOT
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.integration
TINY = DEFAULT_CONFIG.parent / "tiny.yaml"
EXPERIMENT = "faults"
BUCKET = "eqface"


# ------------------------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """An MLflow server of this module's own: stopping it leaves the session's `stack` alone."""
    stack = Stack.load(tmp_path_factory.mktemp("mlflow-faults"))
    try:
        stack.start_mlflow()
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")  # one synthetic dataset cache for the module's flows


def uri_of(stack: Stack) -> str:
    return stack.env()["MLFLOW_TRACKING_URI"]


def stop_mlflow(stack: Stack) -> int:
    """Kill the server by pid, as a crash would (its process group gets SIGKILL at once); returns its port."""
    port = stack.services["mlflow"].port
    stack.stop("mlflow", timeout=0)
    return port


def restart_mlflow(stack: Stack, port: int) -> None:
    """The same command on the same port and SQLite store; returns once /health answers."""
    with mock.patch.object(infra.stack, "free_port", lambda: port):
        stack.start_mlflow()


def down_for(stack: Stack, seconds: float) -> dict[str, float]:
    """An outage in the background: stop now, restart after `seconds`; times filled in as they happen."""
    times = {"down": time.time()}
    port = stop_mlflow(stack)
    times["stopped"] = time.time()

    def restart():
        time.sleep(seconds)
        times["restarting"] = time.time()
        restart_mlflow(stack, port)
        times["up"] = time.time()

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    times["thread"] = thread
    return times


def tracker_for(stack: Stack, limit_s: float) -> FlowTracker:
    cfg = load_config([DEFAULT_CONFIG, TINY], [f"flow.name=t-{uuid.uuid4().hex[:6]}", f"tracking.uri={uri_of(stack)}",
                                               f"tracking.experiment={EXPERIMENT}", f"tracking.max_outage_s={limit_s}"])
    tracker = FlowTracker(cfg)
    tracker.start_flow()
    return tracker


def test_step_completion_waits_out_an_outage_up_to_the_limit(mlflow_server):
    """The driver's end of a step (metrics, plots, tags, termination) during one outage: with a 3 s limit it
    gives up with a clear error; with 90 s it waits until the server is back, then completes the run."""
    short, patient = tracker_for(mlflow_server, limit_s=3), tracker_for(mlflow_server, limit_s=90)
    short_run, run = short.step_run(PlannedStep(0, 1, 0)), patient.step_run(PlannedStep(0, 1, 0))
    port = stop_mlflow(mlflow_server)
    down = time.time()
    try:
        with pytest.raises(TrackingOutageError, match=r"unreachable for over 3s \(tracking\.max_outage_s\) "
                                                       r"while completing the step run"):
            short.complete_step(short_run.run_id, "/ckpt/0", {"val_acc": 0.5}, {})
        gave_up = time.time() - down
    except BaseException:
        restart_mlflow(mlflow_server, port)
        raise
    times: dict[str, float] = {}

    def restart():
        time.sleep(2)
        times["restarting"] = time.time()
        restart_mlflow(mlflow_server, port)
        times["up"] = time.time()

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    patient.complete_step(run.run_id, "/ckpt/0", {"val_acc": 0.75}, {"hist.png": b"png bytes"})
    done = time.time()
    thread.join(timeout=120)
    print(f"\n[faults] complete_step: a 3 s limit gave up after {gave_up:.1f}s; a 90 s one waited "
          f"{done - down:.1f}s in all and returned {done - times['up']:.2f}s after the server was back "
          f"(restart {times['up'] - times['restarting']:.1f}s)")
    assert 3 <= gave_up < 15
    assert done >= times["up"]  # it really waited through the outage
    client = MlflowClient(uri_of(mlflow_server))
    assert client.get_run(short_run.run_id).info.status == "RUNNING"  # never marked complete
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags[TAG_COMPLETE] == "true" and finished.data.tags[TAG_CHECKPOINT] == "/ckpt/0"
    assert [m.value for m in client.get_metric_history(run.run_id, "val_acc")] == [0.75]
    assert [a.path for a in client.list_artifacts(run.run_id, "plots")] == ["plots/hist.png"]
    assert patient.step_run(PlannedStep(1, 2, 0)).run_id != run.run_id  # the next step's run, after the outage


def start_flow(stack: Stack, work: Path, name: str, overrides: list[str]) -> subprocess.Popen:
    """`python flows/eqface.py` on its own local Ray (RAY_ADDRESS=local), as a user runs it without a cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env["RAY_ADDRESS"] = "local"
    args = ["--config", str(DEFAULT_CONFIG), "--config", str(TINY), f"flow.name={name}",
            f"tracking.uri={uri_of(stack)}", f"tracking.experiment={EXPERIMENT}", f"flow.storage={work / 'runs'}",
            f"data.cache_root={work / 'data'}", "flow.loops=0", "scaling.num_workers=1", *overrides]
    log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed by the caller through finish()
    return subprocess.Popen([sys.executable, "flows/eqface.py", *args], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, work: Path, name: str, timeout: float = 420) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return (work / f"{name}.log").read_text()


def wait_for_first_epoch(stack: Stack, name: str, proc: subprocess.Popen, timeout: float = 240) -> str:
    """The step-0 run's id once its first epoch's loss is in MLflow (training has started)."""
    client = MlflowClient(uri_of(stack))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            runs = client.search_runs([experiment.experiment_id],
                                      f"tags.`{TAG_FLOW}` = '{name}' and tags.`{TAG_INDEX}` = '0'")
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                return runs[0].info.run_id
        time.sleep(0.3)
    raise AssertionError(f"step 0 of {name} logged no epoch (exit code {proc.poll()})")


def test_flow_rides_out_an_mlflow_outage_mid_step(mlflow_server, work):
    epochs = 6
    name = f"outage-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    proc = start_flow(mlflow_server, work, name, [f"step1.epochs={epochs}", "tracking.max_outage_s=120"])
    try:
        run_id = wait_for_first_epoch(mlflow_server, name, proc)
        outage = down_for(mlflow_server, seconds=4)
        outage["thread"].join(timeout=180)
    finally:
        output = finish(proc, work, name)
    wall = time.monotonic() - started
    assert proc.returncode == 0, output[-4000:]

    client = MlflowClient(uri_of(mlflow_server))
    loss = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, epochs + 1))  # every epoch, exactly once
    for key in ("top1", "lr", "images_per_s"):
        assert len(client.get_metric_history(run_id, key)) == epochs, key
    # Stamped when measured: epochs trained while the server was away are dated inside the outage.
    during = [m.step for m in loss if outage["down"] * 1000 <= m.timestamp <= outage["up"] * 1000]
    assert during, ([m.timestamp for m in loss], outage)
    buffered = output.count("epochs buffered")
    assert buffered >= 1 and "buffered metrics sent" in output
    step = client.get_run(run_id)
    assert step.info.status == "FINISHED" and step.data.tags[TAG_COMPLETE] == "true"
    parent = client.get_run(step.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.data.tags[TAG_FINAL_MODEL]
    print(f"\n[faults] MLflow outage mid-step: down {outage['up'] - outage['down']:.1f}s "
          f"(stop {outage['stopped'] - outage['down']:.1f}s, restart {outage['up'] - outage['restarting']:.1f}s); "
          f"epochs {during} trained during it; {buffered} failed sends buffered; flow {wall:.0f}s")


def test_flow_fails_clearly_when_mlflow_stays_down_past_the_limit(mlflow_server, work):
    limit = 5
    name = f"toolong-{uuid.uuid4().hex[:6]}"
    proc = start_flow(mlflow_server, work, name, ["step1.epochs=3", f"tracking.max_outage_s={limit}",
                                                  "flow.max_failures=0"])
    port = None
    try:
        run_id = wait_for_first_epoch(mlflow_server, name, proc)
        down = time.monotonic()
        port = stop_mlflow(mlflow_server)
        output = finish(proc, work, name, timeout=300)
        failed_after = time.monotonic() - down
    finally:
        if proc.poll() is None:
            proc.kill()
        if port is not None:
            restart_mlflow(mlflow_server, port)
    assert proc.returncode != 0
    message = f"unreachable for over {limit}s (tracking.max_outage_s)"
    assert message in output, output[-4000:]
    final = output[output.rindex("eqface: error: "):].splitlines()[0]
    assert message in final, final  # the flow's one-line final error names the limit
    assert limit <= failed_after < 150

    # Nothing already written is lost: the run, its params and the epoch logged before the outage are in
    # MLflow, and the epochs it could not log are in the step's last checkpoint, for a resume to send.
    client = MlflowClient(uri_of(mlflow_server))
    run = client.get_run(run_id)
    assert run.data.params["tracking.max_outage_s"] == str(float(limit))
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]
    states = sorted((work / "runs").glob(f"{name}-*/checkpoint_*/state.pt"))
    assert states, list((work / "runs").iterdir())
    history = torch.load(states[-1], map_location="cpu", weights_only=False)["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    print(f"\n[faults] MLflow down past a {limit}s limit: the flow exited {proc.returncode} "
          f"{failed_after:.1f}s after the server stopped")


# ------------------------------------------------------------------------------------------------ S3


def test_s3_filesystem_keeps_its_retry_strategy_when_pickled(monkeypatch):
    """Ray pickles the filesystem into read tasks and train workers; pyarrow's own pickling drops the strategy
    and carries the keys."""
    import pickle

    import cloudpickle
    import pyarrow.fs as pafs

    from data import storage

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "sender-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sender-secret")
    fs = storage.s3_filesystem()
    pickles = (pickle.dumps(fs), cloudpickle.dumps(fs))
    # The keys stay out of the pickle (Ray Tune writes it into its experiment state); the receiver takes its own.
    assert not any(secret in data for data in pickles for secret in (b"sender-key-id", b"sender-secret"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "receiver-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "receiver-secret")
    for clone in (pickle.loads(pickles[0]), cloudpickle.loads(pickles[1])):
        assert isinstance(clone, pafs.S3FileSystem) and clone.max_attempts == 7 and clone.region == fs.region
        _, (kwargs,) = pafs.S3FileSystem.__reduce__(clone)
        assert (kwargs["access_key"], kwargs["secret_key"]) == ("receiver-key-id", "receiver-secret")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    assert storage.s3_filesystem().max_attempts == storage.DEFAULT_S3_ATTEMPTS
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "lots")
    with pytest.raises(ValueError, match="AWS_MAX_ATTEMPTS must be a whole number >= 1, got 'lots'"):
        storage.s3_filesystem()


@pytest.fixture(scope="module")
def s3_behind_proxy(tmp_path_factory):
    """moto_server behind a FaultProxy; this process's S3 endpoint is the proxy, and Ray starts after that
    so its workers see the same environment."""
    import ray

    stack = Stack.load(tmp_path_factory.mktemp("s3-faults"))
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")}
    proxy = None
    try:
        moto = stack.start_s3(buckets=(BUCKET,))
        proxy = FaultProxy(moto.port).start()
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", AWS_ACCESS_KEY_ID=LOCAL_S3_KEY_ID,
                          AWS_SECRET_ACCESS_KEY=LOCAL_S3_SECRET, AWS_DEFAULT_REGION="us-east-1")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        direct = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto.port}", region_name="us-east-1",
                              aws_access_key_id=LOCAL_S3_KEY_ID, aws_secret_access_key=LOCAL_S3_SECRET)
        yield {"proxy": proxy, "s3": direct}
    finally:
        ray.shutdown()
        if proxy is not None:
            proxy.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stack.stop_all()


def s3_outage(proxy: FaultProxy, times: dict[str, float], reset_s: float = 4, closed_s: float = 4) -> None:
    """Reset connections (open ones and each new one) for reset_s, refuse them for closed_s, then serve."""
    times["down"] = time.time()
    proxy.down("reset")
    time.sleep(reset_s)
    proxy.down("closed")  # no listener: the kernel refuses connections
    time.sleep(closed_s)
    proxy.up()  # listen again on the same port
    times["up"] = time.time()


def request_kinds(lines: list[str]) -> list[str]:
    """"PUT /eqface/runs/x/state.pt HTTP/1.1" -> "PUT .../state.pt": what the refused clients were doing."""
    return sorted(f"{line.split()[0]} .../{line.split()[1].split('?')[0].rsplit('/', 1)[-1]}"
                  for line in lines if len(line.split()) >= 2)


def keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_step_rides_out_s3_resets_and_refusals(s3_behind_proxy):
    proxy, s3 = s3_behind_proxy["proxy"], s3_behind_proxy["s3"]
    epochs, name = 5, f"s3-outage-{uuid.uuid4().hex[:6]}"
    cfg = load_config([DEFAULT_CONFIG, TINY], [
        f"flow.storage=s3://{BUCKET}/runs", f"data.cache_root=s3://{BUCKET}/datasets", "scaling.num_workers=1",
        f"step1.epochs={epochs}", "flow.max_failures=0", f"flow.checkpoints_to_keep={epochs}"])
    data = prepare_datasets(cfg)
    times: dict[str, float] = {}

    def outage():
        deadline = time.monotonic() + 300
        while not any(k.endswith("/meta.json") for k in keys(s3, f"runs/{name}/")):  # moto directly
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        s3_outage(proxy, times)

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    started = time.time()
    ckpt = run_step(cfg, StepSpec(PlannedStep(0, 1, 0), data.num_classes), data, name)
    ended = time.time()
    thread.join(timeout=30)

    assert "up" in times and started < times["down"] < times["up"] < ended  # the outage was inside the step
    assert proxy.refused >= 1  # requests did hit the outage, and the step still finished
    assert [h["epoch"] for h in checkpoints.load_state(ckpt)["history"]] == list(range(1, epochs + 1))
    metas = sorted(k for k in keys(s3, f"runs/{name}/") if k.endswith("/meta.json"))
    assert len(metas) == epochs  # one checkpoint per epoch, none lost
    for key in metas:
        uri = f"s3://{BUCKET}/{key.rsplit('/', 1)[0]}"
        ckpt_i = checkpoints.from_uri(uri)  # every file of it is there
        epoch = checkpoints.read_meta(ckpt_i)["epoch"]
        assert checkpoints.load_state(ckpt_i)["epoch"] == epoch
        with torch.no_grad():
            emb, quality = checkpoints.load_net(ckpt_i)(torch.zeros(1, 3, 32, 32))
        assert emb.shape == (1, 32) and 0.0 <= float(quality) <= 1.0
    kinds = request_kinds(proxy.refused_requests)
    print(f"\n[faults] S3 outage mid-step: {times['up'] - times['down']:.1f}s (4 s resets, 4 s refused); "
          f"{proxy.refused} connections reset on arrival ({kinds}), {proxy.dropped} open ones cut, "
          f"{proxy.accepted} forwarded; step {ended - started:.0f}s, finished {ended - times['up']:.1f}s after")


def test_dataset_reads_ride_out_s3_resets_and_refusals(s3_behind_proxy):
    """Ray Data read tasks (the filesystem pickled into them) retry through the outage and read every row."""
    from data.pipeline import training_dataset

    proxy = s3_behind_proxy["proxy"]
    cfg = load_config([DEFAULT_CONFIG, TINY], [f"data.cache_root=s3://{BUCKET}/datasets"])
    data = prepare_datasets(cfg)
    ds = training_dataset(data.train, image_size=32, augment=None)  # planned now; read when iterated
    before = len(proxy.refused_requests)
    times: dict[str, float] = {}
    thread = threading.Thread(target=s3_outage, args=(proxy, times, 4, 3), daemon=True)
    thread.start()
    started = time.time()
    labels = [int(x) for batch in ds.iter_batches(batch_size=64) for x in batch["label"]]
    ended = time.time()
    thread.join(timeout=30)
    refused = proxy.refused_requests[before:]
    assert len(labels) == data.num_train and set(labels) == set(range(data.num_classes))
    assert refused and all(line.startswith(("GET ", "HEAD ")) for line in refused), refused  # reads, retried
    print(f"\n[faults] S3 outage during a dataset read: {times['up'] - times['down']:.1f}s; "
          f"{len(refused)} requests reset on arrival ({request_kinds(refused)}); read {len(labels)} rows in "
          f"{ended - started:.1f}s, done {ended - times['up']:.1f}s after the outage")


def test_partial_checkpoints_on_s3_are_refused(s3_behind_proxy, tmp_path):
    from flows.step_model import build_net_and_head

    s3 = s3_behind_proxy["s3"]
    cfg = load_config([DEFAULT_CONFIG, TINY], [])
    net, head = build_net_and_head(cfg, 12)
    local = tmp_path / "ckpt"
    local.mkdir()
    checkpoints.save_centres(head, local)
    checkpoints.write_checkpoint_dir(local, {"epoch": 1, "history": []}, net, {"epoch": 1, "num_classes": 12})
    files = {p.name: p.read_bytes() for p in local.iterdir()}

    def upload(prefix: str, names, renamed: dict[str, str] | None = None) -> str:
        for name in names:
            key = (renamed or {}).get(name, name)
            s3.put_object(Bucket=BUCKET, Key=f"partial/{prefix}/{key}", Body=files[name])
        return f"s3://{BUCKET}/partial/{prefix}"

    whole = upload("whole", files)
    assert checkpoints.read_meta(checkpoints.from_uri(whole))["num_classes"] == 12
    with pytest.raises(FileNotFoundError, match=r"partial/none is missing"):
        checkpoints.from_uri(f"s3://{BUCKET}/partial/none")
    with pytest.raises(FileNotFoundError, match=r"partial/state-only is incomplete \(no meta.json; has state.pt\)"):
        checkpoints.from_uri(upload("state-only", ["state.pt"]))
    with pytest.raises(FileNotFoundError, match=r"partial/no-net is incomplete \(missing net.pt\)"):
        checkpoints.from_uri(upload("no-net", [n for n in files if n != "net.pt"]))
    shard = next(n for n in files if n.startswith("centres_"))
    with pytest.raises(FileNotFoundError, match=r"incomplete \(missing centres_<start>_<end>.pt\)"):
        checkpoints.from_uri(upload("no-centres", [n for n in files if n != shard]))
    # A sharded checkpoint with a rank's shard missing: classes 6-11 have no centres.
    with pytest.raises(FileNotFoundError, match=r"incomplete \(missing the class centres from 6 to 12\)"):
        checkpoints.from_uri(upload("half-centres", files, {shard: "centres_000000000_000000006.pt"}))
    # The evaluation CLIs read only the network: a checkpoint without its training state still serves them.
    assert checkpoints.load_net_from(upload("net-only", ["net.pt", "meta.json"])) is not None


def test_a_checkpoint_file_cut_short_is_refused(tmp_path):
    """A local checkpoint copied by halves (the copy interrupted mid-file) is named, not loaded."""
    from flows.step_model import build_net_and_head

    net, head = build_net_and_head(load_config([DEFAULT_CONFIG, TINY], []), 12)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    checkpoints.save_centres(head, ckpt)
    checkpoints.write_checkpoint_dir(ckpt, {"epoch": 1, "history": []}, net, {"epoch": 1, "num_classes": 12})
    meta = checkpoints.read_meta(checkpoints.from_uri(str(ckpt)))
    assert set(meta["files"]) == {"state.pt", "net.pt", "centres_000000000_000000012.pt"}
    for name in ("net.pt", "centres_000000000_000000012.pt"):
        whole = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(whole[: len(whole) // 2])
        with pytest.raises(FileNotFoundError, match=rf"^checkpoint {ckpt} is incomplete \({name} has "
                                                    rf"{len(whole) // 2} of {len(whole)} bytes\)$"):
            checkpoints.from_uri(str(ckpt))
        (ckpt / name).write_bytes(whole)
    assert checkpoints.load_net(checkpoints.from_uri(str(ckpt))) is not None
