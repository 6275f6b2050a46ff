"""1:1 face verification on cosine similarity: LFW-style k-fold accuracy, TAR@FAR, ROC, pair generation.

Score convention used everywhere in `evaluation/`: a pair is declared "same" when its cosine
similarity is strictly above the threshold (`score > t`). The ROC arrays follow the usual
sklearn convention instead (`score >= thresholds[i]`), which only matters at exact ties.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

DEFAULT_FARS: tuple[float, ...] = (1e-2, 1e-3, 1e-4)

# Above this many candidate pairs we sample by rejection instead of enumerating them all.
_ENUMERATE_LIMIT = 2_000_000


# ----------------------------------------------------------------------------- input checks


def as_numpy(x: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
    """Turn a numpy array, torch tensor or nested list into a numpy array of `dtype`."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot be read as an array of {np.dtype(dtype).name}: {e}") from e


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raise naming the first row that holds NaN or inf."""
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{name}: row {row} is not finite ({np.asarray(arr[row]).tolist()})")


def check_embeddings(emb: Any, name: str) -> np.ndarray:
    arr = as_numpy(emb, name)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, E) array, got shape {arr.shape}")
    check_finite(arr, name)
    return arr


def check_labels_bool(is_same: Any, n: int, name: str = "is_same") -> np.ndarray:
    arr = np.asarray(is_same.detach().cpu().numpy() if isinstance(is_same, torch.Tensor) else is_same)
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {arr.shape}")
    if arr.dtype != bool:
        bad = ~np.isin(arr, (0, 1))
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ValueError(f"{name}: row {row} is {arr[row].item()!r}, expected 0/1 or bool")
    return arr.astype(bool)


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


def cosine_similarity(emb_a: Any, emb_b: Any) -> np.ndarray:
    """Row-wise cosine similarity of two (N, E) arrays."""
    a = check_embeddings(emb_a, "emb_a")
    b = check_embeddings(emb_b, "emb_b")
    if a.shape != b.shape:
        raise ValueError(f"emb_a {a.shape} and emb_b {b.shape} must have the same shape")
    return np.einsum("ij,ij->i", l2_normalize(a), l2_normalize(b))


# ----------------------------------------------------------------------------- embeddings


def _first_output(out: Any) -> Any:
    # embed_fn may return (embedding, quality) like EQFaceNet, or just the embedding.
    return out[0] if isinstance(out, (tuple, list)) else out


def _views(embed_fn: Callable[[Any], Any], images: Any, batch_size: int | None, progress: bool = False):
    """(embed_fn(x), embed_fn(hflip(x))) for each batch x of `images` (width last), without gradients."""
    n = len(images)
    if n == 0:
        raise ValueError("images: empty batch")
    step = batch_size or n
    with torch.no_grad():
        for start in tqdm(range(0, n, step), desc="embedding", unit="batch", disable=not progress):
            x = images[start : start + step]
            x_flip = torch.flip(x, dims=[-1]) if isinstance(x, torch.Tensor) else np.ascontiguousarray(x[..., ::-1])
            yield embed_fn(x), embed_fn(x_flip)


def flip_sum_embeddings(
    embed_fn: Callable[[Any], Any],
    images: Any,
    batch_size: int | None = None,
    return_quality: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """normalise(embed(x) + embed(hflip(x))) for images laid out width-last, e.g. (B, 3, H, W).

    `embed_fn(images) -> embedding` or `-> (embedding, quality)`; torch or numpy in and out.
    With `return_quality=True` also returns the mean quality of the two views.
    """
    embs, quals = [], []
    for out, out_flip in _views(embed_fn, images, batch_size):
        embs.append(
            as_numpy(_first_output(out), "embed_fn output") + as_numpy(_first_output(out_flip), "embed_fn output")
        )
        if return_quality:
            if not isinstance(out, (tuple, list)) or len(out) < 2:
                raise ValueError("return_quality=True needs embed_fn to return (embedding, quality)")
            quals.append((as_numpy(out[1], "quality") + as_numpy(out_flip[1], "quality")) / 2)
    emb = np.concatenate(embs)
    check_finite(emb, "flip-sum embedding")
    emb = l2_normalize(emb)
    return (emb, np.concatenate(quals).reshape(-1)) if return_quality else emb


@dataclass
class Embedded:
    embeddings: np.ndarray  # (N, E) flip-sum, L2-normalised: what verification compares
    raw_embeddings: np.ndarray  # (N, E) of the image itself, unnormalised: the feature-norm baseline
    quality: np.ndarray  # (N,) quality of the image itself


def embed_images(net: Callable[[Any], Any], images: np.ndarray, batch_size: int = 64,
                 progress: bool = False) -> Embedded:
    """What evaluation needs of a face model over float32 images (N, 3, H, W) in [-1, 1]: flip-sum embeddings
    (as `flip_sum_embeddings`), and the raw embedding and quality of each unflipped image.
    `net(x: torch.Tensor) -> (embedding, quality)`, e.g. an EQFaceNet in eval mode."""
    summed, raw, quality = [], [], []
    for out, out_flip in _views(lambda x: net(torch.as_tensor(x)), images, batch_size, progress):
        emb = as_numpy(out[0], "model embedding")
        raw.append(emb)
        summed.append(emb + as_numpy(out_flip[0], "model embedding"))
        quality.append(as_numpy(out[1], "model quality").reshape(-1))
    flip = np.concatenate(summed)
    check_finite(flip, "model embeddings")
    return Embedded(l2_normalize(flip), np.concatenate(raw), np.concatenate(quality))


def image_quality(net: Callable[[Any], Any], images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N,) quality of each image: `net(x)[1]`, one pass, no flip."""
    with torch.no_grad():
        return np.concatenate([as_numpy(net(torch.as_tensor(images[i:i + batch_size]))[1], "model quality")
                               .reshape(-1) for i in range(0, len(images), batch_size)])


