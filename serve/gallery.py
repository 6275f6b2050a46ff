"""The enrolled identities: one QWFA template each (evaluation.aggregation.aggregate "qwfa"), persisted.

The gallery is one JSON file, <gallery dir>/gallery.json (local path or s3://, data/storage.py), rewritten
whole and atomically on every change (a temp file + rename locally, one PUT on S3), so a restart finds the
last complete gallery. It records the fingerprint of the model its templates come from: templates of one
network mean nothing to another, so frames or enrolments from another model are refused, never matched.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from data import storage
from evaluation.aggregation import aggregate, identify
from evaluation.verification import l2_normalize
from serve.errors import ServiceError

GALLERY_FILE = "gallery.json"
FORMAT = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ServiceError(f"{kind} {name!r}: a name is 1-128 letters, digits, '_', '.', '@' or '-', "
                           "starting with a letter or digit")
    return name


@dataclass
class Identity:
    template: np.ndarray  # (E,) L2-normalised
    qualities: list[float]  # of the enrolment images

    def summary(self, name: str) -> dict[str, Any]:
        return {"identity": name, "images": len(self.qualities),
                "quality_mean": float(np.mean(self.qualities)) if self.qualities else 0.0}


class Gallery:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.model: str | None = None  # fingerprint of the model the templates come from
        self.identities: dict[str, Identity] = {}
        self._lock = threading.Lock()  # one change at a time; readers take the current dict as a whole

    @property
    def file(self) -> str:
        return storage.join(self.uri, GALLERY_FILE)

    @classmethod
    def load(cls, uri: str) -> Gallery:
        gallery = cls(uri)
        if not storage.exists(gallery.file):
            return gallery
        try:
            doc = json.loads(storage.read_bytes(gallery.file))
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
            gallery.model = doc["model"]
            gallery.identities = {
                name: Identity(np.asarray(entry["template"], dtype=np.float32), [float(q) for q in entry["qualities"]])
                for name, entry in doc["identities"].items()
            }
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{gallery.file}: not a gallery file this service wrote ({type(exc).__name__}: {exc})"
                             ) from None
        return gallery

    def _save(self, model: str | None, identities: dict[str, Identity]) -> None:
        doc = {"format": FORMAT, "model": model, "identities": {
            name: {"template": ident.template.astype(float).tolist(), "qualities": ident.qualities}
            for name, ident in identities.items()}}
        storage.write_bytes_atomic(self.file, json.dumps(doc).encode())
        # Memory follows the file only once the file is written: a failed write changes nothing.
        self.model, self.identities = model, identities

    def check_model(self, model: str, what: str) -> None:
        if self.identities and self.model != model:
            raise ServiceError(f"{what}: the model serving now (fingerprint {model}) is not the one the gallery "
                               f"was enrolled with ({self.model}); re-enrol the gallery for this model", 409)

    def enrol(self, name: str, embeddings: np.ndarray, qualities: np.ndarray, model: str) -> dict[str, Any]:
        """Add or replace `name` with the QWFA template of its images."""
        check_name("identity", name)
        self.check_model(model, f"identity {name!r}")
        if len(embeddings) == 0:
            raise ServiceError(f"identity {name!r}: no image to enrol")
        template = aggregate(embeddings, qualities, "qwfa").astype(np.float32)
        with self._lock:
            self.check_model(model, f"identity {name!r}")
            identities = {**self.identities, name: Identity(template, [float(q) for q in qualities])}
            self._save(model, identities)
        return identities[name].summary(name)

    def remove(self, name: str) -> dict[str, Any]:
        with self._lock:
            if name not in self.identities:
                raise ServiceError(f"identity {name!r}: not in the gallery", 404)
            identities = {k: v for k, v in self.identities.items() if k != name}
            summary = self.identities[name].summary(name)
            self._save(self.model if identities else None, identities)
        return summary

    def list(self) -> list[dict[str, Any]]:
        return [ident.summary(name) for name, ident in sorted(self.identities.items())]

    def identify(self, template: np.ndarray, threshold: float) -> tuple[str | None, float]:
        """(best identity, or None unless its cosine is above the threshold; that cosine): evaluation's rule."""
        identities = self.identities
        names = list(identities)
        return identify(l2_normalize(template), np.stack([identities[n].template for n in names]), names, threshold)
