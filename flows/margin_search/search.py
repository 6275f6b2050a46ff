"""The margin search's driver: parse the command line, run the Tune search, write the best config."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from data import storage
from flows.config import DEFAULT_CONFIG, Config, ConfigError, load_config
from flows.margin_search.space import SearchSpace, SpaceError, check_space, load_space, override_yaml, trial_overrides
from flows.margin_search.tracking import MlflowTrials, SearchTracker, family_and_form
from flows.margin_search.trial import TRIAL_DRIVER_CPU, TrialSetup, plan_trials, run_trial
from flows.runner import start_up
from infra.ray_private import gcs_addresses_on_this_host, stop_tune_propagating

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SPACE = ROOT / "configs" / "tune_margins.yaml"


def warn_if_cleaner_is_blind() -> None:
    """ASHA stops a trial by killing its driver, and with it the trial's Train controller; Ray Train's
    detached PlacementGroupCleaner then frees the workers' CPUs. Where several Ray clusters run on one host it
    finds its own only through RAY_ADDRESS; without it the CPUs stay reserved until the search ends."""
    try:
        clusters = len(gcs_addresses_on_this_host())
    except Exception:  # noqa: BLE001 - a private Ray API: a hint, never a failure
        return
    env_vars = ray.get_runtime_context().runtime_env.env_vars() or {}
    if clusters > 1 and "RAY_ADDRESS" not in env_vars:
        gcs = ray.get_runtime_context().gcs_address
        print(f"[tune] warning: {clusters} Ray clusters run on this host and the job's env_vars lack "
              f"RAY_ADDRESS: trials ASHA stops keep their CPUs until the search ends. Submit with "
              f"--runtime-env-json '{{\"env_vars\": {{\"RAY_ADDRESS\": \"{gcs}\"}}}}'", flush=True)


@dataclass
class SearchArgs:
    space: SearchSpace
    cfg: Config
    files: list[str]
    overrides: list[str]
    name: str
    out: Path
    storage: str
    resume: bool


def parse_args(argv: list[str] | None) -> SearchArgs:
    parser = argparse.ArgumentParser(description="Ray Tune search over the margins (m1, m2, m3), the scale S and "
                                                 "the margin form, compared in MLflow.")
    parser.add_argument("--space", default=str(DEFAULT_SPACE), help="search space YAML")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="base config YAML; repeat to overlay (default: configs/default.yaml)",
    )
    parser.add_argument("--name", default=None, help="search name (default: the space's name)")
    parser.add_argument(
        "--out", default=None, help="where best.yaml is written (default: ~/.cache/eqface/tune/NAME)"
    )
    parser.add_argument(
        "--storage", default=None, help="Tune + trial storage, local or s3:// (default: flow.storage/tune)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the search NAME after its driver died"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the base config")
    args = parser.parse_args(argv)
    files = args.config or [str(DEFAULT_CONFIG)]
    space = load_space(args.space)
    cfg = check_space(space, files, args.overrides)
    name = args.name or space.name
    if not name or "/" in name:
        raise SpaceError(f"--name: must be a non-empty name without '/', got {name!r}")
    storage_uri = args.storage or storage.join(cfg.flow.storage, "tune")
    out = Path(os.path.expanduser(args.out or f"~/.cache/eqface/tune/{name}")).resolve()
    return SearchArgs(space, cfg, files, args.overrides, name, out, storage_uri, args.resume)


AWS_CREDENTIAL_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                                 "AWS_SESSION_TOKEN"})


def keep_credentials_out_of_trial_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS keys into every trial actor's runtime env, and Ray's runtime env
    agent logs runtime envs in clear (runtime_env_agent.log). Trials, like every Ray process, find the keys
    in their node's environment (or use the instance profile), so Tune is told not to copy them."""
    stop_tune_propagating(AWS_CREDENTIAL_VARS)


