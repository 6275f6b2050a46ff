"""insightface RecordIO packs, built byte by byte from the documented layout, read without MXNet."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data import recordio
from data.convert import Options, convert_recordio
from data.shards import DatasetError, read_manifest, validate_dataset

MAGIC = 0xCED7230A
OPTS = Options(workers=1, progress=False)


# -------------------------------------------------------------- building packs (independent of data/)


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, 40)).save(buf, format="PNG")
    return buf.getvalue()


def frame(part: bytes, cflag: int) -> bytes:
    """One physical record: magic, lrecord (cflag << 29 | length), data, zero padding to 4 bytes."""
    return struct.pack("<II", MAGIC, (cflag << 29) | len(part)) + part + b"\0" * (-len(part) % 4)


def encode_record(payload: bytes) -> bytes:
    """As dmlc's RecordIOWriter: split where a 4-aligned word equals the magic (that word is dropped)."""
    magic = struct.pack("<I", MAGIC)
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == magic]
    if not cuts:
        return frame(payload, 0)
    out, start = b"", 0
    for n, cut in enumerate(cuts):
        out += frame(payload[start:cut], 1 if n == 0 else 2)
        start = cut + 4
    return out + frame(payload[start:], 3)


def ir_payload(label: float, image: bytes, labels: tuple[float, ...] = (), rec_id: int = 0) -> bytes:
    """IRHeader (uint32 flag, float32 label, uint64 id, uint64 id2) [+ flag float32 labels] + image."""
    head = struct.pack("<IfQQ", len(labels), label, rec_id, 0)
    return head + struct.pack(f"<{len(labels)}f", *labels) + image


def with_magic_inside(image: bytes, words: int = 1) -> bytes:
    """`image` + a trailer with the magic `words` times at 4-aligned payload offsets (24-byte header first).

    PNG readers stop at IEND, so the trailer does not change the image.
    """
    pad = -(24 + len(image)) % 4
    magic = struct.pack("<I", MAGIC)
    return image + b"\x01" * pad + (magic + b"abcd") * words


