"""Checks of a flow against its data and its Ray cluster, made before anything is trained or written,
and the report of the rows a step skipped with data.skip_corrupt.

Config validation (flows/config.py) sees one config; these see what it meets: a dataset with too few
images or classes for the scaling chosen, or a cluster that can never host the workers (use_gpu without
GPUs, more CPUs than there are). Ray Train would wait for such resources forever; here it is one line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import ray

from flows.config import Config, ConfigError
from flows.steps import training_plan
from infra.ray_private import RayPrivateApiError, max_resources_from_cluster_config

# map_batches tasks ask for 1 CPU each: the training workers must leave at least that much for decoding.
RAY_DATA_CPUS = 1.0


def check_data_fits(cfg: Config, num_classes: int, num_train: int | Callable[[str], int]) -> None:
    """The scaling against the training set: every worker gets a full batch per epoch of every step (of the
    part of the set its kind reads: `num_train` may be `Datasets.size`), and a sharded head at least one class
    per worker."""
    n = cfg.scaling.num_workers
    if cfg.model.head == "sharded" and n > num_classes:
        raise ConfigError(f"model.head: sharded over scaling.num_workers={n} needs at least {n} classes; the "
                          f"training set has {num_classes} (use fewer workers or model.head: full)")
    size = num_train if callable(num_train) else (lambda part: num_train)
    for kind in sorted({step.kind for step in training_plan(cfg.flow.loops)}):
        batch, images = kind.settings(cfg).batch_size, size(kind.reads)
        if batch * n > images:
            part = "" if images == size("all") else f" of its {kind.reads} part (data.quality_holdout)"
            raise ConfigError(f"{kind.section}.batch_size: {batch} per worker x {n} workers = {batch * n} images per "
                              f"step, more than the {images} training images{part} (an epoch would have no full "
                              f"batch)")


def check_cluster(cfg: Config) -> None:
    """After ray.init(): the cluster has (or its autoscaler can add) the workers' CPUs/GPUs plus a CPU for
    Ray Data. Without this, Ray Train retries placing the workers forever on a cluster that lacks them."""
    try:
        ceiling = max_resources_from_cluster_config()
    except RayPrivateApiError as gone:  # said, not silent: the flow still runs, Ray Train places the workers
        print(f"[preflight] warning: the cluster resource check is skipped: {gone}", file=sys.stderr, flush=True)
        return
    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    check_resources(cfg, dict(ray.cluster_resources()), ceiling, nodes)


def check_resources(cfg: Config, have: dict[str, float], ceiling: dict[str, float] | None,
                    nodes: list[dict[str, float]] | None = None) -> None:
    """ConfigError unless `have` (the cluster now), grown to `ceiling` (an autoscaler's limit), hosts the
    workers and one Ray Data task; on a fixed cluster (no ceiling) the `nodes` must also host them node by
    node, since a task cannot take half a CPU from each of two nodes."""
    have = dict(have)
    for key, value in (ceiling or {}).items():
        have[key] = max(have.get(key, 0.0), float(value))
    grow = " (and no autoscaler can add more)" if ceiling is None else " at most, autoscaling included"
    n, cpus = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    gpus = have.get("GPU", 0.0)
    if cfg.scaling.use_gpu and n > gpus:
        fix = "scaling.use_gpu=false" + (f" or scaling.num_workers<={int(gpus)}" if gpus >= 1 else "")
        raise ConfigError(f"scaling.use_gpu: {n} workers need {n} GPUs (1 each) but the Ray cluster has "
                          f"{gpus:g}{grow}; set {fix}")
    need = n * cpus + RAY_DATA_CPUS
    if need > have.get("CPU", 0.0) + 1e-9:
        raise ConfigError(f"scaling: {n} workers x {cpus:g} CPU + {RAY_DATA_CPUS:g} CPU for Ray Data decoding = "
                          f"{need:g} CPUs, but the Ray cluster has {have.get('CPU', 0.0):g}{grow}; lower "
                          f"scaling.num_workers or scaling.cpus_per_worker")
    if ceiling is None and nodes:
        check_nodes(cfg, nodes)


def check_nodes(cfg: Config, nodes: list[dict[str, float]]) -> None:
    """The workers placed node by node the way Ray places their placement group, then a whole CPU left on
    some node for a decode task."""
    n, cpus, gpu = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu
    free = sorted(([node.get("CPU", 0.0), node.get("GPU", 0.0)] for node in nodes), key=lambda r: -r[0])
    placed = _place(cfg.scaling.placement_strategy, free, n, cpus, 1.0 if gpu else 0.0)
    shape = "nodes of " + ", ".join(f"{node.get('CPU', 0.0):g}" for node in nodes) + " CPUs"
    if placed < n:
        raise ConfigError(f"scaling: only {placed} of {n} workers x {cpus:g} CPU{' + 1 GPU' if gpu else ''} fit "
                          f"on the Ray cluster's {shape} (a worker cannot span nodes); lower "
                          f"scaling.num_workers or scaling.cpus_per_worker")
    if max(r[0] for r in free) + 1e-9 < RAY_DATA_CPUS:
        raise ConfigError(f"scaling: {n} workers x {cpus:g} CPU placed {cfg.scaling.placement_strategy} on the Ray "
                          f"cluster's {shape} leave no node a whole CPU for Ray Data decoding (a task cannot "
                          f"span nodes); lower scaling.cpus_per_worker or change scaling.placement_strategy")


def _place(strategy: str, free: list[list[float]], n: int, cpus: float, gpus: float) -> int:
    """How many of n bundles (cpus, gpus) fit, taken from `free` ([cpu, gpu] per node, largest first):
    PACK fills the largest nodes first, SPREAD deals one per node in turn, the STRICT forms keep to one
    node / one bundle per node."""
    def take(r: list[float]) -> bool:
        if r[0] + 1e-9 < cpus or r[1] + 1e-9 < gpus:
            return False
        r[0], r[1] = r[0] - cpus, r[1] - gpus
        return True

    if strategy == "STRICT_PACK":
        home = next((r for r in free if r[0] + 1e-9 >= n * cpus and r[1] + 1e-9 >= n * gpus), None)
        return sum(take(home) for _ in range(n)) if home is not None else 0
    if strategy == "STRICT_SPREAD":
        return sum(take(r) for r in free[:n]) if len(free) >= n else 0
    placed = 0
    while placed < n:
        if strategy == "SPREAD":
            took = sum(take(r) for r in free[: n - placed])
        else:
            took = int(any(take(r) for r in free))
        if not took:
            break
        placed += took
    return placed


def report_skipped_rows(tally, step_name: str, run_id: str, tracking_uri: str) -> list[str]:
    """How many rows a step skipped (data.skip_corrupt=true): a line in the driver's log, and the metric
    `corrupt_images_skipped` (0 included) plus the first rows as a tag on the step's MLflow run."""
    rows: list[str] = ray.get(tally.skipped.remote())
    ray.kill(tally)
    if rows:
        print(f"[eqface] {step_name}: skipped {len(rows)} corrupt or wrong-size images (data.skip_corrupt=true), "
              f"first: {rows[0]}", flush=True)
    if run_id:
        try:
            from mlflow.tracking import MlflowClient  # only for a tracked step: the GPU host has no MLflow

            client = MlflowClient(tracking_uri)
            client.log_metric(run_id, "corrupt_images_skipped", len(rows))
            if rows:
                client.set_tag(run_id, "eqface.skipped_rows", "\n".join(rows[:20])[:5000])
        except Exception as exc:  # noqa: BLE001 - the count is in the log above; training is not undone for it
            print(f"[eqface] {step_name}: could not log the skipped-row count to MLflow ({exc})", flush=True)
    return rows
