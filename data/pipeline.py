"""What training and evaluation read: decoded, augmented, normalised image batches.

Reproducibility
---------------
* Decoding is deterministic. Augmentation draws from a per-row generator seeded by
  (seed, crc32(source), nonce).
  `decode_batch(..., nonce=0)` (the default) therefore gives bit-identical output for the same rows and seed,
  whatever batch they arrive in or which process runs them.
* `training_dataset(..., augment_per_epoch=True)` (the default) passes nonce=None so every pass over the data
  (every epoch) draws fresh augmentations: better training, not bit-reproducible. Pass
  `augment_per_epoch=False` for bit-reproducible augmentation (the same augmented view of a row every epoch).
* Row order: Ray Data yields blocks in completion order unless `preserve_order` is set. Use
  `ingest_data_config()` as the TorchTrainer's `dataset_config` to turn it on; with a single training worker
  the sequence of rows is then fixed and `iter_torch_batches(local_shuffle_seed=seed + epoch)` shuffles it
  reproducibly per epoch. With several workers, `streaming_split` hands blocks to whichever worker asks first,
  so each worker's share can differ between runs (the union per epoch is always the whole dataset).
"""

from __future__ import annotations

import io
import logging
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from data import storage
from data.augment import AugmentConfig, augment_image
from data.shards import DatasetError, read_manifest, shard_uris

if TYPE_CHECKING:
    import ray.data
    import ray.train

log = logging.getLogger(__name__)

STRING_COLUMNS = ("image", "identity", "source")
_corrupt_rows_skipped = 0  # per process; Ray Data tasks each count their own


def corrupt_rows_skipped() -> int:
    """How many corrupt rows decode_batch dropped in this process (skip_corrupt=True)."""
    return _corrupt_rows_skipped


def normalise(pixels_hwc_uint8: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    x = pixels_hwc_uint8.astype(np.float32) * (2.0 / 255.0) - 1.0
    return np.moveaxis(x, -1, -3)


def decode_image(data: bytes, image_size: int) -> Image.Image:
    """Bytes -> RGB PIL image of image_size x image_size (greyscale becomes 3 equal channels)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
    return rgb


def _row_name(batch: dict[str, np.ndarray], i: int) -> str:
    parts = [f"{key}={batch[key][i]!s}" for key in ("identity", "source") if key in batch]
    return f"row {i} of batch ({', '.join(parts)})" if parts else f"row {i} of batch"


def _row_key(batch: dict[str, np.ndarray], i: int) -> int:
    if "source" in batch:
        return zlib.crc32(str(batch["source"][i]).encode())
    return zlib.crc32(bytes(batch["image"][i]))


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    image_size: int,
    augment: AugmentConfig | None,
    seed: int,
    skip_corrupt: bool = False,
    nonce: int | None = 0,
) -> dict[str, np.ndarray]:
    """Decode + augment + normalise one batch of rows.

    Returns {"image": float32 (B,3,H,W) in [-1,1], "label": int64 (B,), numeric passthrough columns}.
    String columns (identity, source, degradation_type, ...) are dropped so the batch converts to tensors.
    nonce=None draws fresh randomness for augmentation (see the module docstring).
    """
    global _corrupt_rows_skipped
    images = batch["image"]
    n = len(images)
    keep: list[int] = []
    pixels: list[np.ndarray] = []
    batch_nonce = int(np.random.SeedSequence().entropy % 2**63) if nonce is None else nonce
    for i in range(n):
        try:
            data = images[i]
            if data is None or len(data) == 0:
                raise ValueError("empty image bytes")
            img = decode_image(bytes(data), image_size)
        except Exception as e:
            if not skip_corrupt:
                raise DatasetError(f"corrupt image at {_row_name(batch, i)}: {e}") from e
            _corrupt_rows_skipped += 1
            log.warning("skipping corrupt image at %s: %s", _row_name(batch, i), e)
            continue
        if augment is not None:
            rng = np.random.default_rng([seed, _row_key(batch, i), batch_nonce])
            img = augment_image(img, augment, rng)
        keep.append(i)
        pixels.append(np.asarray(img, dtype=np.uint8))
    if pixels:
        image = normalise(np.stack(pixels))
    else:
        image = np.zeros((0, 3, image_size, image_size), dtype=np.float32)
    out: dict[str, np.ndarray] = {"image": image}
    idx = np.asarray(keep, dtype=np.int64)
    out["label"] = np.asarray(batch["label"])[idx].astype(np.int64)
    for name, col in batch.items():
        if name in out or name in STRING_COLUMNS:
            continue
        arr = np.asarray(col)
        if arr.dtype.kind == "f":
            out[name] = arr[idx].astype(np.float32)
        elif arr.dtype.kind in "iub":
            out[name] = arr[idx].astype(np.int64) if arr.dtype.kind != "b" else arr[idx]
    return out


def dataset_error_from(exc: BaseException) -> DatasetError | None:
    """The DatasetError behind an exception from a Ray Data pipeline, or None.

    Ray re-raises task failures as RayTaskError(UserCodeException) whose cause chain no longer holds the
    DatasetError object, only its formatted traceback; this recovers the message from either.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DatasetError):
            return e
        pending += [getattr(e, "cause", None), e.__cause__, e.__context__]
    marker = f"{DatasetError.__module__}.{DatasetError.__name__}: "
    for line in reversed(str(exc).splitlines()):
        for prefix in (marker, "DatasetError: "):
            if prefix in line:
                return DatasetError(line.split(prefix, 1)[1].strip())
    return None


