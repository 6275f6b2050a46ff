"""One trial of the margin search: a driver function that runs the flow's step(s) through the flow's own
step runner (`flows.runner.run_step`), reporting every epoch's held-out metrics to Tune."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from flows.config import Config, ConfigError, with_overrides
from flows.margin_search.space import trial_overrides
from flows.runner import Datasets, run_step
from flows.steps import PlannedStep, StepKind, StepSpec
from flows.train_step import NonFiniteLossError

# Ray Data's decode tasks each ask for one whole CPU: a search leaves that much free beside its trials.
DATA_CPU_RESERVE = 1.0
TRIAL_DRIVER_CPU = 0.01  # the per-trial driver only waits on its TorchTrainer (0 CPU is refused by Tune)


@dataclass
class TrialSetup:
    """What every trial shares; travels to the trial actors through `tune.with_parameters`."""

    base: Config  # the base config, with the trials' resources
    steps: tuple[int, ...]
    reporting: tuple[int, ...]
    data: Datasets
    val_limit: int | None
    train_storage: str  # Ray Train runs of the trials (local path or s3://)


def run_trial(sample: dict[str, Any], setup: TrialSetup) -> None:
    """One trial: step 1 (then step 2) with the trial's margins; every epoch reports to Tune. A step that
    diverges ends the trial (no retries), not the search."""
    cfg = with_overrides(setup.base, trial_overrides(sample))
    trial_id = ray.tune.get_context().get_trial_id()
    checkpoint, offset = None, 0
    for index, number in enumerate(setup.steps):  # the flow's plan starts 1, 2: same indices, same seeds
        kind = StepKind(number)
        spec = StepSpec(PlannedStep(index, kind, 0), setup.data.num_classes, init_checkpoint=checkpoint)
        reports = kind in setup.reporting
        try:
            checkpoint = run_step(
                cfg, spec, setup.data,
                # Stable per trial and step: a trial restarted by `--resume` continues from its checkpoint.
                f"{trial_id}-step{kind}",
                storage_uri=setup.train_storage,
                checkpoints_to_keep=1,
                callbacks=[epoch_report_callback(offset, kind)] if reports else [],
                per_epoch_val={"uri": setup.data.val, "limit": setup.val_limit},
            )
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"trial {trial_id}: {exc} (these margins do not train)") from None
        if reports:
            offset += kind.settings(cfg).epochs


def epoch_report_callback(offset: int, kind: int):
    """TuneReportCallback adding `trial_epoch` (epochs over the trial's steps: ASHA's clock), `step_kind`."""

    class EpochReport(TuneReportCallback):
        def __init__(self) -> None:
            super().__init__()
            self.offset, self.kind = offset, int(kind)

        def after_report(self, run_context, metrics, checkpoint):
            first = {
                **metrics[0],
                "trial_epoch": self.offset + int(metrics[0]["epoch"]),
                "step_kind": self.kind,
            }
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReport()


def plan_trials(cluster: dict[str, float], cfg: Config, cap: int | None = None) -> tuple[int, float]:
    """(trials at once, CPUs per training worker) on this cluster.

    Ray Data's decode tasks each ask for one whole CPU, so one CPU stays free beside the trials; the rest
    holds `floor(rest / (num_workers x cpus_per_worker))` trials, and the workers give up a sliver each
    so the trials' drivers fit too (2 CPUs, 1 worker x 0.5 CPU: 2 trials of 0.49 + 0.01 CPU).
    """
    cpus = cluster.get("CPU", 0.0)
    room = cpus - DATA_CPU_RESERVE
    workers = cfg.scaling.num_workers
    fit = int(room / (workers * cfg.scaling.cpus_per_worker) + 1e-9)
    if cfg.scaling.use_gpu:
        fit = min(fit, int(cluster.get("GPU", 0) // workers))
    concurrent = max(1, min(fit, cap or fit))
    per_worker = min(
        cfg.scaling.cpus_per_worker,
        math.floor(((room / concurrent) - TRIAL_DRIVER_CPU) / workers * 100 + 1e-9) / 100,
    )
    if per_worker <= 0:
        raise ConfigError(
            f"the Ray cluster has {cpus:g} CPUs: too few for {workers} training worker(s) beside the "
            f"{DATA_CPU_RESERVE:g} CPU Ray Data needs"
        )
    return concurrent, per_worker
