"""MLflow for a margin search: one parent run per search, one child run per trial, logged from the Tune driver."""

from __future__ import annotations

import time
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from flows.config import Config, with_overrides
from flows.margin_search.space import trial_overrides
from flows.tracking import PARENT, TAG_ROLE, check_reachable, experiment_id, log_params

TAG_SEARCH = "eqface.search"
TAG_TRIAL = "eqface.trial_id"
TAG_EARLY_STOP = "eqface.early_stopped"


def _is_step_metric(key: str) -> bool:
    return key in ("loss", "top1", "lr", "images_per_s") or key.startswith(("val_", "quality_", "erc_"))


def family_and_form(sample: dict[str, Any]) -> tuple[str, str]:
    return sample["margins"]["family"], str(sample["form"])


class MlflowTrials(Callback):
    """A Tune callback that mirrors every trial into an MLflow child run of the search's parent run."""

    def __init__(self, uri: str, experiment: str, parent_id: str, search: str, base: Config, max_t: int) -> None:
        self.uri, self.experiment_id, self.parent_id, self.search = uri, experiment, parent_id, search
        self.base, self.max_t = base, max_t
        self.runs: dict[str, str] = {}
        self.last_epoch: dict[str, int] = {}
        self._client = None

    def __getstate__(self):  # pickled into the experiment state: no client, no run cache
        return {**self.__dict__, "_client": None, "runs": {}}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    def run_for(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{PARENT}` = '{self.parent_id}' and tags.`{TAG_TRIAL}` = '{trial.trial_id}'",
        )
        if found:  # a resumed search: the trial keeps its run
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            family, form = family_and_form(trial.config)
            run_id = self.client.create_run(
                self.experiment_id,
                run_name=f"trial-{trial.trial_id}-{family}-{form}",
                tags={
                    PARENT: self.parent_id,
                    TAG_ROLE: "trial",
                    TAG_SEARCH: self.search,
                    TAG_TRIAL: trial.trial_id,
                    "eqface.family": family,
                    "eqface.form": form,
                },
            ).info.run_id
            cfg = with_overrides(self.base, trial_overrides(trial.config))
            params = {**cfg.flat(), "tune.family": family, "tune.trial_id": trial.trial_id}
            log_params(self.client, run_id, params)
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("trial_epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, epoch)
            for k, v in result.items()
            if _is_step_metric(k) and isinstance(v, (int, float)) and v == v
        ]
        self.client.log_batch(self.run_for(trial), metrics=metrics)
        self.last_epoch[trial.trial_id] = epoch

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_for(trial)
        last = self.last_epoch.get(trial.trial_id, int((trial.last_result or {}).get("trial_epoch", 0)))
        # ASHA stops the trials it gives up on before `max_t`; the others run to the end.
        self.client.set_tag(run_id, TAG_EARLY_STOP, str(last < self.max_t).lower())
        self.client.set_tag(run_id, "eqface.last_epoch", str(last))
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_for(trial)
        self.client.set_tag(
            run_id, "eqface.error", str(getattr(trial, "error_file", "") or "trial failed")
        )
        self.client.set_terminated(run_id, "FAILED")


class SearchTracker:
    """The driver's parent run: found again by its search name on `--resume`."""

    def __init__(self, uri: str, experiment: str, search: str) -> None:
        check_reachable(uri)
        self.uri, self.search = uri, search
        self.client = MlflowClient(uri)
        self.experiment_id = experiment_id(self.client, experiment)

    def find(self):
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{TAG_ROLE}` = 'tune' and tags.`{TAG_SEARCH}` = '{self.search}'",
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None

    def start(self, params: dict[str, Any], space_file: str) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"tune-{self.search}",
            tags={TAG_ROLE: "tune", TAG_SEARCH: self.search},
        )
        run_id = run.info.run_id
        log_params(self.client, run_id, params)
        self.client.log_artifact(run_id, space_file, "search")
        return run_id


