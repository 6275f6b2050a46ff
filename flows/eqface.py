"""The EQFace flow: step 1 -> (step 2 -> step 3) x loops -> step 2, each a Ray Train job, tracked in MLflow.

    ray job submit --working-dir . -- python flows/eqface.py [--config FILE ...] [key.sub=value ...]

Re-submitting a flow with the same `flow.name` resumes it: finished steps are skipped, an interrupted
step continues from its last checkpoint, and no MLflow run is created twice.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python flows/eqface.py`): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from data.pipeline import dataset_error_from  # noqa: E402
from data.shards import DatasetError  # noqa: E402
from flows import checkpoints  # noqa: E402
from flows.checkpoints import CheckpointStorageError  # noqa: E402
from flows.config import DEFAULT_CONFIG, Config, ConfigError, load_config  # noqa: E402
from flows.model_registry import log_final_model  # noqa: E402
from flows.runner import Datasets, run_step, start_up  # noqa: E402
from flows.steps import PlannedStep, StepSpec, training_plan  # noqa: E402
from flows.tracking import FlowTracker, TrackingOutageError  # noqa: E402
from flows.train_step import NonFiniteLossError  # noqa: E402
from flows.validation import validate_checkpoints  # noqa: E402
from infra.ray_errors import remote_error_message  # noqa: E402
from models.safe_load import UnsafeFileError  # noqa: E402


def run_flow(cfg: Config) -> dict[str, str]:
    tracker = FlowTracker(cfg)  # the tracking server is checked before anything is written
    data = start_up(cfg)
    parent_id, resumed = tracker.start_flow()
    print(f"[eqface] flow '{cfg.flow.name}' parent run {parent_id}{' (resumed)' if resumed else ''}", flush=True)

    final_uri = tracker.final_model_uri()
    # Checkpoints of the latest step, and of the latest step that learnt quality (and that step's run).
    latest, latest_quality, latest_quality_run = None, None, None
    final_metrics: dict[str, float] = {}
    for step in training_plan(cfg.flow.loops):
        run = tracker.step_run(step)
        if run.complete:
            print(f"[eqface] step {step.index} (kind {step.kind}) already complete: {run.checkpoint_uri}", flush=True)
            ckpt = completed_checkpoint(tracker, step, run)
        else:
            print(f"[eqface] {step.name} -> run {run.run_id}", flush=True)
            spec = StepSpec(step, data.num_classes, run.run_id, tracker.uri,
                            init_checkpoint=latest if step.kind.continues(cfg) else None,
                            teacher_checkpoint=latest_quality if step.kind.needs_teacher else None)
            try:
                ckpt = run_step(cfg, spec, data, f"{cfg.flow.name}-{parent_id[:8]}-{step.index:02d}-step{step.kind}")
                final_metrics = complete_step(cfg, tracker, spec, data, ckpt, run.run_id)
            except BaseException as exc:
                fail_step(tracker, step, run.run_id, exc)
                raise
        latest = ckpt
        if step.kind.learns_quality:
            latest_quality, latest_quality_run = ckpt, run.run_id

    if final_uri is None:
        final_uri = log_final_model(tracker, checkpoints.load_net(latest_quality),
                                    {f"final_{k}": v for k, v in final_metrics.items()}, latest_quality_run,
                                    data.train)
    else:
        tracker.client.set_terminated(parent_id, "FINISHED")
    return {"parent_run_id": parent_id, "final_model_uri": final_uri, "tracking_uri": tracker.uri,
            "experiment_id": tracker.experiment_id}


def completed_checkpoint(tracker: FlowTracker, step: PlannedStep, run):
    """The checkpoint of a step a previous submission finished; a clear error when it is gone."""
    try:
        return checkpoints.from_uri(run.checkpoint_uri)
    except FileNotFoundError as exc:
        message = (f"step {step.index} (kind {step.kind}) is complete in MLflow run {run.run_id}, but "
                   f"{exc}; restore it, or run the flow under a new flow.name")
        tracker.fail(None, message)  # the parent run is not left RUNNING
        raise FileNotFoundError(message) from None


def complete_step(cfg: Config, tracker: FlowTracker, spec: StepSpec, data: Datasets, ckpt, run_id: str):
    """Held-out metrics and plots of a trained step onto its run, which is then complete; returns the metrics.
    A quality step whose held-out quality collapsed is tagged, and fails unless step2.on_collapse is "warn"."""
    metrics, artifacts = validate_step(cfg, spec, data, ckpt)
    collapsed = quality_collapse(cfg, spec, metrics)
    if collapsed is not None:
        tracker.mark_quality_collapsed(run_id, collapsed)
        if spec.kind.settings(cfg).on_collapse == "fail":
            tracker.log_figures(run_id, metrics, artifacts)  # the figures stay on the failed run
            raise QualityCollapsedError(f"{collapsed} (step2.on_collapse=warn lets the flow go on)")
        print(f"[eqface] WARNING: {collapsed}; the flow goes on (step2.on_collapse=warn)", flush=True)
    tracker.complete_step(run_id, checkpoints.checkpoint_uri(ckpt), metrics, artifacts)
    print(f"[eqface] step {spec.step.index} done: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())),
          flush=True)
    return metrics


class QualityCollapsedError(RuntimeError):
    """Every held-out face got nearly the same quality after a quality step (the collapse guard)."""


def quality_collapse(cfg: Config, spec: StepSpec, metrics: dict[str, float]) -> str | None:
    """One line with the figures when a step that learnt quality left it collapsed on `data.val`, else None."""
    if not spec.kind.learns_quality or "val_quality_std" not in metrics:
        return None
    settings = spec.kind.settings(cfg)
    std, p05 = metrics["val_quality_std"], metrics["val_quality_p05"]
    tripped = []
    if std < settings.collapse_std:
        tripped.append(f"std {std:.4f} under {settings.KEY}.collapse_std={settings.collapse_std:g}")
    if p05 > settings.collapse_p05:
        tripped.append(f"5th percentile {p05:.4f} over {settings.KEY}.collapse_p05={settings.collapse_p05:g}")
    if not tripped:
        return None
    return (f"{spec.name}: the quality collapsed on the held-out set ({', '.join(tripped)}): "
            f"every face gets nearly the same quality")


def validate_step(cfg: Config, spec: StepSpec, data: Datasets, ckpt):
    """Held-out metrics as a Ray task: it lands where there is CPU, not on the driver's node by force."""
    if not data.val and not data.eval_sets:
        return {}, {}
    quality_ckpt = spec.kind.quality_from(own=ckpt, teacher=spec.teacher_checkpoint)
    task = ray.remote(num_cpus=cfg.scaling.cpus_per_worker)(validate_checkpoints)
    return ray.get(task.remote(ckpt, quality_ckpt, data.val, cfg.data.image_size, cfg.flow.seed,
                               eval_sets=data.eval_sets))


