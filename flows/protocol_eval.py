"""Evaluate a model as the papers do: IJB-B / IJB-C template verification and YouTube Faces video pairs.

    python -m flows.evaluate --protocol ijbc|ijbb|ytf --root DIR --model URI --out DIR
        [--actors N] [--gpus-per-actor G] [--cpus-per-actor C] [--shard-size N] [--batch-size B]
        [--s-th 0.5] [--skip-bad] [--frames-per-video N] [--center-crop F] [--overwrite] [--no-mlflow]

1. The protocol's files are read streaming (evaluation/protocols) into one row per face.
2. A Ray Data job embeds them: decoding and alignment (IJB: the five landmarks onto insightface's 112x112
   template, then the model's input size; YTF: an optional centre crop) run as tasks, the model in a pool
   of `--actors` actors (`map_batches` with an actor pool of that size, `--gpus-per-actor` GPUs each): flip-sum
   embeddings, EQFace quality, the raw feature's norm.
3. Results go to OUT/embeddings.parquet/, one Parquet file per shard of `--shard-size` faces, each written
   whole under its final name only once complete: a re-run reuses every shard already there, an
   interrupted run resumes at the first missing one, without duplicates. OUT/embeddings.parquet/_run.json
   records what the shards were made from; a different model, protocol, root or face list is refused.
4. Template (IJB) or video (YTF) features per weighting, then OUT/metrics.json (`tar_far1e-4_qwfa`,
   `ytf_acc_qwfaf`, ...), OUT/table.md, OUT/roc.png, and the same logged to the model's MLflow run when
   the model is an MLflow URI (metrics `<protocol>.<key>`, artifacts under `evaluation/<protocol>/`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image
from tqdm import tqdm

from data import storage
from data.pipeline import to_rgb
from evaluation.align import align_face
from evaluation.plots import plot_roc
from evaluation.protocols import Face, Problems, ProtocolError, ijb, ytf
from evaluation.verification import embed_images, roc_curve, tar_at_far, tar_at_nearest_far, verify_scores
from flows.runner import check_ray_address

PROTOCOLS = ("ijbb", "ijbc", "ytf")
PROTOCOL_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
EMBEDDINGS_DIR = "embeddings.parquet"
RUN_FILE = "_run.json"  # pyarrow skips "_" files when it reads the folder as one table
SHARD_META_KEY = b"eqface.shard"
ROC_POINTS = 400


@dataclass
class ProtocolOptions:
    protocol: str
    root: str
    model: str
    out: str
    image_size: int | None = None
    batch_size: int = 64
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    shard_size: int = 20_000
    s_th: float = 0.5
    skip_bad: bool = False
    frames_per_video: int = 0
    center_crop: float = 1.0
    overwrite: bool = False
    mlflow: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol {self.protocol!r}: expected one of {PROTOCOLS}")
        for name, low in (("batch_size", 1), ("actors", 1), ("shard_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= {low}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise ValueError("--gpus-per-actor and --cpus-per-actor must be >= 0")
        if not 0 < self.center_crop <= 1:
            raise ValueError(f"--center-crop {self.center_crop}: must be in (0, 1]")
        if self.frames_per_video < 0:
            raise ValueError(f"--frames-per-video {self.frames_per_video}: must be >= 0")


def far_key(far: float) -> str:
    """1e-4 -> '1e-4' (the metric names of the paper's tables)."""
    exponent = round(math.log10(far))
    return f"1e{exponent}" if math.isclose(far, 10.0**exponent) else f"{far:g}"


# ----------------------------------------------------------------------------- the face index


def list_faces(opts: ProtocolOptions, problems: Problems) -> tuple[list[Face], Any]:
    """(faces, the protocol's pairs for YTF / None for IJB: its pair file is streamed later)."""
    if opts.protocol == "ytf":
        pairs = ytf.read_splits(opts.root, problems)
        return list(ytf.iter_faces(opts.root, pairs, opts.frames_per_video, problems)), pairs
    return list(ijb.iter_faces(opts.root, opts.protocol, problems)), None


def faces_digest(faces: Iterable[Face]) -> str:
    h = hashlib.sha256()
    for f in faces:
        h.update(f"{f.image}\t{f.template}\t{f.media}\n".encode())
    return h.hexdigest()


def run_record(opts: ProtocolOptions, image_size: int, faces: Sequence[Face]) -> dict[str, Any]:
    """What the shards are made from: a re-run must agree on all of it to reuse them."""
    return {"protocol": opts.protocol, "root": opts.root, "model": opts.model, "image_size": image_size,
            "shard_size": opts.shard_size, "center_crop": opts.center_crop, "num_faces": len(faces),
            "faces_sha256": faces_digest(faces)}


def check_run_record(out_dir: str, record: Mapping[str, Any], overwrite: bool) -> None:
    uri = storage.join(out_dir, RUN_FILE)
    if overwrite:
        storage.delete_dir(out_dir)
    elif storage.exists(uri):
        old = json.loads(storage.read_bytes(uri))
        changed = [k for k in record if old.get(k) != record[k]]
        if changed:
            k = changed[0]
            raise ProtocolError(f"{out_dir} holds embeddings made with {k}={old.get(k)!r}, not {record[k]!r}; "
                                "use another --out, or --overwrite to replace them")
    storage.write_bytes_atomic(uri, json.dumps(record, indent=1).encode())


# ----------------------------------------------------------------------------- shards on disk


def part_uri(out_dir: str, shard: int) -> str:
    return storage.join(out_dir, f"part-{shard:05d}.parquet")


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int, int]]:
    return [(k, start, min(start + shard_size, n)) for k, start in enumerate(range(0, n, shard_size))]


