"""Typed configuration of an EQFace flow.

One `Config` object is built from YAML files (later files override earlier ones) and `key.sub=value`
overrides, and travels unchanged to every training step (Ray pickles it into the workers) and, flattened,
into MLflow params. The dataclasses hold the defaults (configs/default.yaml spells them out and a test keeps
it equal to them). Each section validates itself when it is built and builds the component it configures:
`ModelConfig.build_net` / `build_head`, `StepConfig.build_optimizer`, `SyntheticConfig.spec`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from torch import nn

from data.augment import AugmentConfig
from data.synthetic import SyntheticSpec
from models import BACKBONE_NAMES, Margin, MarginHead, ShardedMarginHead, build_eqface_net
from models.eqface_net import EQFaceNet


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the file/key and what is wrong."""


class Section:
    """A config section: `KEY` is its dotted place in the config, used to name keys in error messages."""

    KEY: ClassVar[str] = ""

    def check(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{self.KEY}.{name}: {message}")


@dataclass
class SyntheticConfig(Section):
    """The embedded procedural face set (data/synthetic.py), generated on first use and cached."""

    KEY: ClassVar[str] = "data.synthetic"
    num_identities: int = 100
    train_per_identity: int = 40
    val_per_identity: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        self.check(self.num_identities >= 2, "num_identities", "must be >= 2")
        self.check(self.train_per_identity >= 1, "train_per_identity", "must be >= 1")

    def spec(self, image_size: int) -> SyntheticSpec:
        return SyntheticSpec(num_identities=self.num_identities, train_per_identity=self.train_per_identity,
                             val_per_identity=self.val_per_identity, image_size=image_size, seed=self.seed)


@dataclass
class DataConfig(Section):
    KEY: ClassVar[str] = "data"
    # "synthetic" or the URI (local path or s3://) of a shard dataset with a manifest.json.
    train: str = "synthetic"
    # Held-out split for validation; derived automatically for "synthetic".
    val: str | None = None
    # More held-out sets of people never seen in training, by name (metrics `<name>/...`): a set with a
    # `degradation` column gets the quality's Spearman correlation with it (per `degradation_type` too), a set
    # with several photos per person gets error-versus-discard curves on its genuine and impostor pairs.
    eval_sets: dict[str, str] = field(default_factory=dict)
    # Where the synthetic set is cached (local path or s3://).
    cache_root: str = "~/.cache/eqface/datasets"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    image_size: int = 56
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Default is to stop at the first corrupt image; True drops and counts them instead.
    skip_corrupt: bool = False
    shuffle_buffer: int = 2048
    # Of each identity's photos (those with at least 2), the fraction the quality steps (2) learn from and the
    # backbone steps (1, 3) never see: on a small set the backbone fits every photo it trains on, and step 2 on
    # those photos drives every quality towards 1. 0: every step reads every photo, as in the paper.
    quality_holdout: float = 0.0
    # Bit-reproducible input (off by default: it costs ingest throughput): Ray Data keeps its block order and
    # each row gets the same augmentation every epoch. With scaling.num_workers 1 and a fixed
    # scaling.threads_per_worker, a step's weights are then the same run after run, and after a restart from a
    # checkpoint (with several workers, which rows each one gets still varies).
    deterministic: bool = False

    def __post_init__(self) -> None:
        self.check(self.image_size >= 16, "image_size", f"must be >= 16 (e.g. 112, 64, 56), got {self.image_size}")
        if self.train != "synthetic":
            self.check(bool(self.val), "val", "a held-out dataset URI is required when data.train is a URI")
        for name, uri in self.eval_sets.items():
            self.check(bool(name) and "/" not in name and bool(uri), f"eval_sets.{name}",
                       "needs a name without '/' and a dataset URI")
        self.check(0.0 <= self.quality_holdout < 1.0, "quality_holdout",
                   f"must be in [0, 1), got {self.quality_holdout}")
        degraded = self.augment.degraded_fraction()
        # EQFace learns quality without labels because most photos of an identity are good ones.
        self.check(degraded <= 0.5, "augment",
                   f"degrade_prob {self.augment.degrade_prob}, jpeg_prob {self.augment.jpeg_prob} and rescale_prob "
                   f"{self.augment.rescale_prob} degrade {degraded:.0%} of each identity's training images, leaving "
                   f"more degraded than clean ones; keep it at most 50%")


@dataclass
class ModelConfig(Section):
    KEY: ClassVar[str] = "model"
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

    def __post_init__(self) -> None:
        self.check(self.backbone in BACKBONE_NAMES, "backbone",
                   f"unknown backbone {self.backbone!r} (valid: {', '.join(BACKBONE_NAMES)})")
        self.check(self.width_mult > 0, "width_mult", f"must be > 0, got {self.width_mult}")
        self.check(self.embedding_size > 0, "embedding_size", "must be > 0")
        self.check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        self.check(self.head in ("full", "sharded"), "head", f"must be 'full' or 'sharded', got {self.head!r}")
        self.check(0 < self.head_sample_rate <= 1, "head_sample_rate",
                   f"must be in (0, 1], got {self.head_sample_rate}")
        self.check(self.head_sample_rate == 1 or self.head == "sharded", "head_sample_rate",
                   "negative-centre sampling needs model.head: sharded")

    def build_net(self, input_size: int) -> EQFaceNet:
        """Backbone + quality branch."""
        return build_eqface_net(backbone=self.backbone, input_size=input_size, embedding_size=self.embedding_size,
                                width_mult=self.width_mult, dropout=self.dropout, quality_hidden=self.quality_hidden,
                                quality_pooled=self.quality_pooled)

    def build_head(self, num_classes: int, loss: LossConfig) -> nn.Module:
        """The margin head; a sharded one takes this process's rank in the DDP group."""
        if self.head == "sharded":
            return ShardedMarginHead(num_classes, self.embedding_size, loss.margin(),
                                     sample_rate=self.head_sample_rate)
        return MarginHead(num_classes, self.embedding_size, loss.margin())


@dataclass
class LossConfig(Section):
    """Combined margin softmax (paper eq. 3 / eq. 6): s_i * S * (m1*cos(theta_y + m2) - m3)."""

    KEY: ClassVar[str] = "loss"
    scale: float = 32.0
    m1: float = 1.0
    # ArcFace-style 0.3 rather than 0.5: with a small backbone trained for minutes, a 0.5 rad margin leaves
    # the true-class logit of most samples below zero, and step 2 then drives every s_i to 0.
    m2: float = 0.3
    m3: float = 0.0
    # "outside": m1*cos(theta + m2) (the paper's text); "angular": cos(m1*theta + m2) (SphereFace).
    form: str = "outside"
    focal_gamma: float = 0.0

    def __post_init__(self) -> None:
        self.margin()  # the Margin's own checks, reported under the config key

    def margin(self) -> Margin:
        """The one margin object both heads take (its fields are this section's keys)."""
        try:
            return Margin(**dataclasses.asdict(self))
        except ValueError as error:
            raise ConfigError(f"{self.KEY}.{error}") from None


@dataclass
class StepConfig(Section):
    """Optimisation settings of one kind of training step (`flows.steps.StepKind.section` names which)."""

    KEY: ClassVar[str] = "step1"
    epochs: int = 8
    batch_size: int = 32  # per worker
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5

    def __post_init__(self) -> None:
        self.check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        self.check(self.batch_size >= 2, "batch_size", f"must be >= 2, got {self.batch_size}")
        self.check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        self.check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")

    def build_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


@dataclass
class Step2Config(StepConfig):
    KEY: ClassVar[str] = "step2"
    epochs: int = 2
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    # Paper: class centres stay fixed while the quality branch learns. The authors' public code also
    # trains them; this switch does the same.
    train_centres: bool = False
    # The collapse guard, after every step 2: held-out quality whose spread is under collapse_std, or whose 5th
    # percentile is over collapse_p05 (every face nearly the same quality, e.g. all close to 1), fails the
    # step ("fail") or warns loudly ("warn"); the step's run is tagged eqface.quality_collapsed either way.
    collapse_std: float = 0.02
    collapse_p05: float = 0.98
    on_collapse: str = "fail"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.collapse_std >= 0, "collapse_std", f"must be >= 0, got {self.collapse_std}")
        self.check(0 < self.collapse_p05 <= 1, "collapse_p05", f"must be in (0, 1], got {self.collapse_p05}")
        self.check(self.on_collapse in ("fail", "warn"), "on_collapse",
                   f"must be 'fail' or 'warn', got {self.on_collapse!r}")


