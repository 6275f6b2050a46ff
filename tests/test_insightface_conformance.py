"""Conformance: files written by insightface's own tools, byte for byte, convert exactly.

The fixtures in tests/fixtures/insightface/ were written once by tests/fixtures/insightface/make_fixtures.py
(its docstring has the commands), not by this project's code. Each RecordIO pack was written with
MXNet 1.9.1's own `mx.recordio.MXIndexedRecordIO.write_idx` / `MXRecordIO.write`, `recordio.pack` and
`recordio.pack_img` (OpenCV 4.11, numpy 1.23.5, Python 3.11), in the layout of one insightface writer;
its `expected.json` is what MXNet's own reader (`read_idx` / `read` + `recordio.unpack`) reads back: key,
IRHeader fields and the sha256 of the image bytes. Images are 16 x 16 synthetic gradients.

Formats of data/convert.py not covered here (imagefolder, listfile, pairs-txt) are plain files that no
insightface writer produces; tests/test_convert.py holds them.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data import recordio
from data.convert import (
    BIN_GLOBALS,
    BIN_NUMPY_FUNCTIONS,
    ConvertError,
    Options,
    convert_recordio,
    convert_verification_bin,
    read_verification_bin,
)
from data.pairs import read_pairs_dataset
from data.shards import read_manifest, validate_dataset

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "insightface"
OPTS = Options(workers=1, progress=False, shuffle_seed=None)

# Each pack: its writer (the insightface source that defines the layout) and what the layout holds.
PACKS = {
    # recognition/arcface_mxnet/common/rec_builder.py, RecBuilder: add(label, imgs) per identity writes
    # pack_img(IRHeader(0, label, idx, 0), img, quality=95, img_fmt='.jpg') at keys 1..6; close() writes the
    # identity records (label [first, end), empty payload) at keys 7..9 and then the header record at key 0
    # (label (7, 10), id2 1): physically the last record, listed last in train.idx; property "3,16,16".
    "rec_builder": {"header": True, "classes": 3, "size": (16, 16), "count": None, "keys": list(range(1, 7))},
    # rec_builder.py, SeqRecBuilder: add(label, img) at keys 0..5, no header record; the last image was given
    # as PNG bytes with the RecordIO magic inside (is_image=False), which MXNet wrote as a 3-part record;
    # property "3,16,16".
    "seq_rec_builder": {"header": False, "classes": 3, "size": (16, 16), "count": None, "keys": list(range(6))},
    # python-package/insightface/data/rec_builder.py, RecBuilder: add(imgs) per identity at keys 0..5, no
    # header record; close() writes train.meta (a pickle) and the two-line property "3,16,16\n6\n".
    "pip_rec_builder": {"header": False, "classes": 3, "size": (16, 16), "count": 6, "keys": list(range(6))},
    # the same RecBuilder through add_image(img, [identity, 0.5]): float-array labels (IRHeader flag 2).
    "pip_rec_builder_array_labels": {"header": False, "classes": 3, "size": (16, 16), "count": 6,
                                     "keys": list(range(6))},
    # recognition/arcface_mxnet/common/rec2shufrec.py run on the rec_builder pack: its image keys shuffled
    # (random.seed(0)), re-packed as IRHeader(0, label, i, 0) by an unindexed MXRecordIO (no train.idx);
    # four-line property "3,112,112\n6\nshuffled\n<date>\n" (it always writes 112,112).
    "rec2shufrec": {"header": False, "classes": 3, "size": (112, 112), "count": 6, "keys": list(range(6))},
}


def expected_records(name: str) -> dict[int, dict]:
    """MXNet's reading of a pack: image records by key, with the identity label (first label when flag > 0)."""
    doc = json.loads((FIXTURES / name / "expected.json").read_text())
    out = {}
    for r in doc["records"]:
        if r["image_sha256"] is not None:
            label = r["label"][0] if isinstance(r["label"], list) else r["label"]
            out[r["key"]] = {**r, "identity_label": int(label)}
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_copy(name: str, tmp_path: Path) -> str:
    shutil.copytree(FIXTURES / name, tmp_path / name)
    return str(tmp_path / name / "train")


# ------------------------------------------------------------------------------------------- RecordIO


