"""Typed configuration of an EQFace flow.

One `Config` object is built from YAML files (later files override earlier ones) and `key.sub=value`
command-line overrides, validated once, and then travels unchanged to every training step and,
flattened, into MLflow params. Field defaults are the embedded CPU default (configs/default.yaml
spells them out).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data.augment import AugmentConfig


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the file/key and what is wrong."""


@dataclass
class SyntheticConfig:
    """The embedded procedural face set (data/synthetic.py), generated on first use and cached."""

    num_identities: int = 100
    train_per_identity: int = 40
    val_per_identity: int = 10
    seed: int = 0


@dataclass
class DataConfig:
    # "synthetic" or the URI (local path or s3://) of a shard dataset with a manifest.json.
    train: str = "synthetic"
    # Held-out split for validation; derived automatically for "synthetic".
    val: str | None = None
    # Where the synthetic set is cached (local path or s3://).
    cache_root: str = "~/.cache/eqface/datasets"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    image_size: int = 56
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Default is to stop at the first corrupt image; True drops and counts them instead.
    skip_corrupt: bool = False
    shuffle_buffer: int = 2048
    # Bit-reproducible input (off by default: it costs ingest throughput): Ray Data keeps its block order and
    # each row gets the same augmentation every epoch. With scaling.num_workers 1 and a fixed
    # scaling.threads_per_worker, a step's weights are then the same run after run, and after a restart from a
    # checkpoint (with several workers, which rows each one gets still varies).
    deterministic: bool = False


@dataclass
class ModelConfig:
    backbone: str = "mobilefacenet"
    width_mult: float = 0.5
    embedding_size: int = 128
    dropout: float = 0.0
    quality_hidden: int = 256
    quality_pooled: bool = False
    # Margin head: "full" (every worker holds all class centres) or "sharded" (partial FC: each DDP worker
    # holds ~num_classes/world centres; for millions of identities). head_sample_rate < 1 samples negative
    # centres per step (sharded only), always keeping the batch's positive classes.
    head: str = "full"
    head_sample_rate: float = 1.0


@dataclass
class LossConfig:
    """Combined margin softmax (paper eq. 3 / eq. 6): s_i * S * (m1*cos(theta_y + m2) - m3)."""

    scale: float = 32.0
    m1: float = 1.0
    # ArcFace-style 0.3 rather than 0.5: with a small backbone trained for minutes, a 0.5 rad margin leaves
    # the true-class logit of most samples below zero, and step 2 then drives every s_i to 0.
    m2: float = 0.3
    m3: float = 0.0
    # "outside": m1*cos(theta + m2) (the paper's text); "angular": cos(m1*theta + m2) (SphereFace).
    form: str = "outside"
    focal_gamma: float = 0.0


@dataclass
class StepConfig:
    """Optimisation settings of one kind of training step."""

    epochs: int = 8
    batch_size: int = 32  # per worker
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5


@dataclass
class Step2Config(StepConfig):
    epochs: int = 2
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    # Paper: class centres stay fixed while the quality branch learns. The authors' public code also
    # trains them; this switch does the same.
    train_centres: bool = False


@dataclass
class Step3Config(StepConfig):
    epochs: int = 3
    # "scratch": a new backbone and margin head; "continue": start from the teacher's backbone and head.
    init: str = "continue"


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    # Ray Data tasks need CPU left over: on a 2-core machine, 2 workers x 1 CPU starves them and hangs.
    cpus_per_worker: float = 0.5
    # torch intra-op threads per worker; 0 = cores of this node / num_workers.
    threads_per_worker: int = 0
    amp: str = "none"  # "none" | "bf16" | "fp16" (fp16 on GPU only)
    # Ray placement group strategy of the workers: PACK fills a node first; SPREAD puts them on different
    # nodes where it can (STRICT_* make it a hard requirement).
    placement_strategy: str = "PACK"


@dataclass
class TrackingConfig:
    # Empty = $MLFLOW_TRACKING_URI, else http://127.0.0.1:5000.
    uri: str = ""
    experiment: str = "eqface"
    # The longest MLflow outage a flow rides out: training goes on and metrics wait in memory; past this,
    # the step fails (its checkpoints stay; a resume sends the metrics it could not).
    max_outage_s: float = 300.0


@dataclass
class FlowConfig:
    # A re-submitted flow with the same name resumes: finished steps are skipped.
    name: str = "default"
    loops: int = 1
    # Ray Train storage for checkpoints (local path or s3://).
    storage: str = "~/.cache/eqface/runs"
    seed: int = 0
    # Worker-group restarts Ray Train may do within a step (from the last checkpoint).
    max_failures: int = 2
    checkpoints_to_keep: int = 2


