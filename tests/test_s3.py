"""Converters, pairs datasets, QWDF and a Ray Data read against a real S3-compatible server (moto_server)."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from pyarrow.fs import FileSelector

from data import storage
from data.convert import ConvertError, Options, convert_imagefolder, convert_verification_bin
from data.pairs import read_pairs_dataset, write_pairs_dataset
from data.pipeline import load_arrays, training_dataset
from data.qwdf import qwdf
from data.shards import DatasetError, read_manifest, validate_dataset
from infra.stack import Stack

pytestmark = pytest.mark.integration  # a real S3-compatible server (moto) for the module

BUCKET = "eqface-test"
OPTS = Options(workers=1, progress=False)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    stack = Stack.load(tmp_path_factory.mktemp("s3-stack"))
    try:
        stack.start_s3(buckets=(BUCKET,))
        with pytest.MonkeyPatch.context() as monkeypatch:
            for key, value in stack.env().items():
                monkeypatch.setenv(key, value)
            yield stack
    finally:
        stack.stop_all()


def png(value: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 60)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def faces_on_s3(s3, tmp_path_factory):
    """An image folder (3 people x 4 images) converted straight into S3."""
    root = tmp_path_factory.mktemp("folder")
    for k, name in enumerate(["ann", "bob", "cid"]):
        (root / name).mkdir()
        for n in range(4):
            (root / name / f"{n}.png").write_bytes(png(40 * k + 5 * n))
    uri = f"s3://{BUCKET}/faces"
    report = convert_imagefolder(str(root), uri, opts=OPTS)
    assert report.num_samples == 12
    return {"uri": uri, "root": root}


def test_imagefolder_into_s3_reads_back(faces_on_s3):
    uri = faces_on_s3["uri"]
    manifest = validate_dataset(uri, decode_images=True)
    assert (manifest.num_samples, manifest.label_to_identity) == (12, ["ann", "bob", "cid"])
    arrays = load_arrays(uri, image_size=12)
    assert arrays["image"].shape == (12, 3, 12, 12) and np.bincount(arrays["label"]).tolist() == [4, 4, 4]
    # red channel encodes (person, image): check every decoded image against its file
    reds = sorted(np.round((arrays["image"][:, 0, 0, 0] + 1) * 255 / 2).astype(int).tolist())
    assert reds == sorted(40 * k + 5 * n for k in range(3) for n in range(4))


def test_failed_overwrite_on_s3_keeps_the_dataset(faces_on_s3):
    uri, root = faces_on_s3["uri"], faces_on_s3["root"]
    before = read_manifest(uri)
    with pytest.raises(ConvertError, match="already exists"):
        convert_imagefolder(str(root), uri, opts=OPTS)
    (root / "bob" / "9.png").write_bytes(b"corrupt")
    try:
        with pytest.raises(ConvertError, match=r"bob/9\.png: cannot read image"):
            convert_imagefolder(str(root), uri, opts=Options(workers=1, progress=False, overwrite=True))
    finally:
        (root / "bob" / "9.png").unlink()
    assert read_manifest(uri).shards == before.shards
    assert validate_dataset(uri).num_samples == 12


def test_ray_data_reads_the_shards_from_s3(faces_on_s3):
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = training_dataset(faces_on_s3["uri"], image_size=12, augment=None, batch_size=4).take(4)
    finally:
        if started:
            ray.shutdown()
    assert len(rows) == 4
    assert all(r["image"].shape == (12, 12, 3) and 0 <= r["label"] < 3 for r in rows)


def test_pairs_datasets_on_s3(s3, tmp_path):
    bins = [png(10 * i) for i in range(8)]
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(pickle.dumps((bins, [True, False, True, False])))
    uri = f"s3://{BUCKET}/agedb"
    report = convert_verification_bin(str(path), uri, num_folds=2, opts=OPTS)
    assert (report.num_pairs, report.num_samples) == (4, 8)
    data = read_pairs_dataset(uri, image_size=12)
    assert data.images.shape == (8, 3, 12, 12) and data.is_same.tolist() == [True, False, True, False]
    assert data.folds.tolist() == [0, 0, 1, 1]

    rows = [{"image": png(i), "label": i // 2, "identity": f"p{i // 2}", "source": str(i)} for i in range(4)]

    def failing():
        yield rows[0]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_pairs_dataset(uri, failing(), [[0, 1]], np.array([True]), label_to_identity=["p0", "p1"],
                            overwrite=True)
    kept = read_pairs_dataset(uri, image_size=12)
    assert kept.pairs.shape == (4, 2), "a failed overwrite keeps the old dataset"
    write_pairs_dataset(uri, rows, [[0, 1], [1, 2]], np.array([True, False]), label_to_identity=["p0", "p1"],
                        overwrite=True)
    data = read_pairs_dataset(uri, image_size=12)
    assert data.pairs.tolist() == [[0, 1], [1, 2]] and data.labels.tolist() == [0, 0, 1, 1]
    fs, prefix = storage.resolve(uri)
    infos = fs.get_file_info(FileSelector(prefix, recursive=True))
    names = sorted(info.path[len(prefix) + 1:] for info in infos)
    assert names == ["images", "images/manifest.json", "images/part-00000.parquet", "pairs.json",
                     "pairs.parquet"], "old shards are gone"
    assert not [i.path for i in fs.get_file_info(FileSelector(BUCKET)) if ".staging-" in i.path]


class MeanNet(torch.nn.Module):
    arch = {"input_size": 12}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean(dim=(2, 3)), (x[:, 0].mean(dim=(1, 2)) + 1) / 2  # quality = red level


def test_qwdf_from_s3_to_s3(faces_on_s3):
    dst = f"s3://{BUCKET}/faces-qwdf"
    report = qwdf(MeanNet(), faces_on_s3["uri"], dst, 0.3, progress=False)
    # red levels: ann 0..15, bob 40..55, cid 80..95 (of 255): threshold 0.3 (76.5) keeps cid only
    assert report["kept"] == 4 and report["identities_removed"] == ["ann", "bob"]
    manifest = validate_dataset(dst, decode_images=True)
    assert manifest.label_to_identity == ["cid"] and "quality" in manifest.columns
    assert json.loads(storage.read_bytes(f"{dst}/qwdf_report.json"))["kept"] == 4
    with pytest.raises(DatasetError, match="never modifies its source"):
        qwdf(MeanNet(), faces_on_s3["uri"], faces_on_s3["uri"] + "/", 0.3, progress=False)