def _ray_read_inputs(uri: str) -> tuple[Any, list[str], int, int]:
    manifest = read_manifest(uri)
    uris = shard_uris(uri)
    fs, _ = storage.resolve(uri)
    paths = [storage.resolve(u)[1] for u in uris]
    return fs, paths, manifest.num_samples, len(uris)


def training_dataset(
    uri: str,
    *,
    image_size: int,
    augment: AugmentConfig | None,
    seed: int = 0,
    skip_corrupt: bool = False,
    batch_size: int = 256,
    augment_per_epoch: bool = True,
) -> ray.data.Dataset:
    """Ray Dataset of decoded (and augmented) batches, read from the shards listed in the manifest.

    Decoding and augmentation run in parallel Ray Data tasks, never in the training loop. The training
    worker calls `ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=...,
    local_shuffle_buffer_size=..., local_shuffle_seed=seed + epoch)`.
    """
    import ray.data

    fs, paths, num_samples, num_shards = _ray_read_inputs(uri)
    # Split shards into blocks of ~batch_size rows so decoding spreads over the CPUs even with one shard.
    num_blocks = max(num_shards, min(200, -(-num_samples // batch_size)))
    ds = ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=num_blocks)
    return ds.map_batches(
        decode_batch,
        batch_size=batch_size,
        batch_format="numpy",
        zero_copy_batch=True,
        fn_kwargs={
            "image_size": image_size,
            "augment": augment,
            "seed": seed,
            "skip_corrupt": skip_corrupt,
            "nonce": None if augment_per_epoch else 0,
        },
    )


def ingest_data_config(preserve_order: bool = True) -> ray.train.DataConfig:
    """DataConfig for TorchTrainer(dataset_config=...) that keeps Ray Data's block order deterministic."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = preserve_order
    return ray.train.DataConfig(execution_options=options)


def load_arrays(
    uri: str,
    *,
    image_size: int,
    limit: int | None = None,
    columns_extra: tuple[str, ...] = ("degradation",),
) -> dict[str, np.ndarray]:
    """Small eval sets without Ray: {"image": float32 (N,3,H,W), "label": int64, extras present in the data}.

    Extra columns that the dataset lacks are left out; string extras come back as object arrays.
    Reads the shards in manifest order, so the result is deterministic.
    """
    manifest = read_manifest(uri)
    fs, _ = storage.resolve(uri)
    want = ["image", "label", "identity", "source"] + [c for c in columns_extra if c in manifest.columns]
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    extras: dict[str, list[np.ndarray]] = {c: [] for c in want[4:]}
    remaining = manifest.num_samples if limit is None else min(limit, manifest.num_samples)
    for shard_uri in shard_uris(uri):
        if remaining <= 0:
            break
        table = pq.read_table(storage.resolve(shard_uri)[1], filesystem=fs, columns=want)
        table = table.slice(0, remaining)
        remaining -= table.num_rows
        batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in want}
        try:
            decoded = decode_batch(batch, image_size=image_size, augment=None, seed=0)
        except DatasetError as e:
            raise DatasetError(f"{shard_uri}: {e}") from e
        images.append(decoded["image"])
        labels.append(decoded["label"])
        for c in extras:
            col = batch[c]
            extras[c].append(col.astype(np.float32) if col.dtype.kind == "f" else col)
    out = {"image": np.concatenate(images), "label": np.concatenate(labels)}
    out.update({c: np.concatenate(v) for c, v in extras.items()})
    return out