def shard_complete(out_dir: str, shard: int, start: int, stop: int) -> bool:
    """The part file exists and says it holds exactly the faces [start, stop) (read from its footer)."""
    fs, path = storage.resolve(part_uri(out_dir, shard))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    try:
        meta = pq.read_metadata(path, filesystem=fs)
        info = json.loads(meta.metadata[SHARD_META_KEY])
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError):
        return False  # unreadable: computed again and replaced whole
    return (info.get("first"), info.get("count")) == (start, stop - start) and \
        meta.num_rows + len(info.get("skipped", [])) == stop - start


def write_part(out_dir: str, shard: int, start: int, stop: int, columns: dict[str, Any],
               skipped: list[str]) -> None:
    embeddings = np.asarray(columns["embedding"], np.float32)
    size = embeddings.shape[1] if embeddings.ndim == 2 else 0
    table = pa.table({
        "index": pa.array(columns["index"], pa.int64()),
        "image": pa.array(columns["image"], pa.string()),
        "template": pa.array(columns["template"]),
        "media": pa.array(columns["media"]),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), size),
        "quality": pa.array(columns["quality"], pa.float32()),
        "detector_score": pa.array(columns["detector_score"], pa.float32()),
        "norm": pa.array(columns["norm"], pa.float32()),
    })
    meta = {SHARD_META_KEY: json.dumps({"first": start, "count": stop - start, "skipped": skipped}).encode()}
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf)
    storage.write_bytes_atomic(part_uri(out_dir, shard), buf.getvalue())


def read_embeddings(out_dir: str, shards: Sequence[tuple[int, int, int]]) -> tuple[pa.Table, list[str]]:
    """Every shard's rows, in face order, and the faces skipped while embedding."""
    tables, skipped = [], []
    for k, _, _ in shards:
        fs, path = storage.resolve(part_uri(out_dir, k))
        table = pq.read_table(path, filesystem=fs)
        skipped += json.loads(table.schema.metadata[SHARD_META_KEY])["skipped"]
        tables.append(table.replace_schema_metadata(None))
    return pa.concat_tables(tables), skipped


# ----------------------------------------------------------------------------- the Ray Data job


