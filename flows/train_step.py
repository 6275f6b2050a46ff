"""One EQFace training step, as run by every Ray Train worker (DDP).

    step 1  backbone + margin head learn, s_i = 1                    (paper eq. 3)
    step 2  backbone frozen; only the quality branch learns          (eq. 6, s_i from the branch)
    step 3  a frozen step-2 network is the quality teacher; a backbone + margin head learn with
            its s_i as per-sample weights                            (eq. 6, s_i from the teacher)

The driver (flows/eqface.py) builds a TorchTrainer around `train_loop_per_worker`; the step's
`StepSpec` travels in `train_loop_config` next to the flow's config.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data.pipeline import to_model_input
from flows.config import Config, config_from_dict

QUALITY_STEPS = (2, 3)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stops on the last good checkpoint, never on bad weights.

    A divergence repeats when retried from the same checkpoint, so it must not spend Ray Train's
    `max_failures` restarts: given a marker URI (`loop_config["diverged_marker"]`, set by the flow's driver),
    the workers stop cleanly instead of raising, rank 0 writes the marker, and the driver raises this error
    with `last_good`, the step's latest checkpoint (None when the step diverged before its first one).
    """

    def __init__(self, message: str, last_good: Any = None) -> None:
        super().__init__(message)
        self.last_good = last_good


DIVERGED_MARKER = "diverged.json"  # in the Ray Train run's directory: what diverged, where


@dataclass
class StepSpec:
    """What the driver tells one step: its place in the flow and where its inputs come from."""

    kind: int  # 1, 2 or 3
    index: int  # position in the flow's plan
    loop: int
    num_classes: int
    mlflow_run_id: str
    tracking_uri: str
    init_checkpoint: Any = None  # ray.train.Checkpoint: backbone + head to start from
    teacher_checkpoint: Any = None  # ray.train.Checkpoint of the latest step 2 (step 3 only)

    @property
    def name(self) -> str:
        return f"step {self.index} (kind {self.kind}, loop {self.loop})"


# ---------------------------------------------------------------------------------------------
# The model of a step


