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

import contextlib
import functools
import io
import logging
import posixpath
import warnings
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
from PIL import Image

from data import storage
from data.augment import AugmentConfig, augment_image
from data.shards import DatasetError, read_manifest, shard_uris
from infra.ray_errors import exception_chain, remote_error_message

if TYPE_CHECKING:
    import torch  # the workers' tensors; this module itself runs without torch (Ray Data decode tasks)

log = logging.getLogger(__name__)

STRING_COLUMNS = ("image", "identity", "source")
_corrupt_rows_skipped = 0  # per process; Ray Data tasks each count their own
_skipped_rows: list[str] = []  # where the skipped rows were, until a tally (see corrupt_row_tally) takes them


def corrupt_rows_skipped() -> int:
    """How many corrupt rows decode_batch dropped in this process (skip_corrupt=True)."""
    return _corrupt_rows_skipped


def normalise(pixels_hwc_uint8: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    x = pixels_hwc_uint8.astype(np.float32) * (2.0 / 255.0) - 1.0
    return np.moveaxis(x, -1, -3)


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], on the tensor's device: `normalise` in torch."""
    return pixels.permute(0, 3, 1, 2).float().mul_(2.0 / 255.0).sub_(1.0).contiguous()


class WrongImageSize(ValueError):
    """An image whose size is not the one its dataset's manifest states (e.g. a shard from another dataset)."""


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Inside: PIL refuses to open an image of more than `max_pixels` (Image.DecompressionBombError or
    DecompressionBombWarning raised), whatever it was set to before, which is restored after."""
    saved_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = max_pixels
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its limit; refuse everything above it.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: greyscale repeated, alpha dropped, CMYK converted, 16-bit / 32-bit / float
    rescaled (PIL's own convert("RGB") clips those to near-white)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, image_size: int, expect_size: tuple[int, int] | None = None) -> Image.Image:
    """Bytes -> RGB PIL image of image_size x image_size (greyscale becomes 3 equal channels).

    expect_size=(width, height), the size a dataset's manifest states: an image of another size raises
    WrongImageSize (from the header, before decoding) instead of being resized silently.
    """
    with Image.open(io.BytesIO(data)) as img:
        if expect_size is not None and img.size != tuple(expect_size):
            raise WrongImageSize(f"image is {img.width}x{img.height} px, the dataset's manifest says "
                                 f"{expect_size[0]}x{expect_size[1]}")
        img.load()
        rgb = to_rgb(img)
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
    return rgb


def _row_name(batch: dict[str, np.ndarray], i: int, dataset: str | None = None) -> str:
    """'<shard> row N (identity=.., source=..)' when the batch carries its shard's path (Ray Data's
    row-group reader, load_arrays) and the dataset URI is known; else 'row i of batch (...)'."""
    parts = [f"{key}={batch[key][i]!s}" for key in ("identity", "source") if key in batch]
    suffix = f" ({', '.join(parts)})" if parts else ""
    if dataset and "path" in batch:
        shard = storage.join(dataset, posixpath.basename(str(batch["path"][i])))
        row = int(batch["row"][i]) if "row" in batch else "?"
        return f"{shard} row {row}{suffix}"
    return f"row {i} of batch{suffix}"


@functools.lru_cache(maxsize=8)
def _manifest_size(dataset: str) -> tuple[int, int] | None:
    """(width, height) the dataset's manifest states for every image; None for a mixed-size dataset."""
    size = read_manifest(dataset).image_size
    return (int(size[1]), int(size[0])) if size else None