@pytest.mark.parametrize("name", sorted(PACKS))
def test_pack_layout_is_read_as_its_writer_wrote_it(name):
    want = PACKS[name]
    pack = recordio.open_pack(str(FIXTURES / name / "train"))
    assert pack.has_header_record == want["header"]
    assert (pack.num_classes, pack.image_size) == (want["classes"], want["size"])
    assert [key for key, _ in pack.image_entries] == want["keys"] == sorted(expected_records(name))
    assert pack.notes == []  # the image count in property (where one is given) agrees
    prop = recordio.read_property(str(FIXTURES / name / "property"))
    assert (prop.num_classes, prop.height, prop.width, prop.num_images) == (want["classes"], *want["size"],
                                                                           want["count"])


@pytest.mark.parametrize("name", sorted(PACKS))
def test_pack_converts_to_exactly_what_mxnet_reads(name, tmp_path):
    expected = expected_records(name)
    dst = tmp_path / "ds"
    report = convert_recordio(str(FIXTURES / name / "train"), str(dst), opts=OPTS)
    assert (report.num_samples, report.num_classes, report.skipped) == (6, 3, [])
    manifest = validate_dataset(str(dst), decode_images=True)
    rows = [r for s in manifest.shards for r in pq.read_table(dst / s["file"]).to_pylist()]
    got = {int(r["source"].split("key=")[1]): r for r in rows}
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        assert sha(got[key]["image"]) == want["image_sha256"], f"{name} key {key}: image bytes differ"
        assert got[key]["label"] == want["identity_label"], f"{name} key {key}"


def test_the_multipart_record_mxnet_wrote_is_reassembled():
    rec = (FIXTURES / "seq_rec_builder" / "train.rec").read_bytes()
    flags, pos = [], 0
    while pos < len(rec):  # MXNet split the record with the magic inside: parts with flags 1, 2, 3
        lrecord = int.from_bytes(rec[pos + 4:pos + 8], "little")
        flags.append(lrecord >> 29)
        pos += 8 + (((lrecord & (2**29 - 1)) + 3) & ~3)
    assert flags == [0, 0, 0, 0, 0, 1, 2, 3]
    images = [img for _, _, img in recordio.iter_records(str(FIXTURES / "seq_rec_builder" / "train.rec"))]
    assert sha(images[5]) == expected_records("seq_rec_builder")[5]["image_sha256"]


def test_an_image_count_that_disagrees_is_said_in_one_line(tmp_path):
    prefix = pack_copy("pip_rec_builder", tmp_path)
    prop = Path(prefix).parent / "property"
    prop.write_text("3,16,16\n7\n")
    report = convert_recordio(prefix, str(tmp_path / "ds"), opts=OPTS)
    assert report.num_samples == 6
    assert report.notes == [f"{prop}: line 2 says 7 images, but {prefix}.rec holds 6 image records; "
                            "all 6 are converted"]


def test_a_property_line_that_is_not_a_count_names_the_line(tmp_path):
    prefix = pack_copy("rec2shufrec", tmp_path)
    prop = Path(prefix).parent / "property"
    prop.write_text("3,112,112\nshuffled\n")
    with pytest.raises(recordio.RecordIOError, match=r"property: line 2: expected the image count .* 'shuffled'"):
        convert_recordio(prefix, str(tmp_path / "ds"), opts=OPTS)
    prop.write_text("20,112\n300\n")
    with pytest.raises(recordio.RecordIOError, match=r"property: line 1: expected 'num_classes,height,width'"):
        convert_recordio(prefix, str(tmp_path / "ds"), opts=OPTS)
    assert not (tmp_path / "ds").exists()


# ------------------------------------------------------------------------------------------- verification .bin

# Each .bin and how it was written (its .json beside it has the versions and the globals the pickle names):
BINS = {
    # build_eval_pack.py under numpy 1.23.5 / OpenCV 4.11 (in the MXNet venv): bins.append(cv2.imencode('.jpg',
    # im)[1]) per crop, issame as Python bools, pickle.dump((bins, issame_list), f, protocol=HIGHEST_PROTOCOL)
    # = 5, so every array is numpy.core.numeric._frombuffer(bytearray, dtype, shape, order).
    "build_eval_pack_numpy1.bin": ["numpy.core.numeric._frombuffer", "numpy.dtype"],
    # the same call under numpy 2.4.6 / OpenCV 5.0: numpy._core.numeric._frombuffer.
    "build_eval_pack_numpy2.bin": ["numpy._core.numeric._frombuffer", "numpy.dtype"],
    # insightface's public lfw.bin / cfp_fp.bin / agedb_30.bin are Python 2 pickles of `str` images: this one
    # is what Python 2.7's pickle.dump(..., protocol=2) writes for them, assembled opcode by opcode
    # (SHORT_BINSTRING / BINSTRING, NEWTRUE / NEWFALSE, no globals) since no Python 2 can be installed here.
    "python2_protocol2.bin": [],
}


