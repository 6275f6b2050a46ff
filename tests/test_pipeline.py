"""decode_batch / augmentation / load_arrays as plain functions, then a tiny Ray Data pipeline run."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from data.augment import AugmentConfig, augment_image
from data.pipeline import (
    corrupt_rows_skipped,
    dataset_error_from,
    decode_batch,
    load_arrays,
    to_model_input,
    training_dataset,
)
from data.shards import DatasetError, shard_uris, write_dataset

IDS = [f"id{i}" for i in range(4)]


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def pattern(i: int, size: int = 16) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def batch_of(images: list[bytes], labels: list[int] | None = None) -> dict[str, np.ndarray]:
    n = len(images)
    col = np.empty(n, dtype=object)
    col[:] = images
    labels = labels if labels is not None else [i % 4 for i in range(n)]
    return {
        "image": col,
        "label": np.asarray(labels, dtype=np.int32),
        "identity": np.asarray([IDS[lab] for lab in labels], dtype=object),
        "source": np.asarray([f"src{i}" for i in range(n)], dtype=object),
        "degradation": np.linspace(0, 1, n, dtype=np.float64),
        "degradation_type": np.asarray(["blur"] * n, dtype=object),
        "frame": np.arange(n, dtype=np.int32),
    }


def test_decode_batch_shapes_ranges_and_passthrough():
    images = [encode(Image.new("RGB", (16, 16), (255, 255, 255))),
              encode(Image.new("RGB", (16, 16), (0, 0, 0))),
              encode(Image.new("L", (16, 16), 128)), encode(pattern(3, size=40), "JPEG")]
    out = decode_batch(batch_of(images), image_size=16, augment=None, seed=0)
    assert set(out) == {"image", "label", "degradation", "frame"}  # strings dropped, numbers kept
    assert out["image"].shape == (4, 3, 16, 16) and out["image"].dtype == np.float32
    assert out["label"].dtype == np.int64 and out["label"].tolist() == [0, 1, 2, 3]
    assert out["degradation"].dtype == np.float32 and out["frame"].dtype == np.int64
    assert np.all(out["image"][0] == 1.0) and np.all(out["image"][1] == -1.0)
    grey = out["image"][2]
    assert np.allclose(grey[0], grey[1]) and np.allclose(grey[1], grey[2])  # greyscale -> 3 equal channels
    assert np.allclose(grey, 128 / 127.5 - 1, atol=1e-6)
    assert out["image"].min() >= -1.0 and out["image"].max() <= 1.0


def test_corrupt_row_raises_with_its_name_or_is_skipped():
    images = [encode(pattern(i)) for i in range(4)]
    images[2] = b"\x89PNG garbage"
    with pytest.raises(DatasetError, match=r"corrupt image at row 2 of batch \(identity=id2, source=src2\)"):
        decode_batch(batch_of(images), image_size=16, augment=None, seed=0)
    before = corrupt_rows_skipped()
    out = decode_batch(batch_of(images), image_size=16, augment=None, seed=0, skip_corrupt=True)
    assert out["label"].tolist() == [0, 1, 3] and out["image"].shape[0] == 3
    assert np.allclose(out["degradation"], [0, 1 / 3, 1])
    assert corrupt_rows_skipped() == before + 1


def test_augmentation_is_seeded_per_row():
    batch = batch_of([encode(pattern(i)) for i in range(6)])
    cfg = AugmentConfig(hflip=True, crop_scale_min=0.6, jpeg_prob=0.5, rescale_prob=0.5)
    a = decode_batch(batch, image_size=16, augment=cfg, seed=1)
    b = decode_batch(batch, image_size=16, augment=cfg, seed=1)
    assert np.array_equal(a["image"], b["image"])
    # the same row gives the same result whatever batch it arrives in
    tail = decode_batch({k: v[3:] for k, v in batch.items()}, image_size=16, augment=cfg, seed=1)
    assert np.array_equal(a["image"][3:], tail["image"])
    assert not np.array_equal(a["image"], decode_batch(batch, image_size=16, augment=cfg, seed=2)["image"])
    fresh = [decode_batch(batch, image_size=16, augment=cfg, seed=1, nonce=None)["image"] for _ in range(2)]
    assert not np.array_equal(fresh[0], fresh[1]), "nonce=None must draw new augmentations each pass"
    plain = decode_batch(batch, image_size=16, augment=None, seed=1)["image"]
    assert not np.array_equal(a["image"], plain)


def test_uint8_pixels_normalised_by_the_worker_equal_the_float_path():
    batch = batch_of([encode(pattern(i)) for i in range(5)])
    cfg = AugmentConfig(hflip=True, crop_scale_min=0.8)
    floats = decode_batch(batch, image_size=16, augment=cfg, seed=3)["image"]
    pixels = decode_batch(batch, image_size=16, augment=cfg, seed=3, pixels_only=True)["image"]
    assert pixels.dtype == np.uint8 and pixels.shape == (5, 16, 16, 3)
    assert pixels.nbytes * 4 == floats.nbytes
    np.testing.assert_allclose(to_model_input(torch.from_numpy(pixels)).numpy(), floats, rtol=0, atol=1e-6)


def test_augment_image_options():
    img = pattern(0, size=20)
    rng = np.random.default_rng(0)
    off = AugmentConfig(hflip=False, crop_scale_min=1.0)
    assert np.array_equal(np.asarray(augment_image(img, off, rng)), np.asarray(img))
    flips = [np.array_equal(np.asarray(augment_image(img, AugmentConfig(crop_scale_min=1.0), rng)),
                            np.asarray(img)[:, ::-1]) for _ in range(200)]
    assert 60 < sum(flips) < 140
    heavy = AugmentConfig(hflip=False, crop_scale_min=0.5, jpeg_prob=1.0, jpeg_quality=(10, 10),
                          rescale_prob=1.0)
    out = augment_image(img, heavy, rng)
    assert out.size == img.size and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), np.asarray(img))
    with pytest.raises(ValueError, match="crop_scale_min"):
        AugmentConfig(crop_scale_min=0.0)
    with pytest.raises(ValueError, match="jpeg_quality"):
        AugmentConfig(jpeg_quality=(90, 40))


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("pipe") / "ds")
    rows = []
    for i in range(40):
        label = i % 4
        rows.append({"image": encode(pattern(i, size=24)), "label": label, "identity": IDS[label],
                     "source": f"s{i}", "degradation": i / 40, "degradation_type": "noise"})
    write_dataset(uri, rows, label_to_identity=IDS, target_shard_bytes=20_000)
    return uri


def test_load_arrays(tiny_dataset):
    extras = ("degradation", "degradation_type", "track")
    arrays = load_arrays(tiny_dataset, image_size=16, columns_extra=extras)
    assert set(arrays) == {"image", "label", "degradation", "degradation_type"}  # absent 'track' is left out
    assert arrays["image"].shape == (40, 3, 16, 16) and arrays["image"].dtype == np.float32
    assert arrays["label"].tolist() == [i % 4 for i in range(40)]
    assert arrays["degradation"].dtype == np.float32 and arrays["degradation_type"][0] == "noise"
    assert load_arrays(tiny_dataset, image_size=16, limit=7)["image"].shape[0] == 7


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # address="local": always a private cluster, never one that another process left running
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.integration
def test_ray_training_dataset_yields_batches(ray_local, tiny_dataset):
    ds = training_dataset(tiny_dataset, image_size=16, augment=AugmentConfig(), seed=0, batch_size=8)
    labels, shapes = [], set()
    for batch in ds.iter_torch_batches(batch_size=16, local_shuffle_buffer_size=20, local_shuffle_seed=0):
        # uint8 pixels travel through Ray; the worker normalises them on its device
        assert str(batch["image"].dtype) == "torch.uint8" and str(batch["label"].dtype) == "torch.int64"
        images = to_model_input(batch["image"])
        shapes.add(tuple(images.shape[1:]))
        assert images.dtype == torch.float32 and float(images.min()) >= -1 and float(images.max()) <= 1
        assert set(batch) == {"image", "label", "degradation"}
        labels += batch["label"].tolist()
    assert shapes == {(3, 16, 16)}
    assert sorted(labels) == sorted(i % 4 for i in range(40))


@pytest.mark.integration
def test_ray_pipeline_corrupt_rows(ray_local, tmp_path):
    uri = str(tmp_path / "bad")
    rows = [{"image": encode(pattern(i)) if i != 5 else b"broken", "label": i % 4, "identity": IDS[i % 4],
             "source": f"s{i}"} for i in range(12)]
    write_dataset(uri, rows, label_to_identity=IDS, image_size=16)
    skipped = training_dataset(uri, image_size=16, augment=None, skip_corrupt=True)
    assert skipped.count() == 11
    failing = training_dataset(uri, image_size=16, augment=None)
    with pytest.raises(Exception) as excinfo:
        failing.take_all()
    error = dataset_error_from(excinfo.value)  # Ray wraps it; the flow still needs the one-line reason
    assert isinstance(error, DatasetError)
    # the exact shard and row in it, from the row-group reader
    shard = re.escape(f"{uri}/part-00000.parquet")
    assert re.fullmatch(rf"corrupt image at {shard} row 5 \(identity=id1, source=s5\): .*", str(error))


@pytest.mark.integration
def test_each_row_group_decodes_in_its_own_task(ray_local, tmp_path, monkeypatch):
    """Row groups spread over the CPUs and stream: one decoded block per row group. (A decode batch_size
    counted in row groups once put every group of a small dataset into one task, on one core.)"""
    import pyarrow.parquet as pq

    from data import shards

    monkeypatch.setattr(shards, "ROW_GROUP_BYTES", 4_000)
    uri = str(tmp_path / "groups")
    rows = [{"image": encode(pattern(i, size=24)), "label": i % 4, "identity": IDS[i % 4], "source": f"s{i}"}
            for i in range(60)]
    write_dataset(uri, rows, label_to_identity=IDS)
    groups = sum(pq.read_metadata(s).num_row_groups for s in shard_uris(uri))
    assert groups >= 4
    ds = training_dataset(uri, image_size=16, augment=None).materialize()
    assert ds.num_blocks() == groups
    assert ds.count() == 60