def _bad_image(e: Exception) -> tuple[str, str]:
    """(what, why) of an image that failed to decode, in words (PIL's own message names a BytesIO)."""
    if isinstance(e, WrongImageSize):
        return "wrong-size image", str(e)
    if isinstance(e, Image.UnidentifiedImageError):
        return "corrupt image", "not an image PIL can identify"
    return "corrupt image", f"{type(e).__name__}: {e}"


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
    pixels_only: bool = False,
    dataset: str | None = None,
) -> dict[str, np.ndarray]:
    """Decode + augment + normalise one batch of rows.

    Returns {"image": float32 (B,3,H,W) in [-1,1], "label": int64 (B,), numeric passthrough columns}.
    pixels_only=True skips the normalisation and returns "image" as uint8 (B,H,W,3): a quarter of the bytes
    through Ray's object store and the shuffle buffer; the training loop normalises on its device
    (`to_model_input`).
    String columns (identity, source, degradation_type, ...) are dropped so the batch converts to tensors.
    nonce=None draws fresh randomness for augmentation (see the module docstring).
    dataset: the URI the rows come from. Then an image whose size differs from the one its manifest states
    is refused like a corrupt one, and errors name the shard and row (with a "path" column in the batch).
    """
    global _corrupt_rows_skipped
    images = batch["image"]
    n = len(images)
    keep: list[int] = []
    pixels: list[np.ndarray] = []
    batch_nonce = int(np.random.SeedSequence().entropy % 2**63) if nonce is None else nonce
    expect_size = _manifest_size(dataset) if dataset else None
    for i in range(n):
        try:
            data = images[i]
            if data is None or len(data) == 0:
                raise ValueError("empty image bytes")
            img = decode_image(bytes(data), image_size, expect_size)
        except Exception as e:
            what, why = _bad_image(e)
            where = _row_name(batch, i, dataset)
            if not skip_corrupt:
                raise DatasetError(f"{what} at {where}: {why}") from e
            _corrupt_rows_skipped += 1
            _skipped_rows.append(where)
            log.warning("skipping %s at %s: %s", what, where, why)
            continue
        if augment is not None:
            rng = np.random.default_rng([seed, _row_key(batch, i), batch_nonce])
            img = augment_image(img, augment, rng)
        keep.append(i)
        pixels.append(np.asarray(img, dtype=np.uint8))
    if pixels_only:
        image = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), dtype=np.uint8)
    elif pixels:
        image = normalise(np.stack(pixels))
    else:
        image = np.zeros((0, 3, image_size, image_size), dtype=np.float32)
    out: dict[str, np.ndarray] = {"image": image}
    idx = np.asarray(keep, dtype=np.int64)
    out["label"] = np.asarray(batch["label"])[idx].astype(np.int64)
    for name, col in batch.items():
        if name in out or name in STRING_COLUMNS or name == "row":  # "row": where it came from, not data
            continue
        arr = np.asarray(col)
        if arr.dtype.kind == "f":
            out[name] = arr[idx].astype(np.float32)
        elif arr.dtype.kind in "iub":
            out[name] = arr[idx].astype(np.int64) if arr.dtype.kind != "b" else arr[idx]
    return out


def dataset_error_from(exc: BaseException) -> DatasetError | None:
    """The DatasetError behind an exception from a Ray Data pipeline or a Ray Train worker, or None: the object
    itself where Ray kept it, else one rebuilt from the message in Ray's formatted traceback."""

    for e in exception_chain(exc):
        if isinstance(e, DatasetError):
            return e
    message = remote_error_message(exc, DatasetError)
    return None if message is None else DatasetError(message)


def read_row_groups(uri: str, rows: dict[str, np.ndarray] | None = None) -> ray.data.Dataset:
    """The dataset's rows as a Ray Dataset whose unit of work is one Parquet row group, not one shard.

    `ray.data.read_parquet` makes one read task per file, and the decode map fused with it then decodes a
    whole shard in that one task: a dataset of few shards decodes on one core and yields nothing until the
    shard is done (measured: the first batch of each epoch arrived only after the whole 4,000-image default
    set was decoded). Row groups (data.shards.ROW_GROUP_BYTES) are small enough to spread over every CPU and
    to stream. Rows carry "path" (the shard, as read_parquet's include_paths gives it) and "row" (the row in
    that shard), so errors name the exact row. Tasks get URIs, never a filesystem object: S3 credentials
    stay in the environment, out of task specs. `rows`: shard URI -> the rows to read (a part of a
    data.splits.DatasetSplit); every row by default.
    """
    read_manifest(uri)  # a clear error for a missing or unfinished dataset, before any task runs
    units = []
    for shard in shard_uris(uri):
        fs, path = storage.resolve(shard)
        metadata = pq.read_metadata(path, filesystem=fs)
        first = 0
        for group in range(metadata.num_row_groups):
            size = metadata.row_group(group).num_rows
            unit = {"shard": shard, "row_group": group, "first_row": first, "take": []}
            if rows is not None:
                wanted = rows[shard]
                unit["take"] = (wanted[(wanted >= first) & (wanted < first + size)] - first).tolist()
            if rows is None or unit["take"]:
                units.append(unit)
            first += size
    return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _read_row_group, batch_size=1, batch_format="numpy")