def face_pixels(data: bytes, landmarks: Sequence[float], image_size: int, center_crop: float) -> np.ndarray:
    """uint8 (S, S, 3): the face aligned from its landmarks, or the (centre-cropped) image, at the model's
    input size."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = to_rgb(img)  # as training decodes: 16-bit and float images rescaled, not clipped
    if len(landmarks):
        return np.asarray(align_face(rgb, landmarks, image_size), np.uint8)
    if center_crop < 1:
        w, h = rgb.size
        side = center_crop * min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        rgb = rgb.crop((round(left), round(top), round(left + side), round(top + side)))
    return np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BILINEAR), np.uint8)


def decode_batch(batch: dict[str, np.ndarray], *, root: str, image_size: int, center_crop: float
                 ) -> dict[str, np.ndarray]:
    """Ray Data task: read, decode and align each face; a face that fails gets zeros and its reason in
    `error` (the driver raises or skips, so one bad file never kills the job with a Ray traceback)."""
    n = len(batch["image"])
    pixels = np.zeros((n, image_size, image_size, 3), np.uint8)
    errors = np.full(n, "", dtype=object)
    for i in range(n):
        try:
            data = storage.read_bytes(storage.join(root, str(batch["image"][i])))
            pixels[i] = face_pixels(data, batch["landmarks"][i], image_size, center_crop)
        except Exception as exc:  # missing, truncated, not an image, degenerate landmarks
            errors[i] = f"{storage.join(root, str(batch['image'][i]))} (listed at {batch['where'][i]}): " \
                        f"{type(exc).__name__}: {exc}"
    return {**{k: v for k, v in batch.items() if k != "landmarks"}, "pixels": pixels, "error": errors}


class Embedder:
    """Ray Data actor: holds the model once; flip-sum embedding, EQFace quality and feature norm per face."""

    def __init__(self, net: torch.nn.Module, batch_size: int) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = net.to(self.device).eval()
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        x = pixels.astype(np.float32) * (2.0 / 255.0) - 1.0
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
        emb = embed_images(lambda t: self.net(t.to(self.device)), x, self.batch_size)
        return {**batch, "embedding": emb.embeddings.astype(np.float32), "quality": emb.quality.astype(np.float32),
                "norm": np.linalg.norm(emb.raw_embeddings, axis=1).astype(np.float32)}


def embedding_dataset(opts: ProtocolOptions, net: torch.nn.Module, image_size: int, rows: list[dict[str, Any]]):
    blocks = max(1, math.ceil(len(rows) / (4 * opts.batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(decode_batch, batch_size=opts.batch_size, batch_format="numpy",
                        fn_kwargs={"root": opts.root, "image_size": image_size, "center_crop": opts.center_crop})
    return ds.map_batches(Embedder, batch_size=opts.batch_size, batch_format="numpy",
                          fn_constructor_kwargs={"net": net, "batch_size": opts.batch_size},
                          compute=ray.data.ActorPoolStrategy(size=opts.actors),  # `concurrency=` is deprecated
                          num_gpus=opts.gpus_per_actor, num_cpus=opts.cpus_per_actor)


def face_row(index: int, face: Face) -> dict[str, Any]:
    return {"index": index, "image": face.image, "template": face.template, "media": face.media,
            "landmarks": list(face.landmarks or ()), "detector_score": face.detector_score, "where": face.where}


def embed_missing_shards(opts: ProtocolOptions, net: torch.nn.Module, image_size: int, faces: Sequence[Face],
                         out_dir: str) -> dict[str, Any]:
    """Embed the faces of every shard not yet on disk and write each shard as it completes."""
    shards = shard_ranges(len(faces), opts.shard_size)
    todo = [s for s in shards if not shard_complete(out_dir, *s)]
    stats = {"shards": len(shards), "shards_reused": len(shards) - len(todo), "faces_embedded": 0}
    if not todo:
        return stats
    rows = [face_row(i, faces[i]) for _, start, stop in todo for i in range(start, stop)]
    if not ray.is_initialized():
        check_ray_address()
        ray.init()  # inside `ray job submit`: the job's cluster; otherwise $RAY_ADDRESS or a new local one
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # rows come back in face order: shards complete one by one
    keys = ("index", "image", "template", "media", "embedding", "quality", "detector_score", "norm")
    pending = iter(todo)
    shard, start, stop = next(pending)
    columns: dict[str, list] = {k: [] for k in keys}
    skipped: list[str] = []
    t0 = time.perf_counter()
    try:
        ds = embedding_dataset(opts, net, image_size, rows)
        with tqdm(total=len(rows), desc=f"embedding ({opts.protocol})", unit="img",
                  disable=not opts.progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(batch["index"])):
                    index = int(batch["index"][i])
                    if index >= stop:  # cannot happen with preserve_order; guards the shard files
                        raise RuntimeError(f"face {index} arrived before shard {shard} [{start}, {stop}) was full")
                    if batch["error"][i]:
                        if not opts.skip_bad:
                            raise ProtocolError(f"image {batch['error'][i]}")
                        skipped.append(f"image {batch['error'][i]}")  # counted once all shards are read
                    else:
                        for k in keys:
                            columns[k].append(batch[k][i])
                    if index == stop - 1:
                        write_part(out_dir, shard, start, stop, columns, skipped)
                        stats["faces_embedded"] += stop - start
                        columns, skipped = {k: [] for k in keys}, []
                        shard, start, stop = next(pending, (None, math.inf, math.inf))
                bar.update(len(batch["index"]))
    finally:
        ctx.execution_options.preserve_order = before
    stats["embed_seconds"] = time.perf_counter() - t0
    return stats


# ----------------------------------------------------------------------------- metrics


def thin_roc(scores: np.ndarray, labels: np.ndarray, points: int = ROC_POINTS) -> dict[str, np.ndarray]:
    """The ROC at about `points` FARs, log-spaced: 15.6M pairs give 15.6M points otherwise."""
    fpr, tpr, _ = roc_curve(scores, labels)
    positive = fpr[fpr > 0]
    if positive.size == 0:
        return {"fpr": fpr, "tpr": tpr}
    grid = np.logspace(np.log10(positive.min()), 0, points)
    keep = np.unique(np.r_[0, np.clip(np.searchsorted(fpr, grid), 0, fpr.size - 1), fpr.size - 1])
    return {"fpr": fpr[keep], "tpr": tpr[keep]}


def tar_table(scores: Mapping[str, np.ndarray], labels: np.ndarray, fars: Sequence[float] = PROTOCOL_FARS
              ) -> tuple[dict[str, float], list[str]]:
    """{'tar_far1e-4_qwfa': TAR at FAR <= 1e-4 (NaN where there are too few impostor pairs),
    'insightface_tar_far1e-4_qwfa': TAR at the ROC point nearest FAR 1e-4 (insightface's tables), ...} and notes."""
    metrics, notes = {}, []
    for name, s in scores.items():
        s = np.asarray(s, np.float64)
        tars, _, why = tar_at_far(s, labels, fars)
        nearest = tar_at_nearest_far(s, labels, fars)
        metrics.update({f"tar_far{far_key(far)}_{name}": tars[far] for far in fars})
        metrics.update({f"insightface_tar_far{far_key(far)}_{name}": nearest[far] for far in fars})
        notes += [n for n in why if n not in notes]
    return metrics, notes


def ijb_metrics(opts: ProtocolOptions, table: pa.Table, problems: Problems) -> tuple[dict, dict, list[str]]:
    """(metrics, ROC per weighting, notes) of IJB 1:1 template verification."""
    templates = table.column("template").to_numpy()
    medias = table.column("media").to_numpy()
    unit = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(), np.float32).reshape(
        table.num_rows, -1)
    quality = table.column("quality").to_numpy()
    detector = table.column("detector_score").to_numpy()
    norm = table.column("norm").to_numpy()
    features = {}
    for name in ijb.WEIGHTINGS:
        weights, keep = ijb.face_weights(name, templates, quality, detector, norm, opts.s_th)
        features[name] = ijb.template_features(templates, medias, unit, weights, keep)
    files = ijb.meta_files(opts.root, opts.protocol)
    scores, labels = ijb.pair_scores(files.pairs, features, problems)
    if not labels.any() or labels.all():
        raise ProtocolError(f"{files.pairs}: needs both genuine and impostor pairs, got {int(labels.sum())} "
                            f"genuine of {labels.size}")
    metrics, notes = tar_table(scores, labels)
    metrics.update({"num_templates": int(features["mean"][0].size), "num_pairs": int(labels.size),
                    "num_genuine": int(labels.sum()), "num_impostor": int((~labels).sum()),
                    "s_th": opts.s_th,
                    "qwfaf_faces_kept": float(ijb.face_weights("qwfaf", templates, quality, detector, norm,
                                                               opts.s_th)[1].mean())})
    return metrics, {name: thin_roc(s, labels) for name, s in scores.items()}, notes


def ytf_metrics(opts: ProtocolOptions, table: pa.Table, pairs: Sequence[ytf.VideoPair], problems: Problems
                ) -> tuple[dict, dict, list[str]]:
    """(metrics, ROC per method, notes) of YTF video pairs: accuracy ± std over the file's own splits."""
    videos = np.asarray(table.column("template").to_pylist(), dtype=object)
    unit = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(), np.float32).reshape(
        table.num_rows, -1)
    quality = table.column("quality").to_numpy()
    features = ytf.video_features(videos, unit, quality, ytf.METHODS, opts.s_th)
    scores, same, splits = ytf.pair_scores(pairs, features, problems)
    metrics, notes, rocs = {}, [], {}
    for name, s in scores.items():
        result = verify_scores(s, same, folds=splits, fars=PROTOCOL_FARS)
        metrics[f"ytf_acc_{name}"] = result["acc_mean"]
        metrics[f"ytf_std_{name}"] = result["acc_std"]
        metrics.update({f"tar_far{far_key(f)}_{name}": t for f, t in result["tar_at_far"].items()})
        notes += [n for n in result["notes"] if n not in notes]
        rocs[name] = thin_roc(s, same)
    metrics.update({"num_videos": len(features["mean"]), "num_pairs": int(same.size),
                    "num_genuine": int(same.sum()), "num_impostor": int((~same).sum()),
                    "num_splits": int(np.unique(splits).size), "s_th": opts.s_th})
    return metrics, rocs, notes


