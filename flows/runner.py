"""Running steps on Ray: the start-up every driver shares, and the one function that runs a step as a Ray Train job.

The flow (flows/eqface.py) and the margin search's trials (flows/margin_search/trial.py) both call `run_step`;
they differ only in its arguments: where checkpoints go, Tune's report callback, a per-epoch held-out check.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from data import storage
from data.pipeline import corrupt_row_tally, ingest_data_config, training_dataset
from data.shards import DatasetError, validate_dataset
from data.splits import DatasetSplit, check_training_set, split_dataset
from data.synthetic import ensure_synthetic_dataset
from flows import checkpoints, preflight
from flows.config import Config
from flows.steps import StepSpec
from flows.train_step import DIVERGED_MARKER, NonFiniteLossError, StepJob, read_divergence, train_loop_per_worker

LEASE_NAMESPACE = "eqface-train-runs"


@dataclass
class Datasets:
    train: str
    val: str | None
    num_classes: int
    num_train: int
    split: DatasetSplit = field(default_factory=lambda: DatasetSplit(0.0, {}))  # data.quality_holdout's parts
    eval_sets: dict[str, str] = field(default_factory=dict)  # more held-out sets, by name

    def size(self, part: str) -> int:
        """Training images in a part of the training set ("fit", "holdout", "all"; StepKind.reads)."""
        return self.split.count(part) if self.split.fraction > 0 else self.num_train


def prepare_datasets(cfg: Config) -> Datasets:
    """The training and held-out sets of the config (the synthetic default is generated on first use), checked."""
    if cfg.data.train == "synthetic":
        uris = ensure_synthetic_dataset(os.path.expanduser(cfg.data.cache_root),
                                        cfg.data.synthetic.spec(cfg.data.image_size))
        train_uri, val_uri = uris["train"], uris["val"]
    else:
        train_uri, val_uri = cfg.data.train, cfg.data.val
    manifest = validate_dataset(train_uri, check_checksums=False)
    # Held-out sets are decoded now (they are small): a bad image would otherwise fail a step after training.
    if val_uri:
        validate_dataset(val_uri, check_checksums=False, decode_images=True)
    for name, uri in cfg.data.eval_sets.items():
        held_out = validate_dataset(uri, check_checksums=False, decode_images=True)
        seen = sorted(set(held_out.label_to_identity) & set(manifest.label_to_identity))
        if seen:
            raise DatasetError(f"data.eval_sets.{name}: {len(seen)} of its people are also in data.train "
                               f"(e.g. {seen[0]!r}), so its figures would not be held out")
    check_training_set(train_uri)
    split = split_dataset(train_uri, cfg.data.quality_holdout, seed=cfg.flow.seed)
    return Datasets(train_uri, val_uri, manifest.num_classes, manifest.num_samples, split, dict(cfg.data.eval_sets))


def start_up(cfg: Config) -> Datasets:
    """What every driver does before it trains: checks everything that can be checked before anything is
    written (the Ray address, the datasets, the scaling against the data), joins the Ray cluster and checks
    that it can host the workers."""
    check_ray_address()
    data = prepare_datasets(cfg)
    preflight.check_data_fits(cfg, data.num_classes, data.size)
    ray.init()  # inside `ray job submit`: the job's cluster; otherwise $RAY_ADDRESS or a new local one
    preflight.check_cluster(cfg)  # use_gpu without GPUs etc.: one line now, not a placement wait forever
    return data


def check_ray_address(timeout: float = 5.0) -> None:
    """Ray retries an absent cluster for minutes; say in one line that it is not there instead."""
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


def step_trainer(cfg: Config, spec: StepSpec, data: Datasets, run_name: str, *, storage_uri: str | None = None,
                 checkpoints_to_keep: int | None = None, callbacks: Sequence[Any] = (),
                 per_epoch_val: dict[str, Any] | None = None, tally: Any = None) -> tuple[TorchTrainer, str]:
    """The Ray Train job of one step: its Ray Data pipeline (seeded by the step's index), DDP over `cfg.scaling`,
    checkpoints in `storage_uri/run_name` (a stable name: the same step started again continues from its last
    checkpoint), `flow.max_failures` restarts, and a divergence marker instead of retries. Returns
    (TorchTrainer, marker URI): after `fit()`, `read_divergence(marker)` says whether the step stopped on
    non-finite loss or weights."""
    storage_uri = storage_uri or cfg.flow.storage
    dataset = training_dataset(data.train, image_size=cfg.data.image_size, augment=cfg.data.augment,
                               seed=cfg.flow.seed + spec.step.index, skip_corrupt=cfg.data.skip_corrupt, tally=tally,
                               augment_per_epoch=not cfg.data.deterministic, rows=data.split.rows(spec.kind.reads))
    fs, storage_path = storage.resolve(storage_uri)
    if not storage.is_s3(storage_uri):
        os.makedirs(storage_path, exist_ok=True)
    marker = storage.join(storage_uri, run_name, DIVERGED_MARKER)
    if storage.exists(marker):  # a resumed step that diverged before: it gets its try, from its last checkpoint
        fs.delete_file(storage.resolve(marker)[1])
    job = StepJob(cfg, spec, data.size(spec.kind.reads), diverged_marker=marker, per_epoch_val=per_epoch_val)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=cfg.scaling.resources_per_worker(),
                                               placement_strategy=cfg.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=fs, callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.flow.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=checkpoints_to_keep or cfg.flow.checkpoints_to_keep),
        ),
        datasets={"train": dataset},
        dataset_config=ingest_data_config(preserve_order=True) if cfg.data.deterministic else None,
    )
    return trainer, marker


def run_step(cfg: Config, spec: StepSpec, data: Datasets, run_name: str, **trainer_options: Any):
    """Fit one step as a Ray Train job (`step_trainer` takes `trainer_options`); returns its final
    ray.train.Checkpoint. Only one driver at a time trains a run name; corrupt rows skipped with
    data.skip_corrupt are reported; a full or read-only checkpoint store and a divergence are one-line errors."""
    tally = corrupt_row_tally() if cfg.data.skip_corrupt else None  # counts what the decode tasks skip
    trainer, marker = step_trainer(cfg, spec, data, run_name, tally=tally, **trainer_options)
    try:
        with train_run_lease(run_name):
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        storage_error = checkpoints.storage_error_from(exc, cfg.flow.storage, spec.name)
        if storage_error is None:
            raise
        raise storage_error from None  # one line; Ray has logged the workers' tracebacks
    if tally is not None:
        preflight.report_skipped_rows(tally, f"step {spec.step.index}", spec.mlflow_run_id, spec.tracking_uri)
    diverged = read_divergence(marker)
    if diverged is not None:
        raise _divergence(diverged, result.checkpoint)
    if result.checkpoint is None:
        raise RuntimeError(f"step {spec.step.index}: Ray Train returned no checkpoint")
    return result.checkpoint


def _divergence(record: dict, last_good) -> NonFiniteLossError:
    """The one-line error of a diverged step: where, and which checkpoint is the last good one."""
    if last_good is None:
        kept = "no checkpoint of this step (it diverged before its first)"
    else:
        kept = f"last good checkpoint {checkpoints.checkpoint_uri(last_good)} (epoch {record['epoch'] - 1})"
    return NonFiniteLossError(f"{record['message']}; not retried; {kept}", last_good=last_good)


class _RunLease:
    """A named actor per Ray Train run name, owned by the driver that trains it (it dies with that driver)."""

    def holder(self) -> str:
        return ray.get_runtime_context().get_job_id()


@contextmanager
def train_run_lease(name: str, timeout_s: float = 60.0):
    """Only one driver at a time may train a Ray Train run name: a resumed step reuses its name, hence its
    storage directory and checkpoints, and two controllers would write one run. The name is held by an
    actor that Ray kills with its driver, so after a killed driver it frees once Ray has torn that driver's
    actors (controller, workers) down; a name still held after timeout_s belongs to a live submission."""
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