@dataclass
class Config:
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    step1: StepConfig = field(default_factory=StepConfig)
    step2: Step2Config = field(default_factory=Step2Config)
    step3: Step3Config = field(default_factory=Step3Config)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def step(self, kind: int) -> StepConfig:
        return {1: self.step1, 2: self.step2, 3: self.step3}[kind]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`{"loss.m2": 0.5, ...}`: the MLflow params of every run of the flow."""
        return flatten(self.to_dict())


# ---------------------------------------------------------------------------------------------
# Loading


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults <- each YAML file in order <- `a.b=value` overrides, then validate."""
    tree: dict[str, Any] = {}
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        _merge(tree, loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = value
    where = " + ".join([str(f) for f in files] + (["command line"] if overrides else [])) or "defaults"
    cfg = _build(Config, tree, "", where)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild the Config that `Config.to_dict()` produced (in Ray workers, from MLflow params)."""
    return _build(Config, tree, "", "config")


def _merge(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _build(cls: type, tree: Any, prefix: str, where: str) -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{unknown[0]}' (valid keys here: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in tree.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}", where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a section's own checks (e.g. AugmentConfig)
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: {exc}") from None


def _coerce(hint: Any, value: Any, key: str, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", where)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key, where) for a, v in zip(args, value, strict=True))
    if value is None:
        raise ConfigError(f"{where}: {key} is missing a value (null given; expected {hint.__name__})")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    return value


# ---------------------------------------------------------------------------------------------
# Validation: contradictions and out-of-range values fail here, before any service is touched.


def validate(cfg: Config) -> None:
    from models import BACKBONE_NAMES  # local import: models imports torch

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}")

    check(cfg.model.backbone in BACKBONE_NAMES, "model.backbone",
          f"unknown backbone {cfg.model.backbone!r} (valid: {', '.join(BACKBONE_NAMES)})")
    check(cfg.data.image_size >= 16, "data.image_size", f"must be >= 16 (e.g. 112, 64, 56), got {cfg.data.image_size}")
    check(cfg.model.width_mult > 0, "model.width_mult", f"must be > 0, got {cfg.model.width_mult}")
    check(cfg.model.embedding_size > 0, "model.embedding_size", "must be > 0")
    check(0.0 <= cfg.model.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {cfg.model.dropout}")
    check(cfg.model.head in ("full", "sharded"), "model.head", f"must be 'full' or 'sharded', got {cfg.model.head!r}")
    check(0 < cfg.model.head_sample_rate <= 1, "model.head_sample_rate",
          f"must be in (0, 1], got {cfg.model.head_sample_rate}")
    check(cfg.model.head_sample_rate == 1 or cfg.model.head == "sharded", "model.head_sample_rate",
          "negative-centre sampling needs model.head: sharded")
    loss = cfg.loss
    check(loss.scale > 0, "loss.scale", f"must be > 0, got {loss.scale}")
    check(loss.m1 > 0, "loss.m1", f"must be > 0, got {loss.m1}")
    check(0 <= loss.m2 < math.pi / 2, "loss.m2", f"must be in [0, pi/2), got {loss.m2}")
    check(0 <= loss.m3 < 1, "loss.m3", f"must be in [0, 1), got {loss.m3}")
    check(loss.form in ("outside", "angular"), "loss.form", f"must be 'outside' or 'angular', got {loss.form!r}")
    check(loss.focal_gamma >= 0, "loss.focal_gamma", "must be >= 0")
    for kind in (1, 2, 3):
        step = cfg.step(kind)
        check(step.epochs >= 1, f"step{kind}.epochs", f"must be >= 1, got {step.epochs}")
        check(step.batch_size >= 2, f"step{kind}.batch_size", f"must be >= 2, got {step.batch_size}")
        check(step.lr > 0, f"step{kind}.lr", f"must be > 0, got {step.lr}")
        check(step.warmup_epochs >= 0, f"step{kind}.warmup_epochs", "must be >= 0")
    check(cfg.step3.init in ("scratch", "continue"), "step3.init",
          f"must be 'scratch' or 'continue', got {cfg.step3.init!r}")
    check(cfg.flow.loops >= 0, "flow.loops", f"must be >= 0, got {cfg.flow.loops}")
    check(bool(cfg.flow.name) and "/" not in cfg.flow.name, "flow.name", "must be a non-empty name without '/'")
    check(cfg.flow.max_failures >= 0, "flow.max_failures", "must be >= 0")
    check(cfg.flow.checkpoints_to_keep >= 1, "flow.checkpoints_to_keep", "must be >= 1")
    check(cfg.tracking.max_outage_s > 0, "tracking.max_outage_s", f"must be > 0, got {cfg.tracking.max_outage_s}")
    check(cfg.scaling.num_workers >= 1, "scaling.num_workers", f"must be >= 1, got {cfg.scaling.num_workers}")
    check(cfg.scaling.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")
    check(cfg.scaling.amp in ("none", "bf16", "fp16"), "scaling.amp",
          f"must be none, bf16 or fp16, got {cfg.scaling.amp!r}")
    check(not (cfg.scaling.amp == "fp16" and not cfg.scaling.use_gpu), "scaling.amp",
          "fp16 autocast needs use_gpu: true (use bf16 on CPU)")
    check(cfg.scaling.placement_strategy in PLACEMENT_STRATEGIES, "scaling.placement_strategy",
          f"must be one of {', '.join(PLACEMENT_STRATEGIES)}, got {cfg.scaling.placement_strategy!r}")
    if cfg.data.train != "synthetic":
        check(bool(cfg.data.val), "data.val", "a held-out dataset URI is required when data.train is a URI")
    check(cfg.data.synthetic.num_identities >= 2, "data.synthetic.num_identities", "must be >= 2")
    check(cfg.data.synthetic.train_per_identity >= 1, "data.synthetic.train_per_identity", "must be >= 1")
