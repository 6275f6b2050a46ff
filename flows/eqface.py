"""The EQFace flow: step 1 -> (step 2 -> step 3) x loops -> step 2, each a Ray Train job, tracked in MLflow.

    ray job submit --working-dir . -- python flows/eqface.py [--config FILE ...] [key.sub=value ...]

Re-submitting a flow with the same `flow.name` resumes it: finished steps are skipped, an interrupted
step continues from its last checkpoint, and no MLflow run is created twice.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python flows/eqface.py`): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.config import Config, ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
LEASE_NAMESPACE = "eqface-train-runs"


@dataclass(frozen=True)
class PlannedStep:
    index: int
    kind: int
    loop: int


def training_plan(loops: int) -> list[PlannedStep]:
    """The paper's training figure: 1, then (2, 3) per loop, and a final 2 so the quality head matches."""
    kinds = [(1, 0)]
    for loop in range(loops):
        kinds += [(2, loop), (3, loop)]
    kinds.append((2, loops))
    return [PlannedStep(i, kind, loop) for i, (kind, loop) in enumerate(kinds)]


@dataclass
class Datasets:
    train: str
    val: str | None
    num_classes: int
    num_train: int


def prepare_datasets(cfg: Config) -> Datasets:
    from data.shards import validate_dataset
    from data.synthetic import SyntheticSpec, ensure_synthetic_dataset

    if cfg.data.train == "synthetic":
        s = cfg.data.synthetic
        spec = SyntheticSpec(num_identities=s.num_identities, train_per_identity=s.train_per_identity,
                             val_per_identity=s.val_per_identity, image_size=cfg.data.image_size, seed=s.seed)
        uris = ensure_synthetic_dataset(os.path.expanduser(cfg.data.cache_root), spec)
        train_uri, val_uri = uris["train"], uris["val"]
    else:
        train_uri, val_uri = cfg.data.train, cfg.data.val
    manifest = validate_dataset(train_uri, check_checksums=False)
    if val_uri:  # decoded now (it is small): a bad held-out image would otherwise fail a step after training
        validate_dataset(val_uri, check_checksums=False, decode_images=True)
    return Datasets(train_uri, val_uri, manifest.num_classes, manifest.num_samples)


def run_step(cfg: Config, step: PlannedStep, data: Datasets, run_id: str, tracking_uri: str,
             init_ckpt, teacher_ckpt, ray_run_name: str):
    """One Ray Train job; returns its final ray.train.Checkpoint."""
    import ray.train

    from data.pipeline import corrupt_row_tally
    from flows import checkpoints
    from flows.train_step import StepSpec, read_divergence, step_trainer

    spec = StepSpec(step.kind, step.index, step.loop, data.num_classes, run_id, tracking_uri,
                    init_checkpoint=init_ckpt, teacher_checkpoint=teacher_ckpt)
    tally = corrupt_row_tally() if cfg.data.skip_corrupt else None  # counts what the decode tasks skip
    trainer, marker = step_trainer(cfg, spec, data.train, data.num_train, ray_run_name, tally=tally)
    try:
        with train_run_lease(ray_run_name):
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        storage_error = checkpoints.storage_error_from(exc, cfg.flow.storage, spec.name)
        if storage_error is None:
            raise
        raise storage_error from None  # one line; Ray has logged the workers' tracebacks
    if tally is not None:
        from flows.preflight import report_skipped_rows

        report_skipped_rows(tally, f"step {step.index}", run_id, tracking_uri)
    diverged = read_divergence(marker)
    if diverged is not None:
        raise _divergence(diverged, result.checkpoint)
    if result.checkpoint is None:
        raise RuntimeError(f"step {step.index}: Ray Train returned no checkpoint")
    return result.checkpoint


