"""Ray Tune search over the margins (m1, m2, m3), the scale S and the margin form, compared in MLflow.

    ray job submit --working-dir . -- python flows/tune_margins.py --space configs/tune_margins.yaml \
        [--config FILE ...] [key.sub=value ...] --name NAME [--out DIR] [--storage URI] [--resume]

Each trial is a small driver function that runs step 1 of the flow (and step 2 where the space says so)
as a Ray Train `TorchTrainer` with the flow's own `train_loop_per_worker`, so what a search finds
transfers to the flow. Every epoch reports a held-out metric to Tune through `TuneReportCallback`;
ASHA stops hopeless trials at its rungs. The driver logs one MLflow parent run per search and one
child run per trial, and writes the best configuration as a YAML override for `flows/eqface.py`.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from flows.config import Config, ConfigError, config_from_dict, load_config, validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
DEFAULT_SPACE = ROOT / "configs" / "tune_margins.yaml"

# Which margins each family varies; the others stay neutral (m1 = 1, m2 = m3 = 0).
FAMILIES: dict[str, tuple[str, ...]] = {
    "arcface": ("m2",), "cosface": ("m3",), "sphereface": ("m1",), "combined": ("m1", "m2", "m3"),
}
NEUTRAL = {"m1": 1.0, "m2": 0.0, "m3": 0.0}
FORMS = ("outside", "angular")
# Objective -> (direction in which it improves, the first step kind that reports it).
METRICS: dict[str, tuple[str, int]] = {
    "val_acc": ("max", 1), "val_auc": ("max", 1),
    "val_tar_far1e-3": ("max", 1), "val_tar_far1e-2": ("max", 1),
    "erc_auc_fmr1e-3": ("min", 2), "erc_auc_fmr1e-2": ("min", 2), "quality_spearman": ("min", 2),
}
DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid")
SPACE_KEYS = ("name", "families", "forms", "scale", "lr", "quality_lr", "steps", "num_samples", "metric",
              "mode", "asha", "val_limit", "seed", "max_concurrent_trials")
# Ray Data's decode tasks each ask for one whole CPU: a search leaves that much free beside its trials.
DATA_CPU_RESERVE = 1.0
TRIAL_DRIVER_CPU = 0.01  # the per-trial driver only waits on its TorchTrainer (0 CPU is refused by Tune)

TAG_ROLE = "eqface.role"
TAG_SEARCH = "eqface.search"
TAG_TRIAL = "eqface.trial_id"
TAG_EARLY_STOP = "eqface.early_stopped"
PARENT = "mlflow.parentRunId"


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
        from ray import tune

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
        return sum(cfg.step(kind).epochs for kind in self.reporting_steps())

    def param_space(self) -> dict[str, Any]:
        """Tune's param space: a family is a choice among dicts, so each samples only its own margins."""
        from ray import tune

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


def _yaml_scalar(value: Any) -> str:
    """A value as `load_config` parses it back (`1e-06` alone would read as a string in YAML 1.1)."""
    return yaml.safe_dump(value).splitlines()[0]


def check_space(space: SearchSpace, files: list[str | Path], overrides: list[str]) -> Config:
    """Every bound of every searched value through `load_config` before any trial starts; -> the base config.

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
            load_config(files, [*overrides, f"{target}={_yaml_scalar(value)}"])
        except ConfigError as exc:
            raise SpaceError(f"{space.path}: {where}: {spec} reaches {value}, but {exc}") from None
    max_t = space.max_t(base)
    if space.grace_period >= max_t:
        raise SpaceError(
            f"{space.path}: asha.grace_period: {space.grace_period} must be below the {max_t} epochs a "
            f"trial trains (steps {list(space.reporting_steps())}), or no trial can be stopped early"
        )
    for index, sample in enumerate(planned_samples(space)):
        changes = [f"{key}={_yaml_scalar(value)}" for key, value in trial_overrides(sample).items()]
        try:
            load_config(files, [*overrides, *changes])
        except ConfigError as exc:
            raise SpaceError(f"{space.path}: trial {index} ({', '.join(changes)}): {exc}") from None
    return base


def planned_samples(space: SearchSpace) -> list[dict[str, Any]]:
    """The configs the search will try, drawn as Tune draws them (same generator, same seed)."""
    from ray.tune.experiment import Experiment
    from ray.tune.search import BasicVariantGenerator

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


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """The base config (Config.to_dict()) with dotted overrides, validated by the flow's own checks."""
    tree = copy.deepcopy(base)
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    cfg = config_from_dict(tree)
    validate(cfg)
    return cfg


