"""Convert the face datasets users have into Parquet shard datasets (local path or s3:// URI).

    python -m data.convert imagefolder SRC DST [--min-per-identity N] [--resize N] [--skip-corrupt]
    python -m data.convert listfile LIST DST --root DIR [--allow-label-gaps]       (lines "path;label")
    python -m data.convert recordio PREFIX DST          (insightface PREFIX.rec + PREFIX.idx + property)
    python -m data.convert verification-bin lfw.bin DST [--folds 10]              -> pairs dataset
    python -m data.convert pairs-txt pairs.txt DST --root LFW_DIR                 -> pairs dataset
    common options: --overwrite --workers N --shard-mb 256 --seed S | --no-shuffle --report FILE --no-progress

Examples:
    python -m data.convert imagefolder ~/casia-webface s3://faces/casia --min-per-identity 5
    python -m data.convert listfile lists/train.txt data/train --root /data/images
    python -m data.convert recordio /data/faces_emore/train s3://faces/ms1mv2 --skip-corrupt
    python -m data.convert verification-bin /data/faces_emore/lfw.bin data/lfw-pairs
    python -m data.convert pairs-txt lfw/pairs.txt data/lfw-view2 --root lfw/lfw-deepfunneled

Streaming: rows go to data.shards.write_dataset as they are read, so memory holds the file list and a few
chunks in flight, not the images. Reading and checking (a full decode of every image) run in a pool of
--workers processes (default: every available CPU); images are stored as given unless --resize asks.

Bad input stops the conversion with an error naming the file (and line, or byte offset); --skip-corrupt
instead skips and counts unreadable images/records and lists them in the report. With --skip-corrupt the
images are checked in a first pass, so labels and --min-per-identity apply to what is actually written.

Re-running: conversions start over, never resume. write_dataset stages the new dataset and puts it in place
only once complete, so a failed or interrupted run leaves no rows behind and an existing dataset at DST
untouched; a DST that already holds a complete dataset is refused unless --overwrite, which replaces it
whole. Rows can therefore never be duplicated.

Training sets are written in a seeded shuffled order (--seed, default 0; --no-shuffle keeps the sorted
order): Ray Data reads shards in order and a local shuffle buffer cannot undo shards sorted by label.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import importlib
import io
import itertools
import json
import multiprocessing
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from data import recordio, storage
from data.pairs import PAIRS_MANIFEST, contiguous_folds, write_pairs_dataset
from data.shards import MANIFEST_NAME, DatasetError, read_manifest, write_dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
CHUNK = 32  # items per worker task: large enough to amortise the IPC, small enough to keep memory flat
MB = 2**20


class ConvertError(DatasetError):
    """Bad converter input; the message names the file and line/byte offset, and what is wrong."""


@dataclass
class ConvertReport:
    kind: str
    src: str
    dst: str
    num_samples: int = 0
    num_classes: int = 0
    num_shards: int = 0
    num_pairs: int | None = None
    bytes_written: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"item", "error"} per skipped image/record
    dropped_pairs: int = 0  # pairs that lost an image to --skip-corrupt
    dropped_identities: list[str] = field(default_factory=list)  # under --min-per-identity, or emptied
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


@dataclass
class Options:
    """What every converter shares."""

    overwrite: bool = False
    skip_corrupt: bool = False
    resize: int | None = None
    workers: int | None = None  # None: every available CPU
    shuffle_seed: int | None = 0  # None keeps the input order
    target_shard_bytes: int = 256 * MB
    progress: bool = True

    def num_workers(self) -> int:
        return self.workers if self.workers is not None else len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------------------------- workers


def ordered_map(fn: Callable[[Any], Any], chunks: Iterable[Any], workers: int) -> Iterator[Any]:
    """fn(chunk) for each chunk, in order, over `workers` processes with a bounded number in flight.

    Executor.map would submit every chunk at once and buffer all results: this keeps memory flat.
    """
    if workers <= 1:
        yield from map(fn, chunks)
        return
    # fork: workers only read files and decode with PIL; spawn would re-import the caller's __main__.
    ctx = multiprocessing.get_context("fork")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    try:
        it = iter(chunks)
        pending = collections.deque(pool.submit(fn, c) for c in itertools.islice(it, 3 * workers))
        while pending:
            result = pending.popleft().result()
            for c in itertools.islice(it, 1):
                pending.append(pool.submit(fn, c))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_image(data: bytes) -> None:
    """Raise unless `data` decodes completely (a truncated JPEG/PNG fails here, not in training)."""
    if not data:
        raise ValueError("empty file")
    with Image.open(io.BytesIO(data)) as img:
        img.load()


def resize_image(data: bytes, size: int) -> bytes:
    """Decode, resize to size x size and re-encode in the same format family (JPEG q95, else PNG)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        fmt = "JPEG" if img.format == "JPEG" else "PNG"
        mode = img.mode if img.mode in ("L", "RGB") else "RGB"
        out = img.convert(mode).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _prepare(data: bytes, verify: bool, resize: int | None) -> bytes:
    if resize:
        return resize_image(data, resize)
    if verify:
        check_image(data)
    elif not data:
        raise ValueError("empty file")
    return data


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _load_files(task: tuple[list[str], bool, int | None, bool]) -> list[tuple[bytes | None, str | None]]:
    """Worker: (bytes or None, error or None) per path; bytes are dropped when only checking."""
    paths, verify, resize, keep_bytes = task
    out: list[tuple[bytes | None, str | None]] = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = _prepare(f.read(), verify, resize)
            out.append((data if keep_bytes else None, None))
        except Exception as e:
            out.append((None, _error_text(e)))
    return out