def build_net_and_head(cfg: Config, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """The EQFaceNet and the margin head; a sharded head takes this process's rank in the DDP group."""
    from models import MarginHead, build_eqface_net
    from models.partial_fc import ShardedMarginHead

    net = build_eqface_net(
        backbone=cfg.model.backbone, input_size=cfg.data.image_size, embedding_size=cfg.model.embedding_size,
        width_mult=cfg.model.width_mult, dropout=cfg.model.dropout, quality_hidden=cfg.model.quality_hidden,
        quality_pooled=cfg.model.quality_pooled,
    )
    margins = dict(scale=cfg.loss.scale, m1=cfg.loss.m1, m2=cfg.loss.m2, m3=cfg.loss.m3, form=cfg.loss.form,
                   focal_gamma=cfg.loss.focal_gamma)
    if cfg.model.head == "sharded":
        head = ShardedMarginHead(num_classes, cfg.model.embedding_size, sample_rate=cfg.model.head_sample_rate,
                                 **margins)
    else:
        head = MarginHead(num_classes, cfg.model.embedding_size, **margins)
    return net, head


class StepModel(nn.Module):
    """Backbone, quality branch and margin head arranged for one kind of step.

    Only the parts the step trains have requires_grad; frozen parts stay in eval mode whatever
    `.train()` is called with, so their BatchNorm statistics never move.
    """

    def __init__(self, kind: int, net: nn.Module, head: nn.Module, teacher: nn.Module | None = None,
                 train_centres: bool = False) -> None:
        super().__init__()
        if kind == 3 and teacher is None:
            raise ValueError("step 3 needs a quality teacher (a step-2 checkpoint)")
        self.kind, self.net, self.head, self.teacher = kind, net, head, teacher
        trains = {
            1: {"backbone": True, "quality": False, "head": True},
            2: {"backbone": False, "quality": True, "head": train_centres},
            3: {"backbone": True, "quality": False, "head": True},
        }[kind]
        net.backbone.requires_grad_(trains["backbone"])
        net.quality.requires_grad_(trains["quality"])
        head.requires_grad_(trains["head"])
        if teacher is not None:
            teacher.requires_grad_(False)
        self._trains = trains
        self.train()

    def train(self, mode: bool = True) -> StepModel:
        super().train(mode)
        self.net.backbone.train(mode and self._trains["backbone"])
        self.net.quality.train(mode and self._trains["quality"])
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        """-> (loss, cos θ (B, C), s_i (B,) or None)."""
        if self.kind == 1:
            embedding, _ = self.net.backbone(images)
            quality = None
        elif self.kind == 2:
            with torch.no_grad():
                embedding, feature_map = self.net.backbone(images)
            quality = self.net.quality(feature_map.float())
        else:
            with torch.no_grad():
                _, teacher_map = self.teacher.backbone(images)
                quality = self.teacher.quality(teacher_map.float())
            embedding, _ = self.net.backbone(images)
        out = self.head(embedding, labels, quality)
        return out.loss, out.cos, quality


def build_step_model(cfg: Config, spec: StepSpec) -> tuple[StepModel, dict[str, Any] | None]:
    """The step's model initialised from its inputs; returns it and the init state it loaded (if any)."""
    from flows import checkpoints

    torch.manual_seed(cfg.flow.seed + 1000 * spec.index)
    net, head = build_net_and_head(cfg, spec.num_classes)
    teacher = None
    init_state = None
    fresh_start = spec.kind == 1 or (spec.kind == 3 and cfg.step3.init == "scratch")
    if not fresh_start:
        if spec.init_checkpoint is None:
            raise ValueError(f"{spec.name}: needs the previous step's checkpoint to start from")
        init_state = checkpoints.load_state(spec.init_checkpoint)
        net.backbone.load_state_dict(init_state["backbone"])
        checkpoints.load_centres(spec.init_checkpoint, head)
    if spec.kind == 3:
        if spec.teacher_checkpoint is None:
            raise ValueError(f"{spec.name}: step 3 needs a step-2 checkpoint as its quality teacher")
        teacher = checkpoints.load_net(spec.teacher_checkpoint)
        # Carried along so the step-3 checkpoint is a complete network; the next step 2 retrains it.
        net.quality.load_state_dict(teacher.quality.state_dict())
    return StepModel(spec.kind, net, head, teacher, train_centres=cfg.step2.train_centres), init_state


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule and metrics


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


def correct_predictions(head: nn.Module, cos: torch.Tensor, labels: torch.Tensor, rank: int) -> int:
    """Top-1 hits among this rank's samples. A sharded head's `cos` covers the gathered batch but only this
    rank's (sampled) centres, so the best class is found across ranks first."""
    from models.partial_fc import ShardedMarginHead

    if not isinstance(head, ShardedMarginHead):
        return int((cos.argmax(dim=1) == labels).sum())
    values, columns = cos.max(dim=1)
    ids = head.last_class_ids[columns]
    if head.world_size > 1:
        all_values = [torch.empty_like(values) for _ in range(head.world_size)]
        all_ids = [torch.empty_like(ids) for _ in range(head.world_size)]
        dist.all_gather(all_values, values)
        dist.all_gather(all_ids, ids)
        best = torch.stack(all_values).argmax(dim=0, keepdim=True)
        ids = torch.stack(all_ids).gather(0, best)[0]
        n = labels.numel()  # equal per rank: batches are dropped to full size
        ids = ids[rank * n:(rank + 1) * n]
    return int((ids == labels).sum())


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


# ---------------------------------------------------------------------------------------------
# The loop every worker runs


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from flows import checkpoints, tracking

    cfg = config_from_dict(loop_config["config"])
    spec: StepSpec = loop_config["step"]
    step_cfg = cfg.step(spec.kind)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.scaling.threads_per_worker or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()

    model, _ = build_step_model(cfg, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=step_cfg.lr, momentum=step_cfg.momentum,
                                weight_decay=step_cfg.weight_decay)
    history: list[dict[str, float]] = []
    start_epoch = 0
    resume = ray.train.get_checkpoint()  # set when Ray Train restarts this step (worker or driver died)
    if resume is not None:
        state = checkpoints.load_state(resume)
        model.net.backbone.load_state_dict(state["backbone"])
        model.net.quality.load_state_dict(state["quality"])
        checkpoints.load_centres(resume, model.head)
        if state.get("world_size", world) == world and state.get("head_type") == cfg.model.head:
            optimizer.load_state_dict(state["optimizer"])
        # else: the centres were resharded; momentum restarts (it is not resharded)
        start_epoch, history = state["epoch"], state["history"]
    if cfg.model.head == "sharded":
        # Each rank owns different centres: DDP must neither broadcast nor average them.
        head_params = [f"head.{name}" for name, _ in model.head.named_parameters()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, head_params)
    model = ray.train.torch.prepare_model(model)  # moves to device, wraps in DDP when world > 1
    inner: StepModel = model.module if hasattr(model, "module") else model

    # No run id: an untracked step (benchmarks); metrics still go to Ray Train's result.
    logger = (tracking.EpochLogger(spec.tracking_uri, spec.mlflow_run_id, cfg.tracking.max_outage_s)
              if rank == 0 and spec.mlflow_run_id else None)
    logged_ahead: set[int] = set()
    if logger is not None:
        logger.backfill(history)  # epochs checkpointed before a crash but never logged
        logged_ahead = _epochs_logged_after(logger, start_epoch)  # ... and epochs logged but never checkpointed

    # Optional held-out check every epoch (Ray Tune's ASHA needs an intermediate objective): every rank
    # computes it on the same small set, so all report the same metrics.
    per_epoch_val = None
    if loop_config.get("val_each_epoch"):
        from data.pipeline import load_arrays

        val = loop_config["val_each_epoch"]
        per_epoch_val = load_arrays(val["uri"], image_size=cfg.data.image_size, limit=val.get("limit"))

    shard = ray.train.get_dataset_shard("train")
    per_epoch = max(1, loop_config["samples"] // (step_cfg.batch_size * world))
    total_steps = per_epoch * step_cfg.epochs
    warmup = int(step_cfg.warmup_epochs * per_epoch)
    global_step = start_epoch * per_epoch
    autocast = _autocast(cfg, device)
    # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.scaling.amp == "fp16")

    diverged = False
    for epoch in range(start_epoch, step_cfg.epochs):
        model.train()
        loss_sum, correct, seen, batches = 0.0, 0, 0, 0
        qualities: list[np.ndarray] = []
        started = time.perf_counter()
        batch_iter = shard.iter_torch_batches(
            batch_size=step_cfg.batch_size, drop_last=True, device=device,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.flow.seed + 7919 * spec.index + epoch,
        )
        for batch in batch_iter:
            lr = learning_rate(step_cfg.lr, global_step, total_steps, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = to_model_input(batch["image"]), batch["label"].long()
            with autocast:
                loss, cos, quality = model(images, labels)
            # Every rank agrees before stepping, so no rank runs on with weights another has refused.
            if _all_sum([0.0 if torch.isfinite(loss) else 1.0])[0] > 0:
                value = loss.item()
                what = f"loss is {value}" if not math.isfinite(value) else "loss is not finite (on another worker)"
                diverged = _stop_diverged(spec, loop_config, what, epoch + 1, batches + 1, rank)
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            batches += 1
            loss_sum += loss.item() * labels.numel()
            correct += correct_predictions(inner.head, cos, labels, rank)
            seen += labels.numel()
            if quality is not None:
                qualities.append(quality.detach().float().cpu().numpy())
        if not diverged:  # BatchNorm statistics can overflow while the loss (on batch statistics) stays finite
            bad = _first_non_finite(inner)
            if _all_sum([1.0 if bad else 0.0])[0] > 0:
                what = f"weights are not finite ({bad or 'on another worker'})"
                diverged = _stop_diverged(spec, loop_config, what, epoch + 1, batches, rank)
        if diverged:
            break  # nothing reported: the step's latest checkpoint stays its last good one
        elapsed = _all_max(time.perf_counter() - started)
        loss_total, correct_total, seen_total = _all_sum([loss_sum, correct, seen])
        metrics = {
            "epoch": epoch + 1,
            "loss": loss_total / max(1, seen_total),
            "top1": correct_total / max(1, seen_total),
            "lr": lr if batches else step_cfg.lr,
            "images_per_s": seen_total / max(elapsed, 1e-9),
        }
        if spec.kind in QUALITY_STEPS:
            local = np.concatenate(qualities) if qualities else np.zeros(0, np.float32)
            metrics.update(quality_summary(_all_gather_array(local)))
        if per_epoch_val is not None:
            metrics.update(_epoch_validation(inner, per_epoch_val))
        history.append(metrics)
        _report(cfg, spec, inner, optimizer, history, rank)
        if logger is not None:
            if metrics["epoch"] not in logged_ahead:
                logger.log_epoch(metrics)
    if logger is not None:
        logger.flush()


def _epochs_logged_after(logger, epoch: int) -> set[int]:
    """Epochs past this attempt's starting checkpoint that MLflow already has.

    A worker killed after it reported and logged an epoch, but before Ray Train's controller registered that
    epoch's checkpoint, restarts from the checkpoint before: the epoch is trained again but logged only once
    (MLflow keeps the first attempt's figures). One quick try: training does not wait for MLflow.
    """
    from flows import tracking

    try:
        history = tracking.call_with_retries("reading the step's metric history",
                                             lambda: logger.client.get_metric_history(logger.run_id, "loss"),
                                             logger.uri, 0.0)
    except Exception:  # noqa: BLE001 - unreachable now: at worst an epoch is logged twice
        return set()
    return {m.step for m in history if m.step > epoch}


def _first_non_finite(model: nn.Module) -> str | None:
    """Name of the first parameter or buffer that holds NaN/inf, or None."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _stop_diverged(spec: StepSpec, loop_config: dict[str, Any], what: str, epoch: int, batch: int,
                   rank: int) -> bool:
    """Every rank has seen the divergence at the same batch. With a marker URI rank 0 writes it and all
    ranks stop without error (True); without one (Tune trials, benchmarks) this raises as before."""
    import json

    from data import storage

    message = f"{spec.name} diverged: {what} at epoch {epoch}, batch {batch}"
    marker = loop_config.get("diverged_marker")
    if not marker:
        raise NonFiniteLossError(f"{message}; stopped on the last good checkpoint (epoch {epoch - 1})")
    if rank == 0:
        record = {"message": message, "step": spec.index, "kind": spec.kind, "epoch": epoch, "batch": batch}
        storage.write_bytes_atomic(marker, json.dumps(record).encode())
    return True


def step_trainer(cfg: Config, spec: StepSpec, train_uri: str, samples: int, run_name: str, *,
                 storage_uri: str | None = None, checkpoints_to_keep: int | None = None, callbacks=(),
                 loop_extra: dict[str, Any] | None = None, tally: Any = None):
    """The Ray Train job of one step, as the flow and the margin search both run it: the step's Ray Data
    pipeline (seeded by the step's index), DDP over `cfg.scaling`, checkpoints in `storage_uri/run_name`
    (a stable name: the same step started again continues from its last checkpoint), `flow.max_failures`
    restarts, and a divergence marker instead of retries. Returns (TorchTrainer, marker URI): after `fit()`,
    `read_divergence(marker)` says whether the step stopped on non-finite loss or weights."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from data import storage
    from data.pipeline import ingest_data_config, training_dataset

    storage_uri = storage_uri or cfg.flow.storage
    dataset = training_dataset(train_uri, image_size=cfg.data.image_size, augment=cfg.data.augment,
                               seed=cfg.flow.seed + spec.index, skip_corrupt=cfg.data.skip_corrupt, tally=tally,
                               augment_per_epoch=not cfg.data.deterministic)
    fs, storage_path = storage.resolve(storage_uri)
    if not storage.is_s3(storage_uri):
        os.makedirs(storage_path, exist_ok=True)
    marker = storage.join(storage_uri, run_name, DIVERGED_MARKER)
    if storage.exists(marker):  # a resumed step that diverged before: it gets its try, from its last checkpoint
        fs.delete_file(storage.resolve(marker)[1])
    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "step": spec, "samples": samples, "diverged_marker": marker,
                           **(loop_extra or {})},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources,
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


def read_divergence(marker: str) -> dict[str, Any] | None:
    """The record `_stop_diverged` left, or None."""
    import json

    from data import storage

    return json.loads(storage.read_bytes(marker)) if storage.exists(marker) else None


def _epoch_validation(model: StepModel, val: dict[str, np.ndarray]) -> dict[str, float]:
    from flows.validation import validation_metrics

    was_training = model.training
    quality_net = model.net if model.kind == 2 else (model.teacher if model.kind == 3 else None)
    metrics, _ = validation_metrics(model.net, quality_net, val, artifacts=False)
    model.train(was_training)
    return metrics


def _report(cfg: Config, spec: StepSpec, model: StepModel, optimizer, history: list[dict], rank: int) -> None:
    """End of epoch: rank 0 writes the checkpoint; every rank reports (Ray Train needs equal report counts)."""
    from pathlib import Path

    import ray.train

    from flows import checkpoints

    epoch = history[-1]["epoch"]
    sharded = cfg.model.head == "sharded"
    if rank != 0 and not sharded:
        ray.train.report(history[-1], checkpoint=None)
        return
    # Ray Train merges the directories that ranks report into one checkpoint: with a sharded head every
    # rank adds its own centres_<start>_<end>.pt next to rank 0's files.
    with checkpoints.temp_dir() as d:
        checkpoints.save_centres(model.head, Path(d))
        if rank == 0:
            state = {
                "backbone": model.net.backbone.state_dict(), "quality": model.net.quality.state_dict(),
                "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1, "head_type": cfg.model.head,
            }
            meta = {
                "kind": spec.kind, "index": spec.index, "loop": spec.loop, "epoch": epoch,
                "epochs": cfg.step(spec.kind).epochs, "num_classes": spec.num_classes, "head": cfg.model.head,
            }
            checkpoints.write_checkpoint_dir(Path(d), state, model.net, meta)
        try:
            ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(d))
        except Exception as exc:
            reason = checkpoints.storage_failure(exc)
            if reason is None:
                raise
            raise checkpoints.CheckpointStorageError(
                f"{spec.name}: cannot write the epoch-{epoch} checkpoint to {cfg.flow.storage}: {reason}") from exc


def _autocast(cfg: Config, device: torch.device):
    if cfg.scaling.amp == "none":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if cfg.scaling.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
