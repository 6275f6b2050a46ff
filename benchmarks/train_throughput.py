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

from data import storage
from data.pipeline import decode_batch, load_arrays
from data.shards import shard_uris
from flows import checkpoints
from flows.config import load_config, with_overrides
from flows.eqface import DEFAULT_CONFIG
from flows.runner import prepare_datasets, run_step
from flows.step_model import StepModel, build_net_and_head
from flows.steps import PlannedStep, StepKind, StepSpec


def _model(cfg, num_classes: int):
    net, head = build_net_and_head(cfg, num_classes)
    model = StepModel(1, net, head)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    return model, opt


def _train_batch(model, opt, images: torch.Tensor, labels: torch.Tensor) -> None:
    loss, _, _ = model(images, labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


def plain_predecoded(cfg, data, epochs: int) -> float:

    arrays = load_arrays(data.train, image_size=cfg.data.image_size)
    images, labels = torch.from_numpy(arrays["image"]), torch.from_numpy(arrays["label"])
    model, opt = _model(cfg, data.num_classes)
    bs, rates = cfg.step1.batch_size, []
    for _ in range(epochs):
        perm = torch.randperm(len(images))
        start, seen = time.perf_counter(), 0
        for i in range(len(images) // bs):
            idx = perm[i * bs:(i + 1) * bs]
            _train_batch(model, opt, images[idx], labels[idx])
            seen += len(idx)
        rates.append(seen / (time.perf_counter() - start))
    return max(rates[1:] or rates)


def plain_same_work(cfg, data, epochs: int) -> float:
    """Encoded rows in memory (as a page cache would hold the shards); decode + augment inline, per batch."""


    tables = [pq.read_table(storage.resolve(u)[1], filesystem=storage.resolve(u)[0],
                            columns=["image", "label", "source"]) for u in shard_uris(data.train)]
    rows = {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in tables])
            for c in ("image", "label", "source")}
    model, opt = _model(cfg, data.num_classes)
    bs, n, rates = cfg.step1.batch_size, len(rows["label"]), []
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        perm = rng.permutation(n)
        start, seen = time.perf_counter(), 0
        for i in range(n // bs):
            idx = perm[i * bs:(i + 1) * bs]
            batch = decode_batch({c: v[idx] for c, v in rows.items()}, image_size=cfg.data.image_size,
                                 augment=cfg.data.augment, seed=0, nonce=None)
            _train_batch(model, opt, torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"]))
            seen += len(idx)
        rates.append(seen / (time.perf_counter() - start))
    return max(rates[1:] or rates)


def ray_loop(cfg, data, epochs: int) -> tuple[float, list[float]]:
    """Step 1 through the flow's own step runner, 1 worker, on a local Ray with every core."""
    cfg = with_overrides(cfg, {"step1.epochs": epochs})
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as storage:
            spec = StepSpec(PlannedStep(0, StepKind.BACKBONE, 0), data.num_classes)
            checkpoint = run_step(cfg, spec, data, "throughput", storage_uri=storage)
            history = checkpoints.load_state(checkpoint)["history"]
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
