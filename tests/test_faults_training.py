"""Training-side faults, injected for real: a training worker killed mid-step, the flow's driver killed
mid-flow, a loss that diverges to NaN, checkpoint storage that fills up.

Tiny config (configs/tiny.yaml). The worker kill drives `run_step` in-process on a private local Ray
cluster; the other three submit the flow with `ray job submit` to the session's Ray head, as a user does.
Each test prints its measured figures (pytest -s shows them).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows import checkpoints
from flows.config import load_config
from flows.eqface import DEFAULT_CONFIG
from flows.runner import prepare_datasets, run_step, train_run_lease
from flows.steps import PlannedStep, StepSpec
from flows.tracking import PARENT, TAG_FINAL_MODEL, TAG_FLOW, TAG_INDEX, TAG_LAST_GOOD
from tests.conftest import ROOT, submit_flow

pytestmark = pytest.mark.integration

TINY = DEFAULT_CONFIG.parent / "tiny.yaml"
EPOCH_METRICS = ("loss", "top1", "lr", "images_per_s")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train writes it once a reported checkpoint is registered
# Diverges on the tiny config after >= 1 good epoch: lr x weight_decay far above SGD's stability limit
# 2(1 + momentum) makes the decay step overshoot, so the weights grow geometrically as warm-up ramps the lr
# until float32 overflows to inf (a BatchNorm statistic or the loss). Measured on tiny (12 batches an epoch):
# lr=1000 diverges in epoch 3, after two good epochs; lr=2000 already in epoch 1, before any checkpoint.
DIVERGING = ("step1.lr=1000", "step1.warmup_epochs=4", "step1.weight_decay=0.01")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The tiny synthetic set, generated once for the module."""
    return tmp_path_factory.mktemp("faults-data")


def _flow_args(name: str, storage: Path, data_root: Path, *overrides: str) -> list[str]:
    return ["--config", "configs/default.yaml", "--config", "configs/tiny.yaml", f"flow.name={name}",
            f"flow.storage={storage}", f"data.cache_root={data_root}", "flow.loops=0", *overrides]


def _popen_flow(stack, args: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """`submit_flow`, without waiting: `ray job submit` follows the job's log into `log`."""
    env = {**os.environ, **stack.env()}
    job_env = {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
               "RAY_ADDRESS": f"127.0.0.1:{stack.services['ray'].info['gcs_port']}", **(extra_env or {})}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"],
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": job_env}),
           "--", "python", "flows/eqface.py", *args]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


# ---------------------------------------------------------------------------------------------
# Processes, from /proc: each Ray cluster's workers are children of its raylet.


def _processes() -> list[tuple[int, int, list[str]]]:
    """(pid, ppid, argv) of every process."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        out.append((int(entry), ppid, [a for a in argv if a]))
    return out


def _raylets(*socket_prefixes: str) -> set[int]:
    """The raylets whose sockets lie under these prefixes: one Ray cluster's nodes among the others here."""
    found = {pid for pid, _, argv in _processes()
             if any(a.startswith(f"--raylet_socket_name={p}") for a in argv for p in socket_prefixes)}
    assert found, f"no raylet with a socket under {socket_prefixes}"
    return found


def _actor_pids(raylets: set[int], title: str) -> list[int]:
    """Processes of those raylets running an actor of the given class (Ray titles them `ray::<Class>...`)."""
    return [pid for pid, ppid, argv in _processes() if ppid in raylets and argv and argv[0].startswith(title)]


# ---------------------------------------------------------------------------------------------
# Ray Train run directories


def _checkpoint_epochs(run_dir: Path) -> dict[str, int]:
    """{checkpoint dir name: epoch} of the checkpoints Ray Train has registered (listed in its snapshot)."""
    try:
        snapshot = (run_dir / SNAPSHOT).read_text()
    except OSError:
        return {}
    out = {}
    for meta in run_dir.glob("checkpoint_*/meta.json"):
        if meta.parent.name in snapshot:
            try:
                out[meta.parent.name] = json.loads(meta.read_text())["epoch"]
            except (OSError, ValueError):
                continue  # being written
    return out


def _wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _one_run_dir(storage: Path, suffix: str) -> Path | None:
    dirs = list(storage.glob(f"*{suffix}"))
    return dirs[0] if len(dirs) == 1 else None