def _check_blobs(task: tuple[list[bytes], int | None]) -> list[tuple[bytes | None, str | None]]:
    """Worker: the in-memory counterpart of _load_files (verification .bin images)."""
    blobs, resize = task
    out: list[tuple[bytes | None, str | None]] = []
    for data in blobs:
        try:
            out.append((_prepare(data, True, resize), None))
        except Exception as e:
            out.append((None, _error_text(e)))
    return out


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _bar(total: int, desc: str, opts: Options) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not opts.progress, smoothing=0.1)


def find_bad_files(paths: Sequence[str], opts: Options, desc: str = "checking") -> dict[int, str]:
    """{index: error} of the paths that cannot be read and decoded (the --skip-corrupt first pass)."""
    bad: dict[int, str] = {}
    tasks = ((chunk, True, None, False) for chunk in _chunks(paths))
    with _bar(len(paths), desc, opts) as bar:
        results_iter = ordered_map(_load_files, tasks, opts.num_workers())
        for start, results in zip(itertools.count(0, CHUNK), results_iter, strict=False):
            for i, (_, error) in enumerate(results):
                if error is not None:
                    bad[start + i] = error
            bar.update(len(results))
    return bad


def stream_files(paths: Sequence[str], opts: Options, *, verify: bool, names: Sequence[str] | None = None,
                 desc: str = "converting") -> Iterator[bytes]:
    """Bytes of each path in order (checked/resized in the pool); the first failure raises ConvertError."""
    tasks = ((chunk, verify, opts.resize, True) for chunk in _chunks(paths))
    with _bar(len(paths), desc, opts) as bar:
        results_iter = ordered_map(_load_files, tasks, opts.num_workers())
        for start, results in zip(itertools.count(0, CHUNK), results_iter, strict=False):
            for i, (data, error) in enumerate(results):
                if error is not None:
                    name = names[start + i] if names is not None else paths[start + i]
                    raise ConvertError(f"{name}: cannot read image ({error}); pass --skip-corrupt to skip "
                                       "and count bad images instead")
                yield data
            bar.update(len(results))


# --------------------------------------------------------------------------------------------- helpers


def _refuse_existing(dst: str, marker: str, overwrite: bool) -> None:
    """Fail before any work when DST already holds a complete dataset (write_dataset checks again)."""
    if not overwrite and storage.exists(storage.join(dst, marker)):
        raise ConvertError(f"{dst}: a complete dataset already exists there; pass --overwrite to replace it "
                           "(the new one takes its place only once it is complete)")


def _order(n: int, opts: Options) -> np.ndarray:
    if opts.shuffle_seed is None:
        return np.arange(n)
    return np.random.default_rng(opts.shuffle_seed).permutation(n)


def _finish(report: ConvertReport, manifest: Any, started: float) -> ConvertReport:
    report.num_samples = manifest.num_samples
    report.num_classes = manifest.num_classes
    report.num_shards = len(manifest.shards)
    report.bytes_written = int(sum(s["bytes"] for s in manifest.shards))
    report.seconds = round(time.perf_counter() - started, 3)
    report.images_per_s = round(report.num_samples / max(report.seconds, 1e-9), 1)
    return report


def _desc(kind: str, src: str, opts: Options, **extra: Any) -> str:
    params = {"resize": opts.resize, "skip_corrupt": opts.skip_corrupt, "shuffle_seed": opts.shuffle_seed,
              **extra}
    return f"data.convert {kind} {src} {json.dumps(params, sort_keys=True)}"


