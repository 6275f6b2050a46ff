"""How well a quality score predicts recognition errors: error-versus-discard curves and correlations.

Pair quality is the minimum of the two images' qualities. Two variants of the curve:

- "fixed" (ISO/IEC 29794-1 EDC): the threshold is set once, at the target FMR on all impostor
  pairs; the x-axis is the fraction of *genuine* pairs discarded (lowest pair quality first), and
  FNMR is measured on the genuine pairs kept.
- "recomputed" (MagFace / CR-FIQA ERC): the lowest-quality fraction of *all* pairs is discarded
  and the threshold is re-derived at the target FMR from the impostor pairs kept.

Ties in quality are broken by a fixed-seed permutation: the same inputs always give the same
curve, and a block of tied pairs is not discarded in storage order (which may follow the label).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from evaluation import baselines as baseline_scores
from evaluation.verification import (
    as_numpy,
    check_finite,
    check_labels_bool,
    cosine_similarity,
    count_available_pairs,
    enough_impostors,
    make_pairs,
    threshold_at_far,
)

VARIANTS: tuple[str, ...] = ("fixed", "recomputed")
DEFAULT_FMRS: tuple[float, ...] = (1e-3, 1e-2)
AREA_RANGES: dict[str, tuple[float, float]] = {"0-0.2": (0.0, 0.2), "0-0.3": (0.0, 0.3), "full": (0.0, 0.95)}


def default_discard_fractions(step: float = 0.05, stop: float = 0.95) -> np.ndarray:
    # Rounded so that 0.2 and 0.3 are exact grid points for the partial areas.
    return np.round(np.arange(0.0, stop + step / 2, step), 10)


def pair_quality(quality: Any, pairs: Any) -> np.ndarray:
    """Quality of a pair = the lower of its two images' qualities."""
    q = as_numpy(quality, "quality").reshape(-1)
    p = np.asarray(pairs)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"pairs: expected shape (P, 2), got {p.shape}")
    if p.size and (p.min() < 0 or p.max() >= q.size):
        row = int(np.argwhere((p < 0) | (p >= q.size))[0][0])
        raise ValueError(f"pairs: row {row} {p[row].tolist()} indexes outside {q.size} samples")
    return np.minimum(q[p[:, 0]], q[p[:, 1]])


def _quality_order(quality: np.ndarray, tie_seed: int) -> np.ndarray:
    """Indices from lowest to highest quality; ties broken by a seeded permutation."""
    tie_key = np.random.default_rng(tie_seed).permutation(quality.size)
    return np.lexsort((tie_key, quality))


def _n_discarded(fraction: float, n: int) -> int:
    return int(math.floor(fraction * n + 1e-9))


def _fnmr_at(gen: np.ndarray, imp: np.ndarray, fmr: float) -> float:
    if gen.size == 0 or not enough_impostors(imp.size, fmr):
        return float("nan")
    return float(np.mean(gen <= threshold_at_far(imp, fmr)))


@dataclass
class ERCResult:
    """FNMR against discard fraction, per variant and FMR, and the areas under those curves."""

    discard_fractions: np.ndarray
    fnmr: dict[str, dict[float, np.ndarray]]
    areas: dict[str, dict[float, dict[str, float]]]
    notes: list[str] = field(default_factory=list)

    def flat_areas(self) -> dict[str, float]:
        """{"fixed_fmr0.001_auc0-0.2": area, ...}: one row of the quality table."""
        return {
            f"{variant}_fmr{fmr:g}_auc{name}": area
            for variant, per_fmr in self.areas.items()
            for fmr, per_range in per_fmr.items()
            for name, area in per_range.items()
        }