@dataclass
class Step3Config(StepConfig):
    KEY: ClassVar[str] = "step3"
    epochs: int = 3
    # "scratch": a new backbone and margin head; "continue": start from the teacher's backbone and head.
    init: str = "continue"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.init in ("scratch", "continue"), "init",
                   f"must be 'scratch' or 'continue', got {self.init!r}")


# The flow's defaults file: every key, as the dataclasses hold them (tests/test_config.py keeps them equal).
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ScalingConfig(Section):
    KEY: ClassVar[str] = "scaling"
    num_workers: int = 2
    use_gpu: bool = False
    # Ray Data tasks need CPU left over: on a 2-core machine, 2 workers x 1 CPU starves them and hangs.
    cpus_per_worker: float = 0.5
    # torch intra-op threads per worker; 0 = cores of this node / num_workers.
    threads_per_worker: int = 0
    # Autocast dtype: "none" | "bf16" | "fp16". fp16 always trains with a GradScaler (loss scaling against
    # gradient underflow; steps whose gradients overflow are skipped); bf16 and fp32 need none. fp16 also runs
    # on CPU (torch's CPU autocast and GradScaler), slowly on most CPUs: it is there for smoke checks.
    amp: str = "none"
    # Ray placement group strategy of the workers: PACK fills a node first; SPREAD puts them on different
    # nodes where it can (STRICT_* make it a hard requirement).
    placement_strategy: str = "PACK"

    def __post_init__(self) -> None:
        self.check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        self.check(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        self.check(self.amp in ("none", "bf16", "fp16"), "amp", f"must be none, bf16 or fp16, got {self.amp!r}")
        self.check(self.placement_strategy in PLACEMENT_STRATEGIES, "placement_strategy",
                   f"must be one of {', '.join(PLACEMENT_STRATEGIES)}, got {self.placement_strategy!r}")

    def resources_per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}

    def autocast(self, device: torch.device) -> torch.autocast:
        """The forward pass's autocast context on `device` (disabled for amp: none)."""
        if self.amp == "none":
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (enabled only then; a disabled scaler passes loss and step through)."""
        return torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")


DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"


@dataclass
class TrackingConfig(Section):
    KEY: ClassVar[str] = "tracking"
    # Empty = $MLFLOW_TRACKING_URI, else http://127.0.0.1:5000.
    uri: str = ""
    experiment: str = "eqface"
    # The Model Registry name the final model is registered under (alias "candidate": the newest version).
    registered_model: str = "eqface"
    # The longest MLflow outage a flow rides out: training goes on and metrics wait in memory; past this,
    # the step fails (its checkpoints stay; a resume sends the metrics it could not).
    max_outage_s: float = 300.0

    def __post_init__(self) -> None:
        self.check(self.max_outage_s > 0, "max_outage_s", f"must be > 0, got {self.max_outage_s}")
        self.check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.registered_model) is not None, "registered_model",
                   f"must be a name of letters, digits, '_', '.' and '-', got {self.registered_model!r}")

    def resolved_uri(self) -> str:
        """The tracking server this flow talks to."""
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@dataclass
class FlowConfig(Section):
    KEY: ClassVar[str] = "flow"
    # A re-submitted flow with the same name resumes: finished steps are skipped.
    name: str = "default"
    loops: int = 1
    # Ray Train storage for checkpoints (local path or s3://).
    storage: str = "~/.cache/eqface/runs"
    seed: int = 0
    # Worker-group restarts Ray Train may do within a step (from the last checkpoint).
    max_failures: int = 2
    checkpoints_to_keep: int = 2

    def __post_init__(self) -> None:
        self.check(self.loops >= 0, "loops", f"must be >= 0, got {self.loops}")
        self.check(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        self.check(self.max_failures >= 0, "max_failures", "must be >= 0")
        self.check(self.checkpoints_to_keep >= 1, "checkpoints_to_keep", "must be >= 1")


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

    def section(self, name: str) -> StepConfig:
        """A step's optimisation section by its key (`StepKind.section`: "step1", "step2", "step3")."""
        return getattr(self, name)

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


