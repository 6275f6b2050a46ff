"""Turning a set or video of face features into one template, using per-frame quality (EQFace, Sec. 3.3).

mean  : average of L2-normalised features.
best  : the highest-quality frame alone.
qwfa  : quality-weighted average of normalised features (weights = quality).
qwfaf : qwfa over frames with quality >= s_th only; if no frame passes, the best frame is used,
        so a template always exists.
The online aggregator does qwfaf frame by frame and stops once enough quality has been seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.verification import (
    DEFAULT_FARS,
    as_numpy,
    check_embeddings,
    check_finite,
    l2_normalize,
    verify,
)

METHODS: tuple[str, ...] = ("mean", "best", "qwfa", "qwfaf")
# Accumulated quality is a float sum; without slack 0.7 + 0.7 + 0.7 < 2.1 would need a fourth frame.
_READY_SLACK = 1e-9


def _check_set(embeddings: Any, qualities: Any, name: str = "set") -> tuple[np.ndarray, np.ndarray]:
    emb = check_embeddings(embeddings, f"{name} embeddings")
    q = as_numpy(qualities, f"{name} qualities").reshape(-1)
    if q.size != emb.shape[0]:
        raise ValueError(f"{name}: {emb.shape[0]} embeddings but {q.size} qualities")
    check_finite(q, f"{name} qualities")
    if (q < 0).any():
        row = int(np.argmax(q < 0))
        raise ValueError(f"{name} qualities: row {row} is {q[row]}, qualities must be >= 0")
    return emb, q


def _weighted_template(unit_feats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    if weights.sum() <= 0:  # all qualities zero: nothing to weight by, fall back to the plain mean
        weights = np.ones_like(weights)
    return l2_normalize(weights @ unit_feats)


def aggregate(embeddings: Any, qualities: Any, method: str = "qwfa", s_th: float = 0.5) -> np.ndarray:
    """(N, E) frame features and (N,) qualities in [0, 1] -> one (E,) L2-normalised template."""
    if method not in METHODS:
        raise ValueError(f"aggregate: unknown method {method!r}, expected one of {METHODS}")
    emb, q = _check_set(embeddings, qualities)
    unit = l2_normalize(emb)
    if method == "mean":
        return l2_normalize(unit.mean(axis=0))
    if method == "best":
        return unit[int(np.argmax(q))]
    if method == "qwfa":
        return _weighted_template(unit, q)
    keep = q >= s_th
    if not keep.any():
        return unit[int(np.argmax(q))]
    return _weighted_template(unit[keep], q[keep])


class OnlineAggregator:
    """Progressive quality-weighted template for a stream of frames.

    Frames with quality < s_th are skipped; the others are added to the running weighted sum.
    Ready once the accumulated quality of the used frames reaches decide_at.
    """

    def __init__(self, s_th: float = 0.5, decide_at: float = 2.0) -> None:
        if decide_at <= 0:
            raise ValueError(f"decide_at={decide_at}: must be > 0")
        self.s_th = s_th
        self.decide_at = decide_at
        self.reset()

    def reset(self) -> None:
        self._sum: np.ndarray | None = None
        self.frames_seen = 0
        self.frames_used = 0
        self.accumulated_quality = 0.0

    @property
    def ready(self) -> bool:
        return self.accumulated_quality >= self.decide_at - _READY_SLACK

    @property
    def template(self) -> np.ndarray | None:
        """Current L2-normalised template, None before any frame passed s_th."""
        return None if self._sum is None else l2_normalize(self._sum)

    def update(self, embedding: Any, quality: float) -> bool:
        """Feed one frame (used when its quality reaches s_th); returns whether the template is ready."""
        if quality >= self.s_th:
            return self.add(embedding, quality)
        _check_set(np.reshape(as_numpy(embedding, "embedding"), (1, -1)), [quality], name=f"frame {self.frames_seen}")
        self.frames_seen += 1
        return self.ready

    def add(self, embedding: Any, quality: float) -> bool:
        """Add one frame whatever its quality: a frame already judged usable (a journal's replay, whose s_th
        may differ from this one's). Returns whether the template is ready."""
        emb, q = _check_set(
            np.reshape(as_numpy(embedding, "embedding"), (1, -1)), [quality], name=f"frame {self.frames_seen}"
        )
        self.frames_seen += 1
        contribution = q[0] * l2_normalize(emb[0])
        self._sum = contribution if self._sum is None else self._sum + contribution
        self.frames_used += 1
        self.accumulated_quality += float(q[0])
        return self.ready


@dataclass
class StreamDecision:
    identity: Any | None  # gallery id, or None when the best score is under the threshold / no usable frame
    score: float  # best cosine similarity to the gallery (NaN when no frame was usable)
    frames_needed: int  # frames read before deciding
    ready: bool  # False when the stream ended before the accumulated quality reached decide_at


def _gallery(gallery: Any, gallery_ids: Sequence[Any]) -> np.ndarray:
    g = check_embeddings(gallery, "gallery")
    if len(gallery_ids) != g.shape[0]:
        raise ValueError(f"gallery has {g.shape[0]} rows but gallery_ids has {len(gallery_ids)}")
    return l2_normalize(g)


def identify(template: np.ndarray, gallery_unit: np.ndarray, gallery_ids: Sequence[Any], threshold: float
             ) -> tuple[Any | None, float]:
    """(nearest gallery id, or None unless its cosine is above `threshold`; that cosine). Strictly above, as
    every threshold of evaluation/verification.py (`score > t`); the service's gallery calls this too."""
    scores = gallery_unit @ template
    best = int(np.argmax(scores))
    return (gallery_ids[best] if scores[best] > threshold else None), float(scores[best])


def match_stream(
    frames_iter: Iterable[tuple[Any, float]],
    gallery: Any,
    gallery_ids: Sequence[Any],
    threshold: float,
    s_th: float = 0.5,
    decide_at: float = 2.0,
    max_frames: int | None = None,
) -> StreamDecision:
    """Identify a stream of (embedding, quality) frames against a gallery, stopping as soon as ready.

    If the stream (or max_frames) ends first, decides on the frames used so far.
    """
    gallery_unit = _gallery(gallery, gallery_ids)
    agg = OnlineAggregator(s_th=s_th, decide_at=decide_at)
    for emb, q in frames_iter:
        if agg.update(emb, q) or (max_frames is not None and agg.frames_seen >= max_frames):
            break
    template = agg.template
    if template is None:
        return StreamDecision(None, float("nan"), agg.frames_seen, False)
    identity, score = identify(template, gallery_unit, gallery_ids, threshold)
    return StreamDecision(identity, score, agg.frames_seen, agg.ready)


def evaluate_set_pairs(
    sets_a: Sequence[tuple[Any, Any]],
    sets_b: Sequence[tuple[Any, Any]],
    is_same: Any,
    methods: Sequence[str] = METHODS,
    s_th: float = 0.5,
    n_folds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
) -> dict[str, dict[str, Any]]:
    """Set-to-set verification, sets as (embeddings (n_i, E), qualities (n_i,)). One `verify` per method."""
    if len(sets_a) != len(sets_b):
        raise ValueError(f"sets_a has {len(sets_a)} sets but sets_b has {len(sets_b)}")
    results = {}
    for method in methods:
        ta = np.stack([aggregate(e, q, method, s_th) for e, q in sets_a])
        tb = np.stack([aggregate(e, q, method, s_th) for e, q in sets_b])
        results[method] = verify(ta, tb, is_same, n_folds=n_folds, fars=fars)
    return results


def _correct(identity: Any, true_id: Any, gallery_ids: Sequence[Any]) -> bool:
    # Open set: a probe whose identity is not enrolled is right only when rejected.
    return identity is None if true_id not in set(gallery_ids) else identity == true_id


def compare_online_vs_window(
    streams: Sequence[tuple[Any, Any]],
    true_ids: Sequence[Any],
    gallery: Any,
    gallery_ids: Sequence[Any],
    threshold: float,
    s_th: float = 0.5,
    decide_at: float = 2.0,
    window_lengths: Sequence[int] | None = None,
    window_method: str = "mean",
) -> dict[str, Any]:
    """Frames the online aggregator needs vs a fixed window of the first L frames, at equal accuracy.

    streams: per probe video (embeddings (T, E), qualities (T,)). The window baseline aggregates the
    first L frames with `window_method` for each L; `window_frames_at_equal_accuracy` is the smallest
    L whose accuracy reaches the online accuracy (None if none does).
    """
    if len(streams) != len(true_ids) or not streams:
        raise ValueError(
            f"{len(streams)} streams but {len(true_ids)} true_ids; need the same, non-zero count"
        )
    gallery_unit = _gallery(gallery, gallery_ids)
    checked = [_check_set(e, q, name=f"stream {k}") for k, (e, q) in enumerate(streams)]
    decisions = [
        match_stream(zip(e, q, strict=True), gallery, gallery_ids, threshold, s_th=s_th, decide_at=decide_at)
        for e, q in checked
    ]
    online_correct = [_correct(d.identity, t, gallery_ids) for d, t in zip(decisions, true_ids, strict=True)]
    frames = np.array([d.frames_needed for d in decisions])
    max_len = max(e.shape[0] for e, _ in checked)
    lengths = list(window_lengths) if window_lengths is not None else list(range(1, max_len + 1))
    window_accuracy = {}
    for length in lengths:
        correct = [
            _correct(
                identify(
                    aggregate(e[:length], q[:length], window_method, s_th),
                    gallery_unit,
                    gallery_ids,
                    threshold,
                )[0],
                t,
                gallery_ids,
            )
            for (e, q), t in zip(checked, true_ids, strict=True)
        ]
        window_accuracy[length] = float(np.mean(correct))
    online_accuracy = float(np.mean(online_correct))
    equal = [
        length for length in sorted(window_accuracy) if window_accuracy[length] >= online_accuracy - 1e-12
    ]
    return {
        "online_accuracy": online_accuracy,
        "online_mean_frames": float(frames.mean()),
        "online_median_frames": float(np.median(frames)),
        "online_ready_fraction": float(np.mean([d.ready for d in decisions])),
        "window_accuracy": window_accuracy,
        "window_frames_at_equal_accuracy": equal[0] if equal else None,
    }
