"""The per-identity holdout of a training set: the photos the quality steps learn from and the backbone never sees.

EQFace's step 2 learns s_i from how well the backbone's margin fits each photo. A backbone that has
memorised its photos fits every one of them, so on a small set step 2 pushes every s_i towards 1. With
`data.quality_holdout = f`, each identity with n >= 2 photos keeps round(f * n) of them (at least 1, at most
n - 1) back from steps 1 and 3; steps 2 read only those, and their margins then say how hard an unseen
photo of a known person is. The choice is a hash of (seed, the row's source), so it does not depend on
row order, shard layout or the number of workers, and is the same for every step of a flow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from data import storage
from data.shards import DatasetError, read_manifest, shard_uris

PARTS = ("fit", "holdout", "all")


def _rank(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "little")


def holdout_mask(labels: np.ndarray, keys: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """True for the rows held back (see the module docstring)."""
    labels = np.asarray(labels)
    held = np.zeros(labels.size, dtype=bool)
    if fraction <= 0:
        return held
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    for rows in np.split(order, starts[1:]):
        n = rows.size
        if n < 2:
            continue
        k = min(n - 1, max(1, round(fraction * n)))
        ranked = sorted(rows.tolist(), key=lambda i: _rank(seed, str(keys[i])))
        held[ranked[:k]] = True
    return held


@dataclass
class DatasetSplit:
    """Which rows of each shard belong to the fit part (steps 1, 3) and the holdout part (steps 2)."""

    fraction: float
    held: dict[str, np.ndarray]  # shard URI -> bool per row, True = holdout

    def rows(self, part: str) -> dict[str, np.ndarray] | None:
        """Shard URI -> the row indices of `part` ("fit", "holdout"); None for "all" (every row)."""
        if part == "all" or self.fraction <= 0:
            return None
        want = part == "holdout"
        return {shard: np.flatnonzero(mask == want) for shard, mask in self.held.items()}

    def count(self, part: str) -> int:
        total = sum(mask.size for mask in self.held.values())
        held = sum(int(mask.sum()) for mask in self.held.values())
        return {"all": total, "fit": total - held, "holdout": held}[part]


def _labels_and_keys(uri: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Every row's label and stable key (its source, else shard#row), and the rows per shard."""
    manifest = read_manifest(uri)
    fs, _ = storage.resolve(uri)
    labels, keys, sizes = [], [], []
    has_source = "source" in manifest.columns
    for shard in shard_uris(uri):
        table = pq.read_table(storage.resolve(shard)[1], filesystem=fs,
                              columns=["label", "source"] if has_source else ["label"])
        labels.append(table.column("label").to_numpy())
        keys.append(np.asarray(table.column("source").to_pylist(), dtype=object) if has_source
                    else np.array([f"{shard}#{i}" for i in range(table.num_rows)], dtype=object))
        sizes.append(table.num_rows)
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, dtype=object), []
    return np.concatenate(labels), np.concatenate(keys), sizes


def check_training_set(uri: str) -> None:
    """A set EQFace can learn from: images, and some person with several photos. With one photo each, the margin
    loss fits every photo to a class of its own and step 2 has no hard photo of a known person to learn from."""
    labels, _, _ = _labels_and_keys(uri)
    if labels.size == 0:
        raise DatasetError(f"{uri}: the training set has no images")
    if np.bincount(labels).max() < 2:
        raise DatasetError(f"{uri}: every identity has one photo; EQFace learns quality from photos of the same "
                           f"person that are harder than others, so it needs several photos per person")


def split_dataset(uri: str, fraction: float, seed: int = 0) -> DatasetSplit:
    """The holdout of the dataset at `uri`; refused in one line where nothing can be held back."""
    if fraction <= 0:
        return DatasetSplit(0.0, {})
    all_labels, keys, sizes = _labels_and_keys(uri)
    if all_labels.size == 0 or np.bincount(all_labels).max() < 2:
        raise DatasetError(f"{uri}: every identity has one photo, so data.quality_holdout={fraction} can hold none "
                           f"back for the quality steps (use a set with several photos per person, or 0)")
    held = holdout_mask(all_labels, keys, fraction, seed)
    bounds = np.cumsum([0, *sizes])
    return DatasetSplit(fraction, {shard: held[a:b] for shard, a, b in zip(shard_uris(uri), bounds[:-1], bounds[1:],
                                                                            strict=True)})
