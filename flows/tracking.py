"""MLflow bookkeeping of a flow: one parent run per flow, one nested child run per training step.

The runs are also the flow's memory: a re-submitted flow finds its parent run by name, skips the
child runs marked complete (their checkpoint URI is recorded on them) and reuses the others, so a
resume never creates duplicate runs.
"""

from __future__ import annotations

import logging
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from flows.config import Config, ConfigError

log = logging.getLogger(__name__)

TAG_FLOW = "eqface.flow"
TAG_ROLE = "eqface.role"
TAG_INDEX = "eqface.step_index"
TAG_KIND = "eqface.step"
TAG_LOOP = "eqface.loop"
TAG_COMPLETE = "eqface.complete"
TAG_CHECKPOINT = "eqface.checkpoint_uri"
TAG_FINAL_MODEL = "eqface.final_model_uri"
PARENT = "mlflow.parentRunId"
# Settings that may change between a flow and its resume without changing what it computes.
RESUMABLE_CHANGES = ("scaling.", "tracking.", "flow.max_failures", "flow.checkpoints_to_keep")


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast with one line, instead of the client's minutes of retries, when the server is not there."""
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


@dataclass
class StepRun:
    run_id: str
    complete: bool
    checkpoint_uri: str | None


class FlowTracker:
    """The driver's view of the flow's runs."""

    def __init__(self, cfg: Config, uri: str) -> None:
        check_reachable(uri)
        self.cfg, self.uri = cfg, uri
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(cfg.tracking.experiment)
        self.experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(cfg.tracking.experiment)
        )
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
        params = [Param(k, str(v)) for k, v in self.cfg.flat().items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[start:start + 100])

    # -- child runs -------------------------------------------------------------------------------
    def step_run(self, index: int, kind: int, loop: int) -> StepRun:
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
            return StepRun(run.info.run_id, complete, tags.get(TAG_CHECKPOINT))
        run = self.client.create_run(
            self.experiment_id, run_name=f"{index}-step{kind}-loop{loop}",
            tags={PARENT: self.parent_id, TAG_FLOW: self.cfg.flow.name, TAG_ROLE: "step",
                  TAG_INDEX: str(index), TAG_KIND: str(kind), TAG_LOOP: str(loop)},
        )
        self._log_params(run.info.run_id)
        return StepRun(run.info.run_id, False, None)

    def complete_step(self, run_id: str, checkpoint_uri: str, metrics: dict[str, float],
                      artifacts: dict[str, bytes]) -> None:
        now = int(time.time() * 1000)
        final_step = self.cfg.step(int(self.client.get_run(run_id).data.tags[TAG_KIND])).epochs
        self.client.log_batch(run_id, metrics=[
            Metric(k, float(v), now, final_step) for k, v in metrics.items() if v == v  # NaN: not logged
        ])
        self.log_artifacts(run_id, artifacts, "plots")
        # The checkpoint URI last: a run is complete only once everything else is on it.
        self.client.log_batch(run_id, tags=[RunTag(TAG_CHECKPOINT, checkpoint_uri), RunTag(TAG_COMPLETE, "true")])
        self.client.set_terminated(run_id, "FINISHED")

    def fail(self, run_id: str | None, message: str) -> None:
        for rid in (run_id, self.parent_id):
            if rid:
                self.client.set_tag(rid, "eqface.error", message[:5000])
                self.client.set_terminated(rid, "FAILED")

    def log_artifacts(self, run_id: str, artifacts: dict[str, bytes], folder: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            for name, data in artifacts.items():
                path = Path(d) / name
                path.write_bytes(data)
                self.client.log_artifact(run_id, str(path), folder)

    # -- the end of the flow ----------------------------------------------------------------------
    def log_final_model(self, net, metrics: dict[str, float]) -> str:
        """The final EQFaceNet as an MLflow model on the parent run: loads with mlflow.pytorch.load_model."""
        import mlflow
        import mlflow.pytorch
        import torch

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.parent_id):
            # Pickle + the `models` package as code: loads as the same EQFaceNet class, any batch size.
            info = mlflow.pytorch.log_model(
                net.eval(), name="model", code_paths=[_models_dir()], serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
            mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})
        self.client.set_tag(self.parent_id, TAG_FINAL_MODEL, info.model_uri)
        self.client.set_terminated(self.parent_id, "FINISHED")
        return info.model_uri

    def final_model_uri(self) -> str | None:
        run = self.client.get_run(self.parent_id)
        return run.data.tags.get(TAG_FINAL_MODEL)


def _models_dir() -> str:
    """The `models` package travels with the MLflow model, so it loads without this repository."""
    return str(Path(__file__).resolve().parents[1] / "models")


class EpochLogger:
    """Rank 0's per-epoch metrics to its step's child run, with `step` = epoch.

    Metrics that cannot be sent (server down) are kept and sent with the next epoch; `flush` at the
    end of the step retries with back-off up to `give_up_after_s` before failing the step.
    """

    def __init__(self, uri: str, run_id: str, give_up_after_s: float = 300.0) -> None:
        self.client, self.run_id, self.give_up_after_s = MlflowClient(uri), run_id, give_up_after_s
        self.pending: list[dict[str, float]] = []

    def backfill(self, history: list[dict[str, float]]) -> None:
        """After a restart from a checkpoint: send the checkpointed epochs MLflow does not have yet."""
        if not history:
            return
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "loss")}
        self.pending.extend(m for m in history if int(m["epoch"]) not in logged)
        self._try_send()

    def log_epoch(self, metrics: dict[str, float]) -> None:
        self.pending.append(metrics)
        self._try_send()

    def flush(self) -> None:
        deadline = time.monotonic() + self.give_up_after_s
        delay = 1.0
        while self.pending:
            if self._try_send():
                return
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"MLflow unreachable for over {self.give_up_after_s:.0f}s; "
                    f"{len(self.pending)} epochs of metrics not logged to run {self.run_id}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _try_send(self) -> bool:
        while self.pending:
            metrics = self.pending[0]
            epoch = int(metrics["epoch"])
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # noqa: BLE001 - any transport error: keep the metrics, retry later
                log.warning("MLflow log failed (%s); %d epochs buffered", exc, len(self.pending))
                return False
            self.pending.pop(0)
        return True