# ----------------------------------------------------------------------------- thresholds and rates


def threshold_at_far(impostor_scores: np.ndarray, far: float) -> float:
    """Smallest t with #(impostor > t) <= floor(far * N), so the false accept rate never exceeds far."""
    imp = np.sort(np.asarray(impostor_scores, dtype=np.float64))[::-1]
    if imp.size == 0:
        raise ValueError("threshold_at_far: no impostor scores")
    k = int(math.floor(far * imp.size + 1e-9))
    return float(imp[min(k, imp.size - 1)])


def enough_impostors(n_impostor: int, far: float) -> bool:
    # A FAR below 1/N cannot be measured from N impostor pairs.
    return n_impostor >= math.ceil(1.0 / far - 1e-9)


def tar_at_far(
    scores: np.ndarray, is_same: np.ndarray, fars: Sequence[float] = DEFAULT_FARS
) -> tuple[dict, dict, list]:
    """TAR at each FAR: returns (tar, threshold, notes); NaN where there are too few impostor pairs."""
    gen, imp = scores[is_same], scores[~is_same]
    tars, thresholds, notes = {}, {}, []
    for far in fars:
        if gen.size == 0 or not enough_impostors(imp.size, far):
            tars[far] = thresholds[far] = float("nan")
            notes.append(
                f"TAR@FAR={far:g} not measured: {imp.size} impostor pairs, needs >= {math.ceil(1 / far)}"
                if gen.size
                else f"TAR@FAR={far:g} not measured: no genuine pairs"
            )
            continue
        t = threshold_at_far(imp, far)
        tars[far] = float(np.mean(gen > t))
        thresholds[far] = t
    return tars, thresholds, notes