def _write_file_rows(kind: str, src: str, dst: str, paths: list[str], sources: list[str], labels: np.ndarray,
                     label_to_identity: list[str], opts: Options, report: ConvertReport, started: float, *,
                     names: list[str] | None = None, extra: dict[str, np.ndarray] | None = None,
                     desc_extra: dict | None = None) -> ConvertReport:
    """Stream files (in the shuffled order) into a shard dataset; shared by imagefolder and listfile.

    `names` say where each file came from in error messages (e.g. the list line); default its path.
    """
    order = _order(len(paths), opts)
    extra = extra or {}

    def rows() -> Iterator[dict[str, Any]]:
        # Files already checked in the --skip-corrupt pass are not decoded again (unless resized).
        blobs = stream_files([paths[i] for i in order], opts, verify=not opts.skip_corrupt,
                             names=[names[i] for i in order] if names else None, desc=f"{kind} -> shards")
        for i, data in zip(order, blobs, strict=True):
            label = int(labels[i])
            row = {"image": data, "label": label, "identity": label_to_identity[label], "source": sources[i]}
            row.update({name: values[i].item() for name, values in extra.items()})
            yield row

    stream = rows()
    try:
        manifest = write_dataset(dst, stream, label_to_identity=label_to_identity,
                                 image_size=[opts.resize, opts.resize] if opts.resize else None,
                                 target_shard_bytes=opts.target_shard_bytes, overwrite=opts.overwrite,
                                 source_desc=_desc(kind, src, opts, **(desc_extra or {})))
    finally:
        stream.close()
    return _finish(report, manifest, started)


def _skip(report: ConvertReport, item: str, error: str) -> None:
    report.skipped.append({"item": item, "error": error})


# --------------------------------------------------------------------------------------------- imagefolder


def scan_imagefolder(src: str) -> tuple[list[str], list[list[str]], int]:
    """(identity names sorted, their image file names sorted, files ignored for their extension)."""
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: not a directory")
    names, files, ignored, top_level_images = [], [], 0, 0
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            ignored += entry.is_file()
            top_level_images += entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
            continue
        images = []
        for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(f.name)
            elif f.is_file():
                ignored += 1
        if images:
            names.append(entry.name)
            files.append(images)
    if not names:
        hint = (f": its {top_level_images} images lie directly in it, but imagefolder expects one sub-folder "
                "per identity" if top_level_images else " (empty input)")
        raise ConvertError(f"{src}: no identity sub-folders with images ({', '.join(IMAGE_EXTENSIONS)})"
                           f"{hint}")
    return names, files, ignored


def convert_imagefolder(src: str, dst: str, *, min_per_identity: int = 1,
                        opts: Options | None = None) -> ConvertReport:
    """SRC/<identity>/<image>: one label per sub-folder, in sorted order of the folder names."""
    opts = opts or Options()
    started = time.perf_counter()
    _refuse_existing(dst, MANIFEST_NAME, opts.overwrite)
    report = ConvertReport("imagefolder", src, dst)
    names, files, ignored = scan_imagefolder(src)
    if ignored:
        report.notes.append(f"ignored {ignored} files that are not images in an identity sub-folder")
    rel = [f"{name}/{f}" for name, fs in zip(names, files, strict=True) for f in fs]
    owner = np.repeat(np.arange(len(names)), [len(fs) for fs in files])
    keep = np.ones(len(rel), dtype=bool)
    if opts.skip_corrupt:
        for i, error in find_bad_files([os.path.join(src, r) for r in rel], opts).items():
            keep[i] = False
            _skip(report, rel[i], error)
    counts = np.bincount(owner[keep], minlength=len(names))
    kept_ids = np.flatnonzero(counts >= max(1, min_per_identity))
    report.dropped_identities = [names[i] for i in np.flatnonzero(counts < max(1, min_per_identity))]
    if not len(kept_ids):
        raise ConvertError(f"{src}: no identity has at least {min_per_identity} readable images")
    new_label = np.full(len(names), -1)
    new_label[kept_ids] = np.arange(len(kept_ids))
    keep &= new_label[owner] >= 0
    idx = np.flatnonzero(keep)
    return _write_file_rows("imagefolder", src, dst, [os.path.join(src, rel[i]) for i in idx],
                            [rel[i] for i in idx], new_label[owner[idx]], [names[i] for i in kept_ids], opts,
                            report, started, desc_extra={"min_per_identity": min_per_identity})


# --------------------------------------------------------------------------------------------- listfile


