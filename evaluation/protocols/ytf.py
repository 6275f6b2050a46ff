"""YouTube Faces video-pair verification, in the layout of the files users download:

    <root>/splits.txt    split number, first video, second video, ..., same (1) / not same (0)
                         (a header line first; videos as <person>/<video>, e.g. "Aaron_Eckhart/0")
    <root>/aligned_images_DB/<person>/<video>/aligned_detect_<video>.<frame>.jpg

Each video becomes one feature per method of `evaluation.aggregation.aggregate` (mean, qwfa, qwfaf, ...);
accuracy is 10-fold over the file's own splits (train the threshold on nine, test on the tenth).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from data import storage
from evaluation.aggregation import aggregate
from evaluation.protocols import Face, Problems, ProtocolError, open_text

SPLITS_FILE = "splits.txt"
FRAMES_DIR = "aligned_images_DB"
METHODS = ("mean", "qwfa", "qwfaf")
_FRAME = re.compile(r"aligned_detect_(?P<video>.+)\.(?P<frame>\d+)\.jpg$")


@dataclass(frozen=True)
class VideoPair:
    split: int
    first: str  # "person/video"
    second: str
    same: bool
    where: str  # "splits.txt:line"


def _video_name(value: str, where: str) -> str:
    parts = value.strip().strip("/").split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise ProtocolError(f"{where}: {value.strip()!r} is not a video name of the form <person>/<video>")
    return "/".join(parts)


def read_splits(root: str, problems: Problems | None = None) -> list[VideoPair]:
    """The pairs of splits.txt (5,000 lines for YTF), header skipped."""
    problems = problems or Problems()
    uri = storage.join(root, SPLITS_FILE)
    pairs = []
    with open_text(uri) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = [v.strip() for v in line.split(",")]
            where = f"{uri}:{line_no}"
            if line_no == 1 and not fields[0].isdigit():
                continue  # the header: "split number, first name, second name, ..."
            try:
                if len(fields) < 4:
                    raise ProtocolError(f"{where}: expected 'split, first video, second video, ..., same', "
                                        f"got {len(fields)} fields")
                if not fields[0].isdigit() or fields[-1] not in ("0", "1"):
                    raise ProtocolError(f"{where}: split must be a number and the last field 0 or 1: "
                                        f"{line.strip()!r}")
                pairs.append(VideoPair(int(fields[0]), _video_name(fields[1], where),
                                       _video_name(fields[2], where), fields[-1] == "1", where))
            except ProtocolError as exc:
                problems.report(str(exc))
    if not pairs:
        raise ProtocolError(f"{uri}: no pairs")
    return pairs


def video_frames(root: str, video: str, where: str) -> list[str]:
    """The video's frame files (relative to root), in frame order."""
    directory = storage.join(root, FRAMES_DIR, *video.split("/"))
    fs, path = storage.resolve(directory)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise ProtocolError(f"{where}: video {video!r} has no folder {directory}")
    frames = []
    for info in fs.get_file_info(pafs.FileSelector(path)):
        match = _FRAME.match(info.base_name)
        if info.type == pafs.FileType.File and match:
            frames.append((int(match["frame"]), info.base_name))
    if not frames:
        raise ProtocolError(f"{where}: video {video!r} has no frames (aligned_detect_<video>.<frame>.jpg) "
                            f"in {directory}")
    return [f"{FRAMES_DIR}/{video}/{name}" for _, name in sorted(frames)]


def iter_faces(root: str, pairs: Sequence[VideoPair], frames_per_video: int = 0,
               problems: Problems | None = None) -> Iterator[Face]:
    """Every frame of every video named in the pairs (each video once, in order of first mention);
    `frames_per_video` > 0 takes that many, evenly spaced."""
    problems = problems or Problems()
    seen = set()
    for pair in pairs:
        for video in (pair.first, pair.second):
            if video in seen:
                continue
            seen.add(video)
            try:
                frames = video_frames(root, video, pair.where)
            except ProtocolError as exc:
                problems.report(str(exc))
                continue
            if 0 < frames_per_video < len(frames):
                frames = [frames[i] for i in np.linspace(0, len(frames) - 1, frames_per_video).round().astype(int)]
            for frame in frames:
                yield Face(frame, video, video, None, float("nan"), pair.where)


def video_features(videos: np.ndarray, embeddings: np.ndarray, quality: np.ndarray, methods: Sequence[str],
                   s_th: float) -> dict[str, dict[str, np.ndarray]]:
    """method -> {video name: L2-normalised feature} over the frames of each video."""
    order = np.argsort(videos, kind="stable")
    names = videos[order]
    starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]])
    bounds = np.r_[starts, names.size]
    out: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        rows = order[a:b]
        for m in methods:
            out[m][str(names[a])] = aggregate(embeddings[rows], quality[rows], m, s_th)
    return out


def pair_scores(pairs: Sequence[VideoPair], features: Mapping[str, Mapping[str, np.ndarray]],
                problems: Problems | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(method -> cosine score per pair, same per pair, split per pair); a pair with a video that has no
    (readable) frame is an error, or with `problems.skip` left out and counted."""
    problems = problems or Problems()
    any_method = next(iter(features.values()))
    kept = []
    for p in pairs:
        missing = [v for v in (p.first, p.second) if v not in any_method]
        if missing:
            problems.report(f"{p.where}: video {missing[0]!r} has no (readable) frame")
            continue
        kept.append(p)
    scores = {m: np.array([float(f[p.first] @ f[p.second]) for p in kept]) for m, f in features.items()}
    return scores, np.array([p.same for p in kept], bool), np.array([p.split for p in kept], np.int64)