def run_search(args: SearchArgs) -> dict[str, Any]:
    space, cfg, name = args.space, args.cfg, args.name
    tracking_uri = cfg.tracking.resolved_uri()
    tracker = SearchTracker(tracking_uri, cfg.tracking.experiment, name)
    fs, storage_path = storage.resolve(args.storage)
    tune_fs = fs if storage.is_s3(args.storage) else None
    experiment_path = f"{storage_path.rstrip('/')}/{name}"
    restorable = tune.Tuner.can_restore(experiment_path, storage_filesystem=tune_fs)
    existing = tracker.find()
    if not args.resume and (restorable or existing is not None):
        where = storage.join(args.storage, name) if restorable else f"MLflow run {existing.info.run_id}"
        raise ConfigError(
            f"search '{name}' already exists ({where}); pass --resume to continue it or choose another --name"
        )
    data = start_up(cfg)  # one trial must fit (GPUs, CPUs + Ray Data), or Tune would wait forever
    if not data.val:
        raise ConfigError("data.val: a held-out split is needed for the search objective")
    warn_if_cleaner_is_blind()
    cluster = ray.cluster_resources()
    concurrent, cpus_per_worker = plan_trials(cluster, cfg, space.max_concurrent_trials)
    trial_cfg = copy.deepcopy(cfg)  # the trials' resources; what they compute is unchanged
    trial_cfg.scaling.cpus_per_worker = cpus_per_worker
    if not trial_cfg.scaling.threads_per_worker:
        trial_cfg.scaling.threads_per_worker = max(
            1, int(cluster.get("CPU", 1) // (concurrent * cfg.scaling.num_workers))
        )
    max_t = space.max_t(cfg)
    if existing is not None:
        parent_id = existing.info.run_id
        tracker.client.update_run(parent_id, status="RUNNING")
        if "eqface.error" in existing.data.tags:  # the interruption this resume recovers from
            tracker.client.delete_tag(parent_id, "eqface.error")
    else:
        params = {
            **cfg.flat(),
            "search.metric": space.metric,
            "search.mode": space.mode,
            "search.num_samples": space.num_samples,
            "search.steps": list(space.steps),
            "search.families": ",".join(space.families),
            "search.max_concurrent_trials": concurrent,
            "asha.grace_period": space.grace_period,
            "asha.reduction_factor": space.reduction_factor,
            "asha.max_t": max_t,
        }
        parent_id = tracker.start(params, space.path)
    print(
        f"[tune] search '{name}': parent run {parent_id}, {space.num_samples} samples, "
        f"{concurrent} at a time ({cfg.scaling.num_workers} x {cpus_per_worker} CPU each), "
        f"ASHA max_t={max_t} epochs, storage {experiment_path}",
        flush=True,
    )

    setup = TrialSetup(
        base=trial_cfg,
        steps=space.steps,
        reporting=space.reporting_steps(),
        data=data,
        val_limit=space.val_limit,
        train_storage=storage.join(args.storage, f"{name}.trials"),
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_DRIVER_CPU})
    keep_credentials_out_of_trial_runtime_envs()
    started = time.monotonic()
    try:
        if args.resume and restorable:
            print(f"[tune] resuming from {experiment_path}", flush=True)
            tuner = tune.Tuner.restore(
                experiment_path,
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=True,
                storage_filesystem=tune_fs,
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space.param_space(),
                tune_config=tune.TuneConfig(
                    metric=space.metric,
                    mode=space.mode,
                    num_samples=space.num_samples,
                    # The limit goes to the generator: Tune ignores max_concurrent_trials beside one.
                    search_alg=BasicVariantGenerator(random_state=space.seed, max_concurrent=concurrent),
                    scheduler=ASHAScheduler(
                        time_attr="trial_epoch",
                        max_t=max_t,
                        grace_period=space.grace_period,
                        reduction_factor=space.reduction_factor,
                        # A trial at max_t ends by itself: stopping it there would kill its Train run
                        # mid-shutdown, leaving the worker group's placement group to Ray's cleaner.
                        stop_last_trials=False,
                    ),
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage_path,
                    storage_filesystem=tune_fs,
                    verbose=1,
                    callbacks=[MlflowTrials(tracking_uri, tracker.experiment_id, parent_id, name, trial_cfg, max_t)],
                ),
            )
        results = tuner.fit()
        summary = finish_search(args, tracker, parent_id, results, max_t)
    except BaseException as exc:
        tracker.client.set_tag(parent_id, "eqface.error", f"{type(exc).__name__}: {exc}"[:5000])
        tracker.client.set_terminated(
            parent_id, "FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED"
        )
        raise
    summary.update(
        wall_s=time.monotonic() - started,
        tracking_uri=tracking_uri,
        experiment_id=tracker.experiment_id,
        parent_run_id=parent_id,
    )
    return summary


