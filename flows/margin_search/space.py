"""The search space of a margin search (YAML) and its checks, and how a sampled trial becomes config overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.experiment import Experiment
from ray.tune.search import BasicVariantGenerator

from flows.config import Config, ConfigError, load_config, with_overrides
from flows.steps import StepKind

# Which margins each family varies; the others stay neutral (m1 = 1, m2 = m3 = 0).
FAMILIES: dict[str, tuple[str, ...]] = {
    "arcface": ("m2",), "cosface": ("m3",), "sphereface": ("m1",), "combined": ("m1", "m2", "m3"),
}
NEUTRAL = {"m1": 1.0, "m2": 0.0, "m3": 0.0}
FORMS = ("outside", "angular")
# Objective -> (direction in which it improves, the first step kind that reports it).
METRICS: dict[str, tuple[str, StepKind]] = {
    "val_acc": ("max", StepKind.BACKBONE), "val_auc": ("max", StepKind.BACKBONE),
    "val_tar_far1e-3": ("max", StepKind.BACKBONE), "val_tar_far1e-2": ("max", StepKind.BACKBONE),
    "erc_auc_fmr1e-3": ("min", StepKind.QUALITY), "erc_auc_fmr1e-2": ("min", StepKind.QUALITY),
    "quality_spearman": ("min", StepKind.QUALITY),
}
DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid")
SPACE_KEYS = ("name", "families", "forms", "scale", "lr", "quality_lr", "steps", "num_samples", "metric",
              "mode", "asha", "val_limit", "seed", "max_concurrent_trials")


class SpaceError(ConfigError):
    """A search-space problem: one line naming the file, the key and what is wrong."""


# ---------------------------------------------------------------------------------------------
# The search space (YAML) and its checks


@dataclass(frozen=True)
class ParamSpec:
    """One searched value: a constant, a range (uniform / loguniform) or a list (choice / grid)."""

    kind: str  # "constant" | "uniform" | "loguniform" | "choice" | "grid"
    values: tuple[Any, ...]

    def domain(self) -> Any:
        if self.kind == "constant":
            return self.values[0]
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def extremes(self) -> tuple[Any, ...]:
        """The values that bound every sample: per-key config checks are intervals, so these suffice."""
        return self.values

    def __str__(self) -> str:
        return str(self.values[0]) if self.kind == "constant" else f"{self.kind} {list(self.values)}"


@dataclass
class SearchSpace:
    path: str
    name: str
    families: dict[str, dict[str, ParamSpec]]
    forms: ParamSpec
    scale: ParamSpec | None = None  # None: the base config's loss.scale
    lr: ParamSpec | None = None  # step1.lr
    quality_lr: ParamSpec | None = None  # step2.lr
    steps: tuple[int, ...] = (1,)
    num_samples: int = 8
    metric: str = "val_acc"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: float = 2.0
    val_limit: int | None = None
    seed: int = 0
    max_concurrent_trials: int | None = None
    raw: dict = field(default_factory=dict)

    def reporting_steps(self) -> tuple[int, ...]:
        """Steps whose epochs report the objective to Tune (quality metrics exist from step 2 on)."""
        first = METRICS[self.metric][1]
        return tuple(kind for kind in self.steps if kind >= first)

    def max_t(self, cfg: Config) -> int:
        """ASHA's time axis: epochs of the reporting steps, counted across steps (`trial_epoch`)."""
        return sum(StepKind(kind).settings(cfg).epochs for kind in self.reporting_steps())

    def param_space(self) -> dict[str, Any]:
        """Tune's param space: a family is a choice among dicts, so each samples only its own margins."""
        variants = []
        for family, params in self.families.items():
            margins: dict[str, Any] = {"family": family, **NEUTRAL}
            margins.update({key: spec.domain() for key, spec in params.items()})
            variants.append(margins)
        space: dict[str, Any] = {
            "margins": tune.choice(variants) if len(variants) > 1 else variants[0],
            "form": self.forms.domain(),
        }
        for key in ("scale", "lr", "quality_lr"):
            spec = getattr(self, key)
            if spec is not None:
                space[key] = spec.domain()
        return space


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_param(raw: Any, where: str, allow_grid: bool = True) -> ParamSpec:
    if _number(raw):
        return ParamSpec("constant", (float(raw),))
    if not isinstance(raw, dict) or len(raw) != 1:
        raise SpaceError(
            f"{where}: expected a number or one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {raw!r}"
        )
    ((kind, values),) = raw.items()
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: unknown distribution {kind!r} (valid: {', '.join(DISTRIBUTIONS)})")
    if kind == "grid" and not allow_grid:
        raise SpaceError(f"{where}: grid is not supported inside a family (families are sampled); use choice")
    if not isinstance(values, list) or not values or not all(_number(v) for v in values):
        raise SpaceError(f"{where}: {kind} needs a non-empty list of numbers, got {values!r}")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2:
            raise SpaceError(f"{where}: {kind} needs [low, high], got {values!r}")
        low, high = float(values[0]), float(values[1])
        if low > high:
            raise SpaceError(f"{where}: {kind} range is empty: low {low} > high {high}")
        if low == high:
            raise SpaceError(
                f"{where}: {kind} range [{low}, {high}] has no width; give the constant {low} instead"
            )
        if kind == "loguniform" and low <= 0:
            raise SpaceError(f"{where}: loguniform needs low > 0, got {low}")
        return ParamSpec(kind, (low, high))
    return ParamSpec(kind, tuple(float(v) for v in values))


