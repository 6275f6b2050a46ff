"""MLflow bookkeeping of a flow: one parent run per flow, one nested child run per training step.

The runs are also the flow's memory: a re-submitted flow finds its parent run by name, skips the
child runs marked complete (their checkpoint URI is recorded on them) and reuses the others, so a
resume never creates duplicate runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import requests
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.config import Config, ConfigError
from flows.credentials import refuse_credentials_in_uri
from flows.steps import PlannedStep, StepKind

log = logging.getLogger(__name__)

TAG_FLOW = "eqface.flow"
TAG_ROLE = "eqface.role"
TAG_INDEX = "eqface.step_index"
TAG_KIND = "eqface.step"
TAG_LOOP = "eqface.loop"
TAG_COMPLETE = "eqface.complete"
TAG_CHECKPOINT = "eqface.checkpoint_uri"
TAG_FINAL_MODEL = "eqface.final_model_uri"
TAG_REGISTERED_MODEL = "eqface.registered_model_uri"  # models:/<tracking.registered_model>/<version>
TAG_LAST_GOOD = "eqface.last_good_checkpoint"  # a diverged step's latest checkpoint with finite weights
TAG_COLLAPSED = "eqface.quality_collapsed"  # the collapse guard's verdict on a quality step, with its figures
PARENT = "mlflow.parentRunId"
# How long marking a failed run waits for MLflow (it may be the reason the step failed).
FAIL_BUDGET_S = 10.0
# Settings that may change between a flow and its resume without changing what it computes, and
# data.skip_corrupt: the way on after a step stopped at a corrupt image (the skipped rows are then logged
# as the step's `corrupt_images_skipped` metric and `eqface.skipped_rows` tag).
# step2.on_collapse: the way on after the collapse guard stopped a flow (warn, and go on).
RESUMABLE_CHANGES = ("scaling.", "tracking.", "flow.max_failures", "flow.checkpoints_to_keep", "data.skip_corrupt",
                     "step2.on_collapse")


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast with one line, instead of the client's minutes of retries, when the server is not there."""
    refuse_credentials_in_uri(uri)  # before the URI is logged anywhere
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
            raise ConnectionError(f"HTTP {resp.status}")
    except (urllib.error.URLError, OSError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"MLflow tracking server at {uri} is unreachable ({reason})") from None


class TrackingOutageError(ConnectionError):
    """MLflow stayed unreachable for longer than tracking.max_outage_s."""


# MLflow's client retries every request itself for ~4 minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7 with
# exponential back-off): a training epoch would stall on it and no limit of ours would hold. Inside
# `_one_attempt` a request is tried once and our own loops retry up to tracking.max_outage_s.
# MLflow reads these variables per request; the lock keeps two of our threads from interleaving them.
_HTTP_ENV_LOCK = threading.RLock()


@contextlib.contextmanager
def _one_attempt(timeout_s: float | None = 30.0):
    overrides = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    if timeout_s is not None:
        overrides["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout_s))
    with _HTTP_ENV_LOCK:
        saved = {k: os.environ.get(k) for k in overrides}
        os.environ.update(overrides)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def transient(exc: BaseException) -> bool:
    """Worth retrying: the server unreachable, timing out or answering 5xx. A 4xx (bad request, no such
    run) is an answer, not an outage."""
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    if isinstance(exc, requests.HTTPError):
        return exc.response is None or exc.response.status_code >= 500
    return isinstance(exc, OSError)  # requests' ConnectionError and Timeout are OSErrors too


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:200] + "..."