def finish_search(
    args: SearchArgs, tracker: SearchTracker, parent_id: str, results, max_t: int
) -> dict[str, Any]:
    space = args.space
    errors = len(results.errors)
    no_best = RuntimeError(
        f"no trial reported a finite {space.metric} ({errors} of {len(results)} trials failed; a NaN "
        f"erc_auc_fmr1e-3 / val_tar_far1e-3 means the held-out set has too few impostor pairs for that FMR)"
    )
    try:
        best = results.get_best_result(
            metric=space.metric, mode=space.mode, scope="last", filter_nan_and_inf=True
        )
    except RuntimeError:
        raise no_best from None
    if best.metrics is None or space.metric not in best.metrics:
        raise no_best
    overrides = trial_overrides(best.config)
    value = float(best.metrics[space.metric])
    best_trial = best.metrics.get("trial_id", "?")
    family, form = family_and_form(best.config)
    text = override_yaml(
        overrides,
        comment=(
            f"Best of Ray Tune search '{args.name}' (trial {best_trial}, {family}, {form}): "
            f"{space.metric}={value:.4f} after {int(best.metrics.get('trial_epoch', 0))} epochs.\n"
            f"Use: python flows/eqface.py --config configs/default.yaml --config best.yaml"
        ),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    best_path = args.out / "best.yaml"
    best_path.write_text(text)
    load_config([*args.files, best_path], args.overrides)  # the flow must accept it as is
    tracker.client.log_artifact(parent_id, str(best_path), "best")
    tracker.client.log_metric(parent_id, f"best_{space.metric}", value)
    early = sum(1 for r in results if r.metrics and int(r.metrics.get("trial_epoch", max_t)) < max_t)
    tags = {
        "eqface.best_trial": str(best_trial),
        "eqface.best_config": str(best_path),
        "eqface.trials": str(len(results)),
        "eqface.trials_early_stopped": str(early),
        "eqface.trials_failed": str(errors),
    }
    for key, tag in tags.items():
        tracker.client.set_tag(parent_id, key, tag)
    tracker.client.set_terminated(parent_id, "FINISHED")
    return {
        "best_path": str(best_path),
        "best_value": value,
        "best_trial": best_trial,
        "trials": len(results),
        "early_stopped": early,
        "failed": errors,
        "overrides": overrides,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        summary = run_search(args)
    except (ConfigError, ConnectionError, FileNotFoundError) as exc:
        print(f"tune_margins: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one clear line at the end, the traceback above it
        traceback.print_exc()
        print(f"tune_margins: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    ui = summary["tracking_uri"]
    print(
        f"\n[tune] search '{args.name}' finished in {summary['wall_s']:.0f} s: {summary['trials']} trials, "
        f"{summary['early_stopped']} stopped early by ASHA, {summary['failed']} failed"
    )
    print(
        f"[tune]   best trial:   {summary['best_trial']} {args.space.metric}={summary['best_value']:.4f} "
        + " ".join(f"{k}={v}" for k, v in summary["overrides"].items())
    )
    run_url = f"{ui}/#/experiments/{summary['experiment_id']}/runs/{summary['parent_run_id']}"
    print(f"[tune]   MLflow UI:    {run_url}")
    print(f"[tune]   best config:  {summary['best_path']}", flush=True)
    return 0