def tar_at_nearest_far(scores: np.ndarray, is_same: np.ndarray, fars: Sequence[float] = DEFAULT_FARS
                       ) -> dict[float, float]:
    """TAR at the ROC point whose FAR is nearest each target: insightface's IJB convention (its 1:1 evaluation
    script: sklearn's ROC with collinear points dropped, read backwards so that of two equally near points the
    one with the larger FAR wins), so that a figure compares like for like with published tables. Unlike
    `tar_at_far` (FAR <= target), the point may lie above the target, and a number comes out even where too
    few impostor pairs exist to measure that FAR."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], is_same[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[last_of_run]
    fps = last_of_run + 1 - tps
    if tps.size > 2:  # drop the points where neither count changes its step: they lie on a straight segment
        corner = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        tps, fps = tps[corner], fps[corner]
    fpr = (np.r_[0, fps] / max(int(fps[-1]), 1))[::-1]
    tpr = (np.r_[0, tps] / max(int(tps[-1]), 1))[::-1]
    return {far: float(tpr[np.argmin(np.abs(fpr - far))]) for far in fars}


def roc_curve(scores: np.ndarray, is_same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with one point per distinct score, starting at (0, 0) for threshold +inf."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], is_same[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[last_of_run]
    fps = last_of_run + 1 - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last_of_run]]


def best_accuracy_threshold(scores: np.ndarray, is_same: np.ndarray) -> tuple[float, float]:
    """Threshold maximising the accuracy of `score > t` on these pairs (exact); returns (t, accuracy)."""
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], is_same[order]
    n = s.size
    # Cut i: pairs [0, i) are called "different", [i, n) "same".
    neg_below = np.r_[0, np.cumsum(~y)]
    pos_above = y.sum() - np.r_[0, np.cumsum(y)]
    correct = neg_below + pos_above
    # A cut inside a run of equal scores cannot be realised by any threshold.
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] > s[:-1]
    i = int(np.argmax(np.where(valid, correct, -1)))
    if i == 0:
        t = float(np.nextafter(s[0], -np.inf))
    elif i == n:
        t = float(s[-1])
    else:
        t = float((s[i - 1] + s[i]) / 2)
    return t, float(correct[i] / n)


def kfold_accuracy(
    scores: np.ndarray, is_same: np.ndarray, n_folds: int = 10, folds: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy per fold at the threshold best on the other folds: (fold accuracies, fold thresholds).

    `folds`: a fold id per pair (a set's own folds, e.g. LFW pairs.txt); by default the LFW protocol's
    `n_folds` contiguous folds in pair order.
    """
    if folds is None:
        if scores.size < n_folds:
            raise ValueError(f"{scores.size} pairs cannot be split into {n_folds} folds")
        folds = np.repeat(np.arange(n_folds), [len(part) for part in np.array_split(np.arange(scores.size), n_folds)])
    folds = np.asarray(folds)
    ids = np.unique(folds)
    if ids.size < 2:
        raise ValueError(f"folds: need at least 2 folds, got {ids.size}")
    accs, thresholds = np.empty(ids.size), np.empty(ids.size)
    for k, fold in enumerate(ids):
        test = folds == fold
        t, _ = best_accuracy_threshold(scores[~test], is_same[~test])
        accs[k] = np.mean((scores[test] > t) == is_same[test])
        thresholds[k] = t
    return accs, thresholds


