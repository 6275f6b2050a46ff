"""Parquet shard format: part-NNNNN.parquet files plus a manifest.json written last and atomically.

A directory without manifest.json is an incomplete (or foreign) dataset and every reader refuses it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from data import storage

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "part-{:05d}.parquet"
REQUIRED_COLUMNS: dict[str, pa.DataType] = {
    "image": pa.binary(),
    "label": pa.int32(),
    "identity": pa.string(),
    "source": pa.string(),
}
# Row groups are the unit of parallel reading and decoding (data.pipeline.read_row_groups): ~1 MiB of
# encoded images (a few hundred faces) spreads even a one-shard dataset over every CPU and streams it.
ROW_GROUP_BYTES = 2**20


class DatasetError(ValueError):
    """A dataset is missing, incomplete or inconsistent; the message names the file and row."""


@dataclass
class Manifest:
    schema_version: int
    num_classes: int
    num_samples: int
    image_size: list[int] | None
    shards: list[dict[str, Any]]
    label_to_identity: list[str]
    columns: list[str]
    column_types: dict[str, str] = field(default_factory=dict)
    created: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


# --------------------------------------------------------------------------------------------- writing


class _HashingSink:
    """File-like wrapper that hashes and counts bytes on their way to the real output stream."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.sha256 = hashlib.sha256()
        self.nbytes = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.nbytes += view.nbytes
        self._stream.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self.closed = True


def _arrow_type_for(value: Any, name: str) -> pa.DataType:
    if isinstance(value, (bool, np.bool_)):
        return pa.bool_()
    if isinstance(value, (int, np.integer)):
        return pa.int64()
    if isinstance(value, (float, np.floating)):
        return pa.float32()
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, (bytes, bytearray)):
        return pa.binary()
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind == "f":
        return pa.list_(pa.float32())  # e.g. embeddings written by QWDF
    raise DatasetError(f"column {name!r}: unsupported value type {type(value).__name__}")


def _image_size_of(data: bytes) -> tuple[int, int] | None:
    """(h, w) from the image header without decoding pixels; None if unreadable."""

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    except Exception:
        return None


def directory_state(uri: str, marker: str, is_own: Callable[[str], bool]) -> str:
    """'missing', 'complete' (holds `marker`, written last), 'partial' (only entries `is_own` accepts) or
    'foreign' (anything else: never overwritten)."""
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return "missing"
    if info.type == pafs.FileType.File:
        return "foreign"
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = {os.path.basename(e.path) for e in entries}
    if marker in names:
        return "complete"
    if not names:
        return "missing"
    return "partial" if all(is_own(n) for n in names) else "foreign"


def _dataset_state(uri: str) -> str:
    return directory_state(uri, MANIFEST_NAME, lambda n: n.startswith("part-") and n.endswith(".parquet"))


