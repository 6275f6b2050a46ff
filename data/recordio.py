"""Read insightface's MXNet RecordIO packs (train.rec + train.idx + property) without MXNet.

Record layout (dmlc-core recordio): uint32 magic 0xced7230a, uint32 lrecord (upper 3 bits cflag, lower 29
bits length), then `length` payload bytes padded with zeros to a multiple of 4. cflag 0 is a whole record;
1/2/3 are the first/middle/last part of a record the writer split where its payload contained the magic
number; reassembly puts the magic back between the parts.

Payload (mxnet.recordio.pack): IRHeader = uint32 flag, float32 label, uint64 id, uint64 id2; when flag > 0,
`flag` float32 labels follow (and replace `label`); the rest is the encoded image.

insightface packs start with a header record (key 0, flag > 0, no image): labels (a, b) say that image records are
keys 1..a-1 and identity records are keys a..b-1 (each identity record's labels are its image key range).
insightface's rec_builder.py writes that record last in the file (the .idx finds it). Packs without it
(SeqRecBuilder, the pip package's RecBuilder, rec2shufrec.py) hold image records only; rec2shufrec.py
writes no .idx. The writers and their `property` files are in tests/test_insightface_conformance.py.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from data.shards import DatasetError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_MASK = (1 << 29) - 1
IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2


class RecordIOError(DatasetError):
    """A .rec/.idx/property file cannot be parsed; the message names the file and byte offset (or line)."""


@dataclass
class IRHeader:
    flag: int
    label: float
    id: int
    id2: int
    labels: np.ndarray | None  # the `flag` extra labels when flag > 0


@dataclass
class ImageRecord:
    key: int
    offset: int
    label: int
    image: bytes


def _read_exact(f: BinaryIO, n: int, path: str, offset: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise RecordIOError(f"{path}: truncated at byte offset {offset}: expected {n} bytes of {what}, "
                            f"got {len(data)}")
    return data


def read_record(f: BinaryIO, offset: int, path: str) -> tuple[bytes, int]:
    """The record starting at `offset` (multi-part records reassembled) and the offset after it."""
    f.seek(offset)
    parts: list[bytes] = []
    pos = offset
    while True:
        head = _read_exact(f, 8, path, pos, "record header")
        magic, lrecord = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"{path}: bad magic 0x{magic:08x} at byte offset {pos} "
                                f"(expected 0x{MAGIC:08x}; not a RecordIO record boundary)")
        cflag, length = lrecord >> 29, lrecord & LENGTH_MASK
        if cflag > 3:
            raise RecordIOError(f"{path}: invalid continuation flag {cflag} at byte offset {pos}")
        if parts and cflag not in (2, 3):
            raise RecordIOError(f"{path}: record part at byte offset {pos} has flag {cflag}, expected the "
                                "middle (2) or last (3) part of the multi-part record begun before it")
        if not parts and cflag in (2, 3):
            raise RecordIOError(f"{path}: byte offset {pos} holds the middle/last part (flag {cflag}) of a "
                                "record whose first part is missing")
        padded = (length + 3) & ~3
        body = _read_exact(f, padded, path, pos + 8, f"payload (record length {length})")
        parts.append(body[:length])
        pos += 8 + padded
        if cflag in (0, 3):
            return MAGIC_BYTES.join(parts), pos


def unpack_payload(payload: bytes, where: str) -> tuple[IRHeader, bytes]:
    """(IRHeader, encoded image bytes) of one record payload."""
    if len(payload) < IR_HEADER.size:
        raise RecordIOError(f"{where}: payload of {len(payload)} bytes is shorter than the "
                            f"{IR_HEADER.size}-byte IRHeader")
    flag, label, rid, rid2 = IR_HEADER.unpack_from(payload)
    body = payload[IR_HEADER.size:]
    labels = None
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(f"{where}: IRHeader flag {flag} announces {flag} labels but only "
                                f"{len(body)} bytes follow")
        labels = np.frombuffer(body[:4 * flag], dtype="<f4").copy()
        body = body[4 * flag:]
    return IRHeader(flag, label, rid, rid2, labels), body


def image_label(header: IRHeader, where: str) -> int:
    """Identity label of an image record: `label`, or the first of the extra labels when flag > 0."""
    value = float(header.labels[0]) if header.labels is not None else float(header.label)
    if not np.isfinite(value) or value < 0 or value != int(value):
        raise RecordIOError(f"{where}: label {value} is not a non-negative integer")
    return int(value)


def read_index(idx_path: str) -> list[tuple[int, int]]:
    """(key, byte offset) per line of a .idx file ("key\\toffset"), in file order."""
    entries: list[tuple[int, int]] = []
    with open(idx_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                key, offset = int(fields[0]), int(fields[1])
                if len(fields) != 2 or offset < 0:
                    raise ValueError
            except (ValueError, IndexError):
                raise RecordIOError(f"{idx_path}: line {lineno}: expected 'key<TAB>offset', "
                                    f"got {line.rstrip()!r}") from None
            entries.append((key, offset))
    return entries


def scan_offsets(rec_path: str) -> list[tuple[int, int]]:
    """(key, offset) of every record by walking the .rec file (for packs without a .idx)."""
    entries: list[tuple[int, int]] = []
    size = os.path.getsize(rec_path)
    with open(rec_path, "rb") as f:
        pos = 0
        while pos < size:
            entries.append((len(entries), pos))
            _, pos = read_record(f, pos, rec_path)
    return entries


@dataclass
class Property:
    """insightface's `property` file: line 1 "num_classes,height,width"; insightface's pip RecBuilder adds the
    image count on line 2, rec2shufrec.py the count, "shuffled" and a date (lines after the count: free text)."""

    num_classes: int
    height: int
    width: int
    num_images: int | None


def read_property(path: str) -> Property:
    with open(path) as f:
        lines = [line.strip() for line in f.read().strip().splitlines()]
    first = lines[0] if lines else ""
    try:
        values = tuple(int(v) for v in first.split(","))
        if len(values) != 3 or min(values) <= 0:
            raise ValueError
    except ValueError:
        raise RecordIOError(f"{path}: line 1: expected 'num_classes,height,width', got {first[:80]!r}") from None
    try:
        num_images = int(lines[1]) if len(lines) > 1 else None
        if num_images is not None and num_images < 0:
            raise ValueError
    except ValueError:
        raise RecordIOError(f"{path}: line 2: expected the image count (a non-negative integer), "
                            f"got {lines[1][:80]!r}") from None
    return Property(*values, num_images=num_images)


@dataclass
class Pack:
    """What a converter needs to know about a pack before reading its images."""

    rec_path: str
    image_entries: list[tuple[int, int]]  # (key, offset) of the image records
    num_classes: int | None  # from `property`, else from the header record, else None
    image_size: tuple[int, int] | None
    has_header_record: bool
    notes: list[str] = field(default_factory=list)  # what the converter's report should say (one line each)


def _check_offsets(entries: list[tuple[int, int]], rec_path: str, idx_path: str) -> None:
    size = os.path.getsize(rec_path)
    for key, offset in entries:
        if offset >= size:
            raise RecordIOError(f"{idx_path}: key {key} points at byte offset {offset}, beyond the end of "
                                f"{rec_path} ({size} bytes): the .rec is truncated or the .idx is not "
                                "its index")


def open_pack(prefix: str) -> Pack:
    """Inspect PREFIX.rec (+ .idx, + `property` beside it); reads only the header record."""
    rec_path, idx_path = f"{prefix}.rec", f"{prefix}.idx"
    if not os.path.isfile(rec_path):
        raise RecordIOError(f"{rec_path}: no such file")
    if os.path.getsize(rec_path) == 0:
        raise RecordIOError(f"{rec_path}: empty file (no records)")
    entries = read_index(idx_path) if os.path.isfile(idx_path) else scan_offsets(rec_path)
    if not entries:
        raise RecordIOError(f"{idx_path}: index lists no records")
    property_path = os.path.join(os.path.dirname(os.path.abspath(prefix)), "property")
    prop = read_property(property_path) if os.path.isfile(property_path) else None
    num_classes = prop.num_classes if prop else None
    image_size = (prop.height, prop.width) if prop else None

    by_key = dict(entries)
    first_key, first_offset = entries[0] if 0 not in by_key else (0, by_key[0])
    with open(rec_path, "rb") as f:
        payload, _ = read_record(f, first_offset, rec_path)
    header, body = unpack_payload(payload, f"{rec_path}: record {first_key} at byte offset {first_offset}")
    # A header record holds labels and no image; record 0 of a pack without one may be an image with
    # float-array labels (flag > 0), as the pip package's RecBuilder.add_image writes them.
    if first_key != 0 or header.flag == 0 or body:
        _check_offsets(entries, rec_path, idx_path)
        pack = Pack(rec_path, entries, num_classes, image_size, has_header_record=False)
        return _check_image_count(pack, prop, property_path)

    where = f"{rec_path}: header record 0 at byte offset {first_offset}"
    if header.labels is None or len(header.labels) < 2:
        raise RecordIOError(f"{where}: expected two labels (end of image keys, end of identity keys)")
    image_end, identity_end = int(header.labels[0]), int(header.labels[1])
    if not 1 <= image_end <= identity_end:
        raise RecordIOError(f"{where}: label range ({image_end}, {identity_end}) is not 1 <= a <= b")
    missing = [k for k in range(1, image_end) if k not in by_key]
    if missing:
        raise RecordIOError(f"{idx_path}: the header record says image keys are 1..{image_end - 1}, but "
                            f"{len(missing)} are not indexed (first: {missing[0]})")
    header_classes = identity_end - image_end
    if num_classes is not None and header_classes and header_classes != num_classes:
        raise RecordIOError(f"{where}: lists {header_classes} identity records but {property_path} says "
                            f"{num_classes} classes")
    num_classes = num_classes or header_classes or None
    image_entries = [(k, by_key[k]) for k in range(1, image_end)]
    _check_offsets(image_entries, rec_path, idx_path)
    pack = Pack(rec_path, image_entries, num_classes, image_size, has_header_record=True)
    return _check_image_count(pack, prop, property_path)


def _check_image_count(pack: Pack, prop: Property | None, property_path: str) -> Pack:
    """A `property` image count that disagrees with the pack becomes a note: the records are what is read."""
    if prop is not None and prop.num_images is not None and prop.num_images != len(pack.image_entries):
        found = len(pack.image_entries)
        pack.notes.append(f"{property_path}: line 2 says {prop.num_images} images, but {pack.rec_path} holds "
                          f"{found} image records; all {found} are converted")
    return pack


def read_image_record(f: BinaryIO, rec_path: str, key: int, offset: int) -> ImageRecord:
    """Read and unpack the image record at (key, offset) from the open .rec file `f`."""
    where = f"{rec_path}: record {key} at byte offset {offset}"
    try:
        payload, _ = read_record(f, offset, rec_path)
    except RecordIOError as e:
        raise RecordIOError(f"{where}: {str(e).removeprefix(rec_path + ': ')}") from None
    header, image = unpack_payload(payload, where)
    if not image:
        raise RecordIOError(f"{where}: record holds no image bytes")
    return ImageRecord(key, offset, image_label(header, where), image)


def iter_records(rec_path: str) -> Iterator[tuple[int, IRHeader, bytes]]:
    """(offset, header, image bytes) of every record in file order; for inspection and tests."""
    size = os.path.getsize(rec_path)
    with open(rec_path, "rb") as f:
        pos = 0
        while pos < size:
            payload, nxt = read_record(f, pos, rec_path)
            header, image = unpack_payload(payload, f"{rec_path}: record at byte offset {pos}")
            yield pos, header, image
            pos = nxt
