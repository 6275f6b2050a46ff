"""Evaluation figures as PNG bytes (optionally also written to a path).

Uses matplotlib's object API with the Agg canvas directly: no pyplot global state, no display. matplotlib is
imported when the first figure is drawn: training workers import this module and draw none, and the GPU host
(benchmarks/gpu_check.py) need not have it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evaluation.baselines import as_uint8_hwc
from evaluation.quality_assessment import ERCResult
from evaluation.verification import as_numpy

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # deferred: see the module's docstring
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure, path: str | Path | None, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    data = buf.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data


def plot_erc(
    curves: Mapping[str, ERCResult],
    variant: str = "fixed",
    fmrs: Sequence[float] | None = None,
    path: str | Path | None = None,
    title: str | None = None,
) -> bytes:
    """FNMR vs discard fraction: one panel per FMR, one line per quality method."""
    if not curves:
        raise ValueError("plot_erc: no curves")
    first = next(iter(curves.values()))
    if variant not in first.fnmr:
        raise ValueError(f"plot_erc: variant {variant!r} not in the curves ({list(first.fnmr)})")
    fmrs = list(fmrs) if fmrs is not None else list(first.fnmr[variant])
    fig = _figure((5 * len(fmrs), 4))
    axes = fig.subplots(1, len(fmrs), squeeze=False)[0]
    for ax, fmr in zip(axes, fmrs, strict=True):
        for name, res in curves.items():
            ax.plot(res.discard_fractions, res.fnmr[variant][fmr], marker=".", label=name)
        x_label = (
            "fraction of genuine pairs discarded" if variant == "fixed" else "fraction of pairs discarded"
        )
        ax.set(xlabel=x_label, ylabel="FNMR", title=f"{variant} threshold, FMR={fmr:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _png(fig, path)


def plot_quality_histogram(
    qualities: Any | Mapping[str, Any], bins: int = 30, path: str | Path | None = None, title: str = "quality"
) -> bytes:
    """Histogram of one quality array, or overlaid histograms of {name: qualities}."""
    named = qualities if isinstance(qualities, Mapping) else {"quality": qualities}
    fig = _figure((5, 4))
    ax = fig.subplots()
    for name, q in named.items():
        ax.hist(as_numpy(q, name).reshape(-1), bins=bins, alpha=0.6, label=name)
    ax.set(xlabel="quality", ylabel="count", title=title)
    if len(named) > 1:
        ax.legend(fontsize=8)
    return _png(fig, path)


def plot_roc(
    rocs: Mapping[str, Any] | Any, path: str | Path | None = None, log_fpr: bool = True, title: str = "ROC"
) -> bytes:
    """ROC curves. Each value: a `verify` result, its "roc" dict, or an (fpr, tpr[, thresholds]) tuple."""
    named = rocs if isinstance(rocs, Mapping) and "fpr" not in rocs and "roc" not in rocs else {"": rocs}
    fig = _figure((5, 4))
    ax = fig.subplots()
    for name, r in named.items():
        r = r.get("roc", r) if isinstance(r, Mapping) else r
        fpr, tpr = (r["fpr"], r["tpr"]) if isinstance(r, Mapping) else (r[0], r[1])
        fpr, tpr = np.asarray(fpr, float), np.asarray(tpr, float)
        if log_fpr:  # FPR = 0 has no place on a log axis
            fpr, tpr = fpr[fpr > 0], tpr[fpr > 0]
        ax.plot(fpr, tpr, label=name or None)
    if log_fpr:
        ax.set_xscale("log")
    ax.set(xlabel="false accept rate", ylabel="true accept rate", title=title, ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    if any(named):
        ax.legend(fontsize=8)
    return _png(fig, path)


def plot_quality_grid(
    images: Any, qualities: Any, n: int = 8, path: str | Path | None = None, title: str | None = None
) -> bytes:
    """Grid of the n lowest-quality faces (top row) and n highest (bottom row), score under each.

    images: uint8 (N, H, W[, C]) or float (N, C, H, W) in [-1, 1].
    """
    imgs = as_uint8_hwc(images)
    q = as_numpy(qualities, "qualities").reshape(-1)
    if q.size != imgs.shape[0]:
        raise ValueError(f"{imgs.shape[0]} images but {q.size} qualities")
    n = max(1, min(n, q.size))
    order = np.argsort(q, kind="mergesort")
    rows = [("lowest", order[:n]), ("highest", order[::-1][:n][::-1])]
    fig = _figure((1.4 * n, 3.4))
    axes = fig.subplots(2, n, squeeze=False)
    for r, (label, idx) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(imgs[idx[c]])
            ax.set_xlabel(f"{q[idx[c]]:.3f}", fontsize=9)
        axes[r][0].set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title)
    return _png(fig, path)


def plot_quality_by_degradation(
    degradation: np.ndarray,
    quality: np.ndarray,
    kinds: np.ndarray | None = None,
    path: str | Path | None = None,
    title: str | None = None,
) -> bytes:
    """Mean quality (with its spread) at each ground-truth severity, one line per degradation kind."""
    degradation, quality = as_numpy(degradation, "degradation"), as_numpy(quality, "quality")
    kinds = np.full(degradation.shape, "all", dtype=object) if kinds is None else np.asarray(kinds, dtype=object)
    clean = degradation == 0
    fig = _figure((6.0, 4.0))
    ax = fig.add_subplot()
    for kind in sorted(set(kinds[~clean].tolist())):
        rows = clean | (kinds == kind)
        levels = np.unique(degradation[rows])
        means = [quality[rows & (degradation == d)].mean() for d in levels]
        spread = [quality[rows & (degradation == d)].std() for d in levels]
        ax.errorbar(levels, means, yerr=spread, marker="o", capsize=3, label=str(kind))
    ax.set_xlabel("degradation severity (0 = clean)")
    ax.set_ylabel("quality")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return _png(fig, path)