def parse_override(item: str) -> tuple[str, Any]:
    """`"a.b=value"` -> ("a.b", value parsed as YAML, e.g. 1e-6 -> 1e-06, [1, 2] -> a list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_key(tree: dict[str, Any], key: str, value: Any, what: str) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: {part!r} is not a section")
    node[leaf] = value


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults <- each YAML file in order <- `a.b=value` overrides; every section validates itself."""
    tree: dict[str, Any] = {}
    for path in files:
        _merge(tree, read_yaml(Path(path)))
    for item in overrides:
        key, value = parse_override(item)
        _set_key(tree, key, value, f"override {item!r}")
    where = " + ".join([str(f) for f in files] + (["command line"] if overrides else [])) or "defaults"
    return _build(Config, tree, "", where)


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """`cfg` with dotted keys changed (`{"loss.m2": 0.41}`), through the same parser and checks as the command line."""
    tree = cfg.to_dict()
    for key, value in overrides.items():
        _set_key(tree, key, copy.deepcopy(value), f"override {key}={value!r}")
    return _build(Config, tree, "", "overrides")


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild the Config that `Config.to_dict()` produced (e.g. from MLflow params)."""
    return _build(Config, tree, "", "config")


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


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
    except ConfigError:  # our own sections' checks: the message already names the key
        raise
    except (TypeError, ValueError) as exc:  # another section's checks (e.g. AugmentConfig)
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
    if origin is tuple and args[-1:] == (Ellipsis,):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, key, where) for v in value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key, where) for a, v in zip(args, value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}", where) for k, v in value.items()}
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
