"""Ray Train overhead: images/s of one training step as a 1-worker Ray Train job vs a plain PyTorch loop.

    python -m benchmarks.train_throughput [key.sub=value ...]      # config overrides, as for the flow

Both run step 1 of the default config (same model, batch size, threads, data) on this machine, one after
the other in one run. The Ray side is the flow's own code (TorchTrainer, Ray Data decode + augment,
per-epoch checkpoints); the plain side trains on pre-decoded tensors in memory, the best case for it.
Target: ratio >= 0.9.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

from flows.config import load_config
from flows.eqface import DEFAULT_CONFIG, prepare_datasets
from flows.train_step import StepModel, StepSpec, build_net_and_head, train_loop_per_worker


def plain_loop(cfg, data, epochs: int) -> float:
    from data.pipeline import load_arrays

    torch.set_num_threads(os.cpu_count() or 1)
    arrays = load_arrays(data.train, image_size=cfg.data.image_size)
    images, labels = torch.from_numpy(arrays["image"]), torch.from_numpy(arrays["label"])
    net, head = build_net_and_head(cfg, data.num_classes)
    model = StepModel(1, net, head)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    bs = cfg.step1.batch_size
    rates = []
    for _ in range(epochs):
        perm = torch.randperm(len(images))
        start, seen = time.perf_counter(), 0
        for i in range(len(images) // bs):
            idx = perm[i * bs:(i + 1) * bs]
            loss, _, _ = model(images[idx], labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(idx)
        rates.append(seen / (time.perf_counter() - start))
    return max(rates[1:] or rates)  # first epoch warms up allocators


def ray_loop(cfg, data, epochs: int) -> float:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from data.pipeline import training_dataset

    ray.init(ignore_reinit_error=True)
    spec = StepSpec(1, 0, 0, data.num_classes, mlflow_run_id="", tracking_uri="")
    cfg.step1.epochs = epochs
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.to_dict(), "step": spec, "samples": data.num_train},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
            run_config=ray.train.RunConfig(name="throughput", storage_path=storage),
            datasets={"train": training_dataset(data.train, image_size=cfg.data.image_size,
                                                augment=cfg.data.augment, seed=0)},
        )
        result = trainer.fit()
        history = _history(result)
    rates = [m["images_per_s"] for m in history]
    return max(rates[1:] or rates)


def _history(result):
    from flows import checkpoints

    return checkpoints.load_state(result.checkpoint)["history"]


def main(argv: list[str]) -> int:
    cfg = load_config([DEFAULT_CONFIG], ["scaling.num_workers=1", "scaling.threads_per_worker=0", *argv])
    data = prepare_datasets(cfg)
    epochs = 3
    ray_rate = ray_loop(cfg, data, epochs)
    plain_rate = plain_loop(cfg, data, epochs)
    print(f"model {cfg.model.backbone} x{cfg.model.width_mult} @ {cfg.data.image_size}px, "
          f"batch {cfg.step1.batch_size}, {data.num_train} images, {os.cpu_count()} CPUs, best of epochs 2..{epochs}")
    print(f"plain PyTorch loop : {plain_rate:8.1f} images/s")
    print(f"Ray Train, 1 worker: {ray_rate:8.1f} images/s")
    print(f"ratio Ray/plain    : {ray_rate / plain_rate:8.3f}   (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
