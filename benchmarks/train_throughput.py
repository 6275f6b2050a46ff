"""Ray Train overhead: images/s of one training step as a 1-worker Ray Train job vs a plain PyTorch loop.

    python -m benchmarks.train_throughput [key.sub=value ...]      # config overrides, as for the flow

All sides run step 1 of the default config (same model, batch size, threads, shards) on this machine, in one
run, best epoch of epochs 2..N each (epoch 1 warms up allocators and starts Ray Data):

* Ray Train, 1 worker: the flow's own step runner (TorchTrainer, Ray Data read + decode + augment in parallel tasks,
  local shuffle, per-epoch checkpoints), images/s as the step logs it (whole epochs, start-up included).
* plain loop, same work: one process reads the same shards and decodes + augments every batch inline with
  the same code (`data.pipeline.decode_batch`), then trains: what a plain PyTorch script would do. The target
  ratio (>= 0.9) is against this loop.
* plain loop, pre-decoded: trains on tensors decoded once and kept in memory, no augmentation: the ceiling
  no real data pipeline reaches; printed so the cost of reading data at all is visible.

`plain_dataloader` is the plain loop with decode + augment in torch DataLoader worker processes (what a plain
GPU script does); benchmarks/gpu_check.py sets it against the Ray job on a GPU. Every plain loop trains with
the config's precision (`scaling.amp` and, for fp16, its GradScaler) as the Ray workers do.

This VM's CPU speed drifts by tens of percent over minutes, so the plain loops run before and after the Ray
job and the better round counts.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from data import storage
from data.pipeline import decode_batch, load_arrays, to_model_input
from data.shards import shard_uris
from flows import checkpoints
from flows.config import DEFAULT_CONFIG, load_config, with_overrides
from flows.runner import Datasets, prepare_datasets, run_step
from flows.step_model import StepModel, build_net_and_head
from flows.steps import PlannedStep, StepKind, StepSpec


class PlainTrainer:
    """Step 1's model and one SGD step per batch, as a plain PyTorch script on `device` would train it: the
    config's autocast and GradScaler (`cfg.scaling`), the same StepModel as the Ray workers."""

    def __init__(self, cfg, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        net, head = build_net_and_head(cfg, num_classes)  # channels_last weights, as in the flow
        self.model = StepModel(1, net, head).to(self.device)
        self.opt = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        self.autocast, self.scaler = cfg.scaling.autocast(self.device), cfg.scaling.grad_scaler(self.device)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One training step on a float (B, 3, H, W) batch; returns the loss (not synchronised)."""
        images = images.to(self.device, non_blocking=True)
        with self.autocast:
            loss, _, _ = self.model(images, labels.to(self.device, non_blocking=True).long())
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def plain_predecoded(cfg, data, epochs: int) -> float:

    arrays = load_arrays(data.train, image_size=cfg.data.image_size)
    images, labels = torch.from_numpy(arrays["image"]), torch.from_numpy(arrays["label"])
    trainer = PlainTrainer(cfg, data.num_classes)
    bs, rates = cfg.step1.batch_size, []
    for _ in range(epochs):
        perm = torch.randperm(len(images))
        start, seen = time.perf_counter(), 0
        for i in range(len(images) // bs):
            idx = perm[i * bs:(i + 1) * bs]
            trainer.step(images[idx], labels[idx])
            seen += len(idx)
        rates.append(seen / (time.perf_counter() - start))
    return max(rates[1:] or rates)


def encoded_rows(data: Datasets) -> dict[str, np.ndarray]:
    """The training set's encoded rows in memory (as a page cache would hold the shards)."""
    tables = [pq.read_table(storage.resolve(u)[1], filesystem=storage.resolve(u)[0],
                            columns=["image", "label", "source"]) for u in shard_uris(data.train)]
    return {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in tables])
            for c in ("image", "label", "source")}


