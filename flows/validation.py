"""Validation after each step, on held-out faces: verification, quality metrics, plots.

Metric names are the same in every step and every flow so the MLflow UI compares runs. On `data.val`:
`val_acc`, `val_acc_std`, `val_tar_far1e-3`, `val_auc`, and where a quality branch exists
`quality_spearman` (against ground-truth degradation, when the set has it: negative is good),
`erc_auc_fmr1e-3` / `erc_auc_fmr1e-2` (area under FNMR-vs-discard, fixed threshold, full range: lower
is better) with the same areas for the random and sharpness baselines, and the val quality spread
(`val_quality_mean/std/p05`, which the collapse guard reads).

On each of `data.eval_sets` (people never seen in training), prefixed `<name>/`: with a `degradation`
column, `quality_spearman` overall, `quality_spearman_<kind>` per `degradation_type` (each kind against
its clean photos) and `quality_spearman_within_photo` (per clean photo, averaged); without one,
error-versus-discard on the set's genuine and impostor pairs for EQFace and the random, sharpness,
feature-norm and SER-FIQ baselines: `edc_pauc20_fmr1e-3` (area over discarding 0 to
20 %), `edc_pauc30_...`, at FMR 1e-3 and 1e-2, `_<baseline>` for the baselines.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data.pipeline import load_arrays
from evaluation import error_versus_discard, make_pairs, pair_quality, verify
from evaluation.baselines import feature_norm_quality, laplacian_variance, random_quality, serfiq_scores
from evaluation.plots import plot_erc, plot_quality_by_degradation, plot_quality_grid, plot_quality_histogram
from evaluation.quality_assessment import quality_correlation
from evaluation.verification import count_available_pairs, embed_images, image_quality
from flows import checkpoints

MAX_PAIRS_PER_KIND = 3000
EDC_FMRS = (1e-3, 1e-2)
EDC_AREAS = {"pauc20": "0-0.2", "pauc30": "0-0.3"}
MAX_IMPOSTOR_PAIRS = 20000  # FMR 1e-3 needs >= 1000; more only narrows the threshold's error


def validation_metrics(
    embed_net: torch.nn.Module, quality_net: torch.nn.Module | None, val: dict[str, np.ndarray], seed: int = 0,
    artifacts: bool = True,
) -> tuple[dict[str, float], dict[str, bytes]]:
    """Metrics and PNG artifacts for one step on `data.val`. `quality_net` is None where the step has no
    quality branch."""
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
        "val_quality_p05": float(np.percentile(quality, 5)),
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
        curves[name] = error_versus_discard(scores, is_same, pair_quality(q, pairs), fmrs=EDC_FMRS)
        suffix = "" if name == "eqface" else f"_{name}"
        for fmr in EDC_FMRS:
            metrics[f"erc_auc_fmr{fmr:.0e}{suffix}".replace("e-0", "e-")] = curves[name].areas["fixed"][fmr]["full"]
    if artifacts:
        plots["erc.png"] = plot_erc(curves, variant="fixed", title="FNMR vs discarded fraction (fixed threshold)")
        plots["quality_histogram.png"] = plot_quality_histogram(quality, title="validation quality")
        plots["quality_extremes.png"] = plot_quality_grid(val["image"], quality, n=8,
                                                          title="lowest (top) and highest (bottom) quality")
    return metrics, plots


def degradation_metrics(name: str, quality: np.ndarray, data: dict[str, np.ndarray],
                        artifacts: bool = True) -> tuple[dict[str, float], dict[str, bytes]]:
    """Quality against ground-truth degradation: overall, per kind against the set's clean photos, and, where rows
    name their clean `photo`, within each photo (averaged): the effect of the degradation alone, without the
    differences between photos (a clean profile view may rank below a blurred frontal one)."""
    metrics = {f"{name}/quality_spearman": quality_correlation(quality, data["degradation"])["spearman"]}
    if "photo" in data:
        within = [quality_correlation(quality[rows], data["degradation"][rows])["spearman"]
                  for rows in (data["photo"] == photo for photo in np.unique(data["photo"]))]
        metrics[f"{name}/quality_spearman_within_photo"] = float(np.nanmean(within))
    kinds = data.get("degradation_type")
    if kinds is not None:
        clean = data["degradation"] == 0
        for kind in sorted(set(kinds[~clean].tolist())):
            rows = clean | (kinds == kind)
            metrics[f"{name}/quality_spearman_{kind}"] = quality_correlation(quality[rows],
                                                                            data["degradation"][rows])["spearman"]
    plots = {}
    if artifacts:
        plots[f"{name}_quality_by_degradation.png"] = plot_quality_by_degradation(
            data["degradation"], quality, kinds, title=f"{name}: quality against degradation")
    return metrics, plots


def discard_metrics(name: str, embed_net: torch.nn.Module, quality: np.ndarray, data: dict[str, np.ndarray],
                    seed: int = 0, artifacts: bool = True) -> tuple[dict[str, float], dict[str, bytes]]:
    """Error-versus-discard on every genuine pair of the set and up to MAX_IMPOSTOR_PAIRS impostor pairs, for
    EQFace's quality and the baselines."""
    genuine, impostor = count_available_pairs(data["label"])
    if genuine == 0 or impostor == 0:
        return {}, {}
    pairs, is_same = make_pairs(data["label"], genuine, min(impostor, MAX_IMPOSTOR_PAIRS), seed=seed)
    embedded = embed_images(embed_net.eval(), data["image"], batch_size=256)
    scores = np.sum(embedded.embeddings[pairs[:, 0]] * embedded.embeddings[pairs[:, 1]], axis=1)
    per_image = {
        "eqface": quality,
        "random": random_quality(len(quality), seed=seed),
        "sharpness": laplacian_variance(data["image"]),
        "norm": feature_norm_quality(embedded.raw_embeddings),
        "serfiq": serfiq_scores(embed_net, data["image"], batch_size=256, seed=seed),
    }
    metrics, curves = {}, {}
    for method, q in per_image.items():
        curves[method] = error_versus_discard(scores, is_same, pair_quality(q, pairs), fmrs=EDC_FMRS)
        suffix = "" if method == "eqface" else f"_{method}"
        for fmr in EDC_FMRS:
            for key, area in EDC_AREAS.items():
                metric = f"{name}/edc_{key}_fmr{fmr:.0e}{suffix}".replace("e-0", "e-")
                metrics[metric] = curves[method].areas["fixed"][fmr][area]
    plots = {}
    if artifacts:
        plots[f"{name}_erc.png"] = plot_erc(curves, variant="fixed",
                                            title=f"{name}: FNMR vs discarded fraction (fixed threshold)")
    return metrics, plots