def parse_listfile(list_path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(paths, labels, line numbers) from `path;label` lines; blank lines and #comments are skipped."""
    if not os.path.isfile(list_path):
        raise ConvertError(f"{list_path}: no such file")
    paths, labels, lines = [], [], []
    with open(list_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            path, sep, label = text.rpartition(";")
            try:
                if not sep or not path.strip():
                    raise ValueError
                value = int(label)
                if value < 0:
                    raise ValueError
            except ValueError:
                raise ConvertError(f"{list_path}: line {lineno}: expected 'path;label' with a non-negative "
                                   f"integer label, got {text[:120]!r}") from None
            paths.append(path.strip())
            labels.append(value)
            lines.append(lineno)
    if not paths:
        raise ConvertError(f"{list_path}: no 'path;label' lines (empty input)")
    return paths, np.asarray(labels, dtype=np.int64), np.asarray(lines, dtype=np.int64)


def _check_label_gaps(list_path: str, labels: np.ndarray, lines: np.ndarray) -> None:
    present = np.unique(labels)
    if present[-1] - present[0] + 1 == present.size:
        return
    after = int(present[np.flatnonzero(np.diff(present) > 1)[0] + 1])
    missing = sorted(set(range(int(present[0]), after)) - set(present.tolist()))
    line = int(lines[np.flatnonzero(labels == after)[0]])
    raise ConvertError(f"{list_path}: line {line}: label {after} leaves a gap: labels {missing[:10]} have no "
                       "lines (pass --allow-label-gaps to renumber the labels anyway)")


def convert_listfile(list_path: str, dst: str, *, root: str | None = None, allow_label_gaps: bool = False,
                     opts: Options | None = None) -> ConvertReport:
    """`path;label` lines (the authors' training list); labels become 0..n-1, originals in `orig_label`."""
    opts = opts or Options()
    started = time.perf_counter()
    _refuse_existing(dst, MANIFEST_NAME, opts.overwrite)
    report = ConvertReport("listfile", list_path, dst)
    root = root if root is not None else os.path.dirname(os.path.abspath(list_path))
    rel, labels, lines = parse_listfile(list_path)
    if not allow_label_gaps:
        _check_label_gaps(list_path, labels, lines)
    full = [p if os.path.isabs(p) else os.path.join(root, p) for p in rel]
    where = [f"{list_path}: line {n} ({p})" for n, p in zip(lines, rel, strict=True)]
    keep = np.ones(len(rel), dtype=bool)
    if opts.skip_corrupt:
        for i, error in find_bad_files(full, opts).items():
            keep[i] = False
            _skip(report, where[i], error)
    before = set(np.unique(labels).tolist())
    kept_labels = np.unique(labels[keep])
    report.dropped_identities = [str(v) for v in sorted(before - set(kept_labels.tolist()))]
    if not kept_labels.size:
        raise ConvertError(f"{list_path}: no readable images left")
    idx = np.flatnonzero(keep)
    new = np.searchsorted(kept_labels, labels[idx])
    label_to_identity = [str(v) for v in kept_labels]
    return _write_file_rows("listfile", list_path, dst, [full[i] for i in idx], [rel[i] for i in idx], new,
                            label_to_identity, opts, report, started, names=[where[i] for i in idx],
                            extra={"orig_label": labels[idx]},
                            desc_extra={"allow_label_gaps": allow_label_gaps})


# --------------------------------------------------------------------------------------------- recordio


def _read_records(task: tuple[str, list[tuple[int, int]], bool, int | None, int | None, bool]
                  ) -> list[tuple[int, int, int, bytes | None, str | None]]:
    """Worker: (key, offset, label, bytes, error naming file and offset) per (key, offset) of the pack."""
    rec_path, entries, verify, resize, num_classes, keep_bytes = task
    out: list[tuple[int, int, int, bytes | None, str | None]] = []
    with open(rec_path, "rb") as f:
        for key, offset in entries:
            label, where = -1, f"{rec_path}: record {key} at byte offset {offset}"
            try:
                record = recordio.read_image_record(f, rec_path, key, offset)
                label = record.label
                if num_classes is not None and label >= num_classes:
                    raise recordio.RecordIOError(f"{where}: label {label} out of range 0..{num_classes - 1}")
                data = _prepare(record.image, verify, resize)
                out.append((key, offset, label, data if keep_bytes else None, None))
            except recordio.RecordIOError as e:
                out.append((key, offset, label, None, str(e)))
            except Exception as e:
                out.append((key, offset, label, None, f"{where}: image does not decode ({_error_text(e)})"))
    return out


def _scan_records(pack: recordio.Pack, entries: list[tuple[int, int]], opts: Options, num_classes: int | None,
                  desc: str) -> Iterator[tuple[int, int, int, str | None]]:
    tasks = ((pack.rec_path, chunk, True, None, num_classes, False) for chunk in _chunks(entries))
    with _bar(len(entries), desc, opts) as bar:
        for results in ordered_map(_read_records, tasks, opts.num_workers()):
            for key, offset, label, _, error in results:
                yield key, offset, label, error
            bar.update(len(results))


def convert_recordio(prefix: str, dst: str, *, opts: Options | None = None) -> ConvertReport:
    """insightface PREFIX.rec/.idx (+ `property`): pack labels are kept (identity = str(label))."""
    opts = opts or Options()
    started = time.perf_counter()
    _refuse_existing(dst, MANIFEST_NAME, opts.overwrite)
    report = ConvertReport("recordio", prefix, dst)
    pack = recordio.open_pack(prefix)
    report.notes.extend(pack.notes)
    entries = pack.image_entries
    if not entries:
        raise ConvertError(f"{pack.rec_path}: the pack holds no image records")
    num_classes = pack.num_classes
    if opts.skip_corrupt or num_classes is None:
        # First pass: which records are readable, and (without `property`) how many classes there are.
        good, max_label = [], -1
        for key, offset, label, error in _scan_records(pack, entries, opts, num_classes, "checking records"):
            if error is None:
                good.append((key, offset))
                max_label = max(max_label, label)
            elif opts.skip_corrupt:
                _skip(report, f"{pack.rec_path}: record {key} at byte offset {offset}", error)
            else:
                raise ConvertError(error)
        entries = good
        num_classes = num_classes if num_classes is not None else max_label + 1
        if not entries:
            raise ConvertError(f"{pack.rec_path}: no readable image records")
        origin = "property file" if pack.num_classes else "max label + 1"
        report.notes.append(f"{num_classes} classes ({origin})")
    label_to_identity = [str(i) for i in range(num_classes)]
    order = _order(len(entries), opts)
    ordered = [entries[i] for i in order]
    rec_name = os.path.basename(pack.rec_path)
    counts = np.zeros(num_classes, dtype=np.int64)

    def rows() -> Iterator[dict[str, Any]]:
        tasks = ((pack.rec_path, chunk, not opts.skip_corrupt, opts.resize, num_classes, True)
                 for chunk in _chunks(ordered))
        with _bar(len(ordered), "recordio -> shards", opts) as bar:
            for results in ordered_map(_read_records, tasks, opts.num_workers()):
                for key, _, label, data, error in results:
                    if error is not None:
                        raise ConvertError(error +
                                           ("" if opts.skip_corrupt else
                                            "; pass --skip-corrupt to skip and count bad records instead"))
                    counts[label] += 1
                    yield {"image": data, "label": label, "identity": label_to_identity[label],
                           "source": f"{rec_name}:key={key}"}
                bar.update(len(results))
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            raise ConvertError(f"{pack.rec_path}: labels {empty[:10].tolist()} of 0..{num_classes - 1} have "
                               f"no {'readable ' if opts.skip_corrupt else ''}image records (gap in labels)")

    stream = rows()
    try:
        manifest = write_dataset(dst, stream, label_to_identity=label_to_identity,
                                 image_size=[opts.resize, opts.resize] if opts.resize else None,
                                 target_shard_bytes=opts.target_shard_bytes, overwrite=opts.overwrite,
                                 source_desc=_desc("recordio", prefix, opts))
    finally:
        stream.close()
    return _finish(report, manifest, started)


# --------------------------------------------------------------------------------------------- pairs sets


def _union_find_labels(n: int, pairs: np.ndarray, is_same: np.ndarray) -> np.ndarray:
    """Pseudo-identities: connected components of the genuine pairs, numbered by first image."""
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs[is_same]:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)])
    return np.unique(roots, return_inverse=True)[1].reshape(-1)


