"""Pairs datasets for face verification (LFW, CFP-FP, AgeDB-30, ... or pairs drawn from any labelled set).

Layout under one directory (local or s3://):

    images/         a shard dataset (data.shards.write_dataset); pairs index its rows in manifest order
    pairs.parquet   a, b (int64 row indices into images), is_same (bool), fold (int16)
    pairs.json      schema version, counts, source, sha256 of pairs.parquet: written last, one PUT/rename

A directory without pairs.json is incomplete and every reader refuses it. Locally the whole dataset is
staged in a hidden sibling directory and renamed into place; on S3 a fresh dataset is written in place
(pairs.json last) and a replacement is staged under a sibling prefix and copied over only once complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data import storage
from data.pipeline import decode_batch, load_arrays
from data.shards import DatasetError, directory_state, read_manifest, shard_uris, write_dataset
from evaluation.verification import make_pairs

PAIRS_SCHEMA_VERSION = 1
IMAGES_DIR = "images"
PAIRS_FILE = "pairs.parquet"
PAIRS_MANIFEST = "pairs.json"
PAIRS_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("is_same", pa.bool_()),
                          ("fold", pa.int16())])


@dataclass
class PairsData:
    images: np.ndarray  # float32 (N, 3, H, W) in [-1, 1]
    labels: np.ndarray  # int64 (N,)
    pairs: np.ndarray  # int64 (P, 2) row indices into images
    is_same: np.ndarray  # bool (P,)
    folds: np.ndarray  # int16 (P,)
    label_to_identity: list[str]
    sources: np.ndarray | None = None  # (N,) `source` of each image (file names carry Yale B ground truth)
    degradation: np.ndarray | None = None  # (N,) float32 ground truth where the images have that column


def contiguous_folds(num_pairs: int, num_folds: int = 10) -> np.ndarray:
    """Fold id per pair for contiguous folds in pair order (as evaluation.verification.kfold_accuracy)."""
    num_folds = max(1, min(num_folds, num_pairs))
    return np.concatenate([np.full(len(part), k, np.int16)
                           for k, part in enumerate(np.array_split(np.arange(num_pairs), num_folds))])


# --------------------------------------------------------------------------------------------- writing


def _check_pair_arrays(pairs: Any, is_same: Any, folds: Any, where: str) -> tuple[np.ndarray, ...]:
    p = np.asarray(pairs)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] == 0:
        raise DatasetError(f"{where}: pairs must have shape (P, 2) with P >= 1, got {p.shape}")
    if p.dtype.kind not in "iu":
        raise DatasetError(f"{where}: pairs must be integer row indices, got dtype {p.dtype}")
    same = np.asarray(is_same)
    if same.shape != (p.shape[0],) or same.dtype != np.bool_:
        raise DatasetError(f"{where}: is_same must be a bool array of shape ({p.shape[0]},), "
                           f"got {same.dtype} {same.shape}")
    f = contiguous_folds(p.shape[0], 1) if folds is None else np.asarray(folds)
    if f.shape != (p.shape[0],) or f.dtype.kind not in "iu" or (f.size and (f.min() < 0 or f.max() > 32767)):
        raise DatasetError(f"{where}: folds must be int in 0..32767 with shape ({p.shape[0]},)")
    self_pairs = np.flatnonzero(p[:, 0] == p[:, 1])
    if len(self_pairs):
        raise DatasetError(f"{where}: pair {int(self_pairs[0])} joins image {int(p[self_pairs[0], 0])} "
                           "with itself")
    return p.astype(np.int64), same, f.astype(np.int16)


def _check_against_images(p: np.ndarray, same: np.ndarray, labels: np.ndarray, where: str) -> None:
    n = labels.size
    bad = np.flatnonzero((p < 0).any(axis=1) | (p >= n).any(axis=1))
    if len(bad):
        raise DatasetError(f"{where}: pair {int(bad[0])} {p[bad[0]].tolist()} indexes outside the {n} images")
    same_label = labels[p[:, 0]] == labels[p[:, 1]]
    wrong = np.flatnonzero(same_label != same)
    if len(wrong):
        i = int(wrong[0])
        kind = "genuine pair joins different labels" if same[i] else "impostor pair joins the same label"
        raise DatasetError(f"{where}: pair {i} {p[i].tolist()}: {kind} "
                           f"({int(labels[p[i, 0]])}, {int(labels[p[i, 1]])})")


def _recording_labels(rows: Iterable[dict[str, Any]], labels: list[int]) -> Iterator[dict[str, Any]]:
    for row in rows:
        labels.append(int(row["label"]))
        yield row


def _state(uri: str) -> str:
    return directory_state(uri, PAIRS_MANIFEST, lambda n: n in (IMAGES_DIR, PAIRS_FILE))


def write_pairs_dataset(
    uri: str,
    image_rows: Iterable[dict[str, Any]],
    pairs: Any,
    is_same: Any,
    folds: Any = None,
    *,
    label_to_identity: list[str],
    image_size: tuple[int, int] | list[int] | int | None = None,
    overwrite: bool = False,
    source_desc: str = "",
    target_shard_bytes: int = 256 * 2**20,
) -> dict[str, Any]:
    """Write images (streamed rows, as for write_dataset) + pairs; returns the pairs.json document.

    `pairs` index the image rows in the order given. Every genuine pair must join two rows of the same label
    and every impostor pair two different labels. A failure leaves an existing dataset at `uri` intact.
    """
    p, same, f = _check_pair_arrays(pairs, is_same, folds, uri)
    state = _state(uri)
    if state == "complete" and not overwrite:
        raise DatasetError(f"{uri}: a complete pairs dataset already exists there (pass overwrite=True)")
    if state == "foreign" and not overwrite:
        raise DatasetError(f"{uri}: exists and is not a pairs dataset; refusing to write into it")
    parent, name = storage.parent_and_name(uri)
    in_place = storage.is_s3(uri) and state in ("missing", "partial")
    if in_place:
        storage.delete_dir(uri)
        staging = uri
    else:
        staging = storage.join(parent, f".{name}.staging-{uuid.uuid4().hex[:12]}")
    try:
        labels: list[int] = []
        manifest = write_dataset(storage.join(staging, IMAGES_DIR), _recording_labels(image_rows, labels),
                                 label_to_identity=label_to_identity, image_size=image_size,
                                 target_shard_bytes=target_shard_bytes, source_desc=source_desc)
        _check_against_images(p, same, np.asarray(labels, dtype=np.int64), uri)
        buf = io.BytesIO()
        table = pa.table({"a": p[:, 0], "b": p[:, 1], "is_same": same, "fold": f}, schema=PAIRS_SCHEMA)
        pq.write_table(table, buf)
        data = buf.getvalue()
        storage.write_bytes_atomic(storage.join(staging, PAIRS_FILE), data)
        doc = {
            "schema_version": PAIRS_SCHEMA_VERSION,
            "num_images": manifest.num_samples,
            "num_classes": manifest.num_classes,
            "num_pairs": int(p.shape[0]),
            "num_genuine": int(same.sum()),
            "num_impostor": int((~same).sum()),
            "num_folds": int(np.unique(f).size),
            "pairs_sha256": hashlib.sha256(data).hexdigest(),
            "source": source_desc,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if staging == uri:
            storage.write_bytes_atomic(storage.join(uri, PAIRS_MANIFEST), json.dumps(doc, indent=1).encode())
        else:
            _commit(staging, uri, doc)
    except BaseException:
        try:
            storage.delete_dir(staging)
        except Exception:
            pass
        raise
    return doc


def _commit(staging: str, uri: str, doc: dict[str, Any]) -> None:
    """Put the staged dataset at `uri` (pairs.json last), replacing what is there only now."""
    manifest_bytes = json.dumps(doc, indent=1).encode()
    storage.write_bytes_atomic(storage.join(staging, PAIRS_MANIFEST), manifest_bytes)
    if not storage.is_s3(uri):
        _, stage_path = storage.resolve(staging)
        _, path = storage.resolve(uri)
        if os.path.exists(path):
            old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(stage_path, path)
            storage.delete_dir(old)
        else:
            os.replace(stage_path, path)
        return
    # S3 has no rename: drop the old pairs.json (the old dataset stops counting as complete), copy the
    # staged files server-side (each shard dataset's manifest after its shards), then PUT pairs.json.
    fs, stage_path = storage.resolve(staging)
    _, path = storage.resolve(uri)
    if fs.get_file_info(f"{path}/{PAIRS_MANIFEST}").type != pafs.FileType.NotFound:
        fs.delete_file(f"{path}/{PAIRS_MANIFEST}")
    fs.delete_dir_contents(path, missing_dir_ok=True)
    files = [e.path for e in fs.get_file_info(pafs.FileSelector(stage_path, recursive=True))
             if e.type == pafs.FileType.File and not e.path.endswith(f"/{PAIRS_MANIFEST}")]
    for src in sorted(files, key=lambda s: (s.endswith("/manifest.json"), s)):
        fs.copy_file(src, path + src[len(stage_path):])
    storage.write_bytes_atomic(storage.join(uri, PAIRS_MANIFEST), manifest_bytes)
    storage.delete_dir(staging)


# --------------------------------------------------------------------------------------------- reading


def read_pairs_manifest(uri: str) -> dict[str, Any]:
    where = storage.join(uri, PAIRS_MANIFEST)
    try:
        doc = json.loads(storage.read_bytes(where))
    except (FileNotFoundError, OSError) as e:
        raise DatasetError(f"{uri}: no {PAIRS_MANIFEST} (not a pairs dataset, or its write never completed)"
                           ) from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON at offset {e.pos}: {e.msg}") from e
    required = ["schema_version", "num_images", "num_pairs", "pairs_sha256"]
    missing = [k for k in required if k not in doc]
    if missing:
        raise DatasetError(f"{where}: missing fields {missing}")
    if doc["schema_version"] != PAIRS_SCHEMA_VERSION:
        raise DatasetError(f"{where}: schema_version {doc['schema_version']} is not supported "
                           f"(expected {PAIRS_SCHEMA_VERSION})")
    return doc


def read_pairs_table(uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(pairs (P,2), is_same, folds, pairs.json) after checking them against pairs.json and the images."""
    doc = read_pairs_manifest(uri)
    where = storage.join(uri, PAIRS_FILE)
    try:
        data = storage.read_bytes(where)
    except (FileNotFoundError, OSError) as e:
        raise DatasetError(f"{where}: missing ({e})") from e
    if hashlib.sha256(data).hexdigest() != doc["pairs_sha256"]:
        raise DatasetError(f"{where}: sha256 does not match {PAIRS_MANIFEST}")
    table = pq.read_table(io.BytesIO(data))
    for name in PAIRS_SCHEMA.names:
        if name not in table.column_names:
            raise DatasetError(f"{where}: missing column {name!r}")
        if table.column(name).null_count:
            row = int(np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{where}: row {row}: {name} is null")
    if table.num_rows != doc["num_pairs"]:
        raise DatasetError(f"{where}: {table.num_rows} pairs, {PAIRS_MANIFEST} says {doc['num_pairs']}")
    pairs = np.stack([table.column("a").to_numpy(), table.column("b").to_numpy()], axis=1).astype(np.int64)
    bad = np.flatnonzero((pairs < 0).any(axis=1) | (pairs >= doc["num_images"]).any(axis=1))
    if len(bad):
        raise DatasetError(f"{where}: row {int(bad[0])}: pair {pairs[bad[0]].tolist()} indexes outside the "
                           f"{doc['num_images']} images")
    is_same = table.column("is_same").to_numpy(zero_copy_only=False).astype(bool)
    folds = table.column("fold").to_numpy().astype(np.int16)
    return pairs, is_same, folds, doc


def read_pairs_dataset(uri: str, image_size: int) -> PairsData:
    """All images (decoded, image_size x image_size, [-1, 1]) and pairs of a pairs dataset."""
    pairs, is_same, folds, doc = read_pairs_table(uri)
    images_uri = storage.join(uri, IMAGES_DIR)
    manifest = read_manifest(images_uri)
    if manifest.num_samples != doc["num_images"]:
        raise DatasetError(f"{images_uri}: {manifest.num_samples} images, {PAIRS_MANIFEST} says "
                           f"{doc['num_images']}")
    arrays = load_arrays(images_uri, image_size=image_size, columns_extra=("degradation",))
    return PairsData(arrays["image"], arrays["label"], pairs, is_same, folds,
                     list(manifest.label_to_identity), sources=_read_column(images_uri, "source"),
                     degradation=arrays.get("degradation"))


# --------------------------------------------------------------------------------------------- sampling


def _read_column(uri: str, name: str) -> np.ndarray:
    fs, _ = storage.resolve(uri)
    parts = [pq.read_table(storage.resolve(s)[1], filesystem=fs, columns=[name]).column(name)
             .to_numpy(zero_copy_only=False) for s in shard_uris(uri)]
    return np.concatenate(parts)


def _load_rows(uri: str, rows: np.ndarray, image_size: int) -> dict[str, np.ndarray]:
    """Decoded images (+ source, degradation) of the given sorted unique global row indices."""
    fs, _ = storage.resolve(uri)
    manifest = read_manifest(uri)
    columns = ["image", "label", "identity", "source"] + (["degradation"] if "degradation" in manifest.columns
                                                          else [])
    images, sources, degradation, start = [], [], [], 0
    for shard, shard_uri in zip(manifest.shards, shard_uris(uri), strict=True):
        lo, hi = np.searchsorted(rows, [start, start + shard["rows"]])
        if hi > lo:
            table = pq.read_table(storage.resolve(shard_uri)[1], filesystem=fs, columns=columns)
            table = table.take(pa.array(rows[lo:hi] - start))
            batch = {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
            try:
                images.append(decode_batch(batch, image_size=image_size, augment=None, seed=0)["image"])
            except DatasetError as e:
                raise DatasetError(f"{shard_uri}: {e}") from e
            sources.append(batch["source"])
            if "degradation" in batch:
                degradation.append(batch["degradation"].astype(np.float32))
        start += shard["rows"]
    out = {"image": np.concatenate(images), "source": np.concatenate(sources)}
    if degradation:
        out["degradation"] = np.concatenate(degradation)
    return out


def pairs_from_dataset(uri: str, num_genuine: int, num_impostor: int, seed: int = 0, image_size: int = 112,
                       num_folds: int = 10) -> PairsData:
    """Genuine/impostor pairs drawn from any labelled shard dataset; only the images in a pair are decoded.

    images/labels hold just the images that some pair uses; pairs index them. Folds are contiguous.
    """

    labels = _read_column(uri, "label").astype(np.int64)
    try:
        pairs, is_same = make_pairs(labels, num_genuine, num_impostor, seed=seed)
    except ValueError as e:
        raise DatasetError(f"{uri}: {e}") from e
    used = np.unique(pairs)
    rows = _load_rows(uri, used, image_size)
    return PairsData(rows["image"], labels[used], np.searchsorted(used, pairs).astype(np.int64), is_same,
                     contiguous_folds(len(pairs), num_folds), list(read_manifest(uri).label_to_identity),
                     sources=rows["source"], degradation=rows.get("degradation"))
