"""QWDF (quality-weighted data filtering, EQFace paper): drop the training samples a trained model scores low.

    python -m data.qwdf --model <checkpoint dir/URI | net.pt | MLflow model URI> --src URI --dst URI
        --s-th 0.3 [--image-size N] [--batch-size 64] [--ray] [--report FILE] [--overwrite]

Scores every sample of the dataset at --src (embedding + quality from the model's forward pass on the
decoded, un-augmented image) and writes a new dataset at --dst with two new columns, `embedding`
(list<float32>, the raw backbone output) and `quality` (float32), without the samples whose quality is
under s_th. Labels are made contiguous again over the identities that keep samples; `orig_label` keeps the
label in the source (a source that already has `orig_label` keeps its own). A JSON report lists the samples
dropped per identity and the identities that lost all of theirs; it goes to --report, or to
DST/qwdf_report.json. The source is only read, never written.

Two passes keep memory flat: pass 1 scores (the embeddings go to a memory-mapped temporary file), pass 2
streams the source rows again into data.shards.write_dataset, so a failure leaves no partial dataset.
With --ray, pass 1 runs as Ray Data map_batches in an actor pool (preserve_order keeps rows aligned; pass 2
checks every row's source and label against it); otherwise a plain loop in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from tqdm import tqdm

from data import shards, storage
from data.pipeline import dataset_error_from, decode_batch
from data.shards import DatasetError, read_manifest, shard_uris, write_dataset
from flows.checkpoints import load_net_from
from models.eqface_net import unwrap

SCORE_COLUMNS = ["image", "label", "identity", "source"]
REPORT_NAME = "qwdf_report.json"


def _stores_lists() -> bool:
    """Whether data.shards.write_dataset can store a float32 vector per row as list<float32>."""
    try:
        shards._arrow_type_for(np.zeros(2, np.float32), "embedding")
        return True
    except DatasetError:
        return False


# list<float32> needs data.shards to map a 1-D float array to pa.list_(pa.float32()); until it does, the
# embedding is stored as its float32 little-endian bytes (np.frombuffer(value, "<f4") reads it back).
EMBEDDING_AS_LIST = _stores_lists()


def embedding_value(vector: np.ndarray) -> Any:
    v = np.ascontiguousarray(vector, dtype="<f4")
    return v if EMBEDDING_AS_LIST else v.tobytes()


def read_embedding(value: Any) -> np.ndarray:
    """An `embedding` cell back as float32, whichever way it was stored."""
    if isinstance(value, (bytes, bytearray)):
        return np.frombuffer(value, dtype="<f4")
    return np.asarray(value, dtype=np.float32)


@torch.no_grad()
def score_images(net: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(embedding (B, E) float32, quality (B,) float32) for images (B, 3, H, W) in [-1, 1]."""
    embedding, quality = net(torch.from_numpy(np.ascontiguousarray(images)))
    return embedding.float().cpu().numpy(), quality.float().reshape(-1).cpu().numpy()


def model_input_size(net: torch.nn.Module) -> int | None:

    arch = getattr(unwrap(net), "arch", None) or {}
    return arch.get("input_size")


# --------------------------------------------------------------------------------------------- scoring


class _Scores:
    """Pass-1 output: quality in memory (4 bytes/row), embeddings in a memory-mapped temporary file."""

    def __init__(self, num_rows: int, tmp_dir: str):
        self.num_rows = num_rows
        self.tmp_dir = tmp_dir
        self.quality = np.full(num_rows, np.nan, dtype=np.float32)
        self.embedding: np.memmap | None = None
        self.sources: list[str] = []  # only when rows must be checked against pass 2 (Ray)
        self.labels = np.full(num_rows, -1, dtype=np.int64)
        self.filled = 0

    def add(self, embedding: np.ndarray, quality: np.ndarray, labels: np.ndarray) -> None:
        n = len(quality)
        if self.embedding is None:
            path = os.path.join(self.tmp_dir, "embedding.npy")
            self.embedding = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                                       shape=(self.num_rows, embedding.shape[1]))
        if self.filled + n > self.num_rows:
            raise DatasetError(f"scoring produced more rows than the manifest's {self.num_rows}")
        self.embedding[self.filled:self.filled + n] = embedding
        self.quality[self.filled:self.filled + n] = quality
        self.labels[self.filled:self.filled + n] = labels
        self.filled += n