def _error_line(output: str) -> str:
    """The flow's one error line (`ray job submit` repeats the job's last log lines when it fails)."""
    lines = {line[line.index("eqface: error:"):].strip() for line in output.splitlines() if "eqface: error:" in line}
    assert len(lines) == 1, output[-4000:]
    return lines.pop()


def _flow_runs(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name("eqface")
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`{TAG_FLOW}` = '{name}' and tags.`eqface.role` = 'flow'")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    children = client.search_runs([experiment.experiment_id], f"tags.`{PARENT}` = '{parents[0].info.run_id}'")
    return parents[0], sorted(children, key=lambda r: int(r.data.tags[TAG_INDEX]))


# Ray Train's run registry (its dashboard's Train API) is kept only where the driver enables it.
STATE_TRACKING = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}


def _train_run_attempts(stack, run_name: str) -> int:
    """Attempts (worker-group starts) of a Ray Train run, from the dashboard's Train API (STATE_TRACKING)."""
    ray_info = stack.services["ray"].info
    request = urllib.request.Request(f"http://127.0.0.1:{ray_info['dashboard_port']}/api/train/v2/runs/v1")
    request.add_header("Authorization", f"Bearer {Path(ray_info['token_path']).read_text().strip()}")
    with urllib.request.urlopen(request, timeout=30) as resp:
        runs = json.loads(resp.read())["train_runs"]
    matching = [r for r in runs if r["name"] == run_name]
    assert len(matching) == 1, [r["name"] for r in runs]
    return len(matching[0]["attempts"])


# ---------------------------------------------------------------------------------------------
# 1. A training worker dies mid-step


class WorkerKiller(threading.Thread):
    """Once the run's first checkpoint is registered, SIGKILL its training worker; then time the recovery."""

    def __init__(self, run_dir: Path, raylets: set[int]) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.raylets = run_dir, raylets
        self.error: BaseException | None = None
        self.killed_pid = self.epochs_at_kill = None
        self.killed_at = self.replaced_at = self.next_checkpoint_at = None

    def run(self) -> None:
        try:
            _wait_for("the first checkpoint", lambda: _checkpoint_epochs(self.run_dir), 300)
            (self.killed_pid,) = _actor_pids(self.raylets, "ray::RayTrainWorker")  # 1 worker
            self.epochs_at_kill = max(_checkpoint_epochs(self.run_dir).values())
            os.kill(self.killed_pid, signal.SIGKILL)
            self.killed_at = time.monotonic()
            _wait_for("a new worker", lambda: set(_actor_pids(self.raylets, "ray::RayTrainWorker")) - {self.killed_pid},
                      300)
            self.replaced_at = time.monotonic()
            _wait_for("a checkpoint after the kill",
                      lambda: max(_checkpoint_epochs(self.run_dir).values()) > self.epochs_at_kill, 300)
            self.next_checkpoint_at = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            self.error = exc


