"""Evaluate a trained EQFace model on a pair set: verification, error-versus-discard against baselines.

    python -m flows.evaluate --model <MLflow model URI | checkpoint dir/URI | net.pt> --pairs <pairs dataset>
    python -m flows.evaluate --model ... --dataset <labelled shard dataset> [--num-genuine N --num-impostor N]
        [--image-size N] [--out DIR] [--serfiq] [--seed S]
    python -m flows.evaluate --model ... --protocol ijbc|ijbb|ytf --root DIR --out DIR   (flows/protocol_eval.py)

Prints the verification table (k-fold accuracy with flip-sum embeddings, TAR at FAR 1e-2/1e-3/1e-4
where the pair count allows), the error-versus-discard areas of the EQFace quality and the baselines
(random, feature norm, sharpness, and SER-FIQ with --serfiq) for both threshold variants, and the
Spearman correlation with ground truth where the set has one (synthetic `degradation`, Yale B lighting
angle from the file names). Writes ERC/ROC plots, the quality histogram, a grid of the lowest/highest
quality faces and report.json (every number) into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow.parquet as pq
import torch

from data import storage
from data.pairs import IMAGES_DIR, pairs_from_dataset, read_pairs_dataset, read_pairs_table
from data.pipeline import decode_image, normalise
from data.shards import DatasetError, read_manifest, shard_uris
from evaluation.baselines import (
    SERFIQ_PASSES,
    feature_norm_quality,
    laplacian_variance,
    random_quality,
    serfiq_scores,
)
from evaluation.plots import plot_erc, plot_quality_grid, plot_quality_histogram, plot_roc
from evaluation.quality_assessment import (
    AREA_RANGES,
    DEFAULT_FMRS,
    ERCResult,
    erc_for_methods,
    format_quality_table,
    pair_quality,
    quality_correlation,
    yaleb_light_angle,
)
from evaluation.verification import Embedded, count_available_pairs, embed_images, make_pairs, verify_scores
from flows import protocol_eval
from flows.checkpoints import load_net_from
from flows.tracking import check_reachable

DEFAULT_IMAGE_SIZE = 112


class ModelLoadError(RuntimeError):
    """The model argument does not lead to a usable EQFace network; the message says which and why."""


# ----------------------------------------------------------------------------- model


def load_model(spec: str, image_size: int | None = None) -> tuple[torch.nn.Module, int]:
    """(EQFaceNet in eval mode, input size) from an MLflow model URI, checkpoint dir/URI or net.pt file.

    The input size is the model's own (`net.arch["input_size"]`); `image_size` must agree with it, and
    is only needed for a model that does not record it.
    """

    if spec.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):


        try:  # one line now, instead of the MLflow client's minutes of retries
            check_reachable(mlflow.get_tracking_uri())
        except ConnectionError as exc:
            raise ModelLoadError(f"cannot load model {spec!r}: {exc}") from None
    try:
        net = load_net_from(spec)
    except Exception as exc:  # missing file, foreign file, unreachable MLflow server, ...
        raise ModelLoadError(f"cannot load model {spec!r}: {type(exc).__name__}: {exc}") from exc
    arch_size = (getattr(net, "arch", None) or {}).get("input_size")
    if arch_size is not None and image_size is not None and image_size != arch_size:
        raise ModelLoadError(
            f"--image-size {image_size} does not match the model, "
            f"which takes {arch_size} x {arch_size} images"
        )
    return net.eval(), int(image_size or arch_size or DEFAULT_IMAGE_SIZE)


# ----------------------------------------------------------------------------- metrics


@dataclass
class PairSet:
    """What evaluation needs of a pair set: decoded images, pairs over them, and optional extras."""

    images: np.ndarray  # float32 (N, 3, H, W) in [-1, 1]
    labels: np.ndarray  # (N,)
    pairs: np.ndarray  # (P, 2) int64 indices into images
    is_same: np.ndarray  # (P,) bool
    folds: np.ndarray | None = None  # (P,) fold id per pair (e.g. pairs.txt); None = contiguous folds
    degradation: np.ndarray | None = None  # (N,) ground truth, 0 = clean
    sources: np.ndarray | None = None  # (N,) file names, for ground truth coded in them (Yale B)
    unreadable: list[str] = field(default_factory=list)  # images skipped while reading, with reasons
    description: str = ""
    pairs_dropped: int = 0  # pairs left out because they use an unreadable image


def ground_truth(data: PairSet) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(name, values, image indices they cover): synthetic degradation, else the Yale B lighting angle."""

    if data.degradation is not None:
        d = np.asarray(data.degradation, dtype=np.float64)
        keep = np.flatnonzero(np.isfinite(d))
        return ("degradation", d[keep], keep) if keep.size >= 2 else None
    if data.sources is not None:
        angles, keep = [], []
        for i, source in enumerate(data.sources):
            try:
                angles.append(yaleb_light_angle(str(source))[2])
                keep.append(i)
            except ValueError:
                continue
        if len(keep) >= 2:
            return "yaleb_light_angle", np.asarray(angles), np.asarray(keep)
    return None


