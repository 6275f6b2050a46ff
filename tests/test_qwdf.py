"""QWDF: score every sample, drop quality < s_th, relabel, report per identity; plain loop and Ray Data."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data.qwdf import main, qwdf, read_embedding
from data.shards import DatasetError, read_manifest, validate_dataset, write_dataset
from models import build_eqface_net, save_eqface_net

BRIGHTNESS = {"p0": [200, 220, 240], "p1": [30, 200, 210], "p2": [10, 20, 30], "p3": [250, 40, 60]}


class BrightnessNet(torch.nn.Module):
    """Test double with a known answer: quality = mean pixel in [0, 1], embedding = per-channel means."""

    arch = {"input_size": 8}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean(dim=(2, 3)), (x.mean(dim=(1, 2, 3)) + 1) / 2


def grey_png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def rows_of(uri: str) -> list[dict]:
    return [r for s in read_manifest(uri).shards for r in pq.read_table(Path(uri) / s["file"]).to_pylist()]


@pytest.fixture
def bright_src(tmp_path) -> str:
    names = list(BRIGHTNESS)
    rows = [{"image": grey_png(v), "label": k, "identity": name, "source": f"{name}/{v}",
             "degradation": v / 255} for k, name in enumerate(names) for v in BRIGHTNESS[name]]
    uri = str(tmp_path / "src")
    write_dataset(uri, rows, label_to_identity=names, target_shard_bytes=500)  # several shards
    return uri


def test_filters_relabels_and_reports(bright_src, tmp_path):
    before = tree_digest(Path(bright_src))
    dst = str(tmp_path / "dst")
    report = qwdf(BrightnessNet(), bright_src, dst, 0.5, batch_size=4, progress=False)
    assert tree_digest(Path(bright_src)) == before, "the source must not change"
    assert (report["num_samples"], report["kept"], report["dropped"]) == (12, 6, 6)
    assert report["dropped_per_identity"] == {"p1": 1, "p2": 3, "p3": 2}
    assert report["identities_removed"] == ["p2"]
    assert (report["num_classes_before"], report["num_classes_after"]) == (4, 3)
    assert json.loads((Path(dst) / "qwdf_report.json").read_text()) == report

    manifest = validate_dataset(dst, decode_images=True)
    assert manifest.label_to_identity == ["p0", "p1", "p3"]
    assert {"embedding", "quality", "orig_label", "degradation"} <= set(manifest.columns)
    rows = rows_of(dst)
    assert sorted(r["source"] for r in rows) == ["p0/200", "p0/220", "p0/240", "p1/200", "p1/210", "p3/250"]
    for row in rows:
        v = int(row["source"].split("/")[1])
        assert row["quality"] == pytest.approx(v / 255, abs=1e-6)
        np.testing.assert_allclose(read_embedding(row["embedding"]), [2 * v / 255 - 1] * 3, atol=1e-6)
        assert row["label"] == ["p0", "p1", "p3"].index(row["identity"])
        assert row["orig_label"] == list(BRIGHTNESS).index(row["identity"])
        assert row["degradation"] == pytest.approx(v / 255)
        assert row["image"] == grey_png(v)  # bytes pass through untouched


def test_refusals(bright_src, tmp_path):
    with pytest.raises(DatasetError, match="QWDF never modifies its source"):
        qwdf(BrightnessNet(), bright_src, bright_src, 0.5, progress=False)
    with pytest.raises(DatasetError, match=r"no sample has quality >= 0.99 \(max 0.9804\): nothing to write"):
        qwdf(BrightnessNet(), bright_src, str(tmp_path / "none"), 0.99, progress=False)
    assert not (tmp_path / "none").exists()
    qwdf(BrightnessNet(), bright_src, str(tmp_path / "d"), 0.5, progress=False)
    with pytest.raises(DatasetError, match="already exists"):
        qwdf(BrightnessNet(), bright_src, str(tmp_path / "d"), 0.1, progress=False)
    report = qwdf(BrightnessNet(), bright_src, str(tmp_path / "d"), 0.1, overwrite=True, progress=False)
    assert report["kept"] == 10 and validate_dataset(str(tmp_path / "d")).num_samples == 10
    with pytest.raises(DatasetError, match="no manifest.json"):
        qwdf(BrightnessNet(), str(tmp_path / "missing"), str(tmp_path / "e"), 0.5, progress=False)


def test_corrupt_source_image_names_shard_and_rows(tmp_path):
    rows = [{"image": grey_png(100) if i != 2 else b"broken", "label": 0, "identity": "a", "source": f"s{i}"}
            for i in range(4)]
    uri = str(tmp_path / "src")
    write_dataset(uri, rows, label_to_identity=["a"])
    with pytest.raises(DatasetError, match=r"part-00000\.parquet \(rows 0\.\.3\): corrupt image at row 2 of "
                                           r"batch \(identity=a, source=s2\)"):
        qwdf(BrightnessNet(), uri, str(tmp_path / "dst"), 0.1, progress=False)
    assert not (tmp_path / "dst").exists()


def test_missing_column_names_the_shard(bright_src, tmp_path):
    shard = Path(bright_src) / read_manifest(bright_src).shards[1]["file"]
    pq.write_table(pq.read_table(shard).drop_columns(["source"]), shard)
    with pytest.raises(DatasetError, match=r"part-00001\.parquet: missing required column\(s\) \['source'\]"):
        qwdf(BrightnessNet(), bright_src, str(tmp_path / "dst"), 0.5, progress=False)


# ------------------------------------------------------------------------- a real EQFaceNet, loop and Ray


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A small random EQFaceNet saved as a checkpoint directory, and a 3 x 4 dataset of noise images."""
    root = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    net = build_eqface_net(backbone="mobilefacenet", input_size=48, width_mult=0.25, embedding_size=8).eval()
    ckpt = root / "ckpt"
    ckpt.mkdir()
    save_eqface_net(net, ckpt / "net.pt")
    (ckpt / "meta.json").write_text("{}")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
        rows.append({"image": buf.getvalue(), "label": i % 3, "identity": f"id{i % 3}", "source": f"n{i}"})
    src = str(root / "src")
    write_dataset(src, rows, label_to_identity=["id0", "id1", "id2"])
    everything = qwdf(net, src, str(root / "all"), 0.0, progress=False)  # quality is in [0, 1]: keeps all
    assert everything["kept"] == 12
    scored = {r["source"]: r for r in rows_of(str(root / "all"))}
    return {"root": root, "net": net, "ckpt": str(ckpt), "src": src, "scored": scored}