def verify_scores(
    scores: Any, is_same: Any, n_folds: int = 10, fars: Sequence[float] = DEFAULT_FARS,
    folds: np.ndarray | None = None,
) -> dict[str, Any]:
    """Verification metrics from precomputed similarity scores; see `verify`. `folds`: the set's own fold
    per pair (else `n_folds` contiguous folds), named in `fold_protocol`."""
    s = as_numpy(scores, "scores").reshape(-1)
    check_finite(s, "scores")
    y = check_labels_bool(is_same, s.size)
    if not y.any() or y.all():
        raise ValueError(
            f"is_same: needs both genuine and impostor pairs, got {int(y.sum())} genuine of {y.size}"
        )
    own_folds = folds is not None and np.unique(folds).size >= 2
    accs, fold_thresholds = kfold_accuracy(s, y, n_folds, folds if own_folds else None)
    best_t, best_acc = best_accuracy_threshold(s, y)
    tars, tar_thresholds, notes = tar_at_far(s, y, fars)
    fpr, tpr, roc_thresholds = roc_curve(s, y)
    return {
        "acc_mean": float(accs.mean()),
        "acc_std": float(accs.std()),
        "fold_accuracies": accs,
        "fold_thresholds": fold_thresholds,
        "fold_protocol": (f"the set's own {accs.size} folds" if own_folds
                          else f"{n_folds} contiguous folds in pair order"),
        "best_threshold": best_t,
        "best_threshold_accuracy": best_acc,
        "tar_at_far": tars,
        "far_thresholds": tar_thresholds,
        "roc": {"fpr": fpr, "tpr": tpr, "thresholds": roc_thresholds},
        "auc": float(np.trapezoid(tpr, fpr)),
        "num_genuine": int(y.sum()),
        "num_impostor": int((~y).sum()),
        "notes": notes,
    }


def verify(
    emb_a: Any, emb_b: Any, is_same: Any, n_folds: int = 10, fars: Sequence[float] = DEFAULT_FARS
) -> dict[str, Any]:
    """Verify pairs (emb_a[i], emb_b[i]) on cosine similarity.

    Returns acc_mean/acc_std (k-fold, LFW protocol: folds are contiguous in pair order, so shuffle or
    interleave pairs first), best_threshold (accuracy-optimal on all pairs; per-fold ones in
    fold_thresholds), tar_at_far {far: TAR or NaN} with a reason in notes when there are fewer than
    1/FAR impostor pairs, roc {fpr, tpr, thresholds}, auc.
    """
    return verify_scores(cosine_similarity(emb_a, emb_b), is_same, n_folds=n_folds, fars=fars)


# ----------------------------------------------------------------------------- pair generation


def _check_pair_inputs(labels: Any, groups: Any) -> tuple[np.ndarray, np.ndarray | None]:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size < 2:
        raise ValueError(f"labels: expected a 1-D array of at least 2 labels, got shape {lab.shape}")
    grp = None
    if groups is not None:
        grp = np.asarray(groups)
        if grp.shape != lab.shape:
            raise ValueError(f"groups: shape {grp.shape} does not match labels {lab.shape}")
    return lab, grp


def _encode(values: np.ndarray) -> np.ndarray:
    return np.unique(values, return_inverse=True)[1].reshape(-1)


