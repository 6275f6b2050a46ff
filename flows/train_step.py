"""One EQFace training step, as every Ray Train worker (DDP) runs it: restore, then per epoch train and report.

The driver (flows/runner.py) builds a TorchTrainer around `train_loop_per_worker` and hands it a `StepJob`:
the flow's config, the step (flows/steps.py says what its kind trains and where s_i comes from) and its
inputs. The loop reads top to bottom:

    worker = StepWorker(job)              # model and optimizer; restored from the step's last checkpoint
    for epoch in ...:
        metrics = worker.run_epoch(epoch) # None: the loss or the weights stopped being finite
        worker.report(metrics)            # checkpoint (rank 0, or every rank of a sharded head) + MLflow
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from data import storage
from data.pipeline import load_arrays, to_model_input
from flows import checkpoints
from flows.config import Config
from flows.step_model import StepModel, build_step_model
from flows.steps import StepSpec
from flows.validation import validation_metrics

if TYPE_CHECKING:
    from flows.tracking import EpochLogger


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stops on the last good checkpoint, never on bad weights.

    A divergence repeats when retried from the same checkpoint, so it must not spend Ray Train's
    `max_failures` restarts: given a marker URI (`StepJob.diverged_marker`, set by the driver), the
    workers stop cleanly instead of raising, rank 0 writes the marker, and the driver raises this error
    with `last_good`, the step's latest checkpoint (None when the step diverged before its first one).
    """

    def __init__(self, message: str, last_good: Any = None) -> None:
        super().__init__(message)
        self.last_good = last_good


DIVERGED_MARKER = "diverged.json"  # in the Ray Train run's directory: what diverged, where


@dataclass
class StepJob:
    """What every worker of one step gets (through `train_loop_config`)."""

    cfg: Config
    spec: StepSpec
    samples: int  # training images per epoch (all workers together)
    diverged_marker: str = ""  # empty: a divergence raises NonFiniteLossError in the workers
    # A held-out check every epoch (Ray Tune's ASHA needs an intermediate objective): {"uri", "limit"}.
    per_epoch_val: dict[str, Any] | None = None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    job: StepJob = loop_config["job"]
    worker = StepWorker(job)
    for epoch in range(worker.start_epoch, worker.settings.epochs):
        metrics = worker.run_epoch(epoch)
        if metrics is None:
            break  # diverged: nothing reported, the step's latest checkpoint stays its last good one
        worker.report(metrics)
    worker.finish()