@pytest.mark.parametrize("name", sorted(BINS))
def test_verification_bin_converts_exactly(name, tmp_path):
    doc = json.loads((FIXTURES / name).with_suffix(".json").read_text())
    assert doc["globals"] == BINS[name]
    images, same = read_verification_bin(str(FIXTURES / name))
    assert [sha(b) for b in images] == doc["image_sha256"]
    assert same.tolist() == doc["issame"]
    dst = str(tmp_path / "pairs")
    report = convert_verification_bin(str(FIXTURES / name), dst, num_folds=2, opts=OPTS)
    assert (report.num_pairs, report.num_samples) == (4, 8)
    data = read_pairs_dataset(dst, image_size=16)
    assert data.is_same.tolist() == doc["issame"]
    stored = [r for s in read_manifest(f"{dst}/images").shards
              for r in pq.read_table(Path(dst) / "images" / s["file"]).to_pylist()]
    assert [sha(r["image"]) for r in stored] == doc["image_sha256"]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_of_bytes_and_arrays_converts(protocol, tmp_path):
    fixture_images, _ = read_verification_bin(str(FIXTURES / "python2_protocol2.bin"))
    bins = [b if i % 2 else np.frombuffer(b, dtype=np.uint8).reshape(-1, 1) for i, b in enumerate(fixture_images)]
    issame = [True, np.bool_(False), True, False]
    path = tmp_path / f"p{protocol}.bin"
    path.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
    images, same = read_verification_bin(str(path))
    assert images == fixture_images and same.tolist() == [True, False, True, False]


def test_the_allow_list_is_exactly_numpy_reconstruction_and_bytes():
    assert BIN_NUMPY_FUNCTIONS == {("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                                   ("numeric", "_frombuffer")}
    assert BIN_GLOBALS == {("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytearray"),
                           ("__builtin__", "bytearray"), ("_codecs", "encode")}


@pytest.mark.parametrize("module, name", [
    ("os", "system"), ("posix", "system"), ("subprocess", "Popen"), ("builtins", "eval"), ("builtins", "exec"),
    ("builtins", "getattr"), ("builtins", "__import__"), ("__builtin__", "eval"), ("pickle", "loads"),
    ("codecs", "encode"), ("numpy", "load"), ("numpy.lib.npyio", "load"), ("numpy", "frombuffer"),
    ("numpy.core.numeric", "fromstring"), ("numpy._core.numeric", "_frombuffer_"), ("numpy.core", "_frombuffer"),
    ("numpy.core.multiarray", "fromfile"), ("numpy._core.numeric.os", "system"), ("numpy.testing", "assert_"),
])
def test_a_pickle_that_would_call_anything_else_is_refused(module, name, tmp_path):
    path = tmp_path / "evil.bin"
    path.write_bytes(f"c{module}\n{name}\n(S'echo pwned'\ntR.".encode())  # protocol 0: GLOBAL, then call it
    with pytest.raises(ConvertError, match=rf"refusing to load {module}\.{name} \(not part of a verification"):
        read_verification_bin(str(path))


def test_an_object_array_from_a_buffer_is_refused(tmp_path):
    """_frombuffer is allowed; with dtype object it could only reinterpret raw bytes as pointers: numpy refuses."""
    path = tmp_path / "objects.bin"
    # _frombuffer(b"abcdefgh", numpy.dtype("O", False, True), (1,), "C"), opcode by opcode
    path.write_bytes(b"\x80\x04cnumpy.core.numeric\n_frombuffer\n(C\x08abcdefghcnumpy\ndtype\nX\x01\x00\x00\x00O"
                     b"\x89\x88\x87RK\x01\x85X\x01\x00\x00\x00CtR.")
    with pytest.raises(ConvertError, match="cannot create an OBJECT array from memory buffer"):
        read_verification_bin(str(path))
