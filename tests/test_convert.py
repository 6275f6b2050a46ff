"""Converters: image folder, list file, verification .bin, LFW pairs.txt; bad input; real faces."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.convert import (
    ConvertError,
    Options,
    convert_imagefolder,
    convert_listfile,
    convert_pairs_txt,
    convert_verification_bin,
    main,
)
from data.pairs import read_pairs_dataset, read_pairs_table
from data.pipeline import load_arrays
from data.shards import read_manifest, validate_dataset

FACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "faces"
OPTS = Options(workers=1, progress=False)


def image_bytes(value: int, fmt: str = "PNG", size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, (3 * value) % 256, 90)).save(buf, format=fmt)
    return buf.getvalue()


def rows_of(uri: str) -> list[dict]:
    return [r for s in read_manifest(uri).shards for r in pq.read_table(Path(uri) / s["file"]).to_pylist()]


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def folder(tmp_path) -> Path:
    """carol: 3 images, alice: 2, bob: 1 (+ a stray README); JPEG and PNG mixed."""
    root = tmp_path / "src"
    for name, values in (("carol", [1, 2, 3]), ("alice", [10, 11]), ("bob", [20])):
        (root / name).mkdir(parents=True)
        for v in values:
            fmt = "JPEG" if v % 2 else "PNG"
            (root / name / f"{name}_{v:02d}.{fmt.lower()}").write_bytes(image_bytes(v, fmt))
    (root / "alice" / "README.txt").write_text("not an image")
    return root


# ------------------------------------------------------------------------- image folder


def test_imagefolder_round_trip_keeps_bytes_and_sorted_labels(folder, tmp_path):
    dst = str(tmp_path / "ds")
    report = convert_imagefolder(str(folder), dst, opts=Options(workers=2, progress=False))
    assert (report.num_samples, report.num_classes, report.num_shards) == (6, 3, 1)
    assert report.notes == ["ignored 1 files that are not images in an identity sub-folder"]
    manifest = validate_dataset(dst, decode_images=True)
    assert manifest.label_to_identity == ["alice", "bob", "carol"]
    assert manifest.image_size == [12, 12]
    rows = rows_of(dst)
    for row in rows:
        assert row["image"] == (folder / row["source"]).read_bytes()
        assert row["identity"] == row["source"].split("/")[0]
        assert manifest.label_to_identity[row["label"]] == row["identity"]
    sources = [r["source"] for r in rows]
    assert sorted(sources) == sorted(str(p.relative_to(folder)) for p in folder.rglob("*_*.*"))
    assert sources != sorted(sources), "default order is shuffled (seed 0)"
    again = str(tmp_path / "again")
    convert_imagefolder(str(folder), again, opts=OPTS)
    assert [r["source"] for r in rows_of(again)] == sources, "the shuffle is seeded"


def test_imagefolder_min_per_identity_resize_and_no_shuffle(folder, tmp_path):
    dst = str(tmp_path / "ds")
    opts = Options(workers=1, progress=False, resize=8, shuffle_seed=None)
    report = convert_imagefolder(str(folder), dst, min_per_identity=2, opts=opts)
    assert report.dropped_identities == ["bob"]
    manifest = validate_dataset(dst, decode_images=True)
    assert manifest.label_to_identity == ["alice", "carol"] and manifest.image_size == [8, 8]
    rows = rows_of(dst)
    assert [r["source"] for r in rows] == ["alice/alice_10.png", "alice/alice_11.jpeg", "carol/carol_01.jpeg",
                                          "carol/carol_02.png", "carol/carol_03.jpeg"]
    assert [r["label"] for r in rows] == [0, 0, 1, 1, 1]
    formats = [Image.open(io.BytesIO(r["image"])).format for r in rows]
    assert formats == ["PNG", "JPEG", "JPEG", "PNG", "JPEG"]  # re-encoded in the same family
    assert load_arrays(dst, image_size=8)["image"].shape == (5, 3, 8, 8)


def test_corrupt_image_stops_and_names_the_file(folder, tmp_path):
    (folder / "bob" / "bob_21.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ConvertError, match=r"bob/bob_21\.png: cannot read image .*--skip-corrupt"):
        convert_imagefolder(str(folder), str(tmp_path / "ds"), opts=OPTS)
    assert not (tmp_path / "ds").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "no staging directory left behind"


def test_truncated_jpeg_is_caught(folder, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG")
    (folder / "carol" / "carol_09.jpg").write_bytes(buf.getvalue()[:-500])  # headers intact, scan data cut
    with pytest.raises(ConvertError, match=r"carol/carol_09\.jpg: cannot read image \(OSError: image file is "
                                           r"truncated"):
        convert_imagefolder(str(folder), str(tmp_path / "ds"), opts=OPTS)


def test_skip_corrupt_counts_and_relabels(folder, tmp_path):
    (folder / "bob" / "bob_20.png").write_bytes(b"")  # bob's only image: bob disappears
    (folder / "carol" / "carol_02.png").write_bytes(image_bytes(2)[:40])
    report = convert_imagefolder(str(folder), str(tmp_path / "ds"),
                                 opts=Options(workers=2, progress=False, skip_corrupt=True))
    assert sorted(s["item"] for s in report.skipped) == ["bob/bob_20.png", "carol/carol_02.png"]
    assert "empty file" in next(s["error"] for s in report.skipped if s["item"] == "bob/bob_20.png")
    assert report.dropped_identities == ["bob"]
    manifest = validate_dataset(str(tmp_path / "ds"), decode_images=True)
    assert (manifest.num_samples, manifest.label_to_identity) == (4, ["alice", "carol"])


def test_existing_dataset_is_refused_then_replaced_whole(folder, tmp_path):
    dst = tmp_path / "ds"
    convert_imagefolder(str(folder), str(dst), opts=OPTS)
    before = tree_digest(dst)
    with pytest.raises(ConvertError, match="already exists.*--overwrite"):
        convert_imagefolder(str(folder), str(dst), opts=OPTS)
    (folder / "alice" / "alice_12.png").write_bytes(b"broken")
    with pytest.raises(ConvertError, match="alice_12.png"):
        convert_imagefolder(str(folder), str(dst), opts=Options(workers=1, progress=False, overwrite=True))
    assert tree_digest(dst) == before, "a failed overwrite must leave the existing dataset intact"
    (folder / "alice" / "alice_12.png").unlink()
    opts = Options(workers=1, progress=False, overwrite=True)
    report = convert_imagefolder(str(folder), str(dst), opts=opts)
    assert report.num_samples == 6 and len(rows_of(str(dst))) == 6, "re-running never duplicates rows"


def test_empty_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match=r"no identity sub-folders with images .*\(empty input\)"):
        convert_imagefolder(str(tmp_path / "empty"), str(tmp_path / "ds"), opts=OPTS)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a_0001.jpg").write_bytes(image_bytes(1, "JPEG"))
    with pytest.raises(ConvertError, match="1 images lie directly in it"):
        convert_imagefolder(str(tmp_path / "flat"), str(tmp_path / "ds"), opts=OPTS)
    with pytest.raises(ConvertError, match="not a directory"):
        convert_imagefolder(str(tmp_path / "missing"), str(tmp_path / "ds"), opts=OPTS)


# ------------------------------------------------------------------------- list file


def write_list(tmp_path: Path, entries: list[tuple[str, int]], extra_lines: str = "") -> Path:
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    lines = []
    for i, (name, label) in enumerate(entries):
        (images / name).write_bytes(image_bytes(i))
        lines.append(f"imgs/{name};{label}")
    path = tmp_path / "train.list"
    path.write_text("# authors' list\n" + "\n".join(lines) + "\n" + extra_lines)
    return path


def test_listfile_remaps_labels_and_keeps_orig_label(tmp_path):
    path = write_list(tmp_path, [("a.png", 7), ("b.png", 5), ("c.png", 6), ("d.png", 7), ("e f.png", 5)])
    dst = str(tmp_path / "ds")
    report = convert_listfile(str(path), dst, root=str(tmp_path), opts=OPTS)
    assert (report.num_samples, report.num_classes) == (5, 3)
    manifest = validate_dataset(dst, decode_images=True)
    assert manifest.label_to_identity == ["5", "6", "7"]
    assert "orig_label" in manifest.columns
    got = {r["source"]: (r["label"], r["orig_label"]) for r in rows_of(dst)}
    assert got == {"imgs/a.png": (2, 7), "imgs/b.png": (0, 5), "imgs/c.png": (1, 6), "imgs/d.png": (2, 7),
                   "imgs/e f.png": (0, 5)}


def test_listfile_gap_bad_line_missing_file_and_empty(tmp_path):
    path = write_list(tmp_path, [("a.png", 0), ("b.png", 1), ("c.png", 3)])
    with pytest.raises(ConvertError, match=r"train\.list: line 4: label 3 leaves a gap: labels \[2\] have"):
        convert_listfile(str(path), str(tmp_path / "ds"), opts=OPTS)
    report = convert_listfile(str(path), str(tmp_path / "ds"), allow_label_gaps=True, opts=OPTS)
    assert report.num_classes == 3 and sorted(r["label"] for r in rows_of(str(tmp_path / "ds"))) == [0, 1, 2]

    path.write_text("imgs/a.png;0\nimgs/b.png 1\n")
    with pytest.raises(ConvertError, match=r"train\.list: line 2: expected 'path;label'"):
        convert_listfile(str(path), str(tmp_path / "x"), opts=OPTS)
    path.write_text("imgs/a.png;0\nimgs/b.png;-1\n")
    with pytest.raises(ConvertError, match=r"line 2: expected 'path;label' with a non-negative integer"):
        convert_listfile(str(path), str(tmp_path / "x"), opts=OPTS)
    path.write_text("imgs/a.png;0\n\nimgs/nope.png;1\n")
    with pytest.raises(ConvertError, match=r"train\.list: line 3 \(imgs/nope\.png\): cannot read image "
                                           r"\(FileNotFoundError"):
        convert_listfile(str(path), str(tmp_path / "x"), opts=OPTS)
    report = convert_listfile(str(path), str(tmp_path / "x"),
                              opts=Options(workers=1, progress=False, skip_corrupt=True))
    assert [s["item"] for s in report.skipped] == [f"{path}: line 3 (imgs/nope.png)"]
    assert report.dropped_identities == ["1"] and report.num_classes == 1
    path.write_text("# nothing\n\n")
    with pytest.raises(ConvertError, match=r"no 'path;label' lines \(empty input\)"):
        convert_listfile(str(path), str(tmp_path / "y"), opts=OPTS)


# ------------------------------------------------------------------------- verification .bin


def write_bin(path: Path, bins: list, issame: list) -> Path:
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=2)
    return path


def test_verification_bin_to_pairs_dataset(tmp_path):
    # people: P (values 1, 2, 3), Q (4, 5), R (6); pairs (2i, 2i+1)
    values = [1, 2, 4, 5, 2, 3, 3, 6, 1, 4, 6, 5]
    issame = [True, True, True, False, False, False]
    bins = [image_bytes(v, "JPEG") for v in values]
    bins[1] = np.frombuffer(bins[1], dtype=np.uint8)  # some .bin files hold numpy buffers
    path = write_bin(tmp_path / "lfw.bin", bins, issame)
    dst = str(tmp_path / "pairs")
    report = convert_verification_bin(str(path), dst, num_folds=3, opts=OPTS)
    assert (report.num_samples, report.num_pairs) == (12, 6)
    pairs, is_same, folds, doc = read_pairs_table(dst)
    np.testing.assert_array_equal(pairs, np.arange(12).reshape(6, 2))
    assert is_same.tolist() == issame and folds.tolist() == [0, 0, 1, 1, 2, 2]
    assert (doc["num_genuine"], doc["num_impostor"], doc["num_folds"]) == (3, 3, 3)
    data = read_pairs_dataset(dst, image_size=12)
    assert data.images.shape == (12, 3, 12, 12)
    # labels: components of the genuine pairs {0,1}, {2,3}, {4,5}
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8]
    assert data.sources.tolist() == [f"lfw.bin#{i}" for i in range(12)]
    assert [r["image"] for r in rows_of(f"{dst}/images")] == [bytes(b) for b in bins]


def test_verification_bin_bad_input(tmp_path):
    good = [image_bytes(v, "PNG") for v in range(4)]
    with pytest.raises(ConvertError, match=r"3 images for 2 pairs"):
        convert_verification_bin(str(write_bin(tmp_path / "a.bin", good[:3], [True, False])),
                                 str(tmp_path / "x"), opts=OPTS)
    (tmp_path / "b.bin").write_bytes(b"not a pickle")
    with pytest.raises(ConvertError, match=r"b\.bin: not a readable verification \.bin"):
        convert_verification_bin(str(tmp_path / "b.bin"), str(tmp_path / "x"), opts=OPTS)
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps((good, [True, False], print)))
    with pytest.raises(ConvertError, match="refusing to load builtins.print"):
        convert_verification_bin(str(evil), str(tmp_path / "x"), opts=OPTS)
    bad = [good[0], good[1], good[2][:30], good[3]]
    path = write_bin(tmp_path / "c.bin", bad, [True, False])
    with pytest.raises(ConvertError, match=r"c\.bin: image 2 \(pair 1\) cannot be read"):
        convert_verification_bin(str(path), str(tmp_path / "x"), opts=OPTS)
    report = convert_verification_bin(str(path), str(tmp_path / "x"),
                                      opts=Options(workers=1, progress=False, skip_corrupt=True))
    assert [s["item"] for s in report.skipped] == [f"{path}: image 2 (pair 1)"]
    assert (report.dropped_pairs, report.num_pairs, report.num_samples) == (1, 1, 3)
    with pytest.raises(ConvertError, match="issame_list is empty"):
        convert_verification_bin(str(write_bin(tmp_path / "d.bin", [], [])), str(tmp_path / "y"), opts=OPTS)


# ------------------------------------------------------------------------- LFW pairs.txt


def lfw_root(tmp_path: Path, people: dict[str, int]) -> Path:
    root = tmp_path / "lfw"
    for k, (name, count) in enumerate(people.items()):
        (root / name).mkdir(parents=True)
        for n in range(1, count + 1):
            (root / name / f"{name}_{n:04d}.jpg").write_bytes(image_bytes(10 * k + n, "JPEG"))
    return root


PAIRS_TXT = """2\t2
Ann_A\t1\t2
Bob_B\t1\t3
Ann_A\t1\tBob_B\t2
Cid_C\t1\tBob_B\t1
Bob_B\t2\t3
Ann_A\t2\t3
Ann_A\t3\tCid_C\t1
Bob_B\t3\tAnn_A\t2
"""


def test_pairs_txt_to_pairs_dataset_with_folds(tmp_path):
    root = lfw_root(tmp_path, {"Ann_A": 3, "Bob_B": 3, "Cid_C": 1})
    (tmp_path / "pairs.txt").write_text(PAIRS_TXT)
    dst = str(tmp_path / "pairs")
    report = convert_pairs_txt(str(tmp_path / "pairs.txt"), dst, root=str(root), opts=OPTS)
    assert (report.num_pairs, report.num_samples, report.num_classes) == (8, 7, 3)
    data = read_pairs_dataset(dst, image_size=12)
    names = [f"{s.split('/')[0]}:{int(s[-8:-4])}" for s in data.sources]
    assert names == ["Ann_A:1", "Ann_A:2", "Ann_A:3", "Bob_B:1", "Bob_B:2", "Bob_B:3", "Cid_C:1"]
    named_pairs = [(names[a], names[b]) for a, b in data.pairs]
    assert named_pairs == [("Ann_A:1", "Ann_A:2"), ("Bob_B:1", "Bob_B:3"), ("Ann_A:1", "Bob_B:2"),
                           ("Cid_C:1", "Bob_B:1"), ("Bob_B:2", "Bob_B:3"), ("Ann_A:2", "Ann_A:3"),
                           ("Ann_A:3", "Cid_C:1"), ("Bob_B:3", "Ann_A:2")]
    assert data.is_same.tolist() == [True, True, False, False, True, True, False, False]
    assert data.folds.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert data.label_to_identity == ["Ann_A", "Bob_B", "Cid_C"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 2]


def test_pairs_txt_bad_input(tmp_path):
    root = lfw_root(tmp_path, {"Ann_A": 3, "Bob_B": 3, "Cid_C": 1})
    path = tmp_path / "pairs.txt"
    path.write_text(PAIRS_TXT.replace("2\t2\n", "4\n"))  # bare count: 4 same + 4 different, one fold
    assert convert_pairs_txt(str(path), str(tmp_path / "a"), root=str(root), opts=OPTS).num_pairs == 8
    assert set(read_pairs_table(str(tmp_path / "a"))[2].tolist()) == {0}
    path.write_text(PAIRS_TXT + "Ann_A\t1\t3\n")
    with pytest.raises(ConvertError, match=r"announces 2 fold\(s\) x 2 x 2 = 8 pairs, but 9 pair lines"):
        convert_pairs_txt(str(path), str(tmp_path / "b"), root=str(root), opts=OPTS)
    path.write_text(PAIRS_TXT.replace("Cid_C\t1\tBob_B\t1", "Cid_C\tone\tBob_B\t1"))
    with pytest.raises(ConvertError, match=r"pairs\.txt: line 5: expected 'name n1 n2' or 'name1 n1 name2"):
        convert_pairs_txt(str(path), str(tmp_path / "b"), root=str(root), opts=OPTS)
    path.write_text("ten\n")
    with pytest.raises(ConvertError, match=r"line 1: expected a header"):
        convert_pairs_txt(str(path), str(tmp_path / "b"), root=str(root), opts=OPTS)
    path.write_text(PAIRS_TXT)
    (root / "Cid_C" / "Cid_C_0001.jpg").unlink()
    with pytest.raises(ConvertError, match=r"Cid_C/Cid_C_0001\.jpg \(used first on .*pairs\.txt line 5\): "
                                           r"cannot read image"):
        convert_pairs_txt(str(path), str(tmp_path / "b"), root=str(root), opts=OPTS)
    report = convert_pairs_txt(str(path), str(tmp_path / "b"), root=str(root),
                               opts=Options(workers=1, progress=False, skip_corrupt=True))
    assert (report.dropped_pairs, report.num_pairs, report.num_classes) == (2, 6, 2)
    assert len(report.skipped) == 1


# ------------------------------------------------------------------------- command line


def test_cli_converts_and_reports_errors(folder, tmp_path, capsys):
    dst = tmp_path / "ds"
    report_file = tmp_path / "report.json"
    assert main(["imagefolder", str(folder), str(dst), "--no-progress", "--workers", "1",
                 "--report", str(report_file)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == 6 and summary["skipped"] == 0
    assert json.loads(report_file.read_text())["num_classes"] == 3
    assert main(["imagefolder", str(folder), str(dst), "--no-progress"]) == 2
    assert "convert: error:" in capsys.readouterr().err and validate_dataset(str(dst)).num_samples == 6
    (folder / "bob" / "bob_20.png").write_bytes(b"junk")
    assert main(["imagefolder", str(folder), str(tmp_path / "ds2"), "--no-progress", "--skip-corrupt",
                 "--min-per-identity", "1"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped"] == 1 and "skipped bob/bob_20.png" in captured.err


# ------------------------------------------------------------------------- real faces


def test_real_faces_through_imagefolder(tmp_path):
    if not FACES.is_dir():
        pytest.skip(f"real face sets not present at {FACES}")
    src = tmp_path / "faces"
    src.mkdir()
    chosen = {"lfw10": ["Ariel_Sharon", "Colin_Powell", "George_W_Bush"], "yaleb": ["yaleB01", "yaleB02"]}
    expected: dict[str, bytes] = {}
    for subset, people in chosen.items():
        for person in people:
            files = sorted((FACES / subset / person).iterdir())[:6]
            (src / person).mkdir()
            for f in files:
                (src / person / f.name).symlink_to(f.resolve())  # links, not copies
                expected[f"{person}/{f.name}"] = f.read_bytes()
    dst = str(tmp_path / "ds")
    report = convert_imagefolder(str(src), dst, opts=Options(workers=2, progress=False))
    assert (report.num_samples, report.num_classes) == (30, 5)
    manifest = validate_dataset(dst, decode_images=True)
    assert manifest.image_size is None, "250x250 LFW and 168x192 Yale B images have no single size"
    assert manifest.label_to_identity == sorted(p for people in chosen.values() for p in people)
    assert {r["source"]: r["image"] for r in rows_of(dst)} == expected
    arrays = load_arrays(dst, image_size=56)
    assert arrays["image"].shape == (30, 3, 56, 56)
    assert np.bincount(arrays["label"]).tolist() == [6] * 5
    grey = arrays["image"][arrays["label"] == manifest.label_to_identity.index("yaleB01")]
    np.testing.assert_allclose(grey[:, 0], grey[:, 1])  # greyscale PNG -> equal RGB channels
