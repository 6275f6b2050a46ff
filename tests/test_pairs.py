"""Pairs datasets: write/read round trip, pairs drawn from a labelled set, every error case."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.pairs import (
    contiguous_folds,
    pairs_from_dataset,
    read_pairs_dataset,
    read_pairs_table,
    write_pairs_dataset,
)
from data.pipeline import load_arrays
from data.shards import DatasetError, write_dataset
from evaluation.verification import kfold_accuracy

IDS = ["ann", "bob", "cid"]


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 255 - value)).save(buf, format="PNG")
    return buf.getvalue()


def image_rows(labels: list[int]) -> list[dict]:
    return [{"image": png(20 * i), "label": lab, "identity": IDS[lab], "source": f"img{i}"}
            for i, lab in enumerate(labels)]


LABELS = [0, 0, 1, 1, 2, 2]
PAIRS = np.array([[0, 1], [0, 2], [2, 3], [1, 4], [4, 5], [3, 5]])
SAME = np.array([True, False, True, False, True, False])


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_round_trip(tmp_path):
    uri = str(tmp_path / "pairs")
    doc = write_pairs_dataset(uri, iter(image_rows(LABELS)), PAIRS, SAME, folds=[0, 0, 1, 1, 2, 2],
                              label_to_identity=IDS, source_desc="unit")
    assert (doc["num_images"], doc["num_pairs"], doc["num_genuine"], doc["num_folds"]) == (6, 6, 3, 3)
    assert sorted(p.name for p in Path(uri).iterdir()) == ["images", "pairs.json", "pairs.parquet"]
    assert not [p for p in tmp_path.iterdir() if p.name != "pairs"], "staging left behind"
    data = read_pairs_dataset(uri, image_size=8)
    assert data.images.shape == (6, 3, 8, 8) and data.images.dtype == np.float32
    np.testing.assert_allclose(data.images[:, 0, 0, 0], [20 * i * 2 / 255 - 1 for i in range(6)], atol=1e-6)
    assert data.labels.tolist() == LABELS and data.label_to_identity == IDS
    np.testing.assert_array_equal(data.pairs, PAIRS)
    assert data.is_same.tolist() == SAME.tolist() and data.folds.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.folds.dtype == np.int16 and data.sources.tolist() == [f"img{i}" for i in range(6)]
    schema = pq.read_schema(Path(uri) / "pairs.parquet")
    assert [(f.name, str(f.type)) for f in schema] == [("a", "int64"), ("b", "int64"), ("is_same", "bool"),
                                                       ("fold", "int16")]


def test_contiguous_folds_match_kfold_accuracy_splits():
    folds = contiguous_folds(23, 10)
    assert folds.tolist() == [k for k, part in enumerate(np.array_split(np.arange(23), 10)) for _ in part]
    # scores perfectly separable within each fold -> kfold_accuracy over the same split gives 1.0
    scores = np.where(np.arange(23) % 2 == 0, 0.9, 0.1)
    accs, _ = kfold_accuracy(scores, np.arange(23) % 2 == 0, 10)
    assert accs.tolist() == [1.0] * 10


def test_pairs_from_dataset_decodes_only_used_images(tmp_path):
    labels = [i % 4 for i in range(20)]
    rows = [{"image": png(10 * i), "label": lab, "identity": f"id{lab}", "source": f"s{i}",
             "degradation": i / 20} for i, lab in enumerate(labels)]
    uri = str(tmp_path / "ds")
    write_dataset(uri, rows, label_to_identity=[f"id{k}" for k in range(4)], target_shard_bytes=600)
    data = pairs_from_dataset(uri, num_genuine=5, num_impostor=7, seed=3, image_size=8, num_folds=4)
    assert data.pairs.shape == (12, 2) and int(data.is_same.sum()) == 5
    same_label = data.labels[data.pairs[:, 0]] == data.labels[data.pairs[:, 1]]
    assert same_label.tolist() == data.is_same.tolist()
    assert len(data.images) == len(np.unique(data.pairs)) <= 20
    full = load_arrays(uri, image_size=8, columns_extra=("degradation",))
    rows_used = [int(s[1:]) for s in data.sources]
    np.testing.assert_array_equal(data.images, full["image"][rows_used])
    np.testing.assert_allclose(data.degradation, full["degradation"][rows_used])
    assert data.folds.tolist() == contiguous_folds(12, 4).tolist()
    again = pairs_from_dataset(uri, num_genuine=5, num_impostor=7, seed=3, image_size=8)
    np.testing.assert_array_equal(again.pairs, data.pairs)
    with pytest.raises(DatasetError, match="asked for 999 genuine pairs"):
        pairs_from_dataset(uri, num_genuine=999, num_impostor=1, image_size=8)


def test_write_errors_name_the_pair(tmp_path):
    uri = str(tmp_path / "p")
    with pytest.raises(DatasetError, match=r"pair 1 \[0, 9\] indexes outside the 6 images"):
        write_pairs_dataset(uri, image_rows(LABELS), [[0, 1], [0, 9]], np.array([True, False]),
                            label_to_identity=IDS)
    with pytest.raises(DatasetError, match=r"pair 1 \[0, 2\]: genuine pair joins different labels \(0, 1\)"):
        write_pairs_dataset(uri, image_rows(LABELS), [[0, 1], [0, 2]], np.array([True, True]),
                            label_to_identity=IDS)
    with pytest.raises(DatasetError, match=r"pair 0 \[0, 1\]: impostor pair joins the same label"):
        write_pairs_dataset(uri, image_rows(LABELS), [[0, 1]], np.array([False]), label_to_identity=IDS)
    with pytest.raises(DatasetError, match="pair 0 joins image 3 with itself"):
        write_pairs_dataset(uri, image_rows(LABELS), [[3, 3]], np.array([True]), label_to_identity=IDS)
    with pytest.raises(DatasetError, match=r"pairs must have shape \(P, 2\) with P >= 1"):
        write_pairs_dataset(uri, image_rows(LABELS), np.zeros((0, 2), int), np.zeros(0, bool),
                            label_to_identity=IDS)
    with pytest.raises(DatasetError, match="is_same must be a bool array"):
        write_pairs_dataset(uri, image_rows(LABELS), [[0, 1]], [1], label_to_identity=IDS)
    assert not Path(uri).exists() and list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_existing_and_complete_is_refused(tmp_path):
    uri = tmp_path / "p"
    write_pairs_dataset(str(uri), image_rows(LABELS), PAIRS, SAME, label_to_identity=IDS)
    before = tree_digest(uri)
    with pytest.raises(DatasetError, match="already exists"):
        write_pairs_dataset(str(uri), image_rows(LABELS), PAIRS, SAME, label_to_identity=IDS)

    def failing_rows():
        yield from image_rows(LABELS)[:3]
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        write_pairs_dataset(str(uri), failing_rows(), PAIRS, SAME, label_to_identity=IDS, overwrite=True)
    assert tree_digest(uri) == before
    assert [p.name for p in tmp_path.iterdir()] == ["p"]
    doc = write_pairs_dataset(str(uri), image_rows(LABELS), PAIRS[:2], SAME[:2], label_to_identity=IDS,
                              overwrite=True)
    assert doc["num_pairs"] == 2 and read_pairs_table(str(uri))[0].shape == (2, 2)


def test_read_errors(tmp_path):
    uri = tmp_path / "p"
    write_pairs_dataset(str(uri), image_rows(LABELS), PAIRS, SAME, label_to_identity=IDS)
    manifest = json.loads((uri / "pairs.json").read_text())

    def rewrite(table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        (uri / "pairs.parquet").write_bytes(buf.getvalue())
        doc = dict(manifest, pairs_sha256=hashlib.sha256(buf.getvalue()).hexdigest())
        (uri / "pairs.json").write_text(json.dumps(doc))

    original = pq.read_table(uri / "pairs.parquet")
    rewrite(original.drop_columns(["fold"]))
    with pytest.raises(DatasetError, match=r"pairs\.parquet: missing column 'fold'"):
        read_pairs_dataset(str(uri), image_size=8)
    rewrite(original.set_column(1, "b", pa.array([1, 2, 3, 4, 5, 60], pa.int64())))
    with pytest.raises(DatasetError, match=r"pairs\.parquet: row 5: pair \[3, 60\] indexes outside the 6"):
        read_pairs_dataset(str(uri), image_size=8)
    rewrite(original.slice(0, 5))
    with pytest.raises(DatasetError, match=r"5 pairs, pairs\.json says 6"):
        read_pairs_dataset(str(uri), image_size=8)
    (uri / "pairs.parquet").write_bytes(b"changed")
    with pytest.raises(DatasetError, match=r"pairs\.parquet: sha256 does not match pairs\.json"):
        read_pairs_dataset(str(uri), image_size=8)
    (uri / "pairs.json").write_text(json.dumps(dict(manifest, num_images=7)))
    (uri / "pairs.parquet").unlink()
    with pytest.raises(DatasetError, match=r"pairs\.parquet: missing"):
        read_pairs_dataset(str(uri), image_size=8)
    (uri / "pairs.json").unlink()
    with pytest.raises(DatasetError, match=r"no pairs\.json \(not a pairs dataset, or its write never"):
        read_pairs_dataset(str(uri), image_size=8)


def test_images_count_must_match(tmp_path):
    uri = tmp_path / "p"
    write_pairs_dataset(str(uri), image_rows(LABELS), PAIRS, SAME, label_to_identity=IDS)
    doc = json.loads((uri / "pairs.json").read_text())
    (uri / "pairs.json").write_text(json.dumps(dict(doc, num_images=7)))
    with pytest.raises(DatasetError, match=r"images: 6 images, pairs\.json says 7"):
        read_pairs_dataset(str(uri), image_size=8)