def call_with_retries(what: str, fn, uri: str, limit_s: float, timeout_s: float | None = 30.0):
    """fn() against MLflow, retried with back-off while the server is unreachable, for up to limit_s.

    Every call wrapped here is idempotent (tags, terminations, metrics with fixed timestamps, artifacts at
    fixed paths, look-ups), so a retry after a lost answer changes nothing.
    """
    started, delay, attempt = time.monotonic(), 0.5, 0
    while True:
        attempt += 1
        try:
            with _one_attempt(timeout_s):
                return fn()
        except Exception as exc:
            if not transient(exc):
                raise
            waited = time.monotonic() - started
            if waited >= limit_s:
                raise TrackingOutageError(
                    f"MLflow tracking server at {uri} unreachable for over {limit_s:g}s "
                    f"(tracking.max_outage_s) while {what}: {_short(exc)}"
                ) from exc
            pause = min(delay, limit_s - waited)
            log.warning("MLflow unreachable while %s (attempt %d, retrying in %.1fs): %s",
                        what, attempt, pause, _short(exc))
            time.sleep(pause)
            delay = min(delay * 2, 5.0)


@dataclass
class StepRun:
    run_id: str
    complete: bool
    checkpoint_uri: str | None


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the experiment `name`, created if it does not exist yet."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """Every param of a run, in batches of 100 (the most MLflow takes at once)."""
    items = [Param(k, str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


class FlowTracker:
    """The driver's view of the flow's runs."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.uri = cfg, cfg.tracking.resolved_uri()
        check_reachable(self.uri)
        self.max_outage_s = cfg.tracking.max_outage_s
        self.client = MlflowClient(self.uri)
        self.experiment_id = experiment_id(self.client, cfg.tracking.experiment)
        self.parent_id: str | None = None

    # -- the parent run ---------------------------------------------------------------------------
    def find_flow(self):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_FLOW}` = '{self.cfg.flow.name}' and tags.`{TAG_ROLE}` = 'flow'",
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None

    def start_flow(self) -> tuple[str, bool]:
        """Parent run id, and whether it is a resumed flow. Refuses to resume under a different config."""
        existing = self.find_flow()
        if existing is not None:
            self._check_same_config(existing.data.params)
            self.parent_id = existing.info.run_id
            if existing.info.status != RunStatus.to_string(RunStatus.RUNNING):
                self.client.update_run(self.parent_id, status="RUNNING")
            return self.parent_id, True
        run = self.client.create_run(
            self.experiment_id, run_name=self.cfg.flow.name,
            tags={TAG_FLOW: self.cfg.flow.name, TAG_ROLE: "flow"},
        )
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id)
        return self.parent_id, False

    def _check_same_config(self, recorded: dict[str, str]) -> None:
        current = {k: str(v) for k, v in self.cfg.flat().items()}
        changed = [
            k for k in sorted(set(current) | set(recorded))
            if current.get(k) != recorded.get(k) and not k.startswith(RESUMABLE_CHANGES)
        ]
        if changed:
            first = ", ".join(f"{k}: {recorded.get(k)} -> {current.get(k)}" for k in changed[:3])
            raise ConfigError(
                f"flow '{self.cfg.flow.name}' already exists in MLflow with a different config ({first}"
                f"{', ...' if len(changed) > 3 else ''}); resume it unchanged or choose a new flow.name"
            )

    def _log_params(self, run_id: str) -> None:
        log_params(self.client, run_id, self.cfg.flat())

    def call(self, what: str, fn, *args, timeout_s: float | None = 30.0, **kwargs):
        """fn(*args, **kwargs) against MLflow, riding out an outage of up to tracking.max_outage_s."""
        return call_with_retries(what, lambda: fn(*args, **kwargs), self.uri, self.max_outage_s, timeout_s)

    # -- child runs -------------------------------------------------------------------------------
    def step_run(self, step: PlannedStep) -> StepRun:
        # Retried as a whole: a run whose creation answer was lost in an outage is found by the next search.
        return self.call(f"starting the run of step {step.index}", self._step_run, step.index, step.kind, step.loop)

    def _step_run(self, index: int, kind: StepKind, loop: int) -> StepRun:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT}` = '{self.parent_id}' and tags.`{TAG_INDEX}` = '{index}'",
        )
        if runs:
            run = runs[0]
            tags = run.data.tags
            complete = tags.get(TAG_COMPLETE) == "true" and run.info.status == "FINISHED"
            if not complete:
                self.client.update_run(run.info.run_id, status="RUNNING")
                if not run.data.params:  # created, but the outage came before its params
                    self._log_params(run.info.run_id)
            return StepRun(run.info.run_id, complete, tags.get(TAG_CHECKPOINT))
        run = self.client.create_run(
            self.experiment_id, run_name=f"{index}-step{kind}-loop{loop}",
            tags={PARENT: self.parent_id, TAG_FLOW: self.cfg.flow.name, TAG_ROLE: "step",
                  TAG_INDEX: str(index), TAG_KIND: str(kind), TAG_LOOP: str(loop)},
        )
        self._log_params(run.info.run_id)
        return StepRun(run.info.run_id, False, None)

    def log_figures(self, run_id: str, metrics: dict[str, float], artifacts: dict[str, bytes],
                    what: str | None = None) -> None:
        """A step's held-out metrics (at its last epoch) and plots; `what` names the caller's task in errors."""
        what = what or f"logging the held-out figures of run {run_id}"
        now = int(time.time() * 1000)  # fixed before any retry: a re-sent metric is the same row, not a new one
        run = self.call(what, self.client.get_run, run_id)
        final_step = StepKind(int(run.data.tags[TAG_KIND])).settings(self.cfg).epochs
        self.call(what, self.client.log_batch, run_id, metrics=[
            Metric(k, float(v), now, final_step) for k, v in metrics.items() if v == v  # NaN: not logged
        ])
        self.call(what, self.log_artifacts, run_id, artifacts, "plots")

    def mark_quality_collapsed(self, run_id: str, verdict: str) -> None:
        self.call(f"tagging run {run_id}", self.client.set_tag, run_id, TAG_COLLAPSED, verdict[:5000])

    def complete_step(self, run_id: str, checkpoint_uri: str, metrics: dict[str, float],
                      artifacts: dict[str, bytes]) -> None:
        what = f"completing the step run {run_id}"
        self.log_figures(run_id, metrics, artifacts, what)
        # The checkpoint URI last: a run is complete only once everything else is on it.
        self.call(what, self.client.log_batch, run_id,
                  tags=[RunTag(TAG_CHECKPOINT, checkpoint_uri), RunTag(TAG_COMPLETE, "true")])
        self.call(what, self.client.set_terminated, run_id, "FINISHED")

    def mark_last_good_checkpoint(self, run_id: str, checkpoint_uri: str) -> None:
        """Tag a failed (diverged) step's run with the checkpoint to go back to; best effort, like `fail`."""
        try:
            call_with_retries(f"tagging run {run_id}",
                              lambda: self.client.set_tag(run_id, TAG_LAST_GOOD, checkpoint_uri),
                              self.uri, min(self.max_outage_s, FAIL_BUDGET_S))
        except Exception as exc:  # noqa: BLE001 - the step's own error is re-raised by the caller
            log.warning("could not tag run %s with its last good checkpoint: %s", run_id, _short(exc))

    def fail(self, run_id: str | None, message: str) -> None:
        """Best effort, briefly: MLflow itself may be why the step failed, and that error must surface."""
        def mark(rid: str) -> None:
            self.client.set_tag(rid, "eqface.error", message[:5000])
            self.client.set_terminated(rid, "FAILED")

        for rid in (run_id, self.parent_id):
            if rid:
                try:
                    call_with_retries(f"marking run {rid} failed", lambda r=rid: mark(r), self.uri,
                                      min(self.max_outage_s, FAIL_BUDGET_S))
                except Exception as exc:  # noqa: BLE001 - the step's own error is re-raised by the caller
                    log.warning("could not mark run %s failed in MLflow: %s", rid, _short(exc))

    def log_artifacts(self, run_id: str, artifacts: dict[str, bytes], folder: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            for name, data in artifacts.items():
                path = Path(d) / name
                path.write_bytes(data)
                self.client.log_artifact(run_id, str(path), folder)

    # -- the end of the flow ----------------------------------------------------------------------

    def final_model_uri(self) -> str | None:
        run = self.call("reading the flow's run", self.client.get_run, self.parent_id)
        return run.data.tags.get(TAG_FINAL_MODEL)


class EpochLogger:
    """Rank 0's per-epoch metrics to its step's child run, with `step` = epoch.

    Training never waits for MLflow: each epoch's metrics are stamped when measured and sent with one
    quick try; while the server is down they wait in memory and go with the next epoch. `flush`, at the
    end of the step, retries with back-off until the outage has lasted `max_outage_s`, then fails the step
    (its checkpoints hold the metric history; a resume backfills what was not sent). A re-sent metric has
    its original timestamp, so MLflow stores it once.
    """

    def __init__(self, uri: str, run_id: str, max_outage_s: float = 300.0) -> None:
        self.client, self.uri, self.run_id, self.max_outage_s = MlflowClient(uri), uri, run_id, max_outage_s
        self.pending: list[tuple[int, dict[str, float]]] = []  # (timestamp ms, metrics with "epoch")
        self.down_since: float | None = None  # monotonic time of the current outage's first failed send

    def epochs_logged_after(self, epoch: int) -> set[int]:
        """Epochs past this attempt's starting checkpoint that MLflow already has.

        A worker killed after it reported and logged an epoch, but before Ray Train's controller registered that
        epoch's checkpoint, restarts from the checkpoint before: the epoch is trained again but logged only once
        (MLflow keeps the first attempt's figures). One quick try: training does not wait for MLflow.
        """
        try:
            history = call_with_retries("reading the step's metric history",
                                        lambda: self.client.get_metric_history(self.run_id, "loss"), self.uri, 0.0)
        except Exception:  # noqa: BLE001 - unreachable now: at worst an epoch is logged twice
            return set()
        return {m.step for m in history if m.step > epoch}

    def backfill(self, history: list[dict[str, float]]) -> None:
        """After a restart from a checkpoint: send the checkpointed epochs MLflow does not have yet."""
        if not history:
            return
        logged = {m.step for m in call_with_retries(
            "reading the step's metric history", lambda: self.client.get_metric_history(self.run_id, "loss"),
            self.uri, self.max_outage_s)}
        now = int(time.time() * 1000)
        self.pending.extend((now, m) for m in history if int(m["epoch"]) not in logged)
        self._try_send()

    def log_epoch(self, metrics: dict[str, float]) -> None:
        self.pending.append((int(time.time() * 1000), metrics))
        self._try_send()

    def flush(self) -> None:
        delay = 0.5
        while True:
            error = self._try_send()
            if error is None:
                return
            if not transient(error):
                raise error
            down_for = time.monotonic() - self.down_since
            if down_for >= self.max_outage_s:
                raise TrackingOutageError(
                    f"MLflow tracking server at {self.uri} unreachable for over {self.max_outage_s:g}s "
                    f"(tracking.max_outage_s); {len(self.pending)} epochs of metrics not logged to run "
                    f"{self.run_id} (they are in the step's checkpoints: a resume logs them)"
                )
            time.sleep(min(delay, self.max_outage_s - down_for))
            delay = min(delay * 2, 5.0)

    def _try_send(self) -> Exception | None:
        """One quick try to send everything pending, oldest first; the error that stopped it, or None."""
        while self.pending:
            stamp, metrics = self.pending[0]
            epoch = int(metrics["epoch"])
            batch = [Metric(k, float(v), stamp, epoch) for k, v in metrics.items() if k != "epoch"]
            try:
                with _one_attempt():
                    self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # noqa: BLE001 - keep the metrics; flush decides when to give up
                if self.down_since is None:
                    self.down_since = time.monotonic()
                log.warning("MLflow log failed (%s); %d epochs buffered", _short(exc), len(self.pending))
                return exc
            self.pending.pop(0)
        if self.down_since is not None:
            log.warning("MLflow reachable again after %.1fs; buffered metrics sent",
                        time.monotonic() - self.down_since)
            self.down_since = None
        return None