def _score_loop(src: str, net: torch.nn.Module, image_size: int, batch_size: int, scores: _Scores,
                progress: bool) -> None:
    fs, _ = storage.resolve(src)
    with tqdm(total=scores.num_rows, desc="scoring", unit="img", disable=not progress) as bar:
        for shard_uri in shard_uris(src):
            parquet = pq.ParquetFile(fs.open_input_file(storage.resolve(shard_uri)[1]))
            row0 = 0
            for batch in parquet.iter_batches(batch_size=batch_size, columns=SCORE_COLUMNS):
                cols = {n: batch.column(n).to_numpy(zero_copy_only=False) for n in SCORE_COLUMNS}
                try:
                    decoded = decode_batch(cols, image_size=image_size, augment=None, seed=0)
                except DatasetError as e:
                    raise DatasetError(f"{shard_uri} (rows {row0}..{row0 + batch.num_rows - 1}): {e}") from e
                embedding, quality = score_images(net, decoded["image"])
                scores.add(embedding, quality, cols["label"])
                row0 += batch.num_rows
                bar.update(batch.num_rows)


class _RayScorer:
    """Ray Data actor: holds the model once, scores batch after batch."""

    def __init__(self, net: torch.nn.Module, image_size: int):
        self.net = net.eval()
        self.image_size = image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = decode_batch(batch, image_size=self.image_size, augment=None, seed=0)
        embedding, quality = score_images(self.net, decoded["image"])
        return {"embedding": embedding, "quality": quality, "label": np.asarray(batch["label"], np.int64),
                "source": np.asarray(batch["source"], dtype=object)}


def _score_ray(src: str, net: torch.nn.Module, image_size: int, batch_size: int, scores: _Scores,
               progress: bool, actors: int) -> None:

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS when set, else a local cluster
    fs, _ = storage.resolve(src)
    paths = [storage.resolve(u)[1] for u in shard_uris(src)]
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # pass 2 matches rows by position
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(SCORE_COLUMNS)
        ds = ds.map_batches(_RayScorer, batch_size=batch_size, batch_format="numpy",
                            fn_constructor_kwargs={"net": net, "image_size": image_size},
                            compute=ray.data.ActorPoolStrategy(size=actors))
        with tqdm(total=scores.num_rows, desc="scoring (ray)", unit="img", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                scores.add(batch["embedding"], batch["quality"], batch["label"])
                scores.sources.extend(str(s) for s in batch["source"])
                bar.update(len(batch["quality"]))
    except Exception as e:
        error = dataset_error_from(e)  # a corrupt row inside a Ray task: surface the clear message
        if error is None:
            raise
        raise error from e
    finally:
        ctx.execution_options.preserve_order = before


# --------------------------------------------------------------------------------------------- filtering


def _filtered_rows(src: str, scores: _Scores, keep: np.ndarray, new_label: np.ndarray,
                   label_to_identity: list[str], has_orig_label: bool, progress: bool
                   ) -> Iterator[dict[str, Any]]:
    """Pass 2: the kept source rows, relabelled, with embedding and quality added."""
    fs, _ = storage.resolve(src)
    check_sources = bool(scores.sources)
    i = 0
    with tqdm(total=int(keep.sum()), desc="writing", unit="img", disable=not progress) as bar:
        for shard_uri in shard_uris(src):
            parquet = pq.ParquetFile(fs.open_input_file(storage.resolve(shard_uri)[1]))
            for batch in parquet.iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    moved = check_sources and row["source"] != scores.sources[i]
                    if row["label"] != scores.labels[i] or moved:
                        raise DatasetError(f"{shard_uri}: row {i} of the dataset (source {row['source']!r}) "
                                           "does not match the row scored at that position; was the source "
                                           "changed while it was filtered?")
                    if keep[i]:
                        if not has_orig_label:
                            row["orig_label"] = row["label"]
                        row["label"] = int(new_label[row["label"]])
                        row["identity"] = label_to_identity[row["label"]]
                        row["embedding"] = embedding_value(scores.embedding[i])
                        row["quality"] = float(scores.quality[i])
                        bar.update(1)
                        yield row
                    i += 1


def _check_columns(src: str) -> None:
    """Every shard has the columns scoring reads (Parquet footers only: no data is read)."""
    fs, _ = storage.resolve(src)
    for shard_uri in shard_uris(src):
        try:
            names = pq.read_schema(fs.open_input_file(storage.resolve(shard_uri)[1])).names
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"{shard_uri}: not a readable Parquet shard: {e}") from e
        missing = [c for c in SCORE_COLUMNS if c not in names]
        if missing:
            raise DatasetError(f"{shard_uri}: missing required column(s) {missing}")


def _same_location(a: str, b: str) -> bool:
    fs_a, path_a = storage.resolve(a)
    fs_b, path_b = storage.resolve(b)
    return type(fs_a) is type(fs_b) and path_a.rstrip("/") == path_b.rstrip("/")