def plain_same_work(cfg, data, epochs: int) -> float:
    """Encoded rows in memory; decode + augment inline, per batch."""
    rows = encoded_rows(data)
    trainer = PlainTrainer(cfg, data.num_classes)
    bs, n, rates = cfg.step1.batch_size, len(rows["label"]), []
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        perm = rng.permutation(n)
        start, seen = time.perf_counter(), 0
        for i in range(n // bs):
            idx = perm[i * bs:(i + 1) * bs]
            batch = decode_batch({c: v[idx] for c, v in rows.items()}, image_size=cfg.data.image_size,
                                 augment=cfg.data.augment, seed=0, nonce=None)
            trainer.step(torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"]))
            seen += len(idx)
        rates.append(seen / (time.perf_counter() - start))
    return max(rates[1:] or rates)


class _EncodedBatches(Dataset):
    """Indexed by a list of row numbers (a BatchSampler's batch): that batch decoded + augmented, uint8 pixels."""

    def __init__(self, rows: dict[str, np.ndarray], cfg) -> None:
        self.rows, self.image_size, self.augment = rows, cfg.data.image_size, cfg.data.augment

    def __len__(self) -> int:
        return len(self.rows["label"])

    def __getitem__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = decode_batch({c: v[idx] for c, v in self.rows.items()}, image_size=self.image_size,
                             augment=self.augment, seed=0, nonce=None, pixels_only=True)
        return {"image": torch.from_numpy(batch["image"]), "label": torch.from_numpy(batch["label"])}


def plain_dataloader(cfg, data, epochs: int, device: torch.device | str, num_workers: int) -> list[float]:
    """images/s per epoch of a plain loop fed by a torch DataLoader: `num_workers` processes decode + augment
    whole batches (the Ray job's decode code), pinned memory on CUDA, the model on `device`."""
    rows = encoded_rows(data)
    trainer = PlainTrainer(cfg, data.num_classes, device)
    sampler = BatchSampler(RandomSampler(range(len(rows["label"])), generator=torch.Generator().manual_seed(0)),
                           cfg.step1.batch_size, drop_last=True)
    loader = DataLoader(_EncodedBatches(rows, cfg), sampler=sampler, batch_size=None, num_workers=num_workers,
                        pin_memory=trainer.device.type == "cuda", persistent_workers=num_workers > 0,
                        prefetch_factor=4 if num_workers > 0 else None)
    rates = []
    for _ in range(epochs):
        start, seen = time.perf_counter(), 0
        for batch in loader:
            pixels = batch["image"].to(trainer.device, non_blocking=True)
            trainer.step(to_model_input(pixels), batch["label"])
            seen += len(batch["label"])
        trainer.sync()
        rates.append(seen / (time.perf_counter() - start))
    return rates


def ray_step(cfg, data, epochs: int, run_name: str, storage_uri: str, num_classes: int | None = None):
    """Step 1 through the flow's own step runner on the Ray already joined; (per-epoch history, checkpoint).
    num_classes: the head's size, when it should be larger than the dataset's label count."""
    cfg = with_overrides(cfg, {"step1.epochs": epochs})
    spec = StepSpec(PlannedStep(0, StepKind.BACKBONE, 0), num_classes or data.num_classes)
    checkpoint = run_step(cfg, spec, data, run_name, storage_uri=storage_uri)
    return checkpoints.load_state(checkpoint)["history"], checkpoint


def ray_loop(cfg, data, epochs: int) -> tuple[float, list[float]]:
    """Step 1 through the flow's own step runner, 1 worker, on a local Ray with every core."""
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as storage:
            history, _ = ray_step(cfg, data, epochs, "throughput", storage)
    finally:
        ray.shutdown()
    rates = [m["images_per_s"] for m in history]
    return max(rates[1:] or rates), rates


def main(argv: list[str]) -> int:
    cfg = load_config([DEFAULT_CONFIG], ["scaling.num_workers=1", "scaling.threads_per_worker=0", *argv])
    data = prepare_datasets(cfg)
    epochs = 4
    torch.set_num_threads(os.cpu_count() or 1)  # the Ray worker uses every core of its node too
    same_work = [plain_same_work(cfg, data, epochs)]
    predecoded = [plain_predecoded(cfg, data, epochs)]
    ray_rate, ray_epochs = ray_loop(cfg, data, epochs)
    torch.set_num_threads(os.cpu_count() or 1)
    same_work.append(plain_same_work(cfg, data, epochs))
    predecoded.append(plain_predecoded(cfg, data, epochs))
    print(f"model {cfg.model.backbone} x{cfg.model.width_mult} @ {cfg.data.image_size}px, "
          f"batch {cfg.step1.batch_size}, {data.num_train} images/epoch, {os.cpu_count()} CPUs, "
          f"best of epochs 2..{epochs}; plain loops before / after the Ray job")
    print(f"plain loop, pre-decoded tensors : {predecoded[0]:7.1f} / {predecoded[1]:7.1f} images/s")
    print(f"plain loop, same work inline    : {same_work[0]:7.1f} / {same_work[1]:7.1f} images/s")
    print(f"Ray Train, 1 worker             : {ray_rate:7.1f} images/s  (epochs: "
          + ", ".join(f"{r:.0f}" for r in ray_epochs) + ")")
    print(f"ratio Ray / plain same work     : {ray_rate / max(same_work):7.3f}   (target >= 0.9)")
    print(f"ratio Ray / plain pre-decoded   : {ray_rate / max(predecoded):7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