def fail_step(tracker: FlowTracker, step: PlannedStep, run_id: str, exc: BaseException) -> None:
    """Mark the step's run (and the flow's) failed with one line; a diverged step also names its last good
    checkpoint, the weights to go back to."""
    if getattr(exc, "last_good", None) is not None:
        tracker.mark_last_good_checkpoint(run_id, checkpoints.checkpoint_uri(exc.last_good))
    reason = dataset_error_from(exc) if isinstance(exc, Exception) else None  # not Ray's snippet
    tracker.fail(run_id, f"step {step.index} (kind {step.kind}): {reason or exc}")


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[],
                        help="YAML config; repeat to overlay (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied last")
    args = parser.parse_args(argv)
    files = args.config or [DEFAULT_CONFIG]
    return load_config(files, args.overrides)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        summary = run_flow(cfg)
    except (ConfigError, ConnectionError, FileNotFoundError) as exc:
        print(f"eqface: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one clear line at the end, the traceback above it
        return report_failure(exc)
    ui = summary["tracking_uri"]
    print("\n[eqface] flow finished")
    print(f"[eqface]   MLflow UI:        {ui}/#/experiments/{summary['experiment_id']}/runs/{summary['parent_run_id']}")
    print(f"[eqface]   parent run id:    {summary['parent_run_id']}")
    print(f"[eqface]   final model URI:  {summary['final_model_uri']}", flush=True)
    return 0


def report_failure(exc: Exception) -> int:
    """The flow's exit status and last line for a failure: bad data 2, anything else 1."""
    if isinstance(exc, (NonFiniteLossError, CheckpointStorageError, QualityCollapsedError)):  # one line says it
        print(f"eqface: error: {exc}", file=sys.stderr)
        return 1
    outage = remote_error_message(exc, TrackingOutageError)  # raised in a worker: Ray keeps only its text
    if outage is not None:
        print(f"eqface: error: {outage}", file=sys.stderr)
        return 1
    refused = remote_error_message(exc, UnsafeFileError)  # a crafted checkpoint a worker would not load
    if refused is not None:
        print(f"eqface: error: {refused}", file=sys.stderr)
        return 2
    bad_data = exc if isinstance(exc, DatasetError) else dataset_error_from(exc)  # unwraps Ray's wrappers
    if bad_data is not None:
        print(f"eqface: error: {bad_data}", file=sys.stderr)
        return 2
    traceback.print_exc()
    print(f"eqface: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