class _ShardWriter:
    """Streams row dicts into size-bounded Parquet shards under one directory."""

    def __init__(self, uri: str, schema: pa.Schema, target_shard_bytes: int):
        self.uri = uri
        self.fs, self.path = storage.resolve(uri)
        self.schema = schema
        self.target_shard_bytes = target_shard_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._sink: _HashingSink | None = None
        self._rows_in_shard = 0
        self._buffer: dict[str, list] = {name: [] for name in schema.names}
        self._buffer_bytes = 0

    def _open_shard(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        stream = self.fs.open_output_stream(f"{self.path}/{name}")
        self._sink = _HashingSink(stream)
        # Image bytes are already compressed; compressing them again only costs CPU.
        compression = {n: ("NONE" if n == "image" else "SNAPPY") for n in self.schema.names}
        self._writer = pq.ParquetWriter(self._sink, self.schema, compression=compression)
        self._rows_in_shard = 0
        self.shards.append({"file": name, "rows": 0, "sha256": "", "bytes": 0})

    def _flush_buffer(self) -> None:
        if not self._buffer["image"]:
            return
        if self._writer is None:
            self._open_shard()
        columns = {n: pa.array(self._buffer[n], type=self.schema.field(n).type) for n in self.schema.names}
        table = pa.table(columns, schema=self.schema)
        self._writer.write_table(table)
        self._rows_in_shard += table.num_rows
        self._buffer = {name: [] for name in self.schema.names}
        self._buffer_bytes = 0

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        self.shards[-1].update(rows=self._rows_in_shard, sha256=self._sink.sha256.hexdigest(),
                               bytes=self._sink.nbytes)
        self._writer = None
        self._sink = None

    def add(self, row: dict[str, Any]) -> None:
        for name in self.schema.names:
            self._buffer[name].append(row[name])
        self._buffer_bytes += len(row["image"]) + 64
        if self._buffer_bytes >= min(ROW_GROUP_BYTES, self.target_shard_bytes):
            self._flush_buffer()
            if self._sink is not None and self._sink.nbytes >= self.target_shard_bytes:
                self._close_shard()

    def finish(self) -> list[dict[str, Any]]:
        self._flush_buffer()
        self._close_shard()
        return self.shards

    def abort(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if self._sink is not None:
                self._sink.close()
        except Exception:
            pass


def write_dataset(
    uri: str,
    rows: Iterable[dict[str, Any]],
    *,
    label_to_identity: list[str],
    image_size: tuple[int, int] | list[int] | int | None = None,
    target_shard_bytes: int = 256 * 2**20,
    overwrite: bool = False,
    source_desc: str = "",
) -> Manifest:
    """Stream rows into Parquet shards at `uri` and write manifest.json last.

    Local datasets are written into a hidden sibling staging directory and renamed into place, so a failed
    write leaves `uri` untouched. On S3 a fresh dataset is written in place (no manifest until the end);
    overwriting an S3 dataset stages the new shards first and swaps them in only once all are written.
    Image bytes are stored as given (never re-encoded); they are not decoded here (see validate_dataset).
    """
    num_classes = len(label_to_identity)
    if num_classes == 0:
        raise DatasetError(f"{uri}: label_to_identity is empty")
    if isinstance(image_size, int):
        image_size = [image_size, image_size]
    state = _dataset_state(uri)
    if state == "complete" and not overwrite:
        raise DatasetError(f"{uri}: a complete dataset already exists there (pass overwrite=True to replace)")
    if state == "foreign" and not overwrite:
        raise DatasetError(f"{uri}: exists and is not a dataset directory; refusing to write into it")

    parent, name = storage.parent_and_name(uri)
    stage_in_place = storage.is_s3(uri) and state in ("missing", "partial")
    if stage_in_place:
        storage.delete_dir(uri)  # stale shards from an earlier failed write
        staging = uri
    else:
        staging = storage.join(parent, f".{name}.staging-{uuid.uuid4().hex[:12]}")
    fs, staging_path = storage.resolve(staging)
    fs.create_dir(staging_path, recursive=True)

    try:
        manifest = _write_shards(staging, rows, label_to_identity, image_size, target_shard_bytes,
                                 source_desc, shown_as=uri)
        storage.write_bytes_atomic(storage.join(staging, MANIFEST_NAME), manifest.to_json().encode())
        if staging != uri:
            _commit(staging, uri)
    except BaseException:
        _remove_partial(staging)  # in place on S3 this removes the half-written shards; no manifest exists
        raise
    return manifest


def _remove_partial(uri: str) -> None:
    try:
        storage.delete_dir(uri)
    except Exception:
        pass


def _write_shards(staging: str, rows: Iterable[dict[str, Any]], label_to_identity: list[str],
                  image_size: list[int] | None, target_shard_bytes: int, source_desc: str,
                  shown_as: str) -> Manifest:
    num_classes = len(label_to_identity)
    writer: _ShardWriter | None = None
    schema: pa.Schema | None = None
    label_counts = np.zeros(num_classes, dtype=np.int64)
    sizes_seen: set[tuple[int, int]] = set()
    detect_size = image_size is None
    count = 0
    try:
        for index, row in enumerate(rows):
            if schema is None:
                schema = _schema_from_first_row(row, shown_as)
                writer = _ShardWriter(staging, schema, target_shard_bytes)
            _check_row(row, index, schema, label_to_identity, shown_as)
            if detect_size and len(sizes_seen) <= 1:
                sizes_seen.add(_image_size_of(row["image"]) or (-1, -1))
            label_counts[row["label"]] += 1
            writer.add(row)
            count += 1
        if writer is None:
            raise DatasetError(f"{shown_as}: no rows to write")
        shards = writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    missing = np.flatnonzero(label_counts == 0)
    if len(missing):
        raise DatasetError(f"{shown_as}: labels {missing[:10].tolist()} have no samples "
                           f"(labels must be contiguous 0..{num_classes - 1})")
    if detect_size:
        only = next(iter(sizes_seen)) if len(sizes_seen) == 1 else (-1, -1)
        image_size = list(only) if only != (-1, -1) else None
    return Manifest(
        schema_version=SCHEMA_VERSION,
        num_classes=num_classes,
        num_samples=count,
        image_size=list(image_size) if image_size is not None else None,
        shards=shards,
        label_to_identity=list(label_to_identity),
        columns=list(schema.names),
        column_types={f.name: str(f.type) for f in schema},
        created={
            "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "source": source_desc,
            "writer": "data.shards.write_dataset",
        },
    )


def _schema_from_first_row(row: dict[str, Any], where: str) -> pa.Schema:
    missing = [c for c in REQUIRED_COLUMNS if c not in row]
    if missing:
        raise DatasetError(f"{where}: row 0 lacks required columns {missing}")
    fields = [pa.field(n, t) for n, t in REQUIRED_COLUMNS.items()]
    fields += [pa.field(n, _arrow_type_for(v, n)) for n, v in row.items() if n not in REQUIRED_COLUMNS]
    return pa.schema(fields)


def _check_row(row: dict[str, Any], index: int, schema: pa.Schema, label_to_identity: list[str],
               where: str) -> None:
    if set(row) != set(schema.names):
        raise DatasetError(f"{where}: row {index} has columns {sorted(row)}, expected {sorted(schema.names)}")
    image, label, identity = row["image"], row["label"], row["identity"]
    if not isinstance(image, (bytes, bytearray)) or len(image) == 0:
        raise DatasetError(f"{where}: row {index} (source {row.get('source')!r}): "
                           "image must be non-empty bytes")
    if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
        raise DatasetError(f"{where}: row {index}: label must be an int, got {label!r}")
    if not 0 <= label < len(label_to_identity):
        raise DatasetError(f"{where}: row {index} (source {row.get('source')!r}): label {label} out of range "
                           f"0..{len(label_to_identity) - 1}")
    if identity != label_to_identity[label]:
        raise DatasetError(f"{where}: row {index}: identity {identity!r} does not match "
                           f"label_to_identity[{label}] = {label_to_identity[label]!r}")


def _commit(staging: str, uri: str) -> None:
    """Move a complete staged dataset to `uri`, replacing what is there only now that the new one is whole."""
    if not storage.is_s3(uri):
        _, stage_path = storage.resolve(staging)
        _, path = storage.resolve(uri)
        if os.path.exists(path):
            old = f"{os.path.dirname(path)}/.{os.path.basename(path)}.old-{uuid.uuid4().hex[:12]}"
            os.replace(path, old)
            os.replace(stage_path, path)
            storage.delete_dir(old)
        else:
            os.replace(stage_path, path)
        return
    # S3 has no directory rename: drop the old manifest first (the old dataset stops counting as complete),
    # copy the new shards over server-side, then PUT the new manifest. The staged copy stays complete until
    # the end, so a failure here loses nothing that cannot be recovered from the staging prefix.
    fs, stage_path = storage.resolve(staging)
    _, path = storage.resolve(uri)
    manifest = read_manifest(staging)
    if fs.get_file_info(f"{path}/{MANIFEST_NAME}").type != pafs.FileType.NotFound:
        fs.delete_file(f"{path}/{MANIFEST_NAME}")
    fs.delete_dir_contents(path, missing_dir_ok=True)
    for shard in manifest.shards:
        fs.copy_file(f"{stage_path}/{shard['file']}", f"{path}/{shard['file']}")
    storage.write_bytes_atomic(storage.join(uri, MANIFEST_NAME), manifest.to_json().encode())
    storage.delete_dir(staging)


# --------------------------------------------------------------------------------------------- reading


def read_manifest(uri: str) -> Manifest:
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(manifest_uri)
    except (FileNotFoundError, OSError) as e:
        raise DatasetError(f"{uri}: no {MANIFEST_NAME} (dataset missing or its write never completed): "
                           f"{e}") from e
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{manifest_uri}: not valid JSON at offset {e.pos}: {e.msg}") from e
    if not isinstance(doc, dict):
        raise DatasetError(f"{manifest_uri}: expected a JSON object")
    required = ["schema_version", "num_classes", "num_samples", "image_size", "shards", "label_to_identity",
                "columns"]
    missing = [k for k in required if k not in doc]
    if missing:
        raise DatasetError(f"{manifest_uri}: missing fields {missing}")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise DatasetError(f"{manifest_uri}: schema_version {doc['schema_version']} is not supported "
                           f"(expected {SCHEMA_VERSION})")
    for i, shard in enumerate(doc["shards"]):
        if not isinstance(shard, dict) or not {"file", "rows", "sha256", "bytes"} <= set(shard):
            raise DatasetError(f"{manifest_uri}: shards[{i}] must have file, rows, sha256, bytes")
    if len(doc["label_to_identity"]) != doc["num_classes"]:
        raise DatasetError(f"{manifest_uri}: label_to_identity has {len(doc['label_to_identity'])} entries "
                           f"but num_classes is {doc['num_classes']}")
    if sum(s["rows"] for s in doc["shards"]) != doc["num_samples"]:
        raise DatasetError(f"{manifest_uri}: shard rows sum to {sum(s['rows'] for s in doc['shards'])} "
                           f"but num_samples is {doc['num_samples']}")
    known = {f for f in Manifest.__dataclass_fields__}
    return Manifest(**{k: v for k, v in doc.items() if k in known})


def shard_uris(uri: str) -> list[str]:
    return [storage.join(uri, s["file"]) for s in read_manifest(uri).shards]


def validate_dataset(uri: str, *, check_checksums: bool = True, decode_images: bool = False) -> Manifest:
    """Check every shard against the manifest; raise DatasetError naming the shard file and row."""
    manifest = read_manifest(uri)
    fs, _ = storage.resolve(uri)
    label_counts = np.zeros(manifest.num_classes, dtype=np.int64)
    for shard in manifest.shards:
        shard_uri = storage.join(uri, shard["file"])
        _validate_shard(fs, shard_uri, shard, manifest, label_counts, check_checksums, decode_images)
    missing = np.flatnonzero(label_counts == 0)
    if len(missing):
        raise DatasetError(f"{uri}: labels {missing[:10].tolist()} have no samples in any shard "
                           f"(labels must be contiguous 0..{manifest.num_classes - 1})")
    return manifest


def _validate_shard(fs: pafs.FileSystem, shard_uri: str, shard: dict[str, Any], manifest: Manifest,
                    label_counts: np.ndarray, check_checksums: bool, decode_images: bool) -> None:
    _, path = storage.resolve(shard_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DatasetError(f"{shard_uri}: shard listed in the manifest is missing")
    if info.size != shard["bytes"]:
        raise DatasetError(f"{shard_uri}: size {info.size} bytes, manifest says {shard['bytes']}")
    if check_checksums:
        digest = hashlib.sha256()
        with fs.open_input_stream(path) as f:
            while chunk := f.read(8 * 2**20):
                digest.update(chunk)
        if digest.hexdigest() != shard["sha256"]:
            raise DatasetError(f"{shard_uri}: sha256 {digest.hexdigest()[:16]}... does not match the "
                               f"manifest ({shard['sha256'][:16]}...)")
    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
    except Exception as e:
        raise DatasetError(f"{shard_uri}: not a readable Parquet file: {e}") from e
    rows = parquet.metadata.num_rows
    if rows == 0:
        raise DatasetError(f"{shard_uri}: shard is empty (0 rows)")
    if rows != shard["rows"]:
        raise DatasetError(f"{shard_uri}: has {rows} rows, manifest says {shard['rows']}")
    schema = parquet.schema_arrow
    for name, expected in REQUIRED_COLUMNS.items():
        if name not in schema.names:
            raise DatasetError(f"{shard_uri}: missing required column {name!r}")
        actual = schema.field(name).type
        if not (actual.equals(expected) or (name == "image" and actual.equals(pa.large_binary()))
                or (name in ("identity", "source") and actual.equals(pa.large_string()))):
            raise DatasetError(f"{shard_uri}: column {name!r} has type {actual}, expected {expected}")
    for name in manifest.columns:
        if name not in schema.names:
            raise DatasetError(f"{shard_uri}: missing column {name!r} listed in the manifest")
    # Every shard of one dataset has the manifest's schema: anything else was copied in from another dataset.
    extra = [n for n in schema.names if n not in manifest.columns]
    if extra:
        raise DatasetError(f"{shard_uri}: column(s) {extra} are not in the manifest's columns "
                           f"{manifest.columns} (a shard from another dataset?)")
    for name, recorded in manifest.column_types.items():
        if name in schema.names and not _same_type(str(schema.field(name).type), recorded):
            raise DatasetError(f"{shard_uri}: column {name!r} has type {schema.field(name).type}, the manifest "
                               f"says {recorded} (a shard from another dataset?)")
    row0 = 0
    for batch in parquet.iter_batches(batch_size=1024):
        _validate_rows(shard_uri, row0, batch, manifest, label_counts, decode_images)
        row0 += batch.num_rows


def _validate_rows(shard_uri: str, row0: int, batch: pa.RecordBatch, manifest: Manifest,
                   label_counts: np.ndarray, decode_images: bool) -> None:
    labels = batch.column("label")
    if labels.null_count:
        bad = row0 + int(np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))[0])
        raise DatasetError(f"{shard_uri}: row {bad}: label is null")
    labels_np = labels.to_numpy()
    out_of_range = np.flatnonzero((labels_np < 0) | (labels_np >= manifest.num_classes))
    if len(out_of_range):
        i = int(out_of_range[0])
        raise DatasetError(f"{shard_uri}: row {row0 + i}: label {labels_np[i]} out of range "
                           f"0..{manifest.num_classes - 1}")
    np.add.at(label_counts, labels_np, 1)
    images = batch.column("image")
    identities = batch.column("identity").to_pylist()
    for i in range(batch.num_rows):
        data = images[i].as_py()
        if not data:
            raise DatasetError(f"{shard_uri}: row {row0 + i} (identity {identities[i]!r}): "
                               "image is empty or null")
        if identities[i] != manifest.label_to_identity[labels_np[i]]:
            raise DatasetError(f"{shard_uri}: row {row0 + i}: identity {identities[i]!r} does not match "
                               f"label_to_identity[{labels_np[i]}]")
        if decode_images:
            _check_decodes(data, f"{shard_uri}: row {row0 + i} (identity {identities[i]!r})", manifest.image_size)


def _same_type(actual: str, recorded: str) -> bool:
    """Arrow type names equal up to large_ variants and list field names (Parquet calls list items 'element')."""
    def norm(t: str) -> str:
        return t.replace("large_", "").replace("element: ", "").replace("item: ", "")
    return norm(actual) == norm(recorded)


def _check_decodes(data: bytes, where: str, image_size: list[int] | None = None) -> None:

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size = (img.height, img.width)
    except Exception as e:
        raise DatasetError(f"{where}: image does not decode: {e}") from e
    if image_size and list(size) != list(image_size):
        raise DatasetError(f"{where}: image is {size[1]}x{size[0]} px, the manifest says "
                           f"{image_size[1]}x{image_size[0]} (a shard from another dataset?)")
