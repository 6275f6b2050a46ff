"""Real-face quality targets: the real-faces flow over several seeds, and the held-out figures against each target.

    python -m benchmarks.realfaces_quality [--seeds 0 1 2] [--data DIR] [--work DIR] [key.sub=value ...]
    python -m benchmarks.realfaces_quality --tracking-uri URI --flows NAME [NAME ...]     # report flows that ran

Builds the real-faces datasets (flows.realfaces) if --data lacks them, starts its own Ray head and MLflow
server (infra.stack), and submits `flows/eqface.py --config configs/default.yaml --config configs/realfaces.yaml`
once per seed (flow.seed), as a user does (`ray job submit`). Then it reads each flow's step runs from MLflow
and prints, after the first step 2 and after the final one, per seed and as mean ± std over the seeds:

  Yale B (held-out people)    Spearman(quality, light angle)                          target <= -0.3
  Yale B (held-out people)    TAR at FAR 1e-3 of the step's backbone                  (how strong a recogniser)
  degraded held-out faces     Spearman(quality, severity) overall / per kind          target <= -0.5 / each < 0
                              ... within each clean photo (averaged)
  LFW held-out pairs          EDC pAUC [0, 0.2] at FMR 1e-3: EQFace, random, sharpness, feature norm, SER-FIQ
                                                            target: below random and sharpness, <= norm
  held-out quality spread     std on Yale B and on LFW                                target >= 0.05
  wall time of the flow                                                               target <= 30 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.degrade import DEGRADATION_KINDS  # noqa: E402
from flows import realfaces  # noqa: E402
from infra.stack import Stack  # noqa: E402

METHODS = ("", "_random", "_sharpness", "_norm", "_serfiq")
TARGET_WALL_S = 30 * 60


def figures(metrics: dict[str, float]) -> dict[str, float]:
    """The target figures of one quality step's held-out metrics."""
    out = {"yaleb_spearman": metrics.get("quality_spearman", math.nan),
           "degraded_spearman": metrics.get("degraded/quality_spearman", math.nan),
           "degraded_spearman_within_photo": metrics.get("degraded/quality_spearman_within_photo", math.nan),
           "yaleb_tar_far1e-3": metrics.get("val_tar_far1e-3", math.nan),
           "yaleb_quality_std": metrics.get("val_quality_std", math.nan),
           "lfw_quality_std": metrics.get("lfw/quality_std", math.nan)}
    for kind in DEGRADATION_KINDS:
        out[f"degraded_spearman_{kind}"] = metrics.get(f"degraded/quality_spearman_{kind}", math.nan)
    for method in METHODS:
        name = method.lstrip("_") or "eqface"
        out[f"lfw_pauc20_fmr1e-3_{name}"] = metrics.get(f"lfw/edc_pauc20_fmr1e-3{method}", math.nan)
        out[f"lfw_pauc20_fmr1e-2_{name}"] = metrics.get(f"lfw/edc_pauc20_fmr1e-2{method}", math.nan)
    return out


