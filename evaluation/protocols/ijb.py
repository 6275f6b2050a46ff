"""IJB-B / IJB-C 1:1 template verification, in the layout of the files users download (insightface's
`eval_ijbc.py` reads the same ones):

    <root>/meta/<set>_face_tid_mid.txt         image template media          (one line per face)
    <root>/meta/<set>_name_5pts_score.txt      image x1 y1 ... x5 y5 score   (same faces, same order)
    <root>/meta/<set>_template_pair_label.txt  template template 1|0         (15.6M lines for IJB-C)
    <root>/loose_crop/<image>

Template features follow insightface: weight each face's L2-normalised feature, average within a medium,
sum over the template's media, normalise. The weightings: `mean` (none), `qwfa` (EQFace quality), `qwfaf`
(quality, faces under s_th dropped; a template left empty keeps its best face), `detector` (detector score),
`norm` (the raw feature's norm, i.e. the unnormalised feature).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from data import storage
from evaluation.protocols import Face, Problems, ProtocolError, open_text
from evaluation.verification import l2_normalize

SETS = ("ijbb", "ijbc")
WEIGHTINGS = ("mean", "qwfa", "qwfaf", "detector", "norm")
IMAGES_DIR = "loose_crop"
PAIR_CHUNK_LINES = 1_000_000


@dataclass(frozen=True)
class MetaFiles:
    faces: str
    landmarks: str
    pairs: str


def meta_files(root: str, name: str) -> MetaFiles:
    """The three meta files of set `name` under `root`; one line naming every missing one."""
    if name not in SETS:
        raise ProtocolError(f"unknown IJB set {name!r}, expected one of {SETS}")
    files = MetaFiles(
        storage.join(root, "meta", f"{name}_face_tid_mid.txt"),
        storage.join(root, "meta", f"{name}_name_5pts_score.txt"),
        storage.join(root, "meta", f"{name}_template_pair_label.txt"),
    )
    missing = [uri for uri in (files.faces, files.landmarks, files.pairs) if not storage.exists(uri)]
    if missing:
        raise ProtocolError(f"missing meta file(s): {', '.join(missing)}")
    return files


def _face_fields(line: str, where: str, problems: Problems) -> tuple[str, int, int] | None:
    fields = line.split()
    if len(fields) != 3:
        problems.report(f"{where}: expected 'image template media', got {len(fields)} fields: {line.strip()!r}")
        return None
    try:
        return fields[0], int(fields[1]), int(fields[2])
    except ValueError:
        problems.report(f"{where}: template and media must be integers: {line.strip()!r}")
        return None


def _landmark_fields(line: str, where: str, problems: Problems) -> tuple[str, tuple[float, ...], float] | None:
    fields = line.split()
    if len(fields) != 12:
        problems.report(f"{where}: expected an image name, 10 landmark numbers and a detector score "
                        f"(12 fields), got {len(fields)}")
        return None
    try:
        values = [float(v) for v in fields[1:]]
    except ValueError:
        problems.report(f"{where}: landmarks and score must be numbers: {line.strip()!r}")
        return None
    if not np.isfinite(values).all():
        problems.report(f"{where}: landmarks and score must be finite: {line.strip()!r}")
        return None
    return fields[0], tuple(values[:10]), values[10]


def iter_faces(root: str, name: str, problems: Problems | None = None) -> Iterator[Face]:
    """Every face of the set, in file order, streaming the two parallel meta files (checked to agree)."""
    problems = problems or Problems()
    files = meta_files(root, name)
    with open_text(files.faces) as faces, open_text(files.landmarks) as marks:
        line_no = 0
        while True:
            face_line, mark_line = faces.readline(), marks.readline()
            if not face_line and not mark_line:
                return
            line_no += 1
            if not face_line or not mark_line:
                short, longer = (files.faces, files.landmarks) if not face_line else (files.landmarks, files.faces)
                raise ProtocolError(f"{short}: ends at line {line_no - 1}, but {longer} has a line {line_no}")
            if not face_line.strip() and not mark_line.strip():
                continue
            face_where, mark_where = f"{files.faces}:{line_no}", f"{files.landmarks}:{line_no}"
            face = _face_fields(face_line, face_where, problems)
            mark = _landmark_fields(mark_line, mark_where, problems)
            if face is None or mark is None:
                continue
            if face[0] != mark[0]:
                problems.report(f"{mark_where}: image {mark[0]!r}, but {face_where} names {face[0]!r} "
                                "(the two files must list the same faces in the same order)")
                continue
            yield Face(f"{IMAGES_DIR}/{face[0]}", face[1], face[2], mark[1], mark[2], face_where)


def _parse_pair_lines(lines: list[str], uri: str, first_line: int, problems: Problems) -> np.ndarray:
    """(n, 4) int64 of a chunk of pair lines: template, template, label, line number; a fast path for
    well-formed chunks, line by line (naming the bad line) otherwise."""
    try:
        values = np.array(" ".join(lines).split(), dtype=np.int64)
        if values.size == 3 * len(lines):
            rows = values.reshape(-1, 3)
            if np.isin(rows[:, 2], (0, 1)).all():
                return np.c_[rows, np.arange(first_line, first_line + len(lines))]
    except ValueError:
        pass
    rows = []
    for k, line in enumerate(lines):
        where = f"{uri}:{first_line + k}"
        fields = line.split()
        try:
            row = [int(v) for v in fields]
        except ValueError:
            row = []
        if len(row) != 3 or row[2] not in (0, 1):
            problems.report(f"{where}: expected 'template template 1|0', got {line.strip()!r}")
            continue
        rows.append([*row, first_line + k])
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def iter_pairs(uri: str, problems: Problems | None = None, chunk_lines: int = PAIR_CHUNK_LINES
               ) -> Iterator[np.ndarray]:
    """Chunks of rows (n, 4) int64: template, template, label, line number; streaming."""
    problems = problems or Problems()
    with open_text(uri) as f:
        lines, first, line_no = [], 1, 0
        for line in f:
            line_no += 1
            if not line.strip():  # blank lines (a trailing newline) carry no pair
                if lines:
                    yield _parse_pair_lines(lines, uri, first, problems)
                lines, first = [], line_no + 1
                continue
            lines.append(line)
            if len(lines) == chunk_lines:
                yield _parse_pair_lines(lines, uri, first, problems)
                lines, first = [], line_no + 1
        if lines:
            yield _parse_pair_lines(lines, uri, first, problems)


# ----------------------------------------------------------------------------- template features


def face_weights(weighting: str, templates: np.ndarray, quality: np.ndarray, detector_score: np.ndarray,
                 norm: np.ndarray, s_th: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight per face, kept per face) of a weighting; only qwfaf drops faces."""
    n = templates.size
    keep = np.ones(n, dtype=bool)
    if weighting == "mean":
        return np.ones(n), keep
    if weighting == "qwfa":
        return quality.astype(np.float64), keep
    if weighting == "detector":
        return detector_score.astype(np.float64), keep
    if weighting == "norm":
        return norm.astype(np.float64), keep
    if weighting != "qwfaf":
        raise ValueError(f"unknown weighting {weighting!r}, expected one of {WEIGHTINGS}")
    keep = quality >= s_th
    # A template with no face over s_th keeps its single best face, so that it still has a feature.
    order = np.lexsort((-quality, templates))
    first = np.r_[True, templates[order][1:] != templates[order][:-1]]
    best = order[first]
    empty = ~np.isin(templates[best], np.unique(templates[keep]))
    keep[best[empty]] = True
    return quality.astype(np.float64), keep