def _divergence(record: dict, last_good):
    """The one-line error of a diverged step: where, and which checkpoint is the last good one."""
    from flows import checkpoints
    from flows.train_step import NonFiniteLossError

    if last_good is None:
        kept = "no checkpoint of this step (it diverged before its first)"
    else:
        kept = f"last good checkpoint {checkpoints.checkpoint_uri(last_good)} (epoch {record['epoch'] - 1})"
    return NonFiniteLossError(f"{record['message']}; not retried; {kept}", last_good=last_good)


class _RunLease:
    """A named actor per Ray Train run name, owned by the driver that trains it (it dies with that driver)."""

    def holder(self) -> str:
        import ray

        return ray.get_runtime_context().get_job_id()


@contextmanager
def train_run_lease(name: str, timeout_s: float = 60.0):
    """Only one driver at a time may train a Ray Train run name: a resumed step reuses its name, hence its
    storage directory and checkpoints, and two controllers would write one run. The name is held by an
    actor that Ray kills with its driver, so after a killed driver it frees once Ray has torn that driver's
    actors (controller, workers) down; a name still held after timeout_s belongs to a live submission."""
    import time

    import ray

    lease_cls = ray.remote(num_cpus=0)(_RunLease)
    deadline, waited = time.monotonic() + timeout_s, False
    while True:
        try:
            lease = lease_cls.options(name=f"run:{name}", namespace=LEASE_NAMESPACE).remote()
            break
        except ValueError:  # the name is taken
            if time.monotonic() > deadline:
                try:
                    other = ray.get_actor(f"run:{name}", namespace=LEASE_NAMESPACE)
                    holder = ray.get(other.holder.remote(), timeout=10)
                except Exception:  # noqa: BLE001 - it went meanwhile, or does not answer: the message still holds
                    holder = "unknown"
                raise RuntimeError(
                    f"Ray Train run '{name}' is still being trained by Ray job {holder}: another submission of this "
                    f"flow is running this step; stop it (ray job stop) or wait for it to finish") from None
            if not waited:
                print(f"[eqface] waiting for the previous driver of Ray Train run '{name}' to be torn down", flush=True)
                waited = True
            time.sleep(0.5)
    try:
        yield
    finally:
        ray.kill(lease)


def validate_step(cfg: Config, step: PlannedStep, data: Datasets, ckpt, teacher_ckpt):
    """Held-out metrics as a Ray task: it lands where there is CPU, not on the driver's node by force."""
    import ray

    from flows.validation import validate_checkpoints

    if not data.val:
        return {}, {}
    quality_ckpt = {1: None, 2: ckpt, 3: teacher_ckpt}[step.kind]
    task = ray.remote(num_cpus=cfg.scaling.cpus_per_worker)(validate_checkpoints)
    return ray.get(task.remote(ckpt, quality_ckpt, data.val, cfg.data.image_size, cfg.flow.seed))