def test_killed_worker_resumes_from_checkpoint_with_identical_weights(stack, tmp_path, data_root):
    import ray

    uri = stack.env()["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("eqface") or client.get_experiment(client.create_experiment("eqface"))
    epochs = 3
    cfg = load_config([DEFAULT_CONFIG, TINY], [
        f"flow.storage={tmp_path / 'runs'}", f"data.cache_root={data_root}", f"tracking.uri={uri}",
        f"step1.epochs={epochs}", "flow.max_failures=2",
        # what makes two runs of a step comparable bit for bit (see flows/config.py: data.deterministic)
        "data.deterministic=true", "scaling.num_workers=1", "scaling.threads_per_worker=1"])
    data = prepare_datasets(cfg)
    step = PlannedStep(0, 1, 0)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        raylets = _raylets(ray.nodes()[0]["RayletSocketName"])
        faulty_run = client.create_run(experiment.experiment_id, run_name="worker-kill").info.run_id
        killer = WorkerKiller(tmp_path / "runs" / "faulty", raylets)
        killer.start()
        started = time.monotonic()
        faulty = run_step(cfg, StepSpec(step, data.num_classes, faulty_run, uri), data, "faulty")
        faulty_s = time.monotonic() - started
        killer.join(timeout=60)
        if killer.error:
            raise killer.error

        reference_run = client.create_run(experiment.experiment_id, run_name="no-fault").info.run_id
        started = time.monotonic()
        reference = run_step(cfg, StepSpec(step, data.num_classes, reference_run, uri), data, "reference")
        reference_s = time.monotonic() - started

        # A second driver cannot take a Ray Train run name that a live driver holds.
        with train_run_lease("held"):
            with pytest.raises(RuntimeError, match="'held' is still being trained by Ray job"):
                with train_run_lease("held", timeout_s=1.0):
                    pass
    finally:
        ray.shutdown()

    assert not _alive(killer.killed_pid)
    assert 1 <= killer.epochs_at_kill < epochs  # killed mid-step, after its first checkpoint

    faulty_state, reference_state = checkpoints.load_state(faulty), checkpoints.load_state(reference)
    assert checkpoints.read_meta(faulty)["epoch"] == epochs
    assert [h["epoch"] for h in faulty_state["history"]] == list(range(1, epochs + 1))
    # MLflow has each epoch once: the restarted worker backfills what it lacks and re-logs nothing.
    for key in EPOCH_METRICS:
        assert sorted(m.step for m in client.get_metric_history(faulty_run, key)) == list(range(1, epochs + 1)), key

    # Bit for bit the weights, class centres and losses of a run that was never interrupted (data.deterministic).
    for part in ("backbone", "quality"):
        assert reference_state[part].keys() == faulty_state[part].keys(), part
        for key, ref in reference_state[part].items():
            assert torch.equal(faulty_state[part][key], ref), (part, key)
    max_diff = max((faulty_state[p][k].double() - ref.double()).abs().max().item()
                   for p in ("backbone", "quality") for k, ref in reference_state[p].items())
    with faulty.as_directory() as a, reference.as_directory() as b:
        from models.partial_fc import assemble_centres

        faulty_centres, reference_centres = assemble_centres(a), assemble_centres(b)
    assert torch.equal(faulty_centres, reference_centres)
    centres_diff = (faulty_centres - reference_centres).abs().max().item()
    assert [h["loss"] for h in faulty_state["history"]] == [h["loss"] for h in reference_state["history"]]

    print(f"\n[worker kill] killed pid {killer.killed_pid} after epoch {killer.epochs_at_kill}/{epochs}; "
          f"new worker up {killer.replaced_at - killer.killed_at:.1f}s after the kill, next checkpoint "
          f"{killer.next_checkpoint_at - killer.killed_at:.1f}s after; step {faulty_s:.1f}s with the kill vs "
          f"{reference_s:.1f}s without; max |weight diff| {max_diff:.3g}, centres {centres_diff:.3g}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# 2. The flow's driver dies mid-flow


def _driver_pid(flow_name: str) -> int:
    """The job's `python flows/eqface.py ... flow.name=<name>` process (not `ray job submit`, not a shell)."""
    found = [pid for pid, _, argv in _processes()
             if len(argv) > 1 and "python" in Path(argv[0]).name and argv[1] == "flows/eqface.py"
             and f"flow.name={flow_name}" in argv]
    assert len(found) == 1, found
    return found[0]


def test_killed_driver_resumes_on_resubmit_without_rerunning_or_duplicating(stack, tmp_path, data_root):
    client = MlflowClient(stack.env()["MLFLOW_TRACKING_URI"])
    name = f"driver-kill-{uuid.uuid4().hex[:6]}"
    storage = tmp_path / "runs"
    epochs = 3
    args = _flow_args(name, storage, data_root, "step1.epochs=1", f"step2.epochs={epochs}",  # plan: steps 1, 2
                      "scaling.num_workers=1")
    temp_dir = stack.services["ray"].info["temp_dir"]
    raylets = _raylets(f"{temp_dir}/", f"{temp_dir}-n")  # the head, and any node added to it
    log = tmp_path / "first.log"
    started = time.monotonic()
    first = _popen_flow(stack, args, log)
    try:
        run_dir = _wait_for("step 2's run directory", lambda: _one_run_dir(storage, "-01-step2"), 600, first, log)
        _wait_for("step 2's first checkpoint", lambda: _checkpoint_epochs(run_dir), 600, first, log)
        epochs_at_kill = max(_checkpoint_epochs(run_dir).values())
        os.kill(_driver_pid(name), signal.SIGKILL)
        killed_at, killed_ms = time.monotonic(), int(time.time() * 1000)
        assert first.wait(timeout=120) != 0  # the job failed
    finally:
        if first.poll() is None:
            first.kill()
    # Ray tears the dead driver's actors down (its Ray Train controller, then the workers it owned).
    _wait_for("the killed driver's Ray Train actors to go",
              lambda: not (_actor_pids(raylets, "ray::TrainController") or _actor_pids(raylets, "ray::RayTrainWorker")),
              60)
    torn_down_s = time.monotonic() - killed_at
    assert 1 <= epochs_at_kill < epochs, epochs_at_kill

    resumed_at = time.monotonic()
    second = submit_flow(stack, args)
    resume_s = time.monotonic() - resumed_at
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert second.stdout.count("already complete") == 1
    assert "step 0 (kind 1) already complete" in second.stdout
    assert "step 1 (kind 2, loop 0) -> run" in second.stdout

    parent, children = _flow_runs(client, name)
    assert Counter(c.data.tags[TAG_INDEX] for c in children) == {"0": 1, "1": 1}  # no duplicate runs
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED" and parent.data.tags[TAG_FINAL_MODEL].startswith("models:/")
    step2 = children[1]
    for key in EPOCH_METRICS:
        history = client.get_metric_history(step2.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key
        # The epochs checkpointed before the kill were logged then and not trained again.
        assert all(m.timestamp < killed_ms for m in history if m.step <= epochs_at_kill), key
    ckpt = checkpoints.from_uri(step2.data.tags["eqface.checkpoint_uri"])
    assert checkpoints.read_meta(ckpt)["epoch"] == epochs
    assert [h["epoch"] for h in checkpoints.load_state(ckpt)["history"]] == list(range(1, epochs + 1))
    print(f"\n[driver kill] killed after step 2's epoch {epochs_at_kill}/{epochs} "
          f"({killed_at - started:.1f}s into the flow); its Ray Train actors gone {torn_down_s:.1f}s after the "
          f"kill; resubmitted flow finished in {resume_s:.1f}s")


# ---------------------------------------------------------------------------------------------
# 3. The loss diverges


def test_divergence_stops_the_flow_once_and_marks_the_last_good_checkpoint(stack, tmp_path, data_root):
    client = MlflowClient(stack.env()["MLFLOW_TRACKING_URI"])
    name = f"diverge-{uuid.uuid4().hex[:6]}"
    storage = tmp_path / "runs"
    args = _flow_args(name, storage, data_root, "step1.epochs=4", "flow.max_failures=2", *DIVERGING)
    started = time.monotonic()
    proc = submit_flow(stack, args, extra_env=STATE_TRACKING)
    flow_s = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    line = _error_line(output)
    # The loss, or first a BatchNorm statistic (the loss uses batch statistics), goes non-finite.
    found = re.fullmatch(r"eqface: error: step 0 \(kind 1, loop 0\) diverged: (loss is (nan|inf|-inf)|weights are not "
                         r"finite \(\S+\)) at epoch (\d+), batch (\d+); not retried; last good checkpoint (\S+) "
                         r"\(epoch (\d+)\)", line)
    assert found, line
    what, epoch, batch, uri, good_epoch = found[1], int(found[3]), int(found[4]), found[5], int(found[6])
    assert epoch >= 2 and good_epoch == epoch - 1  # at least one good epoch before it

    parent, children = _flow_runs(client, name)
    assert parent.info.status == "FAILED"
    assert [c.data.tags[TAG_INDEX] for c in children] == ["0"]  # the flow did not go on to step 2
    step1 = children[0]
    assert step1.info.status == "FAILED"
    assert step1.data.tags[TAG_LAST_GOOD] == uri
    assert "diverged" in step1.data.tags["eqface.error"]
    history = client.get_metric_history(step1.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, epoch))  # the good epochs, logged once
    assert all(torch.isfinite(torch.tensor(m.value)) for m in history)

    ckpt = checkpoints.from_uri(uri)
    assert checkpoints.read_meta(ckpt)["epoch"] == good_epoch
    state = checkpoints.load_state(ckpt)
    # Never a non-finite weight or BatchNorm statistic in a checkpoint. (These weights are already huge - that
    # is how this config diverges - so the network is finite, not necessarily useful.)
    for part in ("backbone", "quality"):
        assert all(torch.isfinite(t).all() for t in state[part].values() if t.is_floating_point()), part
    assert checkpoints.load_net(ckpt) is not None

    # Not retried: one worker-group attempt although flow.max_failures allows 2 restarts.
    run_name = f"{name}-{parent.info.run_id[:8]}-00-step1"
    assert _train_run_attempts(stack, run_name) == 1
    assert "[FailurePolicy]" not in output
    print(f"\n[divergence] {what} at epoch {epoch}, batch {batch}; flow failed after {flow_s:.1f}s "
          f"with 1 attempt (max_failures=2)")


# ---------------------------------------------------------------------------------------------
# 4. Checkpoint storage fills up or turns read-only


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 32 MiB tmpfs to hold a flow's checkpoints (root only: skipped where mounting is not permitted)."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)  # busy: detach it anyway


def _fill(path: Path) -> int:
    """Write a filler file until the filesystem refuses (ENOSPC); bytes written."""
    written = 0
    with open(path / "filler", "wb", buffering=0) as out:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    written += out.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return written


def _make_read_only(path: Path) -> int:
    """Remount the filesystem read-only (retried while a write holds it busy); 0 bytes written."""
    for _ in range(100):
        done = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
        if done.returncode == 0:
            return 0
        time.sleep(0.1)
    raise AssertionError(f"could not remount {path} read-only: {done.stderr.strip()}")


@pytest.mark.parametrize(("break_storage", "reason"), [
    (_fill, "storage is full (no space left on device)"),
    (_make_read_only, "storage is read-only"),
], ids=["full", "read-only"])
def test_unwritable_checkpoint_storage_fails_clearly_and_keeps_earlier_checkpoints(
        stack, tmp_path, data_root, small_tmpfs, break_storage, reason):
    client = MlflowClient(stack.env()["MLFLOW_TRACKING_URI"])
    name = f"disk-{break_storage.__name__.strip('_').replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    args = _flow_args(name, small_tmpfs, data_root, "step1.epochs=4", "scaling.num_workers=1",
                      "flow.max_failures=1")
    log = tmp_path / "flow.log"
    proc = _popen_flow(stack, args, log, extra_env=STATE_TRACKING)
    try:
        run_dir = _wait_for("step 1's run directory", lambda: _one_run_dir(small_tmpfs, "-00-step1"), 600, proc, log)
        saved = _wait_for("step 1's first checkpoint", lambda: _checkpoint_epochs(run_dir), 600, proc, log)
        filled = break_storage(small_tmpfs)
        saved = _checkpoint_epochs(run_dir)  # what was registered before the storage refused writes
        filled_at = time.monotonic()
        rc = proc.wait(timeout=600)
        failed_after_s = time.monotonic() - filled_at
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert rc != 0, output[-4000:]
    line = _error_line(output)
    # Whichever writes first names it: a worker its checkpoint, or Ray Train's controller its run state.
    assert re.fullmatch(rf"eqface: error: step 0 \(kind 1, loop 0\): cannot write (the epoch-\d+ checkpoint|Ray "
                        rf"Train's checkpoints or run state) to {re.escape(str(small_tmpfs))}: {re.escape(reason)}",
                        line), line

    # Every checkpoint registered before the storage refused writes is whole and loads.
    assert saved and max(saved.values()) < 4
    for dir_name, epoch in saved.items():
        ckpt = checkpoints.from_uri(str(run_dir / dir_name))
        assert checkpoints.read_meta(ckpt)["epoch"] == epoch
        assert checkpoints.load_state(ckpt)["epoch"] == epoch
        emb, _ = checkpoints.load_net(ckpt)(torch.zeros(2, 3, 32, 32))
        assert torch.isfinite(emb).all()
    parent, children = _flow_runs(client, name)
    assert parent.info.status == "FAILED" and [c.info.status for c in children] == ["FAILED"]
    assert reason in children[0].data.tags["eqface.error"]
    attempts = _train_run_attempts(stack, f"{name}-{parent.info.run_id[:8]}-00-step1")
    # A worker's failure is retried (max_failures=1: space may be freed); the controller's own is not.
    assert attempts == (2 if "checkpoint to" in line else 1), (line, attempts)
    print(f"\n[{reason}] wrote {filled / 2**20:.1f} MiB after epoch {max(saved.values())}; flow failed "
          f"{failed_after_s:.1f}s later after {attempts} attempts; {len(saved)} earlier checkpoint(s) intact")