class StepWorker:
    """One worker's state for one step: model, optimizer, data shard, history, MLflow logger."""

    def __init__(self, job: StepJob) -> None:
        self.job, self.cfg, self.spec = job, job.cfg, job.spec
        self.settings = self.spec.kind.settings(self.cfg)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(self.cfg.scaling.threads_per_worker
                              or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
        self.device = ray.train.torch.get_device()

        model = build_step_model(self.cfg, self.spec)
        self.optimizer = self.settings.build_optimizer(p for p in model.parameters() if p.requires_grad)
        self.start_epoch, self.history = self.restore(model, ray.train.get_checkpoint())
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [f"head.{name}" for name in model.head.rank_local_parameters()])
        self.model = ray.train.torch.prepare_model(model)  # moves to device, wraps in DDP when world > 1
        self.inner: StepModel = self.model.module if hasattr(self.model, "module") else self.model

        self.logger, self.logged_ahead = self._logger()
        self.per_epoch_val = (load_arrays(job.per_epoch_val["uri"], image_size=self.cfg.data.image_size,
                                          limit=job.per_epoch_val.get("limit")) if job.per_epoch_val else None)
        self.shard = ray.train.get_dataset_shard("train")
        self.per_epoch = max(1, job.samples // (self.settings.batch_size * self.world))
        self.total_steps = self.per_epoch * self.settings.epochs
        self.warmup = int(self.settings.warmup_epochs * self.per_epoch)
        self.global_step = self.start_epoch * self.per_epoch
        self.autocast = self.cfg.scaling.autocast(self.device)
        self.scaler = self.cfg.scaling.grad_scaler(self.device)  # enabled for fp16 only

    # -- restore ----------------------------------------------------------------------------------
    def restore(self, model: StepModel, resume) -> tuple[int, list[dict[str, float]]]:
        """(first epoch to train, history so far): from the step's own last checkpoint when Ray Train restarts
        it (a worker or the driver died), else from the start."""
        if resume is None:
            return 0, []
        state = checkpoints.load_state_and_centres(resume, model.head)
        model.net.backbone.load_state_dict(state["backbone"])
        model.net.quality.load_state_dict(state["quality"])
        if state.get("world_size", self.world) == self.world and state.get("head_type") == self.cfg.model.head:
            self.optimizer.load_state_dict(state["optimizer"])
        # else: the centres were resharded; momentum restarts (it is not resharded)
        return state["epoch"], state["history"]

    def _logger(self) -> tuple[EpochLogger | None, set[int]]:
        """Rank 0's MLflow logger (none for an untracked step), after sending what a crash left unsent."""
        if self.rank != 0 or not self.spec.mlflow_run_id:
            return None, set()
        from flows.tracking import EpochLogger  # MLflow only for a tracked step: the GPU host has none

        logger = EpochLogger(self.spec.tracking_uri, self.spec.mlflow_run_id,
                              self.cfg.tracking.max_outage_s)
        logger.backfill(self.history)  # epochs checkpointed before a crash but never logged
        return logger, logger.epochs_logged_after(self.start_epoch)  # ... and logged but never checkpointed

    # -- one epoch --------------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> dict[str, float] | None:
        """Train one pass over this worker's shard; the epoch's metrics, or None if it diverged."""
        self.model.train()
        loss_sum, correct, seen, batches, skipped = 0.0, 0, 0, 0, 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        lr = self.settings.lr
        qualities: list[np.ndarray] = []
        started = time.perf_counter()
        batch_iter = self.shard.iter_torch_batches(
            batch_size=self.settings.batch_size, drop_last=True, device=self.device,
            local_shuffle_buffer_size=self.cfg.data.shuffle_buffer or None,
            local_shuffle_seed=self.cfg.flow.seed + 7919 * self.spec.step.index + epoch,
        )
        for batch in batch_iter:
            lr = learning_rate(self.settings.lr, self.global_step, self.total_steps, self.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images, labels = to_model_input(batch["image"]), batch["label"].long()
            with self.autocast:
                loss, cos, quality = self.model(images, labels)
            # Every rank agrees before stepping, so no rank runs on with weights another has refused.
            if _all_sum([0.0 if torch.isfinite(loss) else 1.0])[0] > 0:
                value = loss.item()
                what = f"loss is {value}" if not math.isfinite(value) else "loss is not finite (on another worker)"
                return self._stop_diverged(what, epoch + 1, batches + 1)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else 0.0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # The scaler lowers its scale exactly when it skipped the step (gradients overflowed).
            skipped += int(self.scaler.is_enabled() and self.scaler.get_scale() < scale)
            self.global_step += 1
            batches += 1
            loss_sum += loss.item() * labels.numel()
            correct += self.inner.head.top1_hits(cos, labels)
            seen += labels.numel()
            if quality is not None:
                qualities.append(quality.detach().float().cpu().numpy())
        # BatchNorm statistics can overflow while the loss (on batch statistics) stays finite.
        bad = _first_non_finite(self.inner)
        if _all_sum([1.0 if bad else 0.0])[0] > 0:
            return self._stop_diverged(f"weights are not finite ({bad or 'on another worker'})", epoch + 1, batches)

        elapsed = _all_max(time.perf_counter() - started)
        loss_total, correct_total, seen_total = _all_sum([loss_sum, correct, seen])
        metrics = {
            "epoch": epoch + 1,
            "loss": loss_total / max(1, seen_total),
            "top1": correct_total / max(1, seen_total),
            "lr": lr,
            "images_per_s": seen_total / max(elapsed, 1e-9),
        }
        if self.scaler.is_enabled():  # the loss scale at the epoch's end and how many steps it skipped
            metrics.update(amp_scale=self.scaler.get_scale(), amp_skipped_steps=skipped)
        if self.device.type == "cuda":
            metrics["gpu_peak_memory_gib"] = _all_max(torch.cuda.max_memory_allocated(self.device) / 2**30)
        if self.spec.kind.reports_quality:
            local = np.concatenate(qualities) if qualities else np.zeros(0, np.float32)
            metrics.update(quality_summary(_all_gather_array(local)))
        if self.per_epoch_val is not None:
            metrics.update(self._validate())
        return metrics

    def _validate(self) -> dict[str, float]:
        """The held-out metrics; every rank computes them on the same small set, so all report the same."""
        metrics, _ = validation_metrics(self.inner.net, self.inner.quality_net, self.per_epoch_val, artifacts=False)
        self.inner.train()
        return metrics

    def _stop_diverged(self, what: str, epoch: int, batch: int) -> None:
        """Every rank has seen the divergence at the same batch. With a marker URI rank 0 writes it and all
        ranks stop without error; without one (Tune trials, benchmarks) this raises."""
        message = f"{self.spec.name} diverged: {what} at epoch {epoch}, batch {batch}"
        if not self.job.diverged_marker:
            raise NonFiniteLossError(f"{message}; stopped on the last good checkpoint (epoch {epoch - 1})")
        if self.rank == 0:
            record = {"message": message, "step": self.spec.step.index, "kind": int(self.spec.kind),
                      "epoch": epoch, "batch": batch}
            storage.write_bytes_atomic(self.job.diverged_marker, json.dumps(record).encode())
        return None

    # -- report -----------------------------------------------------------------------------------
    def report(self, metrics: dict[str, float]) -> None:
        """End of epoch: the checkpoint, reported by every rank (Ray Train needs equal report counts), then
        the metrics to MLflow."""
        self.history.append(metrics)
        self._report_checkpoint()
        if self.logger is not None and metrics["epoch"] not in self.logged_ahead:
            self.logger.log_epoch(metrics)

    def _report_checkpoint(self) -> None:
        head, epoch = self.inner.head, self.history[-1]["epoch"]
        if not head.saved_by(self.rank):
            ray.train.report(self.history[-1], checkpoint=None)
            return
        # Ray Train merges the directories that ranks report into one checkpoint: with a sharded head every
        # rank adds its own centres_<start>_<end>.pt next to rank 0's files.
        with checkpoints.temp_dir() as d:
            checkpoints.save_centres(head, Path(d))
            if self.rank == 0:
                state = {
                    "backbone": self.inner.net.backbone.state_dict(), "quality": self.inner.net.quality.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "epoch": epoch, "history": self.history,
                    "world_size": self.world, "head_type": self.cfg.model.head,
                }
                meta = {
                    "kind": int(self.spec.kind), "index": self.spec.step.index, "loop": self.spec.step.loop,
                    "epoch": epoch, "epochs": self.settings.epochs, "num_classes": self.spec.num_classes,
                    "head": self.cfg.model.head,
                }
                checkpoints.write_checkpoint_dir(Path(d), state, self.inner.net, meta)
            try:
                ray.train.report(self.history[-1], checkpoint=ray.train.Checkpoint.from_directory(d))
            except Exception as exc:
                reason = checkpoints.storage_failure(exc)
                if reason is None:
                    raise
                raise checkpoints.CheckpointStorageError(
                    f"{self.spec.name}: cannot write the epoch-{epoch} checkpoint to {self.cfg.flow.storage}: "
                    f"{reason}") from exc

    def finish(self) -> None:
        if self.logger is not None:
            self.logger.flush()


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule, metrics, collectives


def learning_rate(base_lr: float, step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero: smooth, and no milestones to retune per dataset size."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress)))


def quality_summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    p05, p50, p95 = np.percentile(values, [5, 50, 95])
    return {
        "quality_mean": float(values.mean()), "quality_std": float(values.std()),
        "quality_p05": float(p05), "quality_p50": float(p50), "quality_p95": float(p95),
    }


def read_divergence(marker: str) -> dict[str, Any] | None:
    """The record `StepWorker._stop_diverged` left, or None."""
    return json.loads(storage.read_bytes(marker)) if storage.exists(marker) else None


def _first_non_finite(model: nn.Module) -> str | None:
    """Name of the first parameter or buffer that holds NaN/inf, or None."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _all_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _all_max(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _all_gather_array(values: np.ndarray) -> np.ndarray:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return np.concatenate(gathered)