def check_ray_address(timeout: float = 5.0) -> None:
    """Ray retries an absent cluster for minutes; say in one line that it is not there instead."""
    import socket

    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith("http"):
        os.environ.pop("RAY_ADDRESS")  # the Jobs API address is for `ray job submit`, not for a driver
        return
    if address in ("", "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"Ray cluster at RAY_ADDRESS={address} is unreachable ({exc})") from None


def run_flow(cfg: Config) -> dict[str, str]:
    import ray

    from flows import checkpoints, preflight
    from flows.tracking import FlowTracker

    tracking_uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "http://127.0.0.1:5000"
    # Everything that can be checked is checked before anything is written.
    tracker = FlowTracker(cfg, tracking_uri)
    check_ray_address()
    data = prepare_datasets(cfg)
    preflight.check_data_fits(cfg, data.num_classes, data.num_train)
    ray.init()  # inside `ray job submit`: the job's cluster; otherwise $RAY_ADDRESS or a new local one
    preflight.check_cluster(cfg)  # use_gpu without GPUs etc.: one line now, not a placement wait forever
    parent_id, resumed = tracker.start_flow()
    print(f"[eqface] flow '{cfg.flow.name}' parent run {parent_id}{' (resumed)' if resumed else ''}", flush=True)

    final_uri = tracker.final_model_uri()
    latest, latest_quality = None, None  # checkpoints of the latest step, and of the latest step 2
    final_metrics: dict[str, float] = {}
    for step in training_plan(cfg.flow.loops):
        run = tracker.step_run(step.index, step.kind, step.loop)
        teacher = latest_quality if step.kind == 3 else None
        if run.complete:
            print(f"[eqface] step {step.index} (kind {step.kind}) already complete: {run.checkpoint_uri}", flush=True)
            try:
                ckpt = checkpoints.from_uri(run.checkpoint_uri)
            except FileNotFoundError as exc:
                message = (f"step {step.index} (kind {step.kind}) is complete in MLflow run {run.run_id}, but "
                           f"{exc}; restore it, or run the flow under a new flow.name")
                tracker.fail(None, message)  # the parent run is not left RUNNING
                raise FileNotFoundError(message) from None
        else:
            print(f"[eqface] step {step.index} (kind {step.kind}, loop {step.loop}) -> run {run.run_id}", flush=True)
            try:
                init = latest if step.kind == 2 or (step.kind == 3 and cfg.step3.init == "continue") else None
                ckpt = run_step(cfg, step, data, run.run_id, tracking_uri, init, teacher,
                                ray_run_name=f"{cfg.flow.name}-{parent_id[:8]}-{step.index:02d}-step{step.kind}")
                metrics, artifacts = validate_step(cfg, step, data, ckpt, teacher)
                tracker.complete_step(run.run_id, checkpoints.checkpoint_uri(ckpt), metrics, artifacts)
                final_metrics = metrics
                print(f"[eqface] step {step.index} done: " +
                      ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())), flush=True)
            except BaseException as exc:
                if getattr(exc, "last_good", None) is not None:  # diverged: the weights to go back to
                    tracker.mark_last_good_checkpoint(run.run_id, checkpoints.checkpoint_uri(exc.last_good))
                from data.pipeline import dataset_error_from

                reason = dataset_error_from(exc) if isinstance(exc, Exception) else None  # not Ray's snippet
                tracker.fail(run.run_id, f"step {step.index} (kind {step.kind}): {reason or exc}")
                raise
        latest = ckpt
        if step.kind == 2:
            latest_quality = ckpt

    if final_uri is None:
        net = checkpoints.load_net(latest_quality)
        final_uri = tracker.log_final_model(net, {f"final_{k}": v for k, v in final_metrics.items()})
    else:
        tracker.client.set_terminated(parent_id, "FINISHED")
    return {"parent_run_id": parent_id, "final_model_uri": final_uri, "tracking_uri": tracking_uri,
            "experiment_id": tracker.experiment_id}


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
        from data.pipeline import dataset_error_from
        from data.shards import DatasetError
        from flows.checkpoints import CheckpointStorageError
        from flows.tracking import TrackingOutageError
        from flows.train_step import NonFiniteLossError
        from infra.ray_errors import remote_error_message

        if isinstance(exc, (NonFiniteLossError, CheckpointStorageError)):  # the workers' logs hold the rest
            print(f"eqface: error: {exc}", file=sys.stderr)
            return 1
        outage = remote_error_message(exc, TrackingOutageError)  # raised in a worker: Ray keeps only its text
        if outage is not None:
            print(f"eqface: error: {outage}", file=sys.stderr)
            return 1

        bad_data = exc if isinstance(exc, DatasetError) else dataset_error_from(exc)  # unwraps Ray's wrappers
        if bad_data is not None:
            print(f"eqface: error: {bad_data}", file=sys.stderr)
            return 2
        import traceback

        traceback.print_exc()
        print(f"eqface: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    ui = summary["tracking_uri"]
    print("\n[eqface] flow finished")
    print(f"[eqface]   MLflow UI:        {ui}/#/experiments/{summary['experiment_id']}/runs/{summary['parent_run_id']}")
    print(f"[eqface]   parent run id:    {summary['parent_run_id']}")
    print(f"[eqface]   final model URI:  {summary['final_model_uri']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

