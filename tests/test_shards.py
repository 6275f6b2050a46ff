"""Parquet shard format: round trip, atomic writes, every DatasetError case, S3 through a real moto_server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data import storage
from data.shards import DatasetError, read_manifest, shard_uris, validate_dataset, write_dataset

IDS = ["alice", "bob", "carol"]


def png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, 10, 200)).save(buf, format="PNG")
    return buf.getvalue()


def make_rows(n: int = 60, *, corrupt_at: int | None = None) -> list[dict]:
    rows = []
    for i in range(n):
        label = i % len(IDS)
        rows.append({"image": b"not an image at all" if i == corrupt_at else png(i), "label": label,
                     "identity": IDS[label], "source": f"test:{i}", "degradation": i / n,
                     "degradation_type": "blur"})
    return rows


@pytest.fixture
def dataset(tmp_path) -> str:
    uri = str(tmp_path / "ds")
    write_dataset(uri, make_rows(), label_to_identity=IDS, target_shard_bytes=3000)
    return uri


def rewrite_shard(uri: str, index: int, table: pa.Table, **manifest_changes) -> str:
    """Replace shard `index` and refresh its checksum/size in the manifest: only the intended fault stays."""
    manifest_path = Path(uri) / "manifest.json"
    doc = json.loads(manifest_path.read_text())
    shard = doc["shards"][index]
    path = Path(uri) / shard["file"]
    pq.write_table(table, path)
    data = path.read_bytes()
    shard.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    for key, value in manifest_changes.items():
        if key == "rows":
            doc["num_samples"] += value - shard["rows"]
        shard[key] = value
    manifest_path.write_text(json.dumps(doc))
    return shard["file"]


def test_round_trip_keeps_bytes_columns_and_order(tmp_path):
    rows = make_rows()
    uri = str(tmp_path / "ds")
    manifest = write_dataset(uri, iter(rows), label_to_identity=IDS, target_shard_bytes=3000,
                             source_desc="unit")
    assert manifest.num_samples == 60 and manifest.num_classes == 3
    assert len(manifest.shards) > 1, "small target_shard_bytes must produce several shards"
    assert manifest.image_size == [8, 8]
    assert manifest.columns == ["image", "label", "identity", "source", "degradation", "degradation_type"]
    assert manifest.created["source"] == "unit"
    assert sorted(os.listdir(uri)) == ["manifest.json"] + [s["file"] for s in manifest.shards]
    assert not [p for p in os.listdir(tmp_path) if p != "ds"], "staging directory left behind"

    again = read_manifest(uri)
    assert again == manifest
    assert validate_dataset(uri, decode_images=True).num_samples == 60
    uris = shard_uris(uri)
    assert [os.path.basename(u) for u in uris] == [f"part-{i:05d}.parquet" for i in range(len(uris))]

    table = pa.concat_tables([pq.read_table(u) for u in uris])
    assert table.schema.field("label").type == pa.int32()
    assert table.schema.field("degradation").type == pa.float32()
    assert table.column("image").to_pylist() == [r["image"] for r in rows]  # stored as given, in order
    assert table.column("source").to_pylist() == [r["source"] for r in rows]
    assert [s["rows"] for s in manifest.shards] == [pq.ParquetFile(u).metadata.num_rows for u in uris]


def test_mixed_image_sizes_give_null_image_size(tmp_path):
    rows = make_rows(6)
    rows[0]["image"] = png(1, size=12)
    assert write_dataset(str(tmp_path / "ds"), rows, label_to_identity=IDS).image_size is None


def test_refuses_to_overwrite_a_complete_dataset(dataset):
    before = read_manifest(dataset)
    with pytest.raises(DatasetError, match="already exists"):
        write_dataset(dataset, make_rows(9), label_to_identity=IDS)
    assert read_manifest(dataset) == before
    after = write_dataset(dataset, make_rows(9), label_to_identity=IDS, overwrite=True)
    assert read_manifest(dataset).num_samples == after.num_samples == 9
    validate_dataset(dataset)


def failing_rows(after: int):
    for i, row in enumerate(make_rows()):
        if i == after:
            raise RuntimeError("source died mid-way")
        yield row


def test_failed_write_leaves_no_manifest_and_no_directory(tmp_path):
    uri = str(tmp_path / "ds")
    with pytest.raises(RuntimeError, match="mid-way"):
        write_dataset(uri, failing_rows(40), label_to_identity=IDS, target_shard_bytes=3000)
    assert os.listdir(tmp_path) == [], "a failed write must not leave shards or staging behind"
    with pytest.raises(DatasetError, match="no manifest.json"):
        read_manifest(uri)


def test_failed_overwrite_keeps_the_existing_dataset(dataset):
    before = read_manifest(dataset)
    with pytest.raises(RuntimeError, match="mid-way"):
        write_dataset(dataset, failing_rows(40), label_to_identity=IDS, overwrite=True,
                      target_shard_bytes=3000)
    assert read_manifest(dataset) == before
    validate_dataset(dataset)
    assert os.listdir(Path(dataset).parent) == ["ds"]


def test_directory_without_manifest_is_refused(dataset):
    os.remove(Path(dataset) / "manifest.json")
    with pytest.raises(DatasetError, match=r"ds: no manifest.json"):
        validate_dataset(dataset)
    # a leftover of an interrupted write (only part files) may be written over
    write_dataset(dataset, make_rows(6), label_to_identity=IDS)
    assert validate_dataset(dataset).num_samples == 6


def test_malformed_manifest(dataset):
    (Path(dataset) / "manifest.json").write_text('{"schema_version": 1, "num_classes": ')
    with pytest.raises(DatasetError, match=r"manifest.json: not valid JSON at offset"):
        read_manifest(dataset)
    (Path(dataset) / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(DatasetError, match=r"missing fields \['num_classes'"):
        read_manifest(dataset)


def test_write_checks_labels_identities_and_columns(tmp_path):
    rows = make_rows(6)
    rows[4]["label"] = 3
    with pytest.raises(DatasetError, match=r"row 4 \(source 'test:4'\): label 3 out of range 0..2"):
        write_dataset(str(tmp_path / "a"), rows, label_to_identity=IDS)
    rows = [r for r in make_rows(9) if r["label"] != 1]
    with pytest.raises(DatasetError, match=r"labels \[1\] have no samples"):
        write_dataset(str(tmp_path / "b"), rows, label_to_identity=IDS)
    rows = make_rows(6)
    rows[2]["identity"] = "mallory"
    with pytest.raises(DatasetError, match=r"row 2: identity 'mallory' does not match"):
        write_dataset(str(tmp_path / "c"), rows, label_to_identity=IDS)
    rows = make_rows(6)
    del rows[3]["degradation"]
    with pytest.raises(DatasetError, match=r"row 3 has columns"):
        write_dataset(str(tmp_path / "d"), rows, label_to_identity=IDS)
    with pytest.raises(DatasetError, match="no rows"):
        write_dataset(str(tmp_path / "e"), [], label_to_identity=IDS)
    assert sorted(os.listdir(tmp_path)) == [], "failed writes must leave nothing behind"


def test_corrupt_image_found_only_when_decoding(tmp_path):
    uri = str(tmp_path / "ds")
    write_dataset(uri, make_rows(30, corrupt_at=17), label_to_identity=IDS, image_size=8)
    validate_dataset(uri)  # bytes are not decoded by default
    expected = r"part-00000.parquet: row 17 \(identity 'carol'\): image does not decode"
    with pytest.raises(DatasetError, match=expected):
        validate_dataset(uri, decode_images=True)


def test_missing_column(dataset):
    table = pq.read_table(Path(dataset) / "part-00001.parquet").drop_columns(["identity"])
    rewrite_shard(dataset, 1, table)
    with pytest.raises(DatasetError, match=r"part-00001.parquet: missing required column 'identity'"):
        validate_dataset(dataset)


def test_label_out_of_range(dataset):
    table = pq.read_table(Path(dataset) / "part-00000.parquet")
    labels = table.column("label").to_numpy().copy()
    labels[5] = 7
    table = table.set_column(1, "label", pa.array(labels, type=pa.int32()))
    rewrite_shard(dataset, 0, table)
    with pytest.raises(DatasetError, match=r"part-00000.parquet: row 5: label 7 out of range 0..2"):
        validate_dataset(dataset)


def test_label_gap(tmp_path):
    uri = str(tmp_path / "ds")
    write_dataset(uri, make_rows(9), label_to_identity=IDS)  # one shard
    table = pq.read_table(Path(uri) / "part-00000.parquet")
    keep = pa.array(np.asarray(table.column("label")) != 2)
    rewrite_shard(uri, 0, table.filter(keep), rows=6)
    with pytest.raises(DatasetError, match=r"labels \[2\] have no samples in any shard"):
        validate_dataset(uri)


def test_empty_shard(dataset):
    table = pq.read_table(Path(dataset) / "part-00001.parquet").slice(0, 0)
    rewrite_shard(dataset, 1, table, rows=0)
    with pytest.raises(DatasetError, match=r"part-00001.parquet: shard is empty \(0 rows\)"):
        validate_dataset(dataset)


def test_manifest_and_shard_disagree(dataset):
    table = pq.read_table(Path(dataset) / "part-00001.parquet")
    rewrite_shard(dataset, 1, table, rows=table.num_rows + 1)
    with pytest.raises(DatasetError, match=rf"part-00001.parquet: has {table.num_rows} rows, manifest says"):
        validate_dataset(dataset)


def test_checksum_mismatch_and_missing_shard(dataset):
    path = Path(dataset) / "part-00000.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"part-00000.parquet: sha256 .* does not match"):
        validate_dataset(dataset)
    validate_dataset(dataset, check_checksums=False)  # a flipped byte inside image data still parses
    (Path(dataset) / "part-00001.parquet").unlink()
    with pytest.raises(DatasetError, match=r"part-00001.parquet: shard listed in the manifest is missing"):
        validate_dataset(dataset, check_checksums=False)


def test_storage_resolve_and_join(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    fs, path = storage.resolve("~/x/y")
    assert type(fs).__name__ == "LocalFileSystem" and path == str(tmp_path / "x" / "y")
    assert storage.join("s3://bucket/prefix/", "train", "part-00000.parquet") == \
        "s3://bucket/prefix/train/part-00000.parquet"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    fs, path = storage.resolve("s3://bucket/prefix/")
    assert type(fs).__name__ == "S3FileSystem" and path == "bucket/prefix" and fs.region == "eu-west-3"
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/x")


# ------------------------------------------------------------------------------------------------- S3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_s3(monkeypatch):
    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        server = Path(shutil.which("moto_server") or "moto_server")
    port = free_port()
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on port {port}") from None
                time.sleep(0.2)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(
            Bucket="faces")
        yield "s3://faces/sets"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.integration  # moto_server, a real S3-compatible server
def test_s3_round_trip_overwrite_and_failure(moto_s3):
    from data.pipeline import load_arrays

    uri = storage.join(moto_s3, "ds")
    manifest = write_dataset(uri, make_rows(), label_to_identity=IDS, target_shard_bytes=3000)
    assert read_manifest(uri) == manifest
    assert validate_dataset(uri, decode_images=True).num_samples == 60
    assert shard_uris(uri)[0] == "s3://faces/sets/ds/part-00000.parquet"
    arrays = load_arrays(uri, image_size=8)
    assert arrays["image"].shape == (60, 3, 8, 8) and arrays["label"].tolist() == [i % 3 for i in range(60)]

    with pytest.raises(DatasetError, match="already exists"):
        write_dataset(uri, make_rows(9), label_to_identity=IDS)
    with pytest.raises(RuntimeError, match="mid-way"):
        write_dataset(uri, failing_rows(40), label_to_identity=IDS, overwrite=True, target_shard_bytes=3000)
    assert read_manifest(uri) == manifest
    validate_dataset(uri)

    write_dataset(uri, make_rows(9), label_to_identity=IDS, overwrite=True)
    assert validate_dataset(uri).num_samples == 9
    fs, path = storage.resolve(moto_s3)
    from pyarrow.fs import FileSelector

    listing = fs.get_file_info(FileSelector(path, recursive=True))
    names = sorted(os.path.relpath(i.path, path) for i in listing)
    assert names == ["ds", "ds/manifest.json", "ds/part-00000.parquet"], "stale shards or staging left on S3"

    fresh = storage.join(moto_s3, "fresh")
    with pytest.raises(RuntimeError, match="mid-way"):
        write_dataset(fresh, failing_rows(40), label_to_identity=IDS, target_shard_bytes=3000)
    with pytest.raises(DatasetError, match="no manifest.json"):
        read_manifest(fresh)