def per_image_qualities(
    net: torch.nn.Module,
    data: PairSet,
    emb: Embedded,
    serfiq: bool,
    seed: int,
    batch_size: int,
    progress: bool,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """EQFace quality and the baselines, per image, by method name; notes on baselines left out."""

    qualities = {
        "eqface": emb.quality,
        "random": random_quality(len(emb.quality), seed=seed),
        "norm": feature_norm_quality(emb.raw_embeddings),
        "sharpness": laplacian_variance(data.images),
    }
    notes = []
    if serfiq:
        try:
            qualities["serfiq"] = serfiq_scores(net, data.images, batch_size, progress)
        except ValueError as exc:  # a model without any Dropout layer
            notes.append(f"SER-FIQ left out: {exc}")
    return qualities, notes


def evaluate(
    net: torch.nn.Module,
    data: PairSet,
    serfiq: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, ERCResult], dict[str, Any]]:
    """Every number of the evaluation: (report, ERC curves by method, arrays for the plots)."""

    emb = embed_images(net, data.images, batch_size, progress)
    pairs, is_same = np.asarray(data.pairs, dtype=np.int64), np.asarray(data.is_same, dtype=bool)
    scores = np.einsum("ij,ij->i", emb.embeddings[pairs[:, 0]], emb.embeddings[pairs[:, 1]])
    ver = verify_scores(scores, is_same, folds=data.folds)

    qualities, notes = per_image_qualities(net, data, emb, serfiq, seed, batch_size, progress)
    curves = erc_for_methods(
        scores, is_same, {k: pair_quality(q, pairs) for k, q in qualities.items()}, fmrs=DEFAULT_FMRS
    )
    erc_table = {}
    for name, res in curves.items():
        row = res.flat_areas()
        for fmr in DEFAULT_FMRS:
            row[f"fnmr_fmr{fmr:g}_at0"] = float(res.fnmr["fixed"][fmr][0])
        erc_table[name] = row
    by_note: dict[str, list[str]] = {}
    for name, res in curves.items():
        for note in res.notes:
            by_note.setdefault(note, []).append(name)
    notes += [
        f"{'every method' if len(names) == len(curves) else ', '.join(names)}: {note}"
        for note, names in by_note.items()
    ]

    correlation = None
    truth = ground_truth(data)
    if truth is not None:
        gt_name, values, keep = truth
        correlation = {
            "ground_truth": gt_name,
            "num_images": int(keep.size),
            "methods": {k: quality_correlation(q[keep], values) for k, q in qualities.items()},
        }

    q = emb.quality
    p05, p50, p95 = np.percentile(q, [5, 50, 95])
    report = {
        "data": data.description,
        "num_images": int(len(data.images)),
        "num_pairs": int(pairs.shape[0]),
        "unreadable_images": {
            "count": len(data.unreadable),
            "items": list(data.unreadable),
            "pairs_dropped": data.pairs_dropped,
        },
        "verification": {
            "acc_mean": ver["acc_mean"],
            "acc_std": ver["acc_std"],
            "fold_accuracies": ver["fold_accuracies"],
            "fold_protocol": ver["fold_protocol"],
            "best_threshold": ver["best_threshold"],
            "auc": ver["auc"],
            "tar_at_far": {f"{far:g}": tar for far, tar in ver["tar_at_far"].items()},
            "num_genuine": ver["num_genuine"],
            "num_impostor": ver["num_impostor"],
            "notes": ver["notes"],
        },
        "erc": erc_table,
        "correlation": correlation,
        "quality": {
            "mean": float(q.mean()),
            "std": float(q.std()),
            "p05": float(p05),
            "p50": float(p50),
            "p95": float(p95),
        },
        "notes": notes,
    }
    arrays = {"roc": ver["roc"], "quality": q, "images": data.images}
    return report, curves, arrays