def template_features(templates: np.ndarray, medias: np.ndarray, unit: np.ndarray, weights: np.ndarray,
                      keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted template ids (T,), L2-normalised template features (T, E) float32): the mean of
    weight x unit feature within each medium, summed over the template's media (insightface's convention).

    One sparse (T, N) x (N, E) product: face i enters its template with weight_i / (faces kept in its
    medium), so no (N, E) copy of the features is made (IJB-C: 469k x 512).
    """
    keep = np.ones(templates.size, bool) if keep is None else np.asarray(keep, bool)
    rows = np.flatnonzero(keep)
    t, m = templates[rows], medias[rows]
    ids, t_index = np.unique(t, return_inverse=True)
    _, media_index, media_sizes = np.unique(np.stack([t, m], axis=1), axis=0, return_inverse=True,
                                            return_counts=True)
    weight = np.asarray(weights, np.float64)[rows]
    t_index = t_index.reshape(-1)
    # A template whose every weight is 0 (quality underflow) falls back to the plain mean, as `aggregate`
    # does: without it the template would be a zero vector and every pair with it would score 0.
    weightless = np.bincount(t_index, weights=weight, minlength=ids.size) <= 0
    weight = np.where(weightless[t_index], 1.0, weight)
    coef = weight / media_sizes[media_index.reshape(-1)]
    combine = sparse.csr_matrix((coef, (t_index, rows)), shape=(ids.size, templates.size))
    return ids, l2_normalize(np.asarray(combine @ unit, np.float64)).astype(np.float32)


def template_lookup(ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of each wanted template id in the sorted `ids`, whether it is there)."""
    pos = np.clip(np.searchsorted(ids, wanted), 0, max(ids.size - 1, 0))
    found = ids[pos] == wanted if ids.size else np.zeros(wanted.shape, bool)
    return pos, found


def pair_scores(pairs_uri: str, features: Mapping[str, tuple[np.ndarray, np.ndarray]],
                problems: Problems | None = None, chunk_lines: int = PAIR_CHUNK_LINES
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Cosine score of every pair of the pair file, per weighting, and the labels; streamed chunk by chunk.

    `features`: weighting -> (template ids, template features), all over the same template ids. A pair
    naming a template with no (readable) image is an error naming its line, or with `problems.skip`
    left out and counted.
    """
    problems = problems or Problems()
    ids = next(iter(features.values()))[0]
    scores: dict[str, list[np.ndarray]] = {name: [] for name in features}
    labels = []
    for rows in iter_pairs(pairs_uri, problems, chunk_lines):
        p1, ok1 = template_lookup(ids, rows[:, 0])
        p2, ok2 = template_lookup(ids, rows[:, 1])
        ok = ok1 & ok2
        for k in np.flatnonzero(~ok):
            bad = rows[k, 0] if not ok1[k] else rows[k, 1]
            problems.report(f"{pairs_uri}:{rows[k, 3]}: template {bad} has no (readable) image")
        if not ok.all():
            p1, p2, rows = p1[ok], p2[ok], rows[ok]
        for name, (_, feats) in features.items():
            scores[name].append(np.einsum("ij,ij->i", feats[p1], feats[p2]))
        labels.append(rows[:, 2].astype(bool))
    return ({name: np.concatenate(s) if s else np.empty(0, np.float32) for name, s in scores.items()},
            np.concatenate(labels) if labels else np.empty(0, bool))
