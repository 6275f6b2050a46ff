"""The per-identity holdout (data/splits.py) and its reading through Ray Data (data.pipeline)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data.shards import DatasetError, write_dataset
from data.splits import holdout_mask, split_dataset


def test_each_identity_keeps_its_share_back_and_at_least_one_photo_forward():
    labels = np.repeat(np.arange(5), [1, 2, 4, 10, 40])
    keys = np.array([f"photo-{i}" for i in range(labels.size)])
    held = holdout_mask(labels, keys, 0.25, seed=0)
    per_identity = [int(held[labels == i].sum()) for i in range(5)]
    assert per_identity == [0, 1, 1, 2, 10]  # n=1 keeps its photo; n=2 holds 1 back (at least 1, at most n-1)
    assert holdout_mask(labels, keys, 0.0).sum() == 0


def test_the_choice_follows_the_photos_not_their_order():
    labels = np.repeat(np.arange(3), 12)
    keys = np.array([f"p{i}" for i in range(labels.size)])
    held = holdout_mask(labels, keys, 0.3, seed=7)
    order = np.random.default_rng(0).permutation(labels.size)
    again = holdout_mask(labels[order], keys[order], 0.3, seed=7)
    assert set(keys[held]) == set(keys[order][again])
    assert set(keys[held]) != set(keys[holdout_mask(labels, keys, 0.3, seed=8)])  # the seed matters


def _png(value: int) -> bytes:
    """A noise image (~800 bytes as PNG): a few make a row group of their own."""
    pixels = np.random.default_rng(value).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _dataset(uri, per_identity):
    names = [f"id{i}" for i in range(len(per_identity))]
    rows = [{"image": _png(10 * i + k), "label": i, "identity": names[i], "source": f"{names[i]}/{k}.png"}
            for i, n in enumerate(per_identity) for k in range(n)]
    write_dataset(str(uri), rows, label_to_identity=names, target_shard_bytes=2000)
    return rows


def test_a_dataset_split_covers_every_row_once_across_shards(tmp_path):
    rows = _dataset(tmp_path / "d", [3, 5, 8])
    split = split_dataset(str(tmp_path / "d"), 0.25, seed=0)
    assert len(split.held) > 1  # several shards
    fit, holdout = split.rows("fit"), split.rows("holdout")
    assert split.count("fit") + split.count("holdout") == split.count("all") == len(rows)
    for shard in split.held:
        assert not set(fit[shard]) & set(holdout[shard])
    assert split.count("holdout") == 1 + 1 + 2
    assert split.rows("all") is None


@pytest.mark.parametrize("per_identity, message", [
    ([1, 1, 1], "every identity has one photo, so data.quality_holdout=0.25 can hold none back"),
])
def test_a_set_with_nothing_to_hold_back_is_refused(tmp_path, per_identity, message):
    _dataset(tmp_path / "d", per_identity)
    with pytest.raises(DatasetError, match=message):
        split_dataset(str(tmp_path / "d"), 0.25)


@pytest.mark.integration
def test_ray_data_reads_exactly_the_rows_of_a_part(tmp_path):
    """What a quality step (holdout) and a backbone step (fit) read through the training pipeline."""
    import ray

    from data.pipeline import training_dataset

    rows = _dataset(tmp_path / "d", [3, 5, 8])
    split = split_dataset(str(tmp_path / "d"), 0.25, seed=0)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # Each row's pixels are its own noise: they say which row came back.
        which = {np.asarray(Image.open(io.BytesIO(r["image"]))).tobytes(): r["source"] for r in rows}
        seen = {}
        for part in ("fit", "holdout"):
            ds = training_dataset(str(tmp_path / "d"), image_size=16, augment=None, rows=split.rows(part))
            seen[part] = [which[np.asarray(r["image"]).tobytes()] for r in ds.take_all()]
        assert len(seen["fit"]) == split.count("fit") and len(seen["holdout"]) == split.count("holdout")
        assert not set(seen["fit"]) & set(seen["holdout"])
        assert sorted(seen["fit"] + seen["holdout"]) == sorted(r["source"] for r in rows)
        # per identity: round(0.25 n), at least 1
        assert sorted(source.split("/")[0] for source in seen["holdout"]) == ["id0", "id1", "id2", "id2"]
    finally:
        ray.shutdown()
