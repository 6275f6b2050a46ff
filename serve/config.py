"""The recognition service's settings: the `args` of the application in configs/serve.yaml.

Defaults live here; `ServiceConfig.from_args` takes the YAML's mapping (or `key=value` overrides of
`python -m serve.deploy`) and refuses an unknown key, a wrong type or a value out of range in one line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

AFTER_DECISION = ("continue", "stop")


class ServiceConfigError(ValueError):
    """A bad setting, as one line naming the key."""


@dataclass
class ServiceConfig:
    # An MLflow model URI (models:/eqface@candidate, models:/eqface/3, models:/m-..., runs:/...), a
    # checkpoint dir/URI or a net.pt file (flows.checkpoints.load_net_from).
    model: str = "models:/eqface@candidate"
    # Where the gallery lives (a directory: local path or s3://); it holds gallery.json.
    gallery: str = "~/.cache/eqface/serve/gallery"
    # The streams' journal: a local directory on the node of the State replica (appended frame by frame).
    state_dir: str = "~/.cache/eqface/serve/state"
    # Online aggregation (evaluation/aggregation.py OnlineAggregator): frames under s_th are not used;
    # a decision once the used frames' quality adds up to decide_at.
    s_th: float = 0.5
    decide_at: float = 2.0
    # Cosine similarity a template needs to the best gallery identity; under it the decision is "unknown".
    threshold: float = 0.3
    # After a decision: "continue" starts a new template and decides again; "stop" keeps the first
    # decision (later frames are still scored and counted, not used).
    after_decision: str = "continue"
    # Frames: an encoded image (JPEG, PNG, ...) up to max_frame_bytes, at most max_pixels once decoded.
    max_frame_bytes: int = 2 * 2**20
    max_pixels: int = 4096 * 4096
    max_images_per_request: int = 64
    # The model replicas' batching across streams (@serve.batch) and torch threads per replica.
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    torch_threads: int = 1
    # How long the HTTP ingress retries a call to a model or State replica that died (a retried frame is
    # never counted twice: frames are idempotent by (stream, seq)); past it, a 503 naming the stream.
    retry_s: float = 60.0
    # A file holding the bearer token every request must carry ("" = none: only for a proxy on 127.0.0.1).
    api_token_file: str = ""

    def __post_init__(self) -> None:
        self._check(bool(self.model), "model", "must name a model")
        self._check(bool(self.gallery), "gallery", "must name a directory (local path or s3://)")
        self._check(bool(self.state_dir) and "://" not in self.state_dir, "state_dir",
                    f"must be a local directory, got {self.state_dir!r}")
        self._check(0.0 <= self.s_th <= 1.0, "s_th", f"must be in [0, 1], got {self.s_th}")
        self._check(math.isfinite(self.decide_at) and self.decide_at > 0, "decide_at",
                    f"must be > 0, got {self.decide_at}")
        self._check(-1.0 <= self.threshold <= 1.0, "threshold", f"must be in [-1, 1], got {self.threshold}")
        self._check(self.after_decision in AFTER_DECISION, "after_decision",
                    f"must be one of {', '.join(AFTER_DECISION)}, got {self.after_decision!r}")
        for name in ("max_frame_bytes", "max_pixels", "max_images_per_request", "max_batch_size", "torch_threads"):
            self._check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        self._check(self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s", "must be >= 0")
        self._check(self.retry_s > 0, "retry_s", f"must be > 0, got {self.retry_s}")

    def _check(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ServiceConfigError(f"serve config {key}: {message}")

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> ServiceConfig:
        args = dict(args or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ServiceConfigError(f"serve config {unknown[0]}: unknown key (known: {', '.join(fields)})")
        values = {}
        for name, value in args.items():
            default = getattr(cls, name)
            kind = type(default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) != isinstance(default, bool):
                raise ServiceConfigError(
                    f"serve config {name}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
            values[name] = value
        return cls(**values)

    def to_args(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