# numpy pickles name their reconstruction functions under numpy.core (numpy 1) or numpy._core (numpy 2),
# whichever wrote them; both spellings resolve to the installed numpy's own module (no deprecation shim).
_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
BIN_NUMPY_FUNCTIONS = frozenset({
    ("multiarray", "_reconstruct"),  # ndarray, protocols 0-4
    ("multiarray", "scalar"),  # numpy scalars (np.bool_ in issame lists)
    ("numeric", "_frombuffer"),  # ndarray, protocol 5 (build_eval_pack.py pickles with HIGHEST_PROTOCOL)
})
BIN_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytearray"), ("__builtin__", "bytearray"),
    ("_codecs", "encode"),  # protocol-2 pickles from Python 3 store bytes through _codecs.encode
})


class _BinUnpickler(pickle.Unpickler):
    """Only what verification .bin files hold (lists, bytes, bools, numpy arrays): no code runs on load.

    Every global a pickle may name is listed above: numpy's array/scalar/dtype reconstruction (which builds
    values from bytes and refuses object arrays from a buffer) and bytes helpers. Anything else is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        for core in ("numpy.core.", "numpy._core."):
            if module.startswith(core) and (module[len(core):], name) in BIN_NUMPY_FUNCTIONS:
                return getattr(importlib.import_module(f"{_NUMPY_CORE}.{module[len(core):]}"), name)
        if (module, name) in BIN_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a verification .bin)")


def read_verification_bin(path: str) -> tuple[list[bytes], np.ndarray]:
    """(encoded images, is_same per pair) of an insightface lfw.bin / cfp_fp.bin / agedb_30.bin."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            obj = _BinUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise ConvertError(f"{path}: not a readable verification .bin (pickle of (bins, issame_list)): "
                           f"{_error_text(e)}") from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ConvertError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    images = []
    for i, b in enumerate(bins):
        if isinstance(b, np.ndarray):
            b = b.tobytes()
        if not isinstance(b, (bytes, bytearray)) or not b:
            raise ConvertError(f"{path}: image {i} is {type(b).__name__} of length {len(b) if b else 0}, "
                               "expected encoded image bytes")
        images.append(bytes(b))
    same = np.asarray([bool(v) for v in issame], dtype=bool)
    if not same.size:
        raise ConvertError(f"{path}: issame_list is empty (no pairs)")
    if len(images) != 2 * same.size:
        raise ConvertError(f"{path}: {len(images)} images for {same.size} pairs (expected 2 images per pair)")
    return images, same


