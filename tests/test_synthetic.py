"""Synthetic faces: deterministic, cached safely, and degradation really removes detail."""

from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data.pipeline import load_arrays
from data.shards import read_manifest, validate_dataset
from data.synthetic import (
    DEGRADATION_TYPES,
    SyntheticSpec,
    contact_sheet,
    degrade,
    ensure_synthetic_dataset,
    identity_params,
    render_face,
    render_sample,
    sample_variation,
)

TINY = SyntheticSpec(num_identities=4, train_per_identity=6, val_per_identity=4, image_size=32, seed=3)


def grey(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.float64)


def laplacian_variance(img: Image.Image) -> float:
    x = grey(img)
    lap = -4 * x[1:-1, 1:-1] + x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:]
    return float(lap.var())


def detail(img: Image.Image) -> np.ndarray:
    """High-pass part of the image: the fine structure that tells identities apart."""
    return grey(img) - grey(img.filter(ImageFilter.GaussianBlur(2)))


def detail_correlation(clean: Image.Image, degraded: Image.Image) -> float:
    return float(np.corrcoef(detail(clean).ravel(), detail(degraded).ravel())[0, 1])


def test_same_spec_gives_same_bytes_and_seed_changes_them():
    a = render_sample(TINY, "train", 2, 5)
    b = render_sample(TINY, "train", 2, 5)
    assert a == b
    other = render_sample(SyntheticSpec(**{**TINY.__dict__, "seed": 4}), "train", 2, 5)
    assert other["image"] != a["image"]
    assert a["label"] == 2 and a["identity"] == "synth-00002" and a["source"] == "synthetic:seed=3:train:2:5"


def test_pool_and_inline_generation_are_byte_identical(tmp_path):
    inline = ensure_synthetic_dataset(str(tmp_path / "a"), TINY, workers=1)
    pooled = ensure_synthetic_dataset(str(tmp_path / "b"), TINY, workers=2)
    for split in ("train", "val"):
        assert [s["sha256"] for s in read_manifest(inline[split]).shards] == \
            [s["sha256"] for s in read_manifest(pooled[split]).shards]


def test_dataset_layout_labels_and_degradation_plan(tmp_path):
    uris = ensure_synthetic_dataset(str(tmp_path), TINY, workers=1)
    assert set(uris) == {"train", "val"}
    assert Path(uris["train"]).parent.name == f"synthetic-{TINY.cache_key()}"
    train = validate_dataset(uris["train"], decode_images=True)
    val = validate_dataset(uris["val"], decode_images=True)
    assert (train.num_samples, val.num_samples, train.num_classes) == (24, 16, 4)
    assert train.image_size == [32, 32]
    assert {"degradation", "degradation_type"} <= set(train.columns)
    arrays = load_arrays(uris["train"], image_size=32, columns_extra=("degradation", "degradation_type"))
    d, kinds = arrays["degradation"], arrays["degradation_type"]
    # exactly round(clean_fraction * n) clean samples per identity, the rest strictly inside (0, 1]
    for label in range(4):
        assert int((d[arrays["label"] == label] == 0).sum()) == round(TINY.clean_fraction * 6)
    assert np.all((d > 0) | (kinds == "none")) and np.all((d == 0) == (kinds == "none"))
    assert d.max() <= 1.0 and set(kinds) - {"none"} <= set(DEGRADATION_TYPES)
    assert arrays["label"].tolist() != sorted(arrays["label"].tolist()), "rows should be shuffled"


def test_cache_is_reused_and_incomplete_cache_is_regenerated(tmp_path):
    uris = ensure_synthetic_dataset(str(tmp_path), TINY, workers=1)
    manifest = Path(uris["train"]) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert ensure_synthetic_dataset(str(tmp_path), TINY, workers=1) == uris
    assert manifest.stat().st_mtime_ns == stamp, "a complete cache must not be regenerated"
    manifest.unlink()  # as if a writer died before finishing
    assert ensure_synthetic_dataset(str(tmp_path), TINY, workers=1) == uris
    validate_dataset(uris["train"])
    left = sorted(p for p in os.listdir(tmp_path) if not p.endswith(".lock"))
    assert left == [Path(uris["train"]).parent.name]


def _ensure_in_child(root: str, queue) -> None:
    queue.put(ensure_synthetic_dataset(root, TINY, workers=1))


def test_concurrent_callers_share_one_cache(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert all(r == results[0] for r in results)
    for uri in results[0].values():
        validate_dataset(uri, decode_images=True)
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []


def test_identities_differ_and_samples_vary():
    spec = SyntheticSpec(image_size=56)
    rng = np.random.default_rng(0)
    same = [render_face(identity_params(spec, 0), sample_variation(rng, spec), 56) for _ in range(2)]
    assert not np.array_equal(np.asarray(same[0]), np.asarray(same[1])), "pose/lighting must vary"
    assert identity_params(spec, 0) != identity_params(spec, 1)
    assert identity_params(spec, 0) == identity_params(spec, 0)


@pytest.mark.parametrize("size", [56, 112])
def test_render_sizes(size):
    spec = SyntheticSpec(image_size=size)
    row = render_sample(spec, "val", 1, 0)
    assert Image.open(io.BytesIO(row["image"])).size == (size, size)


def test_jpeg_degradation_is_stored_as_jpeg_and_others_as_png():
    spec = SyntheticSpec(num_identities=10, train_per_identity=12, degradation_types=("jpeg",),
                         clean_fraction=0.5)
    formats = {}
    for k in range(12):
        row = render_sample(spec, "train", 0, k)
        formats.setdefault(row["degradation_type"], set()).add(Image.open(io.BytesIO(row["image"])).format)
    assert formats == {"none": {"PNG"}, "jpeg": {"JPEG"}}


def test_degradation_removes_detail_as_d_grows():
    spec = SyntheticSpec(image_size=56)
    faces = []
    for i in range(6):
        rng = np.random.default_rng(i)
        faces.append(render_face(identity_params(spec, i), sample_variation(rng, spec), 56))
    for kind in DEGRADATION_TYPES:
        corr = {}
        for d in (0.1, 0.5, 0.95):
            values = []
            for i, face in enumerate(faces):
                img, quality = degrade(face, d, kind, np.random.default_rng(100 + i))
                if quality is not None:  # what is stored is the JPEG
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=quality)
                    img = Image.open(buf)
                values.append(detail_correlation(face, img))
            corr[d] = np.mean(values)
        assert corr[0.1] > corr[0.5] > corr[0.95], (kind, corr)
        assert corr[0.1] > 0.6, (kind, corr)  # mild degradation keeps most of the detail
        assert corr[0.95] < 0.35, (kind, corr)  # severe degradation destroys it
    for kind in ("blur", "lowres"):
        sharp = np.mean([laplacian_variance(f) for f in faces])
        rng = np.random.default_rng(0)
        blurred = np.mean([laplacian_variance(degrade(f, 0.9, kind, rng)[0]) for f in faces])
        assert blurred < 0.1 * sharp, (kind, blurred, sharp)


def test_spec_validation_and_contact_sheet():
    with pytest.raises(ValueError, match="unknown degradation types"):
        SyntheticSpec(degradation_types=("fog",))
    with pytest.raises(ValueError, match="clean_fraction"):
        SyntheticSpec(clean_fraction=1.5)
    assert SyntheticSpec().cache_key() != SyntheticSpec(seed=1).cache_key()
    assert SyntheticSpec().cache_key() == SyntheticSpec(target_shard_bytes=1).cache_key()
    sheet = contact_sheet(TINY, identities=2, per_identity=3, scale=1)
    assert sheet.size == (3 * 32, 2 * 32)