def flow_figures(client: MlflowClient, experiment: str, flow: str) -> dict[str, dict[str, float]]:
    """{"first step 2": figures, "final step 2": figures} of a flow's step runs."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`eqface.flow` = '{flow}' and tags.`eqface.role` = 'step' "
                              "and tags.`eqface.step` = '2'")
    runs = sorted(runs, key=lambda r: int(r.data.tags["eqface.step_index"]))
    if not runs:
        raise SystemExit(f"realfaces_quality: no step-2 runs of flow {flow!r} in experiment {experiment!r}")
    return {"first step 2": figures(runs[0].data.metrics), "final step 2": figures(runs[-1].data.metrics)}


def verdicts(f: dict[str, float]) -> dict[str, bool]:
    kinds_negative = all(f[f"degraded_spearman_{kind}"] < 0 for kind in DEGRADATION_KINDS)
    eq = f["lfw_pauc20_fmr1e-3_eqface"]
    return {
        "Yale B Spearman <= -0.3": f["yaleb_spearman"] <= -0.3,
        "degraded Spearman <= -0.5": f["degraded_spearman"] <= -0.5,
        "degraded Spearman < 0 for each kind": kinds_negative,
        "LFW EDC pAUC@1e-3 below random and sharpness": eq < f["lfw_pauc20_fmr1e-3_random"]
        and eq < f["lfw_pauc20_fmr1e-3_sharpness"],
        "LFW EDC pAUC@1e-3 no worse than feature norm": eq <= f["lfw_pauc20_fmr1e-3_norm"],
        "held-out quality std >= 0.05": min(f["yaleb_quality_std"], f["lfw_quality_std"]) >= 0.05,
    }


def print_report(results: dict[str, dict], walls: dict[str, float]) -> None:
    names = list(results)
    for when in ("first step 2", "final step 2"):
        per_flow = [results[n][when] for n in names]
        print(f"\n{when}: " + ", ".join(names))
        print(f"  {'figure':<34}" + "".join(f"{n[-10:]:>11}" for n in names) + f"{'mean ± std':>18}")
        for key in per_flow[0]:
            values = np.array([f[key] for f in per_flow], dtype=float)
            print(f"  {key:<34}" + "".join(f"{v:>11.3f}" for v in values)
                  + f"{np.nanmean(values):>11.3f} ± {np.nanstd(values):.3f}")
        mean = {key: float(np.nanmean([f[key] for f in per_flow])) for key in per_flow[0]}
        print("  targets (on the mean over seeds; per seed: met in k of n):")
        for target, ok in verdicts(mean).items():
            k = sum(verdicts(f)[target] for f in per_flow)
            print(f"    {'met' if ok else 'NOT met':<8} {target}   ({k} of {len(per_flow)} seeds)")
    if walls:
        w = np.array(list(walls.values()))
        print("\nflow wall time: " + ", ".join(f"{v:.0f} s" for v in w) + f"; mean {w.mean():.0f} s "
              f"({'met' if w.max() <= TARGET_WALL_S else 'NOT met'}: <= {TARGET_WALL_S} s)")


def run_flows(args, data: Path) -> tuple[str, dict[str, float]]:
    """Submit one flow per seed to a stack of our own; (tracking URI, wall seconds by flow name)."""
    stack = Stack.load(args.work / "stack")
    walls = {}
    stack.start_mlflow()
    stack.start_ray(num_cpus=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(stack.env())
    job_env = {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
               "RAY_ADDRESS": f"127.0.0.1:{stack.services['ray'].info['gcs_port']}"}
    for seed in args.seeds:
        name = f"{args.prefix}-s{seed}"
        overrides = [f"flow.name={name}", f"flow.seed={seed}", f"flow.storage={args.work / 'runs'}",
                     f"data.train={data / 'train'}", f"data.val={data / 'val'}",
                     f"data.eval_sets.lfw={data / 'lfw'}", f"data.eval_sets.degraded={data / 'degraded'}",
                     *args.overrides]
        started = time.monotonic()
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"],
             "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": job_env}), "--",
             "python", "flows/eqface.py", "--config", "configs/default.yaml", "--config", "configs/realfaces.yaml",
             *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
        walls[name] = time.monotonic() - started
        print(f"[realfaces] {name}: exit {proc.returncode} in {walls[name]:.0f} s", flush=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:] + proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(1)
    return env["MLFLOW_TRACKING_URI"], walls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.realfaces_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", type=Path, default=Path(os.path.expanduser(realfaces.DEFAULT_OUT)))
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "eqface" / "realfaces_quality")
    parser.add_argument("--prefix", default="realfaces-bench", help="flow names: PREFIX-s<seed>")
    parser.add_argument("--tracking-uri", default=None, help="with --flows: the MLflow server they tracked into")
    parser.add_argument("--flows", nargs="+", default=None, help="report these flows instead of running new ones")
    parser.add_argument("--experiment", default="eqface")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("overrides", nargs="*", help="more key.sub=value overrides of the flow")
    args = parser.parse_args(argv)
    if args.flows:
        report(args, args.tracking_uri or os.environ["MLFLOW_TRACKING_URI"], args.flows, {})
        return 0
    if not (args.data / "degraded" / "manifest.json").exists() and realfaces.main(["--out", str(args.data)]):
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        uri, walls = run_flows(args, args.data)
        report(args, uri, list(walls), walls)  # while the stack's MLflow server still runs
    finally:
        Stack.load(args.work / "stack").stop_all()
    return 0


def report(args, uri: str, names: list[str], walls: dict[str, float]) -> None:
    client = MlflowClient(uri)
    results = {name: flow_figures(client, args.experiment, name) for name in names}
    print_report(results, walls)
    if args.json:
        args.json.write_text(json.dumps({"figures": results, "wall_s": walls}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