def _check_bin_images(images: list[bytes], opts: Options, path: str) -> tuple[list[bytes], dict[int, str]]:
    """(images prepared (checked/resized), {index: error}) over the pool."""
    out: list[bytes] = []
    bad: dict[int, str] = {}
    tasks = ((chunk, opts.resize) for chunk in _chunks(images))
    with _bar(len(images), "checking images", opts) as bar:
        for results in ordered_map(_check_blobs, tasks, opts.num_workers()):
            for data, error in results:
                if error is not None:
                    i = len(out)
                    if not opts.skip_corrupt:
                        raise ConvertError(f"{path}: image {i} (pair {i // 2}) cannot be read ({error}); "
                                           "pass --skip-corrupt to skip and count bad images instead")
                    bad[i] = error
                out.append(data or b"")
            bar.update(len(results))
    return out, bad


def _drop_pairs(pairs: np.ndarray, bad: set[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask of pairs kept, old image index -> new index or -1) once `bad` images are removed."""
    keep_img = np.ones(n, dtype=bool)
    keep_img[list(bad)] = False
    new_index = np.cumsum(keep_img) - 1
    new_index[~keep_img] = -1
    return keep_img[pairs].all(axis=1), new_index


def convert_verification_bin(path: str, dst: str, *, num_folds: int = 10,
                             opts: Options | None = None) -> ConvertReport:
    """insightface verification .bin -> pairs dataset; images stay in pair order (2i, 2i+1).

    A .bin has no identities: labels are the connected components of the genuine pairs (two images with one
    label are the same person; different labels do not prove different people). Folds are the 10 contiguous
    folds insightface evaluates with.
    """
    opts = opts or Options()
    started = time.perf_counter()
    _refuse_existing(dst, PAIRS_MANIFEST, opts.overwrite)
    report = ConvertReport("verification-bin", path, dst)
    images, same = read_verification_bin(path)
    pairs = np.arange(len(images), dtype=np.int64).reshape(-1, 2)
    folds = contiguous_folds(len(pairs), num_folds)
    images, bad = _check_bin_images(images, opts, path)
    for i, error in bad.items():
        _skip(report, f"{path}: image {i} (pair {i // 2})", error)
    keep_pair, new_index = _drop_pairs(pairs, set(bad), len(images))
    report.dropped_pairs = int((~keep_pair).sum())
    kept_images = np.flatnonzero(new_index >= 0)
    pairs, same, folds = new_index[pairs[keep_pair]], same[keep_pair], folds[keep_pair]
    if not len(pairs):
        raise ConvertError(f"{path}: no pairs left with readable images")
    labels = _union_find_labels(len(kept_images), pairs, same)
    stem = os.path.splitext(os.path.basename(path))[0]
    label_to_identity = [f"{stem}:{k:05d}" for k in range(int(labels.max()) + 1)]
    rows = ({"image": images[old], "label": int(labels[new]), "identity": label_to_identity[labels[new]],
             "source": f"{os.path.basename(path)}#{old}"} for new, old in enumerate(kept_images))
    doc = write_pairs_dataset(dst, rows, pairs, same, folds, label_to_identity=label_to_identity,
                              image_size=[opts.resize, opts.resize] if opts.resize else None,
                              overwrite=opts.overwrite, target_shard_bytes=opts.target_shard_bytes,
                              source_desc=_desc("verification-bin", path, opts, folds=num_folds))
    return _finish_pairs(report, doc, dst, started)


def _finish_pairs(report: ConvertReport, doc: dict[str, Any], dst: str, started: float) -> ConvertReport:

    report.num_pairs = doc["num_pairs"]
    return _finish(report, read_manifest(storage.join(dst, "images")), started)


def parse_pairs_txt(path: str) -> tuple[list[tuple[str, int, str, int]], np.ndarray, np.ndarray, np.ndarray]:
    """LFW pairs.txt: ((name1, n1, name2, n2) per pair, is_same, fold, line number)."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = [(n, line.split()) for n, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise ConvertError(f"{path}: empty file")
    header_line, header = lines[0]
    try:
        values = [int(v) for v in header]
        if len(values) not in (1, 2) or min(values) <= 0:
            raise ValueError
    except ValueError:
        raise ConvertError(f"{path}: line {header_line}: expected a header 'folds pairs_per_fold' or a bare "
                           f"pair count, got {' '.join(header)!r}") from None
    num_folds, per_fold = (1, values[0]) if len(values) == 1 else values
    expected = num_folds * 2 * per_fold
    body = lines[1:]
    if len(body) != expected:
        raise ConvertError(f"{path}: the header (line {header_line}) announces {num_folds} fold(s) x 2 x "
                           f"{per_fold} = {expected} pairs, but {len(body)} pair lines follow")
    pairs, same, fold, where = [], [], [], []
    for j, (lineno, fields) in enumerate(body):
        try:
            if len(fields) == 3:
                pair = (fields[0], int(fields[1]), fields[0], int(fields[2]))
            elif len(fields) == 4:
                pair = (fields[0], int(fields[1]), fields[2], int(fields[3]))
            else:
                raise ValueError
            if pair[1] <= 0 or pair[3] <= 0:
                raise ValueError
        except ValueError:
            raise ConvertError(f"{path}: line {lineno}: expected 'name n1 n2' or 'name1 n1 name2 n2' with "
                               f"positive image numbers, got {' '.join(fields)!r}") from None
        pairs.append(pair)
        same.append(len(fields) == 3)
        fold.append(j // (2 * per_fold))
        where.append(lineno)
    return pairs, np.asarray(same), np.asarray(fold, dtype=np.int16), np.asarray(where)


def convert_pairs_txt(path: str, dst: str, *, root: str, opts: Options | None = None) -> ConvertReport:
    """LFW pairs.txt + image root (root/name/name_%04d.jpg) -> pairs dataset with each pair's fold."""
    opts = opts or Options()
    started = time.perf_counter()
    _refuse_existing(dst, PAIRS_MANIFEST, opts.overwrite)
    report = ConvertReport("pairs-txt", path, dst)
    pairs_named, same, folds, lines = parse_pairs_txt(path)
    # images: every (name, n) a pair uses, sorted; remember the first line that uses each
    first_line: dict[tuple[str, int], int] = {}
    for (a, na, b, nb), line in zip(pairs_named, lines, strict=True):
        first_line.setdefault((a, na), int(line))
        first_line.setdefault((b, nb), int(line))
    keys = sorted(first_line)
    index = {k: i for i, k in enumerate(keys)}
    rel = [f"{name}/{name}_{n:04d}.jpg" for name, n in keys]
    full = [os.path.join(root, r) for r in rel]
    where = [f"{r} (used first on {path} line {first_line[k]})" for r, k in zip(rel, keys, strict=True)]
    pairs = np.asarray([(index[(a, na)], index[(b, nb)]) for a, na, b, nb in pairs_named], dtype=np.int64)
    bad: dict[int, str] = {}
    if opts.skip_corrupt:
        bad = find_bad_files(full, opts)
        for i, error in bad.items():
            _skip(report, where[i], error)
    keep_pair, new_index = _drop_pairs(pairs, set(bad), len(keys))
    report.dropped_pairs = int((~keep_pair).sum())
    pairs, same, folds = new_index[pairs[keep_pair]], same[keep_pair], folds[keep_pair]
    if not len(pairs):
        raise ConvertError(f"{path}: no pairs left with readable images")
    kept = np.flatnonzero(new_index >= 0)
    names = sorted({keys[i][0] for i in kept})
    label_of = {name: k for k, name in enumerate(names)}

    def rows() -> Iterator[dict[str, Any]]:
        blobs = stream_files([full[i] for i in kept], opts, verify=not opts.skip_corrupt,
                             names=[where[i] for i in kept], desc="pairs-txt -> shards")
        for i, data in zip(kept, blobs, strict=True):
            name = keys[i][0]
            yield {"image": data, "label": label_of[name], "identity": name, "source": rel[i]}

    stream = rows()
    try:
        doc = write_pairs_dataset(dst, stream, pairs, same, folds, label_to_identity=names,
                                  image_size=[opts.resize, opts.resize] if opts.resize else None,
                                  overwrite=opts.overwrite, target_shard_bytes=opts.target_shard_bytes,
                                  source_desc=_desc("pairs-txt", path, opts, root=root))
    finally:
        stream.close()
    return _finish_pairs(report, doc, dst, started)


# --------------------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--overwrite", action="store_true", help="replace a complete dataset at DST")
    common.add_argument("--skip-corrupt", action="store_true",
                        help="skip and count unreadable images/records instead of stopping at the first")
    common.add_argument("--resize", type=int, default=None, metavar="N",
                        help="re-encode images at N x N (default: bytes stored as given)")
    common.add_argument("--workers", type=int, default=None, help="decode processes (default: all CPUs)")
    common.add_argument("--shard-mb", type=float, default=256, help="target shard size in MB")
    common.add_argument("--seed", type=int, default=0, help="seed of the shuffled row order")
    common.add_argument("--no-shuffle", action="store_true", help="keep the input order of the rows")
    common.add_argument("--report", default=None, help="also write the JSON report to this file")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")

    parser = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("imagefolder", parents=[common], help="SRC/<identity>/<images>")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--min-per-identity", type=int, default=1)
    p = sub.add_parser("listfile", parents=[common], help="'path;label' lines")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--root", default=None, help="directory the paths are relative to (default: the list's)")
    p.add_argument("--allow-label-gaps", action="store_true", help="renumber labels that have gaps")
    p = sub.add_parser("recordio", parents=[common], help="insightface PREFIX.rec + PREFIX.idx + property")
    p.add_argument("src", metavar="PREFIX")
    p.add_argument("dst")
    p = sub.add_parser("verification-bin", parents=[common], help="insightface lfw.bin-style pairs")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--folds", type=int, default=10)
    p = sub.add_parser("pairs-txt", parents=[common], help="LFW-style pairs.txt")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--root", required=True, help="LFW image root (root/name/name_0001.jpg)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> ConvertReport:
    opts = Options(overwrite=args.overwrite, skip_corrupt=args.skip_corrupt, resize=args.resize,
                   workers=args.workers, shuffle_seed=None if args.no_shuffle else args.seed,
                   target_shard_bytes=int(args.shard_mb * MB), progress=not args.no_progress)
    if args.kind == "imagefolder":
        return convert_imagefolder(args.src, args.dst, min_per_identity=args.min_per_identity, opts=opts)
    if args.kind == "listfile":
        return convert_listfile(args.src, args.dst, root=args.root, allow_label_gaps=args.allow_label_gaps,
                                opts=opts)
    if args.kind == "recordio":
        return convert_recordio(args.src, args.dst, opts=opts)
    if args.kind == "verification-bin":
        return convert_verification_bin(args.src, args.dst, num_folds=args.folds, opts=opts)
    return convert_pairs_txt(args.src, args.dst, root=args.root, opts=opts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (DatasetError, OSError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    if args.report:
        storage.write_bytes_atomic(args.report, report.to_json().encode())
    summary = {k: v for k, v in asdict(report).items() if k != "skipped"}
    summary["skipped"] = len(report.skipped)
    print(json.dumps(summary, indent=1))
    for item in report.skipped[:20]:
        print(f"skipped {item['item']}: {item['error']}", file=sys.stderr)
    if len(report.skipped) > 20:
        print(f"... and {len(report.skipped) - 20} more (see --report)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