def override_yaml(overrides: dict[str, Any], comment: str = "") -> str:
    """`{"loss.m2": 0.41}` -> `loss: {m2: 0.41}` as a YAML file `flows/eqface.py --config` accepts as is."""
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        section, leaf = key.split(".")
        tree.setdefault(section, {})[leaf] = value
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------------------
# The trial: a driver function that runs the flow's step(s) as Ray Train jobs


@dataclass
class TrialSetup:
    """What every trial shares; travels to the trial actors through `tune.with_parameters`."""

    base: dict[str, Any]  # Config.to_dict() of the base config
    steps: tuple[int, ...]
    reporting: tuple[int, ...]
    train_uri: str
    val_uri: str
    num_classes: int
    num_train: int
    val_limit: int | None
    train_storage: str  # Ray Train runs of the trials (local path or s3://)


def run_trial(sample: dict[str, Any], setup: TrialSetup) -> None:
    """One trial: step 1 (then step 2) with the trial's margins; every epoch reports to Tune. Each step is the
    flow's own Ray Train job (`step_trainer`); a step that diverges ends the trial (no retries), not the search."""
    import ray.tune

    from flows.train_step import NonFiniteLossError, StepSpec, read_divergence, step_trainer

    cfg = apply_overrides(setup.base, trial_overrides(sample))
    trial_id = ray.tune.get_context().get_trial_id()
    checkpoint, offset = None, 0
    for index, kind in enumerate(setup.steps):  # the flow's plan starts 1, 2: same indices, same seeds
        spec = StepSpec(
            kind, index, 0, setup.num_classes, mlflow_run_id="", tracking_uri="", init_checkpoint=checkpoint
        )
        reports = kind in setup.reporting
        trainer, marker = step_trainer(
            cfg, spec, setup.train_uri, setup.num_train,
            # Stable per trial and step: a trial restarted by `--resume` continues from its checkpoint.
            f"{trial_id}-step{kind}",
            storage_uri=setup.train_storage,
            checkpoints_to_keep=1,
            callbacks=[epoch_report_callback(offset, kind)] if reports else [],
            loop_extra={"val_each_epoch": {"uri": setup.val_uri, "limit": setup.val_limit}},
        )
        result = trainer.fit()
        diverged = read_divergence(marker)
        if diverged is not None:
            raise NonFiniteLossError(f"trial {trial_id}: {diverged['message']} (these margins do not train)")
        if result.checkpoint is None:
            raise RuntimeError(f"trial {trial_id}: step {kind} returned no checkpoint")
        checkpoint = result.checkpoint
        if reports:
            offset += cfg.step(kind).epochs