def _read_row_group(unit: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    shard, group, first = str(unit["shard"][0]), int(unit["row_group"][0]), int(unit["first_row"][0])
    take = np.asarray(unit["take"][0], dtype=np.int64)  # empty: the whole row group
    fs, path = storage.resolve(shard)
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read_row_group(group)
    index = take if take.size else np.arange(table.num_rows)
    if take.size:
        table = table.take(take)
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    batch["path"] = np.full(table.num_rows, path, dtype=object)
    batch["row"] = first + index
    return batch


def training_dataset(
    uri: str,
    *,
    image_size: int,
    augment: AugmentConfig | None,
    seed: int = 0,
    skip_corrupt: bool = False,
    batch_size: int | None = None,
    augment_per_epoch: bool = True,
    tally: Any = None,
    rows: dict[str, np.ndarray] | None = None,
) -> ray.data.Dataset:
    """Ray Dataset of decoded (and augmented) batches, read from the shards listed in the manifest.

    Decoding and augmentation run in parallel Ray Data tasks, never in the training loop. Rows carry
    uint8 (H, W, 3) pixels; the worker turns a batch into model input with `to_model_input`. The training
    worker calls `ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=...,
    local_shuffle_buffer_size=..., local_shuffle_seed=seed + epoch)`.
    Errors name the shard and row. tally: a `corrupt_row_tally()` actor that collects the rows skipped with
    skip_corrupt=True (each Ray Data task only knows its own). rows: only these rows of each shard (see
    `read_row_groups`).

    batch_size None (the default) decodes one row group per task. The decode map is fused with the row-group
    read, and Ray Data bundles a fused task's *input* rows up to the batch size: those rows are row-group
    descriptors, so batch_size=256 put every row group of a dataset under 256 groups into one task
    (measured: the default set decoded in one task on one core, its first batch only after all 4,000
    images). A number groups that many row groups per task.
    """
    ds = read_row_groups(uri, rows)  # with "path" and "row" columns: a bad row is named by its shard and row
    return ds.map_batches(
        decode_batch if tally is None else _decode_and_tally,
        batch_size=batch_size,
        batch_format="numpy",
        zero_copy_batch=True,
        fn_kwargs={
            "image_size": image_size,
            "augment": augment,
            "seed": seed,
            "skip_corrupt": skip_corrupt,
            "nonce": None if augment_per_epoch else 0,
            "pixels_only": True,
            "dataset": uri,
            **({} if tally is None else {"tally": tally}),
        },
    )


class _RowTally:
    """Where the skipped rows were, from every Ray Data task (a set: each epoch decodes them again)."""

    def __init__(self) -> None:
        self.rows: set[str] = set()

    def add(self, rows: list[str]) -> None:
        self.rows.update(rows)

    def skipped(self) -> list[str]:
        return sorted(self.rows)


def corrupt_row_tally():
    """A Ray actor for `training_dataset(tally=...)`; `ray.get(tally.skipped.remote())` lists the rows."""

    return ray.remote(num_cpus=0)(_RowTally).remote()


def _decode_and_tally(batch: dict[str, np.ndarray], *, tally: Any, **kwargs: Any) -> dict[str, np.ndarray]:
    del _skipped_rows[:]
    out = decode_batch(batch, **kwargs)
    if _skipped_rows:

        ray.get(tally.add.remote(list(_skipped_rows)))  # waited for: the task may end right after
        del _skipped_rows[:]
    return out


def ingest_data_config(preserve_order: bool = True) -> ray.train.DataConfig:
    """DataConfig for TorchTrainer(dataset_config=...) that keeps Ray Data's block order deterministic."""

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
        # where a bad row is: the shard and the row in it (the slice starts at the shard's first row)
        batch["path"] = np.full(table.num_rows, storage.resolve(shard_uri)[1], dtype=object)
        batch["row"] = np.arange(table.num_rows, dtype=np.int64)
        decoded = decode_batch(batch, image_size=image_size, augment=None, seed=0, dataset=uri)
        images.append(decoded["image"])
        labels.append(decoded["label"])
        for c in extras:
            col = batch[c]
            extras[c].append(col.astype(np.float32) if col.dtype.kind == "f" else col)
    out = {"image": np.concatenate(images), "label": np.concatenate(labels)}
    out.update({c: np.concatenate(v) for c, v in extras.items()})
    return out