def qwdf(model: str | torch.nn.Module, src: str, dst: str, s_th: float, *, image_size: int | None = None,
         batch_size: int = 64, use_ray: bool = False, ray_actors: int = 1, overwrite: bool = False,
         report_uri: str | None = None, target_shard_bytes: int = 256 * 2**20, progress: bool = True
         ) -> dict[str, Any]:
    """Filter `src` into `dst` by quality >= s_th; returns the report (also written as JSON)."""
    if _same_location(src, dst):
        raise DatasetError(f"{dst}: --dst is the source dataset; QWDF never modifies its source")
    if not overwrite and storage.exists(storage.join(dst, shards.MANIFEST_NAME)):
        raise DatasetError(f"{dst}: a complete dataset already exists there (pass --overwrite to replace it)")
    manifest = read_manifest(src)
    _check_columns(src)
    if isinstance(model, str):

        net = load_net_from(model)
    else:
        net = model.eval()
    image_size = image_size or model_input_size(net)
    if not image_size:
        raise ValueError("the model does not record its input size: pass --image-size")

    with tempfile.TemporaryDirectory(prefix="qwdf-") as tmp:
        scores = _Scores(manifest.num_samples, tmp)
        if use_ray:
            _score_ray(src, net, image_size, batch_size, scores, progress, ray_actors)
        else:
            _score_loop(src, net, image_size, batch_size, scores, progress)
        if scores.filled != manifest.num_samples:
            raise DatasetError(f"{src}: scored {scores.filled} rows, the manifest lists "
                               f"{manifest.num_samples}")
        if not np.isfinite(scores.quality).all():
            bad = int(np.flatnonzero(~np.isfinite(scores.quality))[0])
            raise DatasetError(f"{src}: the model gave a non-finite quality for row {bad}")

        keep = scores.quality >= s_th
        total = np.bincount(scores.labels, minlength=manifest.num_classes)
        kept = np.bincount(scores.labels[keep], minlength=manifest.num_classes)
        surviving = np.flatnonzero(kept > 0)
        names = manifest.label_to_identity
        report = {
            "src": src, "dst": dst, "model": model if isinstance(model, str) else type(model).__name__,
            "s_th": s_th, "image_size": image_size, "scored_with": "ray" if use_ray else "loop",
            "num_samples": int(manifest.num_samples), "kept": int(keep.sum()), "dropped": int((~keep).sum()),
            "num_classes_before": int(manifest.num_classes), "num_classes_after": int(surviving.size),
            "quality": {"min": float(scores.quality.min()), "mean": float(scores.quality.mean()),
                        "max": float(scores.quality.max())},
            "dropped_per_identity": {names[k]: int(total[k] - kept[k]) for k in np.flatnonzero(kept < total)},
            "identities_removed": [names[k] for k in np.flatnonzero(kept == 0)],
            "embedding_storage": "list<float32>" if EMBEDDING_AS_LIST else "float32 little-endian bytes",
        }
        if not surviving.size:
            best = report["quality"]["max"]
            raise DatasetError(f"{src}: no sample has quality >= {s_th} (max {best:.4f}): nothing to write")
        new_label = np.full(manifest.num_classes, -1, dtype=np.int64)
        new_label[surviving] = np.arange(surviving.size)
        label_to_identity = [names[k] for k in surviving]
        rows = _filtered_rows(src, scores, keep, new_label, label_to_identity,
                              "orig_label" in manifest.columns, progress)
        desc = json.dumps({"src": src, "s_th": s_th, "model": report["model"]})
        try:
            write_dataset(dst, rows, label_to_identity=label_to_identity, image_size=manifest.image_size,
                          target_shard_bytes=target_shard_bytes, overwrite=overwrite,
                          source_desc=f"data.qwdf {desc}")
        finally:
            rows.close()
    report_uri = report_uri or storage.join(dst, REPORT_NAME)
    storage.write_bytes_atomic(report_uri, json.dumps(report, indent=1).encode())
    return report


# --------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.qwdf", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint dir/URI, net.pt, or MLflow model URI")
    parser.add_argument("--src", required=True, help="dataset to score (never modified)")
    parser.add_argument("--dst", required=True, help="where the filtered dataset goes")
    parser.add_argument("--s-th", type=float, required=True, help="keep samples with quality >= s_th")
    parser.add_argument("--image-size", type=int, default=None, help="model input (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ray", action="store_true", help="score with Ray Data map_batches")
    parser.add_argument("--ray-actors", type=int, default=1, help="scoring actors with --ray")
    parser.add_argument("--report", default=None, help=f"report path (default: DST/{REPORT_NAME})")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete dataset at --dst")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = qwdf(args.model, args.src, args.dst, args.s_th, image_size=args.image_size,
                      batch_size=args.batch_size, use_ray=args.ray, ray_actors=args.ray_actors,
                      overwrite=args.overwrite, report_uri=args.report, progress=not args.no_progress)
    except (DatasetError, ValueError, FileNotFoundError) as e:
        print(f"qwdf: error: {e}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in report.items() if k not in ("dropped_per_identity", "identities_removed")}
    summary["identities_removed"] = len(report["identities_removed"])
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