def epoch_report_callback(offset: int, kind: int):
    """TuneReportCallback adding `trial_epoch` (epochs over the trial's steps: ASHA's clock), `step_kind`."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReport(TuneReportCallback):
        def __init__(self) -> None:
            super().__init__()
            self.offset, self.kind = offset, kind

        def after_report(self, run_context, metrics, checkpoint):
            first = {
                **metrics[0],
                "trial_epoch": self.offset + int(metrics[0]["epoch"]),
                "step_kind": self.kind,
            }
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReport()


# ---------------------------------------------------------------------------------------------
# MLflow: one parent run per search, one child run per trial, logged from the Tune driver


def _is_step_metric(key: str) -> bool:
    return key in ("loss", "top1", "lr", "images_per_s") or key.startswith(("val_", "quality_", "erc_"))


def family_and_form(sample: dict[str, Any]) -> tuple[str, str]:
    return sample["margins"]["family"], str(sample["form"])


def mlflow_callback(
    uri: str, experiment_id: str, parent_id: str, search: str, base: dict[str, Any], max_t: int
):
    """A Tune Callback (built lazily: `ray.tune` is heavy) that mirrors trials into MLflow child runs."""
    from ray.tune import Callback

    class MlflowTrials(Callback):
        def __init__(self) -> None:
            self.uri, self.experiment_id, self.parent_id, self.search = uri, experiment_id, parent_id, search
            self.base, self.max_t = base, max_t
            self.runs: dict[str, str] = {}
            self.last_epoch: dict[str, int] = {}
            self._client = None

        def __getstate__(self):  # pickled into the experiment state: no client, no run cache
            return {**self.__dict__, "_client": None, "runs": {}}

        @property
        def client(self):
            from mlflow.tracking import MlflowClient

            if self._client is None:
                self._client = MlflowClient(self.uri)
            return self._client

        def run_for(self, trial) -> str:
            if trial.trial_id in self.runs:
                return self.runs[trial.trial_id]
            found = self.client.search_runs(
                [self.experiment_id],
                f"tags.`{PARENT}` = '{self.parent_id}' and tags.`{TAG_TRIAL}` = '{trial.trial_id}'",
            )
            if found:  # a resumed search: the trial keeps its run
                run_id = found[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
            else:
                family, form = family_and_form(trial.config)
                run_id = self.client.create_run(
                    self.experiment_id,
                    run_name=f"trial-{trial.trial_id}-{family}-{form}",
                    tags={
                        PARENT: self.parent_id,
                        TAG_ROLE: "trial",
                        TAG_SEARCH: self.search,
                        TAG_TRIAL: trial.trial_id,
                        "eqface.family": family,
                        "eqface.form": form,
                    },
                ).info.run_id
                cfg = apply_overrides(self.base, trial_overrides(trial.config))
                params = {**cfg.flat(), "tune.family": family, "tune.trial_id": trial.trial_id}
                _log_params(self.client, run_id, params)
            self.runs[trial.trial_id] = run_id
            return run_id

        def on_trial_start(self, iteration, trials, trial, **info):
            self.run_for(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            from mlflow.entities import Metric

            epoch = int(result.get("trial_epoch", result.get("training_iteration", 0)))
            now = int(time.time() * 1000)
            metrics = [
                Metric(k, float(v), now, epoch)
                for k, v in result.items()
                if _is_step_metric(k) and isinstance(v, (int, float)) and v == v
            ]
            self.client.log_batch(self.run_for(trial), metrics=metrics)
            self.last_epoch[trial.trial_id] = epoch

        def on_trial_complete(self, iteration, trials, trial, **info):
            run_id = self.run_for(trial)
            last = self.last_epoch.get(trial.trial_id, int((trial.last_result or {}).get("trial_epoch", 0)))
            # ASHA stops the trials it gives up on before `max_t`; the others run to the end.
            self.client.set_tag(run_id, TAG_EARLY_STOP, str(last < self.max_t).lower())
            self.client.set_tag(run_id, "eqface.last_epoch", str(last))
            self.client.set_terminated(run_id, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            run_id = self.run_for(trial)
            self.client.set_tag(
                run_id, "eqface.error", str(getattr(trial, "error_file", "") or "trial failed")
            )
            self.client.set_terminated(run_id, "FAILED")

    return MlflowTrials()


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])


class SearchTracker:
    """The driver's parent run: found again by its search name on `--resume`."""

    def __init__(self, uri: str, experiment: str, search: str) -> None:
        from mlflow.tracking import MlflowClient

        from flows.tracking import check_reachable

        check_reachable(uri)
        self.uri, self.search = uri, search
        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

    def find(self):
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{TAG_ROLE}` = 'tune' and tags.`{TAG_SEARCH}` = '{self.search}'",
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None

    def start(self, params: dict[str, Any], space_file: str) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"tune-{self.search}",
            tags={TAG_ROLE: "tune", TAG_SEARCH: self.search},
        )
        run_id = run.info.run_id
        _log_params(self.client, run_id, params)
        self.client.log_artifact(run_id, space_file, "search")
        return run_id


# ---------------------------------------------------------------------------------------------
# The search


def plan_trials(cluster: dict[str, float], cfg: Config, cap: int | None = None) -> tuple[int, float]:
    """(trials at once, CPUs per training worker) on this cluster.

    Ray Data's decode tasks each ask for one whole CPU, so one CPU stays free beside the trials; the rest
    holds `floor(rest / (num_workers x cpus_per_worker))` trials, and the workers give up a sliver each
    so the trials' drivers fit too (2 CPUs, 1 worker x 0.5 CPU: 2 trials of 0.49 + 0.01 CPU).
    """
    cpus = cluster.get("CPU", 0.0)
    room = cpus - DATA_CPU_RESERVE
    workers = cfg.scaling.num_workers
    fit = int(room / (workers * cfg.scaling.cpus_per_worker) + 1e-9)
    if cfg.scaling.use_gpu:
        fit = min(fit, int(cluster.get("GPU", 0) // workers))
    concurrent = max(1, min(fit, cap or fit))
    per_worker = min(
        cfg.scaling.cpus_per_worker,
        math.floor(((room / concurrent) - TRIAL_DRIVER_CPU) / workers * 100 + 1e-9) / 100,
    )
    if per_worker <= 0:
        raise ConfigError(
            f"the Ray cluster has {cpus:g} CPUs: too few for {workers} training worker(s) beside the "
            f"{DATA_CPU_RESERVE:g} CPU Ray Data needs"
        )
    return concurrent, per_worker


def warn_if_cleaner_is_blind() -> None:
    """ASHA stops a trial by killing its driver, and with it the trial's Train controller; Ray Train's
    detached PlacementGroupCleaner then frees the workers' CPUs. Where several Ray clusters run on one host it
    finds its own only through RAY_ADDRESS; without it the CPUs stay reserved until the search ends."""
    import ray

    try:
        from ray._private.services import find_gcs_addresses  # private: a hint, never a failure

        clusters = len(find_gcs_addresses())
    except Exception:  # noqa: BLE001
        return
    env_vars = ray.get_runtime_context().runtime_env.env_vars() or {}
    if clusters > 1 and "RAY_ADDRESS" not in env_vars:
        gcs = ray.get_runtime_context().gcs_address
        print(f"[tune] warning: {clusters} Ray clusters run on this host and the job's env_vars lack "
              f"RAY_ADDRESS: trials ASHA stops keep their CPUs until the search ends. Submit with "
              f"--runtime-env-json '{{\"env_vars\": {{\"RAY_ADDRESS\": \"{gcs}\"}}}}'", flush=True)


@dataclass
class SearchArgs:
    space: SearchSpace
    cfg: Config
    files: list[str]
    overrides: list[str]
    name: str
    out: Path
    storage: str
    resume: bool


def parse_args(argv: list[str] | None) -> SearchArgs:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(DEFAULT_SPACE), help="search space YAML")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="base config YAML; repeat to overlay (default: configs/default.yaml)",
    )
    parser.add_argument("--name", default=None, help="search name (default: the space's name)")
    parser.add_argument(
        "--out", default=None, help="where best.yaml is written (default: ~/.cache/eqface/tune/NAME)"
    )
    parser.add_argument(
        "--storage", default=None, help="Tune + trial storage, local or s3:// (default: flow.storage/tune)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the search NAME after its driver died"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the base config")
    args = parser.parse_args(argv)
    files = args.config or [str(DEFAULT_CONFIG)]
    space = load_space(args.space)
    cfg = check_space(space, files, args.overrides)
    name = args.name or space.name
    if not name or "/" in name:
        raise SpaceError(f"--name: must be a non-empty name without '/', got {name!r}")
    from data import storage

    storage_uri = args.storage or storage.join(cfg.flow.storage, "tune")
    out = Path(os.path.expanduser(args.out or f"~/.cache/eqface/tune/{name}")).resolve()
    return SearchArgs(space, cfg, files, args.overrides, name, out, storage_uri, args.resume)


AWS_CREDENTIAL_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                                 "AWS_SESSION_TOKEN"})


def keep_credentials_out_of_trial_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS keys into every trial actor's runtime env, and Ray's runtime env
    agent logs runtime envs in clear (runtime_env_agent.log). Trials, like every Ray process, find the keys
    in their node's environment (or use the instance profile), so Tune is told not to copy them."""
    from ray.tune.execution import class_cache

    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if propagated is not None:
        class_cache.ENV_VARS_TO_PROPAGATE = set(propagated) - AWS_CREDENTIAL_VARS


def run_search(args: SearchArgs) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from data import storage
    from flows.eqface import check_ray_address, prepare_datasets

    space, cfg, name = args.space, args.cfg, args.name
    tracking_uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "http://127.0.0.1:5000"
    tracker = SearchTracker(tracking_uri, cfg.tracking.experiment, name)
    fs, storage_path = storage.resolve(args.storage)
    tune_fs = fs if storage.is_s3(args.storage) else None
    experiment_path = f"{storage_path.rstrip('/')}/{name}"
    restorable = tune.Tuner.can_restore(experiment_path, storage_filesystem=tune_fs)
    existing = tracker.find()
    if not args.resume and (restorable or existing is not None):
        where = storage.join(args.storage, name) if restorable else f"MLflow run {existing.info.run_id}"
        raise ConfigError(
            f"search '{name}' already exists ({where}); pass --resume to continue it or choose another --name"
        )
    check_ray_address()
    data = prepare_datasets(cfg)
    if not data.val:
        raise ConfigError("data.val: a held-out split is needed for the search objective")
    from flows import preflight

    preflight.check_data_fits(cfg, data.num_classes, data.num_train)

    ray.init()
    preflight.check_cluster(cfg)  # one trial must fit (GPUs, CPUs + Ray Data), or Tune would wait forever
    warn_if_cleaner_is_blind()
    cluster = ray.cluster_resources()
    concurrent, cpus_per_worker = plan_trials(cluster, cfg, space.max_concurrent_trials)
    trial_cfg = copy.deepcopy(cfg)  # the trials' resources; what they compute is unchanged
    trial_cfg.scaling.cpus_per_worker = cpus_per_worker
    if not trial_cfg.scaling.threads_per_worker:
        trial_cfg.scaling.threads_per_worker = max(
            1, int(cluster.get("CPU", 1) // (concurrent * cfg.scaling.num_workers))
        )
    max_t = space.max_t(cfg)
    if existing is not None:
        parent_id = existing.info.run_id
        tracker.client.update_run(parent_id, status="RUNNING")
        if "eqface.error" in existing.data.tags:  # the interruption this resume recovers from
            tracker.client.delete_tag(parent_id, "eqface.error")
    else:
        params = {
            **cfg.flat(),
            "search.metric": space.metric,
            "search.mode": space.mode,
            "search.num_samples": space.num_samples,
            "search.steps": list(space.steps),
            "search.families": ",".join(space.families),
            "search.max_concurrent_trials": concurrent,
            "asha.grace_period": space.grace_period,
            "asha.reduction_factor": space.reduction_factor,
            "asha.max_t": max_t,
        }
        parent_id = tracker.start(params, space.path)
    print(
        f"[tune] search '{name}': parent run {parent_id}, {space.num_samples} samples, "
        f"{concurrent} at a time ({cfg.scaling.num_workers} x {cpus_per_worker} CPU each), "
        f"ASHA max_t={max_t} epochs, storage {experiment_path}",
        flush=True,
    )

    setup = TrialSetup(
        base=trial_cfg.to_dict(),
        steps=space.steps,
        reporting=space.reporting_steps(),
        train_uri=data.train,
        val_uri=data.val,
        num_classes=data.num_classes,
        num_train=data.num_train,
        val_limit=space.val_limit,
        train_storage=storage.join(args.storage, f"{name}.trials"),
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_DRIVER_CPU})
    keep_credentials_out_of_trial_runtime_envs()
    started = time.monotonic()
    try:
        if args.resume and restorable:
            print(f"[tune] resuming from {experiment_path}", flush=True)
            tuner = tune.Tuner.restore(
                experiment_path,
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=True,
                storage_filesystem=tune_fs,
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space.param_space(),
                tune_config=tune.TuneConfig(
                    metric=space.metric,
                    mode=space.mode,
                    num_samples=space.num_samples,
                    # The limit goes to the generator: Tune ignores max_concurrent_trials beside one.
                    search_alg=BasicVariantGenerator(random_state=space.seed, max_concurrent=concurrent),
                    scheduler=ASHAScheduler(
                        time_attr="trial_epoch",
                        max_t=max_t,
                        grace_period=space.grace_period,
                        reduction_factor=space.reduction_factor,
                        # A trial at max_t ends by itself: stopping it there would kill its Train run
                        # mid-shutdown, leaving the worker group's placement group to Ray's cleaner.
                        stop_last_trials=False,
                    ),
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage_path,
                    storage_filesystem=tune_fs,
                    verbose=1,
                    callbacks=[
                        mlflow_callback(
                            tracking_uri, tracker.experiment_id, parent_id, name, trial_cfg.to_dict(), max_t
                        )
                    ],
                ),
            )
        results = tuner.fit()
        summary = finish_search(args, tracker, parent_id, results, max_t)
    except BaseException as exc:
        tracker.client.set_tag(parent_id, "eqface.error", f"{type(exc).__name__}: {exc}"[:5000])
        tracker.client.set_terminated(
            parent_id, "FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED"
        )
        raise
    summary.update(
        wall_s=time.monotonic() - started,
        tracking_uri=tracking_uri,
        experiment_id=tracker.experiment_id,
        parent_run_id=parent_id,
    )
    return summary


def finish_search(
    args: SearchArgs, tracker: SearchTracker, parent_id: str, results, max_t: int
) -> dict[str, Any]:
    space = args.space
    errors = len(results.errors)
    no_best = RuntimeError(
        f"no trial reported a finite {space.metric} ({errors} of {len(results)} trials failed; a NaN "
        f"erc_auc_fmr1e-3 / val_tar_far1e-3 means the held-out set has too few impostor pairs for that FMR)"
    )
    try:
        best = results.get_best_result(
            metric=space.metric, mode=space.mode, scope="last", filter_nan_and_inf=True
        )
    except RuntimeError:
        raise no_best from None
    if best.metrics is None or space.metric not in best.metrics:
        raise no_best
    overrides = trial_overrides(best.config)
    value = float(best.metrics[space.metric])
    best_trial = best.metrics.get("trial_id", "?")
    family, form = family_and_form(best.config)
    text = override_yaml(
        overrides,
        comment=(
            f"Best of Ray Tune search '{args.name}' (trial {best_trial}, {family}, {form}): "
            f"{space.metric}={value:.4f} after {int(best.metrics.get('trial_epoch', 0))} epochs.\n"
            f"Use: python flows/eqface.py --config configs/default.yaml --config best.yaml"
        ),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    best_path = args.out / "best.yaml"
    best_path.write_text(text)
    load_config([*args.files, best_path], args.overrides)  # the flow must accept it as is
    tracker.client.log_artifact(parent_id, str(best_path), "best")
    tracker.client.log_metric(parent_id, f"best_{space.metric}", value)
    early = sum(1 for r in results if r.metrics and int(r.metrics.get("trial_epoch", max_t)) < max_t)
    tags = {
        "eqface.best_trial": str(best_trial),
        "eqface.best_config": str(best_path),
        "eqface.trials": str(len(results)),
        "eqface.trials_early_stopped": str(early),
        "eqface.trials_failed": str(errors),
    }
    for key, tag in tags.items():
        tracker.client.set_tag(parent_id, key, tag)
    tracker.client.set_terminated(parent_id, "FINISHED")
    return {
        "best_path": str(best_path),
        "best_value": value,
        "best_trial": best_trial,
        "trials": len(results),
        "early_stopped": early,
        "failed": errors,
        "overrides": overrides,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        summary = run_search(args)
    except (ConfigError, ConnectionError, FileNotFoundError) as exc:
        print(f"tune_margins: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one clear line at the end, the traceback above it
        import traceback

        traceback.print_exc()
        print(f"tune_margins: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    ui = summary["tracking_uri"]
    print(
        f"\n[tune] search '{args.name}' finished in {summary['wall_s']:.0f} s: {summary['trials']} trials, "
        f"{summary['early_stopped']} stopped early by ASHA, {summary['failed']} failed"
    )
    print(
        f"[tune]   best trial:   {summary['best_trial']} {args.space.metric}={summary['best_value']:.4f} "
        + " ".join(f"{k}={v}" for k, v in summary["overrides"].items())
    )
    run_url = f"{ui}/#/experiments/{summary['experiment_id']}/runs/{summary['parent_run_id']}"
    print(f"[tune]   MLflow UI:    {run_url}")
    print(f"[tune]   best config:  {summary['best_path']}", flush=True)
    return 0


if __name__ == "__main__":
    # Run through the package module: Tune pickles `flows.tune_margins.*` by reference, not `__main__`.
    from flows.tune_margins import main as package_main

    sys.exit(package_main())
