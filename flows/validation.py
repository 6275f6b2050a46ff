"""Validation after each step, on the held-out split: verification, quality metrics, plots.

Metric names are the same in every step and every flow so the MLflow UI compares runs:
`val_acc`, `val_acc_std`, `val_tar_far1e-3`, `val_auc`, and where a quality branch exists
`quality_spearman` (against ground-truth degradation, when the set has it: negative is good),
`erc_auc_fmr1e-3` / `erc_auc_fmr1e-2` (area under FNMR-vs-discard, fixed threshold, full range: lower
is better) with the same areas for the random and sharpness baselines, and the val quality spread.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data.pipeline import load_arrays
from evaluation import error_versus_discard, make_pairs, pair_quality, verify
from evaluation.baselines import laplacian_variance, random_quality
from evaluation.plots import plot_erc, plot_quality_grid, plot_quality_histogram
from evaluation.quality_assessment import quality_correlation
from evaluation.verification import count_available_pairs, embed_images, image_quality
from flows import checkpoints

MAX_PAIRS_PER_KIND = 3000


def validation_metrics(
    embed_net: torch.nn.Module, quality_net: torch.nn.Module | None, val: dict[str, np.ndarray], seed: int = 0,
    artifacts: bool = True,
) -> tuple[dict[str, float], dict[str, bytes]]:
    """Metrics and PNG artifacts for one step. `quality_net` is None where the step has no quality branch."""
    embed_net.eval()
    emb = embed_images(embed_net, val["image"], batch_size=256).embeddings
    labels = val["label"]
    genuine_avail, impostor_avail = count_available_pairs(labels)
    n = min(MAX_PAIRS_PER_KIND, genuine_avail, impostor_avail)
    pairs, is_same = make_pairs(labels, n, n, seed=seed)
    ver = verify(emb[pairs[:, 0]], emb[pairs[:, 1]], is_same)
    metrics = {
        "val_acc": ver["acc_mean"], "val_acc_std": ver["acc_std"], "val_auc": ver["auc"],
        "val_tar_far1e-3": _finite_or_nan(ver["tar_at_far"].get(1e-3)),
        "val_tar_far1e-2": _finite_or_nan(ver["tar_at_far"].get(1e-2)),
    }
    plots: dict[str, bytes] = {}
    if quality_net is None:
        return metrics, plots

    quality = image_quality(quality_net.eval(), val["image"], batch_size=256)
    metrics.update({
        "val_quality_mean": float(quality.mean()), "val_quality_std": float(quality.std()),
    })
    if "degradation" in val:
        metrics["quality_spearman"] = quality_correlation(quality, val["degradation"])["spearman"]
    scores = np.sum(emb[pairs[:, 0]] * emb[pairs[:, 1]], axis=1)
    per_image = {
        "eqface": quality,
        "random": random_quality(len(quality), seed=seed),
        "sharpness": laplacian_variance(val["image"]),
    }
    curves = {}
    for name, q in per_image.items():
        curves[name] = error_versus_discard(scores, is_same, pair_quality(q, pairs), fmrs=(1e-3, 1e-2))
        suffix = "" if name == "eqface" else f"_{name}"
        for fmr in (1e-3, 1e-2):
            metrics[f"erc_auc_fmr{fmr:.0e}{suffix}".replace("e-0", "e-")] = curves[name].areas["fixed"][fmr]["full"]
    if artifacts:
        plots["erc.png"] = plot_erc(curves, variant="fixed", title="FNMR vs discarded fraction (fixed threshold)")
        plots["quality_histogram.png"] = plot_quality_histogram(quality, title="validation quality")
        plots["quality_extremes.png"] = plot_quality_grid(val["image"], quality, n=8,
                                                          title="lowest (top) and highest (bottom) quality")
    return metrics, plots


def _finite_or_nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def validate_checkpoints(embed_ckpt, quality_ckpt, val_uri: str, image_size: int, seed: int,
                         limit: int | None = None) -> tuple[dict[str, float], dict[str, bytes]]:
    """Load the step's networks and the held-out set, then `validation_metrics` (runs as a Ray task)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    val = load_arrays(val_uri, image_size=image_size, limit=limit)
    embed_net = checkpoints.load_net(embed_ckpt)
    quality_net = None
    if quality_ckpt is not None:
        quality_net = embed_net if quality_ckpt is embed_ckpt else checkpoints.load_net(quality_ckpt)
    return validation_metrics(embed_net, quality_net, val, seed=seed)