def _cell(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def format_table(protocol: str, metrics: Mapping[str, Any]) -> str:
    """The paper's table as Markdown: TAR (%) at each FAR per weighting; YTF accuracy ± std (%)."""
    if protocol == "ytf":
        lines = ["| method | accuracy (%) | TAR@FAR=1e-2 (%) |", "|---|---|---|"]
        lines += [f"| {m} | {_cell(metrics[f'ytf_acc_{m}'])} ± {_cell(metrics[f'ytf_std_{m}'])} | "
                  f"{_cell(metrics[f'tar_far1e-2_{m}'])} |" for m in ytf.METHODS]
        return "\n".join(lines)
    # Ours (FAR <= target) beside insightface's (the ROC point nearest the target), FAR by FAR.
    head = " | ".join(f"TAR@FAR<={far_key(f)} | insightface {far_key(f)}" for f in PROTOCOL_FARS)
    lines = [f"| weighting | {head} |", "|---" * (2 * len(PROTOCOL_FARS) + 1) + "|"]
    for w in ijb.WEIGHTINGS:
        cells = [_cell(metrics[f"{kind}tar_far{far_key(f)}_{w}"])
                 for f in PROTOCOL_FARS for kind in ("", "insightface_")]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- outputs and MLflow


def to_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def model_run_id(model: str) -> str | None:
    """The MLflow run a model URI belongs to (runs:/ or models:/), None for a file or checkpoint."""
    if model.startswith("runs:/"):
        return model.removeprefix("runs:/").split("/")[0]
    if model.startswith("models:/"):
        return mlflow.models.get_model_info(model).run_id
    return None


def log_to_model_run(run_id: str, protocol: str, metrics: Mapping[str, Any], files: Mapping[str, bytes]) -> None:
    """Metrics `<protocol>.<key>` and the files under `evaluation/<protocol>/` on the model's run (which
    stays as it was: finished runs are not reopened)."""
    client = MlflowClient()
    now = int(time.time() * 1000)
    numbers = [Metric(f"{protocol}.{k}", float(v), now, 0) for k, v in metrics.items()
               if isinstance(v, (int, float)) and math.isfinite(v)]
    for start in range(0, len(numbers), 500):
        client.log_batch(run_id, metrics=numbers[start:start + 500])
    with tempfile.TemporaryDirectory(prefix="eqface-protocol-") as d:
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        client.log_artifacts(run_id, d, artifact_path=f"evaluation/{protocol}")


def evaluate_protocol(opts: ProtocolOptions, net: torch.nn.Module, image_size: int) -> dict[str, Any]:
    """The whole evaluation; returns metrics.json's content."""
    problems = Problems(skip=opts.skip_bad)
    faces, pairs = list_faces(opts, problems)
    if not faces:
        raise ProtocolError(f"{opts.root}: the {opts.protocol} protocol files name no image")
    out_dir = storage.join(opts.out, EMBEDDINGS_DIR)
    check_run_record(out_dir, run_record(opts, image_size, faces), opts.overwrite)
    stats = embed_missing_shards(opts, net, image_size, faces, out_dir)
    table, skipped = read_embeddings(out_dir, shard_ranges(len(faces), opts.shard_size))
    for message in skipped:  # this run's and those of the shards reused from an earlier run
        problems.report(message)
    if table.num_rows == 0:
        raise ProtocolError(f"{opts.root}: no image of the protocol could be read")
    if opts.protocol == "ytf":
        metrics, rocs, notes = ytf_metrics(opts, table, pairs, problems)
    else:
        metrics, rocs, notes = ijb_metrics(opts, table, problems)
    table_md = format_table(opts.protocol, metrics)
    report = {**metrics, "protocol": opts.protocol, "model": opts.model, "root": opts.root,
              "image_size": image_size, "num_images": table.num_rows, "skipped": problems.as_dict(),
              "embedding": stats, "notes": notes, "options": asdict(opts)}
    files = {"metrics.json": json.dumps(to_json(report), indent=1).encode(), "table.md": table_md.encode(),
             "roc.png": plot_roc(rocs, title=f"{opts.protocol}: ROC per weighting")}
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(opts.out, name), data)
    run_id = model_run_id(opts.model) if opts.mlflow else None
    if run_id:
        log_to_model_run(run_id, opts.protocol, metrics, files)
    report["mlflow_run"] = run_id
    return report