# ----------------------------------------------------------------------------- printing and files


def _num(v: Any, precision: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{precision}f}"


def format_verification(report: Mapping[str, Any]) -> str:
    v = report["verification"]
    lines = [
        f"verification: {report['num_pairs']} pairs "
        f"({v['num_genuine']} genuine, {v['num_impostor']} impostor) "
        f"over {report['num_images']} images, flip-sum embeddings",
        f"  accuracy      {_num(v['acc_mean'])} ± {_num(v['acc_std'])}   ({v['fold_protocol']})",
    ]
    for far, tar in v["tar_at_far"].items():
        lines.append(f"  TAR@FAR={far:<6} {_num(tar)}")
    lines.append(f"  ROC AUC       {_num(v['auc'])}")
    lines += [f"  note: {n}" for n in v["notes"]]
    return "\n".join(lines)


def format_erc(report: Mapping[str, Any]) -> str:
    """One table per threshold variant: ERC areas per method (lower is better)."""

    out = []
    for variant, what in (
        ("fixed", "threshold fixed on all pairs (EDC, ISO/IEC 29794-1)"),
        ("recomputed", "threshold re-derived at each discard level (MagFace / CR-FIQA ERC)"),
    ):
        columns = [f"{variant}_fmr{fmr:g}_auc{r}" for fmr in DEFAULT_FMRS for r in AREA_RANGES]
        table = {
            m: {
                f"fmr{fmr:g} {r}": row[f"{variant}_fmr{fmr:g}_auc{r}"]
                for fmr in DEFAULT_FMRS
                for r in AREA_RANGES
            }
            for m, row in report["erc"].items()
        }
        assert len(columns) == len(next(iter(table.values())))
        out.append(f"error-versus-discard areas (FNMR over discard fraction; lower is better), {what}:")
        out.append(format_quality_table(table))
    fnmr = {
        m: {f"FNMR@FMR={fmr:g}": row[f"fnmr_fmr{fmr:g}_at0"] for fmr in DEFAULT_FMRS}
        for m, row in report["erc"].items()
    }
    out.append(
        "FNMR with nothing discarded: "
        + ", ".join(f"{k} {_num(v)}" for k, v in next(iter(fnmr.values())).items())
    )
    return "\n".join(out)


def format_correlation(report: Mapping[str, Any]) -> str:
    c = report["correlation"]
    if c is None:
        return (
            "correlation with ground truth: this set has none (no degradation column, no Yale B file names)"
        )
    lines = [
        f"correlation of quality with {c['ground_truth']} over {c['num_images']} images "
        "(negative = quality falls as the ground truth gets worse):",
        f"  {'method':<10} {'spearman':>9} {'kendall':>9}",
    ]
    for name, r in c["methods"].items():
        lines.append(f"  {name:<10} {_num(r['spearman']):>9} {_num(r['kendall']):>9}")
    return "\n".join(lines)


def format_report(report: Mapping[str, Any]) -> str:
    parts = [format_verification(report), format_erc(report), format_correlation(report)]
    q = report["quality"]
    parts.append(
        f"EQFace quality: mean {q['mean']:.3f}, std {q['std']:.3f}, "
        f"p05 {q['p05']:.3f}, median {q['p50']:.3f}, p95 {q['p95']:.3f}"
    )
    u = report["unreadable_images"]
    if u["count"]:
        parts.append(
            f"unreadable images skipped: {u['count']} ({u['pairs_dropped']} pairs using them dropped)\n"
            + "\n".join(f"  {item}" for item in u["items"])
        )
    if report["notes"]:
        parts.append("notes:\n" + "\n".join(f"  {n}" for n in report["notes"]))
    return "\n\n".join(parts)