def write_pack(directory: Path, records: list[bytes], *, header: tuple[int, int] | None,
               property_text: str | None, with_idx: bool = True) -> tuple[str, list[int]]:
    """train.rec (+ train.idx, property); keys 0.. in order. Returns (prefix, offsets)."""
    data, offsets = b"", []
    payloads = ([ir_payload(0.0, b"", labels=header)] if header else []) + records
    for payload in payloads:
        offsets.append(len(data))
        data += encode_record(payload)
    (directory / "train.rec").write_bytes(data)
    if with_idx:
        (directory / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    if property_text is not None:
        (directory / "property").write_text(property_text)
    return str(directory / "train"), offsets


IMAGE_LABELS = [0, 0, 1, 1, 2, 2]


def insightface_pack(directory: Path) -> tuple[str, list[int], list[bytes]]:
    """Header record, 6 image records of 3 identities (one multi-part, one flag > 0), 3 identity records."""
    images = [png(10 * i) for i in range(6)]
    images[3] = with_magic_inside(images[3], 2)  # two magic words -> a record in 3 physical parts
    records = []
    for i, (label, image) in enumerate(zip(IMAGE_LABELS, images, strict=True)):
        extra = (float(label), 0.5) if i == 5 else ()  # flag 2: label comes from the extra labels
        records.append(ir_payload(-1.0 if extra else float(label), image, labels=extra, rec_id=i + 1))
    n = len(records)
    identity_records = [ir_payload(0.0, b"", labels=(1 + 2 * k, 3 + 2 * k)) for k in range(3)]
    prefix, offsets = write_pack(directory, records + identity_records, header=(n + 1, n + 1 + 3),
                                 property_text="3,8,8\n")
    return prefix, offsets, images


# ------------------------------------------------------------------------- reading records


def test_multipart_record_is_reassembled_with_the_magic_put_back(tmp_path):
    payload = ir_payload(7.0, with_magic_inside(png(3), 2))
    encoded = encode_record(payload)
    flags = []
    pos = 0
    while pos < len(encoded):  # the test's own writer really produced first/middle/last parts
        magic, lrec = struct.unpack_from("<II", encoded, pos)
        flags.append(lrec >> 29)
        pos += 8 + (((lrec & (2**29 - 1)) + 3) & ~3)
    assert flags == [1, 2, 3]
    path = tmp_path / "one.rec"
    path.write_bytes(encoded + encode_record(ir_payload(1.0, png(9))))
    with open(path, "rb") as f:
        got, nxt = recordio.read_record(f, 0, str(path))
        assert got == payload
        assert nxt == len(encoded)
        header, image = recordio.unpack_payload(got, "x")
    assert header.flag == 0 and header.label == 7.0
    assert image == with_magic_inside(png(3), 2)
    assert [h.label for _, h, _ in recordio.iter_records(str(path))] == [7.0, 1.0]


def test_header_record_and_identity_records_are_handled(tmp_path):
    prefix, offsets, _ = insightface_pack(tmp_path)
    pack = recordio.open_pack(prefix)
    assert pack.has_header_record and pack.num_classes == 3 and pack.image_size == (8, 8)
    assert pack.image_entries == [(k, offsets[k]) for k in range(1, 7)]  # identity records 7..9 left out


def test_pack_round_trip(tmp_path):
    prefix, _, images = insightface_pack(tmp_path)
    dst = str(tmp_path / "ds")
    report = convert_recordio(prefix, dst, opts=OPTS)
    assert (report.num_samples, report.num_classes, report.skipped) == (6, 3, [])
    manifest = validate_dataset(dst, decode_images=True)
    assert manifest.label_to_identity == ["0", "1", "2"] and manifest.image_size == [8, 8]
    table = pq.read_table(Path(dst) / manifest.shards[0]["file"])
    rows = {r["source"]: r for r in table.to_pylist()}
    assert sorted(rows) == [f"train.rec:key={k}" for k in range(1, 7)]
    for k in range(1, 7):
        row = rows[f"train.rec:key={k}"]
        assert row["image"] == images[k - 1], f"key {k}: bytes changed"  # incl. the 3-part record
        assert row["label"] == IMAGE_LABELS[k - 1] and row["identity"] == str(IMAGE_LABELS[k - 1])
    assert table.column("source").to_pylist() != sorted(rows), "rows are written in a shuffled order"


def test_pack_without_idx_header_or_property(tmp_path):
    records = [ir_payload(float(label), png(5 * i)) for i, label in enumerate([1, 0, 1, 2])]
    prefix, _ = write_pack(tmp_path, records, header=None, property_text=None, with_idx=False)
    dst = str(tmp_path / "ds")
    report = convert_recordio(prefix, dst, opts=Options(workers=2, progress=False, shuffle_seed=None))
    assert (report.num_samples, report.num_classes) == (4, 3)  # max label + 1
    table = pq.read_table(Path(dst) / read_manifest(dst).shards[0]["file"])
    assert table.column("label").to_pylist() == [1, 0, 1, 2]  # --no-shuffle keeps the pack order


# ------------------------------------------------------------------------- bad input


def test_bad_magic_names_file_and_offset(tmp_path):
    prefix, offsets, _ = insightface_pack(tmp_path)
    rec = Path(f"{prefix}.rec")
    data = bytearray(rec.read_bytes())
    data[offsets[2]:offsets[2] + 4] = b"JUNK"
    rec.write_bytes(bytes(data))
    o = offsets[2]
    with pytest.raises(DatasetError, match=rf"train\.rec: record 2 at byte offset {o}: bad magic 0x4b4e554a "
                                           rf"at byte offset {o}"):
        convert_recordio(prefix, str(tmp_path / "ds"), opts=OPTS)
    assert not (tmp_path / "ds").exists()


def test_truncated_rec_names_offset(tmp_path):
    prefix, offsets, _ = insightface_pack(tmp_path)
    rec = Path(f"{prefix}.rec")
    rec.write_bytes(rec.read_bytes()[:offsets[6] + 20])  # cut inside record 6
    o = offsets[6]
    with pytest.raises(DatasetError, match=rf"train\.rec: record 6 at byte offset {o}: truncated at byte "
                                           rf"offset {o + 8}: expected \d+ bytes of payload"):
        convert_recordio(prefix, str(tmp_path / "ds"), opts=OPTS)


def test_skip_corrupt_skips_and_counts_bad_records(tmp_path):
    prefix, offsets, images = insightface_pack(tmp_path)
    rec = Path(f"{prefix}.rec")
    data = bytearray(rec.read_bytes())
    data[offsets[1]:offsets[1] + 4] = b"\0\0\0\0"  # record 1: bad magic
    image_at = data.index(images[4][:16], offsets[5])  # record 5: image bytes garbled
    data[image_at + 8:image_at + 40] = b"\xff" * 32
    rec.write_bytes(bytes(data))
    report = convert_recordio(prefix, str(tmp_path / "ds"),
                              opts=Options(workers=1, progress=False, skip_corrupt=True))
    assert report.num_samples == 4 and report.num_classes == 3
    assert [s["item"] for s in report.skipped] == [f"{prefix}.rec: record {k} at byte offset {offsets[k]}"
                                                   for k in (1, 5)]
    assert "bad magic" in report.skipped[0]["error"] and "does not decode" in report.skipped[1]["error"]


def test_label_out_of_range_and_gap(tmp_path):
    records = [ir_payload(float(label), png(i)) for i, label in enumerate([0, 5])]
    prefix, offsets = write_pack(tmp_path, records, header=None, property_text="2,8,8")
    with pytest.raises(DatasetError, match=rf"record 1 at byte offset {offsets[1]}: label 5 out of range"):
        convert_recordio(prefix, str(tmp_path / "a"), opts=OPTS)
    gap_dir = tmp_path / "gap"
    gap_dir.mkdir()
    records = [ir_payload(float(label), png(i)) for i, label in enumerate([0, 2, 2])]
    prefix, _ = write_pack(gap_dir, records, header=None, property_text="3,8,8")
    with pytest.raises(DatasetError, match=r"labels \[1\] of 0..2 have no image records \(gap in labels\)"):
        convert_recordio(prefix, str(tmp_path / "b"), opts=OPTS)
    assert not (tmp_path / "b").exists()


def test_bad_index_property_and_empty_pack(tmp_path):
    prefix, offsets, _ = insightface_pack(tmp_path)
    Path(f"{prefix}.idx").write_text("0\t0\n1\tnot-a-number\n")
    with pytest.raises(DatasetError, match=r"train\.idx: line 2: expected 'key<TAB>offset'"):
        convert_recordio(prefix, str(tmp_path / "ds"), opts=OPTS)
    offsets = [0, 999999] + offsets[2:]
    Path(f"{prefix}.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    with pytest.raises(DatasetError, match=r"key 1 points at byte offset 999999, beyond the end"):
        convert_recordio(prefix, str(tmp_path / "ds"), opts=OPTS)
    Path(f"{prefix}.idx").unlink()
    (tmp_path / "property").write_text("three,8,8")
    with pytest.raises(DatasetError, match=r"property: line 1: expected 'num_classes,height,width'"):
        convert_recordio(prefix, str(tmp_path / "ds"), opts=OPTS)
    Path(f"{prefix}.rec").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"train\.rec: empty file"):
        convert_recordio(prefix, str(tmp_path / "ds"), opts=OPTS)


def test_failed_conversion_leaves_existing_dataset_intact(tmp_path):
    prefix, offsets, _ = insightface_pack(tmp_path)
    dst = tmp_path / "ds"
    convert_recordio(prefix, str(dst), opts=OPTS)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dst.iterdir()}
    with pytest.raises(DatasetError, match="already exists"):
        convert_recordio(prefix, str(dst), opts=OPTS)
    rec = Path(f"{prefix}.rec")
    rec.write_bytes(rec.read_bytes()[:offsets[4] + 30])
    with pytest.raises(DatasetError, match="truncated"):
        convert_recordio(prefix, str(dst), opts=Options(workers=1, progress=False, overwrite=True))
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dst.iterdir()} == before
    assert validate_dataset(str(dst)).num_samples == 6
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_flag_labels_take_first_value():
    payload = ir_payload(-1.0, b"img", labels=(4.0, 9.0))
    header, image = recordio.unpack_payload(payload, "x")
    assert header.flag == 2 and image == b"img"
    assert recordio.image_label(header, "x") == 4
    np.testing.assert_array_equal(header.labels, [4.0, 9.0])
    with pytest.raises(recordio.RecordIOError, match="announces 3 labels"):
        recordio.unpack_payload(struct.pack("<IfQQ", 3, 0, 0, 0) + b"\0" * 8, "x")