def eval_set_metrics(name: str, embed_net: torch.nn.Module, quality_net: torch.nn.Module,
                     data: dict[str, np.ndarray], seed: int = 0) -> tuple[dict[str, float], dict[str, bytes]]:
    """The figures of one of `data.eval_sets` (see the module docstring)."""
    quality = image_quality(quality_net.eval(), data["image"], batch_size=256)
    metrics = {f"{name}/quality_mean": float(quality.mean()), f"{name}/quality_std": float(quality.std())}
    if "degradation" in data:
        found, plots = degradation_metrics(name, quality, data)
    else:
        found, plots = discard_metrics(name, embed_net, quality, data, seed=seed)
    return {**metrics, **found}, plots


def _finite_or_nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def validate_checkpoints(embed_ckpt, quality_ckpt, val_uri: str, image_size: int, seed: int,
                         limit: int | None = None, eval_sets: dict[str, str] | None = None,
                         ) -> tuple[dict[str, float], dict[str, bytes]]:
    """Load the step's networks and the held-out sets, then every figure above (runs as a Ray task)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    embed_net = checkpoints.load_net(embed_ckpt)
    quality_net = None
    if quality_ckpt is not None:
        quality_net = embed_net if quality_ckpt is embed_ckpt else checkpoints.load_net(quality_ckpt)
    metrics, plots = {}, {}
    if val_uri:
        metrics, plots = validation_metrics(embed_net, quality_net, load_arrays(val_uri, image_size=image_size,
                                                                                limit=limit), seed=seed)
    if quality_net is not None:
        for name, uri in (eval_sets or {}).items():
            data = load_arrays(uri, image_size=image_size, columns_extra=("degradation", "degradation_type", "photo"))
            found, drawn = eval_set_metrics(name, embed_net, quality_net, data, seed=seed)
            metrics.update(found)
            plots.update(drawn)
    return metrics, plots