def to_jsonable(value: Any) -> Any:
    """numpy -> lists/floats, NaN/inf -> None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_outputs(
    out: Path, report: dict[str, Any], curves: Mapping[str, ERCResult], arrays: Mapping[str, Any]
) -> dict[str, str]:
    """Plots and report.json into `out`; returns {what: path}."""

    out.mkdir(parents=True, exist_ok=True)
    files = {
        "erc_fixed": out / "erc_fixed.png",
        "erc_recomputed": out / "erc_recomputed.png",
        "roc": out / "roc.png",
        "quality_histogram": out / "quality_histogram.png",
        "quality_extremes": out / "quality_extremes.png",
        "report": out / "report.json",
    }
    plot_erc(curves, variant="fixed", path=files["erc_fixed"], title="FNMR vs discard (threshold fixed once)")
    plot_erc(
        curves,
        variant="recomputed",
        path=files["erc_recomputed"],
        title="FNMR vs discard (threshold re-derived at each level)",
    )
    plot_roc({"flip-sum": arrays["roc"]}, path=files["roc"])
    plot_quality_histogram(arrays["quality"], path=files["quality_histogram"], title="EQFace quality")
    plot_quality_grid(
        arrays["images"],
        arrays["quality"],
        n=8,
        path=files["quality_extremes"],
        title="lowest (top) and highest (bottom) quality",
    )
    paths = {k: str(v) for k, v in files.items()}
    report["files"] = paths
    curve_doc = {
        name: {
            "discard_fractions": r.discard_fractions,
            "fnmr": {v: {f"{fmr:g}": c for fmr, c in per.items()} for v, per in r.fnmr.items()},
        }
        for name, r in curves.items()
    }
    files["report"].write_text(json.dumps(to_jsonable({**report, "erc_curves": curve_doc}), indent=1))
    return paths


# ----------------------------------------------------------------------------- loading pair sets


def read_labels(uri: str) -> np.ndarray:
    """The label column of a shard dataset, in manifest order (without decoding any image)."""


    fs, _ = storage.resolve(uri)
    return np.concatenate(
        [
            pq.read_table(storage.resolve(s)[1], filesystem=fs, columns=["label"]).column("label").to_numpy()
            for s in shard_uris(uri)
        ]
    ).astype(np.int64)


def decode_rows_skipping_unreadable(uri: str, rows: np.ndarray, image_size: int) -> dict[str, Any]:
    """Decode the given sorted global rows of a shard dataset one by one; unreadable ones are listed.

    Returns {"rows": readable rows, "image", "label", "source", "degradation" (or None), "unreadable"}.
    """


    manifest = read_manifest(uri)
    fs, _ = storage.resolve(uri)
    columns = ["image", "label", "source"] + (["degradation"] if "degradation" in manifest.columns else [])
    wanted = set(rows.tolist())
    kept, pixels, labels, sources, degradation, unreadable = [], [], [], [], [], []
    start = 0
    for shard, shard_uri in zip(manifest.shards, shard_uris(uri), strict=True):
        table = pq.read_table(storage.resolve(shard_uri)[1], filesystem=fs, columns=columns)
        cols = {name: table.column(name).to_pylist() for name in columns}
        for i in range(table.num_rows):
            if start + i not in wanted:
                continue
            try:
                if not cols["image"][i]:
                    raise ValueError("empty image bytes")
                img = decode_image(cols["image"][i], image_size)
            except Exception as exc:  # truncated, not an image, empty, ...
                unreadable.append(
                    f"{shard_uri}: row {start + i} (source {cols['source'][i]!r}): "
                    f"{type(exc).__name__}: {exc}"
                )
                continue
            kept.append(start + i)
            pixels.append(np.asarray(img, dtype=np.uint8))
            labels.append(cols["label"][i])
            sources.append(cols["source"][i])
            if "degradation" in cols:
                degradation.append(np.nan if cols["degradation"][i] is None else cols["degradation"][i])
        start += shard["rows"]
    return {
        "rows": np.asarray(kept, dtype=np.int64),
        "image": normalise(np.stack(pixels))
        if pixels
        else np.zeros((0, 3, image_size, image_size), np.float32),
        "label": np.asarray(labels, dtype=np.int64),
        "source": np.asarray(sources, dtype=object),
        "degradation": np.asarray(degradation, dtype=np.float32) if "degradation" in cols else None,
        "unreadable": unreadable,
    }


def _pairs_over_readable(
    images_uri: str,
    pairs: np.ndarray,
    is_same: np.ndarray,
    folds: np.ndarray | None,
    image_size: int,
    description: str,
) -> PairSet:
    """PairSet over the readable images only: pairs that touch an unreadable image are dropped."""
    rows = decode_rows_skipping_unreadable(images_uri, np.unique(pairs), image_size)
    keep = np.isin(pairs, rows["rows"]).all(axis=1)
    if not keep.any():
        raise ValueError(f"{images_uri}: no pair is left once the unreadable images are skipped")
    return PairSet(
        rows["image"],
        rows["label"],
        np.searchsorted(rows["rows"], pairs[keep]),
        is_same[keep],
        None if folds is None else folds[keep],
        rows["degradation"],
        rows["source"],
        rows["unreadable"],
        description,
        pairs_dropped=int((~keep).sum()),
    )


def load_pair_set(args: argparse.Namespace, image_size: int) -> PairSet:
    """The pair set named on the command line: --pairs (a pairs dataset) or --dataset (pairs drawn from it).

    Reads through data.pairs; when an image does not decode, reads again image by image, lists and skips
    the unreadable ones and the pairs that use them.
    """

    if args.pairs:
        description = f"pairs dataset {args.pairs}"
        try:
            d = read_pairs_dataset(args.pairs, image_size)
        except DatasetError as exc:
            if "corrupt image" not in str(exc):
                raise
            pairs, is_same, folds, _ = read_pairs_table(args.pairs)
            return _pairs_over_readable(
                storage.join(args.pairs, IMAGES_DIR), pairs, is_same, folds, image_size, description
            )
    else:
        labels = read_labels(args.dataset)
        have_gen, have_imp = count_available_pairs(labels)
        n_gen, n_imp = min(args.num_genuine, have_gen), min(args.num_impostor, have_imp)
        description = f"{n_gen} genuine + {n_imp} impostor pairs drawn (seed {args.seed}) from {args.dataset}"
        try:
            d = pairs_from_dataset(args.dataset, n_gen, n_imp, seed=args.seed, image_size=image_size)
        except DatasetError as exc:
            if "corrupt image" not in str(exc):
                raise
            # The same pairs pairs_from_dataset draws (make_pairs over every label, same seed).
            pairs, is_same = make_pairs(labels, n_gen, n_imp, seed=args.seed)
            return _pairs_over_readable(args.dataset, pairs, is_same, None, image_size, description)
    # Drawn pairs have no folds of their own: verification uses 10 contiguous folds over them.
    folds = d.folds if args.pairs else None
    return PairSet(d.images, d.labels, d.pairs, d.is_same, folds, d.degradation, d.sources, [], description)


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        required=True,
        help="MLflow model URI (models:/..., runs:/...), checkpoint dir/URI, or net.pt",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--pairs", help="pairs dataset URI (see data.pairs / data.convert)")
    source.add_argument(
        "--dataset", help="labelled shard dataset URI: genuine/impostor pairs are drawn from it"
    )
    parser.add_argument(
        "--num-genuine", type=int, default=3000, help="with --dataset (capped at what exists)"
    )
    parser.add_argument(
        "--num-impostor",
        type=int,
        default=3000,
        help="with --dataset (capped at what exists); balanced by default, as accuracy assumes. "
        "TAR@FAR=1e-4 needs >= 10000",
    )
    parser.add_argument("--seed", type=int, default=0, help="pair drawing and the random baseline")
    parser.add_argument(
        "--image-size", type=int, default=None, help="model input size (default: the model's)"
    )
    parser.add_argument(
        "--out", default="evaluation_out", help="folder for plots and report.json (with --protocol: local or s3://)"
    )
    parser.add_argument(
        "--serfiq", action="store_true", help=f"add SER-FIQ ({SERFIQ_PASSES} dropout passes per image)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    protocol_eval.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.protocol and (args.pairs or args.dataset or not args.root):
        parser.error("--protocol takes --root (and not --pairs / --dataset)")
    if not args.protocol and not (args.pairs or args.dataset):
        parser.error("one of the arguments --pairs --dataset --protocol is required")
    return args


def main(argv: Sequence[str] | None = None) -> int:

    args = parse_args(argv)
    if args.protocol:
        try:
            opts = protocol_eval.options_from(args)
            net, image_size = load_model(args.model, args.image_size)
        except (ModelLoadError, ValueError) as exc:
            print(f"evaluate: error: {exc}", file=sys.stderr)
            return 2
        return protocol_eval.main(opts, net, image_size)
    try:
        net, image_size = load_model(args.model, args.image_size)
        data = load_pair_set(args, image_size)
    except (ModelLoadError, DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    report, curves, arrays = evaluate(
        net,
        data,
        serfiq=args.serfiq,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    report["model"] = args.model
    report["image_size"] = image_size
    files = write_outputs(Path(args.out), report, curves, arrays)
    print(format_report(report))
    print("\nwritten: " + ", ".join(files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
