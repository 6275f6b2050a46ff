"""Decoded + augmented images/s: Parquet shards through Ray Data vs the same images from a folder through
torch.utils.data.DataLoader (2 workers), with the same decode + augment code, and the same work inline on one
core (no workers: the ceiling per core). One run; the first epoch includes starting workers, later epochs show
the steady state.

    .venv/bin/python -m benchmarks.data_pipeline [--identities 100 --per-identity 40 --image-size 56]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from torch.utils.data import DataLoader, Dataset

from data import storage
from data.augment import AugmentConfig, augment_image
from data.pipeline import decode_image, normalise, to_model_input, training_dataset
from data.shards import shard_uris
from data.synthetic import SyntheticSpec, ensure_synthetic_dataset


def export_folder(uri: str, folder: Path) -> list[tuple[Path, int]]:
    """Write every stored image, bytes unchanged, as folder/<label>/<n>.<ext> (done once, not timed)."""
    items: list[tuple[Path, int]] = []
    done = folder / ".complete"
    fs, _ = storage.resolve(uri)
    n = 0
    for shard in shard_uris(uri):
        table = pq.read_table(storage.resolve(shard)[1], filesystem=fs, columns=["image", "label"])
        images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
        for data, label in zip(images, labels, strict=True):
            ext = "jpg" if data[:2] == b"\xff\xd8" else "png"
            path = folder / str(label) / f"{n:06d}.{ext}"
            if not done.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            items.append((path, label))
            n += 1
    done.touch()
    return items


class FolderFaces(Dataset):
    def __init__(self, items: list[tuple[Path, int]], image_size: int, augment: AugmentConfig, seed: int):
        self.items, self.image_size, self.augment, self.seed = items, image_size, augment, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        img = decode_image(path.read_bytes(), self.image_size)
        img = augment_image(img, self.augment, np.random.default_rng([self.seed, i]))
        return torch.from_numpy(normalise(np.asarray(img, dtype=np.uint8))), label


def time_dataloader(items, image_size: int, augment: AugmentConfig, batch_size: int,
                    epochs: int) -> list[float]:
    loader = DataLoader(FolderFaces(items, image_size, augment, seed=0), batch_size=batch_size, shuffle=True,
                        num_workers=2, persistent_workers=True, generator=torch.Generator().manual_seed(0))
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for images, _ in loader:
            n += images.shape[0]
        rates.append(n / (time.perf_counter() - start))
    return rates


def time_one_core(items, image_size: int, augment: AugmentConfig) -> float:
    """Images/s of FolderFaces read in this process alone: what one core gives, with nothing to hand over."""
    faces = FolderFaces(items, image_size, augment, seed=0)
    start = time.perf_counter()
    for i in range(len(faces)):
        faces[i]
    return len(faces) / (time.perf_counter() - start)


def time_ray(uri: str, image_size: int, augment: AugmentConfig, batch_size: int, epochs: int) -> list[float]:
    """Images/s per epoch, as a training worker reads them (seeded local shuffle, torch batches)."""
    ds = training_dataset(uri, image_size=image_size, augment=augment, seed=0)
    rates = []
    for epoch in range(epochs):
        start, n = time.perf_counter(), 0
        batches = ds.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=1000,
                                        local_shuffle_seed=epoch)
        for batch in batches:
            n += to_model_input(batch["image"]).shape[0]  # the same float (B,3,H,W) the DataLoader yields
        rates.append(n / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--per-identity", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="epoch 0 includes worker start-up")
    parser.add_argument("--cache-root", default=os.path.join("/tmp", "eqface-bench-data"))
    args = parser.parse_args()

    spec = SyntheticSpec(num_identities=args.identities, train_per_identity=args.per_identity,
                         val_per_identity=1, image_size=args.image_size)
    uri = ensure_synthetic_dataset(args.cache_root, spec)["train"]
    items = export_folder(uri, Path(args.cache_root) / f"folder-{spec.cache_key()}")
    augment = AugmentConfig(hflip=True, crop_scale_min=0.9, jpeg_prob=0.2, rescale_prob=0.2)
    print(f"{len(items)} images of {args.image_size} px, augment={augment}, {os.cpu_count()} CPUs")

    torch.set_num_threads(1)
    one_core = time_one_core(items, args.image_size, augment)
    print(f"one core, inline (read + decode + augment + normalise): {one_core:6.0f} img/s")
    loader_rates = time_dataloader(items, args.image_size, augment, args.batch_size, args.epochs)

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        ray_rates = time_ray(uri, args.image_size, augment, args.batch_size, args.epochs)
    finally:
        ray.shutdown()
    for epoch, (loader_rate, ray_rate) in enumerate(zip(loader_rates, ray_rates, strict=True)):
        note = " (includes starting workers)" if epoch == 0 else ""
        print(f"epoch {epoch}{note}: DataLoader (folder, 2 workers) {loader_rate:6.0f} img/s | "
              f"Ray Data (Parquet shards) {ray_rate:6.0f} img/s | "
              f"ratio Ray/DataLoader {ray_rate / loader_rate:.2f}")


if __name__ == "__main__":
    main()