def main(opts: ProtocolOptions, net: torch.nn.Module, image_size: int) -> int:
    """The command-line entry, after flows.evaluate has loaded the model: 0 done, 2 bad input, 3 done with
    skipped input (--skip-bad)."""
    try:
        report = evaluate_protocol(opts, net, image_size)
    except (ProtocolError, FileNotFoundError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(f"{opts.protocol}: {report['num_images']} images, {report['num_pairs']} pairs "
          f"(embedded {report['embedding']['faces_embedded']}, reused {report['embedding']['shards_reused']} "
          f"of {report['embedding']['shards']} shards)")
    print(format_table(opts.protocol, report))
    for note in report["notes"]:
        print(f"note: {note}")
    if report["skipped"]["count"]:
        print(f"skipped: {report['skipped']['count']} bad input(s), e.g.\n  "
              + "\n  ".join(report["skipped"]["examples"][:5]), file=sys.stderr)
    print(f"written: {storage.join(opts.out, 'metrics.json')}, {storage.join(opts.out, 'table.md')}, "
          f"{storage.join(opts.out, 'roc.png')}, {storage.join(opts.out, EMBEDDINGS_DIR)}"
          + (f"; logged to MLflow run {report['mlflow_run']}" if report["mlflow_run"] else ""))
    return 3 if report["skipped"]["count"] else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The protocol options of `python -m flows.evaluate`."""
    group = parser.add_argument_group("protocols (--protocol): IJB-B / IJB-C templates, YouTube Faces videos")
    group.add_argument("--protocol", choices=PROTOCOLS, help="evaluate on a public protocol's files under --root")
    group.add_argument("--root", help="the protocol's folder (IJB: meta/ and loose_crop/; YTF: splits.txt and "
                                      "aligned_images_DB/), local or s3://")
    group.add_argument("--actors", type=int, default=1, help="model actors of the Ray Data job (the actor pool's size)")
    group.add_argument("--gpus-per-actor", type=float, default=0.0, help="0: CPU")
    group.add_argument("--cpus-per-actor", type=float, default=1.0)
    group.add_argument("--shard-size", type=int, default=20_000, help="faces per Parquet shard (the unit of resume)")
    group.add_argument("--s-th", type=float, default=0.5, help="QWFAF's quality threshold")
    group.add_argument("--skip-bad", action="store_true",
                       help="skip and count bad lines, templates without images, unreadable images (exit 3)")
    group.add_argument("--frames-per-video", type=int, default=0, help="YTF: frames per video, evenly spaced (0: all)")
    group.add_argument("--center-crop", type=float, default=1.0,
                       help="YTF: keep the central fraction of each frame before resizing (no landmarks there)")
    group.add_argument("--overwrite", action="store_true", help="replace embeddings already in --out")
    group.add_argument("--no-mlflow", action="store_true", help="do not log to the model's MLflow run")


def options_from(args: argparse.Namespace) -> ProtocolOptions:
    return ProtocolOptions(
        protocol=args.protocol, root=args.root, model=args.model, out=str(args.out), image_size=args.image_size,
        batch_size=args.batch_size, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, shard_size=args.shard_size, s_th=args.s_th, skip_bad=args.skip_bad,
        frames_per_video=args.frames_per_video, center_crop=args.center_crop, overwrite=args.overwrite,
        mlflow=not args.no_mlflow, progress=not args.no_progress)
