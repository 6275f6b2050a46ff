"""The margin search: space checks (fast), then a real 4-trial Tune search through `ray job submit`.

The integration search runs configs/tune_tiny.yaml on 2 CPUs against the real MLflow server and Ray
head of the `stack` fixture, and checks the trials, ASHA's early stop, the MLflow run tree and the
best-config file that `flows/eqface.py` must accept as is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.config import ConfigError, load_config
from flows.margin_search.space import (
    SpaceError,
    check_space,
    load_space,
    override_yaml,
    planned_samples,
    trial_overrides,
)
from flows.margin_search.trial import plan_trials
from tests.conftest import ROOT

DEFAULT = ROOT / "configs" / "default.yaml"
TINY = ROOT / "configs" / "tiny.yaml"
TINY_SPACE = ROOT / "configs" / "tune_tiny.yaml"
# The tiny search's data and training: configs/tiny.yaml with more images per identity and smaller batches,
# so one epoch is 48 SGD steps and the lr=0.03 trials beat their lr=1e-6 twins at ASHA's rung.
TINY_OVERRIDES = ["scaling.num_workers=1", "data.synthetic.train_per_identity=32",
                  "data.synthetic.val_per_identity=10", "step1.batch_size=8", "step1.warmup_epochs=0",
                  "step1.epochs=2"]


def write_space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def check(tmp_path: Path, text: str) -> None:
    check_space(load_space(write_space(tmp_path, text)), [DEFAULT], ["step1.epochs=4"])


# ---------------------------------------------------------------------------------------------
# Space checks: one line naming the file and key, before any service is touched


@pytest.mark.parametrize("text, message", [
    ("", "the search space is empty"),
    ("families: {}\n", "families: needs at least one of"),
    ("families: {arcface: {}}\n", "families.arcface: the family has no parameters (give m2)"),
    ("families: {cosface: null}\n", "families.cosface: the family has no parameters (give m3)"),
    ("families: {arcface: {m2: {uniform: [0.6, 0.2]}}}\n",
     "families.arcface.m2: uniform range is empty: low 0.6 > high 0.2"),
    ("families: {arcface: {m2: {uniform: [0.3, 0.3]}}}\n", "has no width; give the constant 0.3 instead"),
    ("families: {arcface: {m3: 0.2}}\n", "families.arcface.m3: arcface varies only m2; use the combined"),
    ("families: {softmax: {m2: 0.2}}\n", "families.softmax: unknown family (valid: arcface, cosface"),
    ("families: {arcface: {m2: {normal: [0.3, 0.1]}}}\n", "arcface.m2: unknown distribution 'normal'"),
    ("families: {arcface: {m2: {grid: [0.3, 0.4]}}}\n", "grid is not supported inside a family"),
    ("families: {arcface: {m2: 0.3}}\nlearning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("families: {arcface: {m2: 0.3}}\nforms: [outside, inside]\n", "forms: unknown margin form 'inside'"),
    ("families: {arcface: {m2: 0.3}}\nforms: []\n", "forms: expected a non-empty list"),
    ("families: {arcface: {m2: 0.3}}\nmetric: val_acc\nmode: min\n", "mode: val_acc improves towards max"),
    ("families: {arcface: {m2: 0.3}}\nmetric: erc_auc_fmr1e-3\n", "by step 2 only; set steps: [1, 2]"),
    ("families: {arcface: {m2: 0.3}}\nquality_lr: 0.01\n", "quality_lr: searched but step 2 never runs"),
    ("families: {arcface: {m2: 0.3}}\nsteps: [2]\n", "steps: must be [1] or [1, 2]"),
    ("families: {arcface: {m2: 0.3}}\nnum_samples: 0\n", "num_samples: must be an integer >= 1"),
    ("families: {arcface: {m2: 0.3}}\nasha: {reduction_factor: 1}\n", "must be a number > 1"),
    ("families: {arcface: {m2: 0.3}}\nlr: {loguniform: [0, 0.1]}\n", "loguniform needs low > 0"),
])
def test_malformed_space(tmp_path, text, message):
    with pytest.raises(SpaceError) as err:
        check(tmp_path, text)
    assert message in str(err.value)
    assert str(err.value).startswith(str(tmp_path / "space.yaml"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    # m2 must stay below pi/2: a range that reaches it is refused, not clipped.
    ("families: {arcface: {m2: {uniform: [0.2, 1.6]}}}\n",
     "families.arcface.m2: uniform [0.2, 1.6] reaches 1.6, but loss.m2: must be in [0, pi/2), got 1.6"),
    ("families: {sphereface: {m1: {uniform: [0.0, 1.5]}}}\n",
     "families.sphereface.m1: uniform [0.0, 1.5] reaches 0.0, but loss.m1: must be > 0, got 0.0"),
    ("families: {cosface: {m3: {uniform: [-0.1, 0.2]}}}\n",
     "families.cosface.m3: uniform [-0.1, 0.2] reaches -0.1, but loss.m3: must be in [0, 1), got -0.1"),
    ("families: {combined: {m1: 1.0, m3: {choice: [0.2, 1.0]}}}\n", "loss.m3: must be in [0, 1), got 1.0"),
    ("families: {arcface: {m2: 0.3}}\nscale: {choice: [32, 0]}\n",
     "scale: choice [32.0, 0.0] reaches 0.0, but loss.scale: must be > 0, got 0.0"),
    ("families: {arcface: {m2: 0.3}}\nlr: {grid: [0.1, -0.1]}\n", "step1.lr: must be > 0, got -0.1"),
    ("families: {arcface: {m2: 0.3}}\nasha: {grace_period: 4}\n",
     "asha.grace_period: 4 must be below the 4 epochs a "
     "trial trains (steps [1])"),
])
def test_space_out_of_range_for_the_config(tmp_path, text, message):
    with pytest.raises(SpaceError) as err:
        check(tmp_path, text)
    assert message in str(err.value)


def test_shipped_spaces_pass_and_sample_only_their_family_margins():
    from ray.tune.search.variant_generator import generate_variants

    for path in (ROOT / "configs" / "tune_margins.yaml", TINY_SPACE):
        check_space(load_space(path), [DEFAULT, TINY], TINY_OVERRIDES)
    space = load_space(ROOT / "configs" / "tune_margins.yaml")
    assert set(space.families) == {"arcface", "cosface", "combined"} and space.metric == "val_acc"
    rng = np.random.RandomState(0)
    samples = [cfg for _ in range(40) for _, cfg in generate_variants(space.param_space(), random_state=rng)]
    assert {s["margins"]["family"] for s in samples} == {"arcface", "cosface", "combined"}
    assert {s["form"] for s in samples} == {"outside", "angular"}
    for sample in samples:
        margins, family = sample["margins"], sample["margins"]["family"]
        if family == "arcface":
            assert margins["m1"] == 1.0 and 0.2 <= margins["m2"] <= 0.6 and margins["m3"] == 0.0
        elif family == "cosface":
            assert margins["m1"] == 1.0 and margins["m2"] == 0.0 and 0.1 <= margins["m3"] <= 0.45
        else:
            assert 0.9 <= margins["m1"] <= 1.0 and 0.1 <= margins["m2"] <= 0.5 and 0.0 <= margins["m3"] <= 0.2
        assert sample["scale"] in (32, 64) and 0.02 <= sample["lr"] <= 0.2
    # The tiny space pairs each sample with a hopeless twin, in the order the test relies on.
    assert [s["lr"] for s in planned_samples(load_space(TINY_SPACE))] == [0.03, 1e-6, 0.03, 1e-6]


def test_best_config_yaml_is_a_flow_override(tmp_path):
    sample = {"margins": {"family": "cosface", "m1": 1.0, "m2": 0.0, "m3": np.float64(0.35)},
              "form": "outside", "scale": 64, "lr": 1e-6, "quality_lr": 0.01}
    overrides = trial_overrides(sample)
    assert overrides == {"loss.m1": 1.0, "loss.m2": 0.0, "loss.m3": 0.35, "loss.form": "outside",
                         "loss.scale": 64.0, "step1.lr": 1e-6, "step2.lr": 0.01}
    path = tmp_path / "best.yaml"
    path.write_text(override_yaml(overrides, comment="best of a test"))
    assert yaml.safe_load(path.read_text()) == {
        "loss": {"m1": 1.0, "m2": 0.0, "m3": 0.35, "form": "outside", "scale": 64.0}, "step1": {"lr": 1e-6},
        "step2": {"lr": 0.01}}
    cfg = load_config([DEFAULT, path])
    assert (cfg.loss.m3, cfg.loss.scale, cfg.loss.m2) == (0.35, 64.0, 0.0)
    assert (cfg.step1.lr, cfg.step2.lr) == (1e-6, 0.01)


def test_plan_trials_leaves_a_cpu_for_ray_data():
    cfg = load_config([DEFAULT], ["scaling.num_workers=1"])
    assert plan_trials({"CPU": 2.0}, cfg) == (2, 0.49)
    assert plan_trials({"CPU": 2.0}, cfg, cap=1) == (1, 0.5)
    assert plan_trials({"CPU": 2.0}, load_config([DEFAULT])) == (1, 0.49)  # 2 workers x 0.5
    big = load_config([DEFAULT], ["scaling.cpus_per_worker=2"])
    assert plan_trials({"CPU": 16.0}, big) == (3, 2.0)
    gpu = load_config([DEFAULT], ["scaling.use_gpu=true", "scaling.cpus_per_worker=1"])
    assert plan_trials({"CPU": 32.0, "GPU": 4.0}, gpu) == (2, 1.0)
    with pytest.raises(ConfigError, match="the Ray cluster has 1 CPUs: too few"):
        plan_trials({"CPU": 1.0}, cfg)


@pytest.mark.integration
def test_bad_space_exits_2_before_anything_starts(tmp_path):
    space = write_space(tmp_path, "families: {arcface: {m2: {uniform: [0.2, 1.6]}}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    proc = subprocess.run(
        [sys.executable, "flows/tune_margins.py", "--space", str(space), "--out", str(tmp_path / "out"),
         "tracking.uri=http://127.0.0.1:9"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tune_margins: error: ")
    assert "m2: must be in [0, pi/2)" in lines[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# A real search


def submit_search(stack, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python flows/tune_margins.py ARGS`, as a user runs it."""
    env = {**os.environ, **stack.env()}
    job_env = {k: v for k, v in stack.env().items() if not k.startswith("RAY_")}
    # Several Ray clusters share this host: Ray Train's detached PlacementGroupCleaner finds its own only
    # through RAY_ADDRESS, and it is what frees the workers of a trial that ASHA stops.
    job_env["RAY_ADDRESS"] = f"127.0.0.1:{stack.services['ray'].info['gcs_port']}"
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit",
        "--address", env["RAY_ADDRESS"], "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps({"env_vars": job_env}),
        "--", "python", "flows/tune_margins.py", *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_a_search_the_cluster_cannot_host_fails_at_once(stack, tmp_path):
    """The flow's preflight: GPUs the cluster lacks are one line and exit 2, not trials waiting forever."""
    from mlflow.tracking import MlflowClient

    name = f"nogpu-{uuid.uuid4().hex[:6]}"
    args = ["--space", "configs/tune_tiny.yaml", "--config", "configs/default.yaml", "--config", "configs/tiny.yaml",
            "--name", name, "--out", str(tmp_path / "out"), "--storage", str(tmp_path / "storage"),
            f"data.cache_root={tmp_path / 'data'}", *TINY_OVERRIDES, "scaling.use_gpu=true"]
    proc = submit_search(stack, args, timeout=300)
    assert proc.returncode != 0
    assert ("tune_margins: error: scaling.use_gpu: 1 workers need 1 GPUs (1 each) but the Ray cluster has 0"
            in proc.stdout + proc.stderr), proc.stdout[-3000:] + proc.stderr[-2000:]
    client = MlflowClient(stack.env()["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("eqface")
    assert experiment is None or not client.search_runs([experiment.experiment_id],
                                                        f"tags.`eqface.search` = '{name}'")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def search(stack, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    work = tmp_path_factory.mktemp("tune")
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    args = ["--space", "configs/tune_tiny.yaml", "--config", "configs/default.yaml",
            "--config", "configs/tiny.yaml", "--name", name, "--out", str(work / "out"),
            "--storage", str(work / "storage"),
            f"data.cache_root={work / 'data'}", *TINY_OVERRIDES]
    started = time.monotonic()
    proc = submit_search(stack, args)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    print(f"\n[test_tune_margins] tiny search wall time: {wall:.0f} s")
    client = MlflowClient(stack.env()["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("eqface")
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`eqface.role` = 'tune' and tags.`eqface.search` = '{name}'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["attributes.run_name ASC"])
    return {"client": client, "parent": parent, "children": children, "stdout": proc.stdout, "work": work,
            "name": name, "args": args, "stack": stack}


@pytest.mark.integration
def test_one_child_run_per_trial_with_its_margins_and_curve(search):
    client, parent, children = search["client"], search["parent"], search["children"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["eqface.trials"] == "4" and parent.data.tags["eqface.trials_failed"] == "0"
    assert len(children) == 4
    lrs = []
    for child in children:
        params, tags = child.data.params, child.data.tags
        family, form = tags["eqface.family"], tags["eqface.form"]
        trial_id = re.escape(tags["eqface.trial_id"])
        assert re.fullmatch(rf"trial-{trial_id}-{family}-{form}", child.info.run_name)
        assert child.info.status == "FINISHED"
        assert params["tune.family"] == family and params["loss.form"] == form
        m1, m2, m3 = (float(params[f"loss.{k}"]) for k in ("m1", "m2", "m3"))
        if family == "arcface":
            assert m1 == 1.0 and 0.3 <= m2 <= 0.5 and m3 == 0.0
        else:
            assert m1 == 1.0 and m2 == 0.0 and 0.2 <= m3 <= 0.35
        assert float(params["loss.scale"]) in (16.0, 32.0)
        assert params["model.width_mult"] == "0.25" and params["scaling.num_workers"] == "1"  # base config
        lrs.append(float(params["step1.lr"]))
        curve = client.get_metric_history(child.info.run_id, "val_acc")
        last = int(tags["eqface.last_epoch"])
        assert [m.step for m in sorted(curve, key=lambda m: m.step)] == list(range(1, last + 1))
        assert all(0.0 <= m.value <= 1.0 for m in curve)
        assert len(client.get_metric_history(child.info.run_id, "loss")) == last
    assert sorted(lrs) == [1e-6, 1e-6, 0.03, 0.03]
    # Trial i ran exactly the i-th config the preflight drew and checked.
    planned = planned_samples(load_space(TINY_SPACE))
    for child in children:
        sample = planned[int(child.data.tags["eqface.trial_id"].rsplit("_", 1)[1])]
        ran = {key: child.data.params[key] for key in trial_overrides(sample)}
        assert ran == {key: str(value) for key, value in trial_overrides(sample).items()}
        assert child.data.tags["eqface.family"] == sample["margins"]["family"]


@pytest.mark.integration
def test_asha_stops_a_trial_at_the_grace_period(search):
    children = search["children"]
    stopped = [c for c in children if c.data.tags["eqface.early_stopped"] == "true"]
    finished = [c for c in children if c.data.tags["eqface.early_stopped"] == "false"]
    assert len(stopped) >= 1 and len(stopped) + len(finished) == 4
    assert all(c.data.tags["eqface.last_epoch"] == "1" for c in stopped)  # asha.grace_period
    assert all(c.data.tags["eqface.last_epoch"] == "2" for c in finished)  # max_t = step1.epochs
    assert search["parent"].data.tags["eqface.trials_early_stopped"] == str(len(stopped))


@pytest.mark.integration
def test_best_config_is_written_logged_and_accepted_by_the_flow(search):
    from flows.eqface import parse_args as flow_args

    client, parent, children = search["client"], search["parent"], search["children"]
    best = search["work"] / "out" / "best.yaml"
    assert best.is_file()
    assert f"best config:  {best}" in search["stdout"]
    tree = yaml.safe_load(best.read_text())
    assert set(tree) == {"loss", "step1"} and set(tree["loss"]) == {"m1", "m2", "m3", "scale", "form"}
    cfg = load_config([DEFAULT, best])
    assert cfg.loss.form == tree["loss"]["form"] and cfg.step1.lr == tree["step1"]["lr"]
    flow_cfg = flow_args(["--config", str(DEFAULT), "--config", str(TINY), "--config", str(best)])
    assert flow_cfg.loss == cfg.loss and flow_cfg.step1.lr == cfg.step1.lr
    # The best trial is the child with the highest last val_acc, and the file holds its margins.
    winner = max(children, key=lambda c: c.data.metrics["val_acc"])
    assert parent.data.metrics["best_val_acc"] == pytest.approx(winner.data.metrics["val_acc"])
    assert parent.data.tags["eqface.best_trial"] == winner.data.tags["eqface.trial_id"]
    for key in ("m1", "m2", "m3", "scale"):
        assert getattr(cfg.loss, key) == pytest.approx(float(winner.data.params[f"loss.{key}"]))
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "best")] == ["best/best.yaml"]


@pytest.mark.integration
def test_a_finished_search_is_not_silently_rerun(search):
    # The same command again, without --resume: refused before Ray is touched (so no job submission needed).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["MLFLOW_TRACKING_URI"] = search["stack"].env()["MLFLOW_TRACKING_URI"]
    proc = subprocess.run([sys.executable, "flows/tune_margins.py", *search["args"]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    storage = search["work"] / "storage" / search["name"]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tune_margins: error: search '{search['name']}' already exists ({storage}); "
        "pass --resume to continue it or choose another --name")