def count_available_pairs(labels: Any, groups: Any = None) -> tuple[int, int]:
    """(#genuine, #impostor) unordered pairs make_pairs can draw from, honouring `groups`."""
    lab, grp = _check_pair_inputs(labels, groups)

    def pairs_within(codes: np.ndarray) -> int:
        c = np.bincount(codes).astype(np.int64)
        return int((c * (c - 1) // 2).sum())

    n = lab.size
    total = n * (n - 1) // 2
    same_label = pairs_within(_encode(lab))
    if grp is None:
        return same_label, total - same_label
    g = _encode(grp)
    same_group = pairs_within(g)
    same_both = pairs_within(_encode(_encode(lab) * (g.max() + 1) + g))
    return same_label - same_both, total - same_label - same_group + same_both


def _sample_from_candidates(a: np.ndarray, b: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    pick = rng.choice(a.size, size=k, replace=False)
    return np.stack([a[pick], b[pick]], axis=1)


def _genuine_candidates(lab: np.ndarray, grp: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    a_all, b_all = [], []
    for members in np.split(np.argsort(lab, kind="mergesort"), np.flatnonzero(np.diff(np.sort(lab))) + 1):
        if members.size < 2:
            continue
        members = np.sort(members)
        i, j = np.triu_indices(members.size, k=1)
        a, b = members[i], members[j]
        if grp is not None:
            keep = grp[a] != grp[b]
            a, b = a[keep], b[keep]
        a_all.append(a)
        b_all.append(b)
    if not a_all:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(a_all), np.concatenate(b_all)


def _impostor_candidates(lab: np.ndarray, grp: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.triu_indices(lab.size, k=1)
    keep = lab[a] != lab[b]
    if grp is not None:
        keep &= grp[a] != grp[b]
    return a[keep], b[keep]


def _rejection_sample(
    lab: np.ndarray, grp: np.ndarray | None, k: int, genuine: bool, rng: np.random.Generator
) -> np.ndarray:
    """Uniform unordered pairs (i < j) with the wanted label relation, without replacement."""
    n = lab.size
    chosen: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    if genuine:
        # Draw a class with probability proportional to its pair count, then two members.
        codes = _encode(lab)
        by_class = np.argsort(codes, kind="mergesort")
        sizes = np.bincount(codes)
        offsets = np.r_[0, np.cumsum(sizes)[:-1]]
        weights = sizes * (sizes - 1) / 2.0
        weights /= weights.sum()
    while len(out) < k:
        batch = max(2 * (k - len(out)), 1024)
        if genuine:
            cls = rng.choice(sizes.size, size=batch, p=weights)
            i = by_class[offsets[cls] + rng.integers(0, sizes[cls])]
            j = by_class[offsets[cls] + rng.integers(0, sizes[cls])]
            ok = i != j
        else:
            i, j = rng.integers(0, n, size=batch), rng.integers(0, n, size=batch)
            ok = lab[i] != lab[j]
        if grp is not None:
            ok &= grp[i] != grp[j]
        for a, b in zip(np.minimum(i, j)[ok], np.maximum(i, j)[ok], strict=True):
            key = (int(a), int(b))
            if key not in chosen:
                chosen.add(key)
                out.append(key)
                if len(out) == k:
                    break
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def make_pairs(
    labels: Any, num_genuine: int, num_impostor: int, seed: int = 0, groups: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw distinct genuine and impostor pairs of sample indices from a labelled set.

    Returns (pairs (P, 2) int64 with pairs[:, 0] < pairs[:, 1], is_same (P,) bool), in a seeded
    shuffled order so that contiguous k-fold splits mix both kinds. No self-pairs, no pair twice
    (in either order). With `groups` (one id per sample, e.g. video or capture session), a pair
    never joins two samples of the same group, so genuine pairs are never near-duplicate frames.
    Raises when more pairs are asked for than exist.
    """
    lab, grp = _check_pair_inputs(labels, groups)
    if num_genuine < 0 or num_impostor < 0:
        raise ValueError(f"num_genuine={num_genuine}, num_impostor={num_impostor}: must be >= 0")
    avail_gen, avail_imp = count_available_pairs(lab, grp)
    for kind, want, have in (("genuine", num_genuine, avail_gen), ("impostor", num_impostor, avail_imp)):
        if want > have:
            raise ValueError(
                f"make_pairs: asked for {want} {kind} pairs but only {have} exist in these labels"
            )
    rng = np.random.default_rng(seed)
    parts = []
    for genuine, want, have in ((True, num_genuine, avail_gen), (False, num_impostor, avail_imp)):
        if want == 0:
            parts.append(np.empty((0, 2), np.int64))
        elif have <= _ENUMERATE_LIMIT or want > have // 2:
            # Enumerating is exact and fast when candidates fit, and avoids slow rejection near exhaustion.
            a, b = _genuine_candidates(lab, grp) if genuine else _impostor_candidates(lab, grp)
            parts.append(_sample_from_candidates(a, b, want, rng))
        else:
            parts.append(_rejection_sample(lab, grp, want, genuine, rng))
    pairs = np.concatenate(parts).astype(np.int64)
    is_same = np.r_[np.ones(num_genuine, bool), np.zeros(num_impostor, bool)]
    order = rng.permutation(pairs.shape[0])
    return pairs[order], is_same[order]