def parse_forms(raw: Any, where: str) -> ParamSpec:
    kind, values = "choice", raw
    if isinstance(raw, str):
        values = [raw]
    elif isinstance(raw, dict) and len(raw) == 1 and next(iter(raw)) in ("choice", "grid"):
        ((kind, values),) = raw.items()
    if not isinstance(values, list) or not values:
        raise SpaceError(
            f"{where}: expected a non-empty list of margin forms ({', '.join(FORMS)}), got {raw!r}"
        )
    unknown = [v for v in values if v not in FORMS]
    if unknown:
        raise SpaceError(f"{where}: unknown margin form {unknown[0]!r} (valid: {', '.join(FORMS)})")
    if len(set(values)) != len(values):
        raise SpaceError(f"{where}: margin forms are listed twice: {values!r}")
    return ParamSpec("constant", (values[0],)) if len(values) == 1 else ParamSpec(kind, tuple(values))


def _int(raw: Any, where: str, low: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < low:
        raise SpaceError(f"{where}: must be an integer >= {low}, got {raw!r}")
    return raw


def load_space(path: str | Path) -> SearchSpace:
    """Parse the space's YAML; structural problems fail here (bounds against a config: `check_space`)."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: search space file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not raw:
        raise SpaceError(f"{path}: the search space is empty (expected families:, forms:, ...)")
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SPACE_KEYS))
    if unknown:
        raise SpaceError(f"{path}: unknown key '{unknown[0]}' (valid keys: {', '.join(SPACE_KEYS)})")

    families_raw = raw.get("families")
    if not isinstance(families_raw, dict) or not families_raw:
        raise SpaceError(
            f"{path}: families: needs at least one of {', '.join(FAMILIES)} with the margins it searches"
        )
    families: dict[str, dict[str, ParamSpec]] = {}
    for family, params in families_raw.items():
        where = f"{path}: families.{family}"
        if family not in FAMILIES:
            raise SpaceError(f"{where}: unknown family (valid: {', '.join(FAMILIES)})")
        allowed = FAMILIES[family]
        if not params:
            raise SpaceError(f"{where}: the family has no parameters (give {' / '.join(allowed)})")
        if not isinstance(params, dict):
            raise SpaceError(f"{where}: expected a mapping of margins, got {params!r}")
        for key in params:
            if key not in allowed:
                hint = "" if family == "combined" else "; use the combined family to vary several margins"
                raise SpaceError(f"{where}.{key}: {family} varies only {' / '.join(allowed)}{hint}")
        families[family] = {
            key: parse_param(value, f"{where}.{key}", allow_grid=False) for key, value in params.items()
        }

    space = SearchSpace(
        path=str(path),
        name=str(raw.get("name") or path.stem),
        families=families,
        forms=parse_forms(raw.get("forms", ["outside"]), f"{path}: forms"),
        raw=raw,
    )
    for key in ("scale", "lr", "quality_lr"):
        if raw.get(key) is not None:
            setattr(space, key, parse_param(raw[key], f"{path}: {key}"))

    steps = raw.get("steps", [1])
    if steps not in ([1], [1, 2]):
        raise SpaceError(
            f"{path}: steps: must be [1] or [1, 2] (step 2 needs step 1's checkpoint), got {steps!r}"
        )
    space.steps = tuple(steps)
    if space.quality_lr is not None and 2 not in space.steps:
        raise SpaceError(f"{path}: quality_lr: searched but step 2 never runs (set steps: [1, 2])")
    space.num_samples = _int(raw.get("num_samples", space.num_samples), f"{path}: num_samples", 1)

    space.metric = raw.get("metric", space.metric)
    if space.metric not in METRICS:
        raise SpaceError(f"{path}: metric: unknown objective {space.metric!r} (valid: {', '.join(METRICS)})")
    better, first_step = METRICS[space.metric]
    space.mode = raw.get("mode", better)
    if space.mode != better:
        raise SpaceError(
            f"{path}: mode: {space.metric} improves towards {better}, but mode is {space.mode!r}"
        )
    if first_step not in space.steps:
        raise SpaceError(
            f"{path}: metric: {space.metric} is reported by step {first_step} only; set steps: [1, 2]"
        )

    asha = raw.get("asha") or {}
    if not isinstance(asha, dict) or set(asha) - {"grace_period", "reduction_factor"}:
        raise SpaceError(f"{path}: asha: expected {{grace_period: N, reduction_factor: R}}, got {asha!r}")
    space.grace_period = _int(asha.get("grace_period", 1), f"{path}: asha.grace_period", 1)
    rf = asha.get("reduction_factor", 2)
    if not _number(rf) or rf <= 1:
        raise SpaceError(f"{path}: asha.reduction_factor: must be a number > 1, got {rf!r}")
    space.reduction_factor = float(rf)

    if raw.get("val_limit") is not None:
        space.val_limit = _int(raw["val_limit"], f"{path}: val_limit", 4)
    space.seed = _int(raw.get("seed", 0), f"{path}: seed", 0)
    if raw.get("max_concurrent_trials") is not None:
        space.max_concurrent_trials = _int(raw["max_concurrent_trials"], f"{path}: max_concurrent_trials", 1)
    return space


def check_space(space: SearchSpace, files: list[str | Path], overrides: list[str]) -> Config:
    """Every bound of every searched value through the config's own checks before any trial starts; -> the base
    config.

    The config's own checks are per-key intervals (m1 > 0, 0 <= m2 < pi/2, 0 <= m3 < 1, S > 0, lr > 0), so
    a space whose bounds pass yields only valid samples.
    """
    base = load_config(files, overrides)
    checks: list[tuple[str, str, Any, ParamSpec]] = []
    for family, params in space.families.items():
        for key, spec in params.items():
            checks += [(f"families.{family}.{key}", f"loss.{key}", v, spec) for v in spec.extremes()]
    for key, target in (("scale", "loss.scale"), ("lr", "step1.lr"), ("quality_lr", "step2.lr")):
        spec = getattr(space, key)
        if spec is not None:
            checks += [(key, target, v, spec) for v in spec.extremes()]
    for where, target, value, spec in checks:
        try:
            with_overrides(base, {target: value})
        except ConfigError as exc:
            raise SpaceError(f"{space.path}: {where}: {spec} reaches {value}, but {exc}") from None
    max_t = space.max_t(base)
    if space.grace_period >= max_t:
        raise SpaceError(
            f"{space.path}: asha.grace_period: {space.grace_period} must be below the {max_t} epochs a "
            f"trial trains (steps {list(space.reporting_steps())}), or no trial can be stopped early"
        )
    for index, sample in enumerate(planned_samples(space)):
        changes = trial_overrides(sample)
        try:
            with_overrides(base, changes)
        except ConfigError as exc:
            described = ", ".join(f"{key}={value}" for key, value in changes.items())
            raise SpaceError(f"{space.path}: trial {index} ({described}): {exc}") from None
    return base


def planned_samples(space: SearchSpace) -> list[dict[str, Any]]:
    """The configs the search will try, drawn as Tune draws them (same generator, same seed)."""
    generator = BasicVariantGenerator(random_state=space.seed)
    generator.add_configurations([Experiment("preflight", _no_trial, config=space.param_space(),
                                             num_samples=space.num_samples)])
    samples = []
    while (trial := generator.next_trial()) is not None:
        samples.append(trial.config)
    return samples


def _no_trial(config: dict[str, Any]) -> None:
    """The trainable of the preflight draw: never run."""


# ---------------------------------------------------------------------------------------------
# One trial's config


def trial_overrides(sample: dict[str, Any]) -> dict[str, Any]:
    """Tune's sampled config -> dotted config keys it changes."""
    margins = sample["margins"]
    out: dict[str, Any] = {f"loss.{k}": float(margins[k]) for k in ("m1", "m2", "m3")}
    out["loss.form"] = str(sample["form"])
    for key, target in (("scale", "loss.scale"), ("lr", "step1.lr"), ("quality_lr", "step2.lr")):
        if key in sample:
            out[target] = float(sample[key])
    return out


def override_yaml(overrides: dict[str, Any], comment: str = "") -> str:
    """`{"loss.m2": 0.41}` -> `loss: {m2: 0.41}` as a YAML file `flows/eqface.py --config` accepts as is."""
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        section, leaf = key.split(".")
        tree.setdefault(section, {})[leaf] = value
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)