def test_cli_with_checkpoint_dir_keeps_exactly_quality_above_threshold(real, capsys):
    qualities = {s: r["quality"] for s, r in real["scored"].items()}
    s_th = float(np.median(list(qualities.values())))
    dst = str(real["root"] / "cli")
    assert main(["--model", real["ckpt"], "--src", real["src"], "--dst", dst, "--s-th", str(s_th),
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["image_size"] == 48 and summary["scored_with"] == "loop"
    kept = {r["source"] for r in rows_of(dst)}
    assert kept == {s for s, q in qualities.items() if q >= s_th} and 0 < len(kept) < 12
    assert summary["kept"] == len(kept)
    # the scores are the model's own forward pass on the decoded image
    from data.pipeline import load_arrays

    arrays = load_arrays(real["src"], image_size=48)
    with torch.no_grad():
        emb, quality = real["net"](torch.from_numpy(arrays["image"]))
    for i, source in enumerate(f"n{k}" for k in range(12)):
        assert qualities[source] == pytest.approx(float(quality[i]), abs=1e-5)
        np.testing.assert_allclose(read_embedding(real["scored"][source]["embedding"]), emb[i].numpy(),
                                   atol=1e-5)
    assert main(["--model", real["ckpt"], "--src", real["src"], "--dst", real["src"], "--s-th", "0.5",
                 "--no-progress"]) == 2
    assert "never modifies its source" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.integration
def test_ray_scoring_matches_the_loop(real, ray_local):
    qualities = sorted(r["quality"] for r in real["scored"].values())
    s_th = qualities[4]  # keeps 8 of 12
    dst = str(real["root"] / "ray")
    report = qwdf(real["net"], real["src"], dst, s_th, use_ray=True, batch_size=5, progress=False)
    assert report["scored_with"] == "ray" and report["kept"] == 8
    rows = {r["source"]: r for r in rows_of(dst)}
    assert set(rows) == {s for s, r in real["scored"].items() if r["quality"] >= s_th}
    for source, row in rows.items():
        assert row["quality"] == pytest.approx(real["scored"][source]["quality"], abs=1e-5)
        np.testing.assert_allclose(read_embedding(row["embedding"]),
                                   read_embedding(real["scored"][source]["embedding"]), atol=1e-5)


@pytest.mark.integration
def test_ray_scoring_reports_a_corrupt_row(real, ray_local, tmp_path):
    rows = [{"image": grey_png(100) if i != 1 else b"broken", "label": 0, "identity": "a", "source": f"s{i}"}
            for i in range(3)]
    uri = str(tmp_path / "src")
    write_dataset(uri, rows, label_to_identity=["a"])
    with pytest.raises(DatasetError, match=r"corrupt image at row 1 of batch \(identity=a, source=s1\)"):
        # the real net: Ray workers cannot import classes defined in a test module
        qwdf(real["net"], uri, str(tmp_path / "dst"), 0.1, use_ray=True, progress=False)
    assert not (tmp_path / "dst").exists()