def curve_area(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    """Trapezoid area of y(x) over the grid points in [lo, hi]; NaN if any of them is NaN."""
    keep = (x >= lo - 1e-9) & (x <= hi + 1e-9)
    if keep.sum() < 2:
        return float("nan")
    return float(np.trapezoid(y[keep], x[keep]))


def error_versus_discard(
    scores: Any,
    is_same: Any,
    quality: Any,
    fmrs: Sequence[float] = DEFAULT_FMRS,
    discard_fractions: Sequence[float] | None = None,
    variants: Sequence[str] = VARIANTS,
    tie_seed: int = 0,
    area_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> ERCResult:
    """Error-versus-discard curves of one quality over pairs (scores, is_same, per-pair quality).

    `quality` is per pair (use `pair_quality` for min of two images). FNMR is NaN where fewer than
    1/FMR impostor pairs are left; areas that include such a point are NaN too.
    """
    s = as_numpy(scores, "scores").reshape(-1)
    check_finite(s, "scores")
    y = check_labels_bool(is_same, s.size)
    q = as_numpy(quality, "quality").reshape(-1)
    if q.size != s.size:
        raise ValueError(f"quality: {q.size} values for {s.size} pairs")
    check_finite(q, "quality")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"variants: unknown {sorted(unknown)}, expected some of {VARIANTS}")
    fractions = (
        default_discard_fractions() if discard_fractions is None else np.asarray(discard_fractions, float)
    )
    if fractions.ndim != 1 or fractions.size == 0 or fractions.min() < 0 or fractions.max() >= 1:
        raise ValueError("discard_fractions: expected a 1-D list of fractions in [0, 1)")
    ranges = dict(AREA_RANGES if area_ranges is None else area_ranges)
    if area_ranges is None:
        ranges["full"] = (0.0, float(fractions.max()))

    order = _quality_order(q, tie_seed)
    gen_sorted = s[order][y[order]]  # genuine scores, lowest pair quality first
    imp_all = s[~y]
    fnmr: dict[str, dict[float, np.ndarray]] = {v: {} for v in variants}
    notes: list[str] = []
    for fmr in fmrs:
        if "fixed" in variants:
            if enough_impostors(imp_all.size, fmr) and gen_sorted.size:
                t = threshold_at_far(imp_all, fmr)
                curve = [
                    np.mean(gen_sorted[_n_discarded(d, gen_sorted.size) :] <= t)
                    if _n_discarded(d, gen_sorted.size) < gen_sorted.size
                    else np.nan
                    for d in fractions
                ]
            else:
                curve = [np.nan] * fractions.size
                notes.append(
                    f"fixed, FMR={fmr:g}: {imp_all.size} impostor pairs, needs >= {math.ceil(1 / fmr)}"
                )
            fnmr["fixed"][fmr] = np.asarray(curve, dtype=float)
        if "recomputed" in variants:
            curve = []
            for d in fractions:
                kept = order[_n_discarded(d, s.size) :]
                curve.append(_fnmr_at(s[kept][y[kept]], s[kept][~y[kept]], fmr))
            curve_arr = np.asarray(curve, dtype=float)
            if np.isnan(curve_arr).any():
                first = float(fractions[np.isnan(curve_arr)][0])
                notes.append(
                    f"recomputed, FMR={fmr:g}: too few impostor pairs left from discard {first:g} on"
                )
            fnmr["recomputed"][fmr] = curve_arr
    areas = {
        v: {
            fmr: {name: curve_area(fractions, c, lo, hi) for name, (lo, hi) in ranges.items()}
            for fmr, c in per.items()
        }
        for v, per in fnmr.items()
    }
    return ERCResult(discard_fractions=fractions, fnmr=fnmr, areas=areas, notes=notes)


def erc_for_methods(
    scores: Any, is_same: Any, pair_qualities: Mapping[str, Any], **kwargs: Any
) -> dict[str, ERCResult]:
    """`error_versus_discard` for several per-pair qualities on the same pairs."""
    return {name: error_versus_discard(scores, is_same, q, **kwargs) for name, q in pair_qualities.items()}


# ----------------------------------------------------------------------------- correlation with ground truth


def quality_correlation(quality: Any, ground_truth: Any) -> dict[str, float]:
    """Spearman (ties get average ranks) and Kendall tau-b between a quality and a ground truth.

    NaN when either input is constant (the correlation is undefined).
    """
    q = as_numpy(quality, "quality").reshape(-1)
    g = as_numpy(ground_truth, "ground_truth").reshape(-1)
    if q.size != g.size:
        raise ValueError(f"quality has {q.size} values but ground_truth has {g.size}")
    if q.size < 2:
        raise ValueError("quality_correlation: needs at least 2 values")
    check_finite(q, "quality")
    check_finite(g, "ground_truth")
    if np.ptp(q) == 0 or np.ptp(g) == 0:
        return {"spearman": float("nan"), "kendall": float("nan")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = stats.spearmanr(q, g).statistic
        tau = stats.kendalltau(q, g).statistic
    return {"spearman": float(rho), "kendall": float(tau)}


_YALEB_NAME = re.compile(r"_P\d+A([+-]\d+)E([+-]\d+)")


def yaleb_light_angle(filename: str | Path) -> tuple[float, float, float]:
    """(azimuth, elevation, off-axis angle) in degrees from a name like `yaleB05_P00A-035E+40.png`.

    The off-axis angle is between the light direction (az, el) and the camera axis:
    arccos(cos(az) * cos(el)).
    """
    name = Path(filename).name
    m = _YALEB_NAME.search(name)
    if m is None:
        raise ValueError(f"{name}: not a Yale B lit-image name like 'yaleB05_P00A-035E+40.png'")
    az, el = float(m.group(1)), float(m.group(2))
    cos_angle = math.cos(math.radians(az)) * math.cos(math.radians(el))
    return az, el, math.degrees(math.acos(max(-1.0, min(1.0, cos_angle))))


# ----------------------------------------------------------------------------- one table for all methods


def baseline_qualities(
    names: Sequence[str], emb: np.ndarray, images: Any = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per-image baseline qualities: "random", "norm" (unnormalised embedding norm), "sharpness"."""
    out = {}
    for name in names:
        if name == "random":
            out[name] = baseline_scores.random_quality(emb.shape[0], seed=seed)
        elif name == "norm":
            out[name] = baseline_scores.feature_norm_quality(emb)
        elif name == "sharpness":
            if images is None:
                raise ValueError("baseline 'sharpness' needs images")
            out[name] = baseline_scores.laplacian_variance(images)
        else:
            raise ValueError(f"unknown baseline {name!r}; pass custom ones through extra_qualities")
    return out


def quality_report(
    emb: Any,
    quality: Any,
    labels: Any,
    images: Any = None,
    pairs: Any = None,
    baselines: Sequence[str] = ("random", "norm", "sharpness"),
    extra_qualities: Mapping[str, Any] | None = None,
    fmrs: Sequence[float] = DEFAULT_FMRS,
    num_genuine: int = 3000,
    num_impostor: int = 30000,
    seed: int = 0,
    return_curves: bool = False,
) -> dict[str, dict[str, float]] | tuple[dict[str, dict[str, float]], dict[str, ERCResult]]:
    """ERC areas of the model's quality ("eqface") and each baseline, same pairs: {method: {metric: value}}.

    emb: (N, E) unnormalised embeddings (the "norm" baseline needs the raw norm); quality: (N,);
    labels: (N,) identities; images: needed for "sharpness"; pairs: (P, 2) indices, or None to draw
    up to num_genuine / num_impostor pairs with `make_pairs(seed)`. extra_qualities: more per-image
    qualities by name (e.g. SER-FIQ). Each row also holds fnmr at zero discard and pair counts.
    """
    e = as_numpy(emb, "emb")
    if e.ndim != 2:
        raise ValueError(f"emb: expected (N, E), got shape {e.shape}")
    check_finite(e, "emb")
    lab = np.asarray(labels)
    n = e.shape[0]
    if lab.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},), got {lab.shape}")
    per_image = {"eqface": as_numpy(quality, "quality").reshape(-1)}
    per_image.update(baseline_qualities(baselines, e, images, seed=seed))
    for name, q in (extra_qualities or {}).items():
        per_image[name] = as_numpy(q, name).reshape(-1)
    for name, q in per_image.items():
        if q.size != n:
            raise ValueError(f"quality {name!r}: {q.size} values for {n} embeddings")

    if pairs is None:
        avail_gen, avail_imp = count_available_pairs(lab)
        pairs, is_same = make_pairs(lab, min(num_genuine, avail_gen), min(num_impostor, avail_imp), seed=seed)
    else:
        pairs = np.asarray(pairs)
        pair_quality(per_image["eqface"], pairs)  # validates shape and index range
        is_same = lab[pairs[:, 0]] == lab[pairs[:, 1]]
    scores = cosine_similarity(e[pairs[:, 0]], e[pairs[:, 1]])
    curves = erc_for_methods(
        scores, is_same, {k: pair_quality(q, pairs) for k, q in per_image.items()}, fmrs=fmrs
    )
    table = {}
    for name, res in curves.items():
        row = res.flat_areas()
        for fmr in fmrs:
            row[f"fnmr_fmr{fmr:g}_at0"] = float(res.fnmr["fixed"][fmr][0])
        row["num_genuine"] = int(is_same.sum())
        row["num_impostor"] = int((~is_same).sum())
        table[name] = row
    return (table, curves) if return_curves else table


def format_quality_table(
    table: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None = None, precision: int = 4
) -> str:
    """Plain-text table: one row per method, one column per metric (all metrics when columns is None)."""
    if not table:
        return "(empty table)"
    if columns is None:
        columns = list(dict.fromkeys(k for row in table.values() for k in row))
    name_width = max(len("method"), *(len(m) for m in table))

    def cell(v: Any) -> str:
        if isinstance(v, (int, np.integer)):
            return str(v)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "nan"
        return f"{v:.{precision}f}"

    rows = [[cell(row.get(c)) for c in columns] for row in table.values()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    header = ["method".ljust(name_width)] + [c.rjust(w) for c, w in zip(columns, widths, strict=True)]
    lines = ["  ".join(header)]
    lines.append("-" * len(lines[0]))
    for name, r in zip(table, rows, strict=True):
        cells = [v.rjust(w) for v, w in zip(r, widths, strict=True)]
        lines.append("  ".join([name.ljust(name_width)] + cells))
    return "\n".join(lines)
