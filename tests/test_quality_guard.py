"""The collapse guard: a quality step whose held-out quality has (nearly) no spread fails in one line, or warns."""

from __future__ import annotations

import uuid

import pytest
from mlflow.tracking import MlflowClient

from flows.config import load_config
from flows.eqface import DEFAULT_CONFIG, QualityCollapsedError, quality_collapse
from flows.steps import PlannedStep, StepSpec
from flows.tracking import TAG_COLLAPSED, TAG_FLOW
from tests.conftest import ROOT, submit_flow

TINY = ROOT / "configs" / "tiny.yaml"


@pytest.mark.parametrize(("std", "p05", "tripped"), [
    (0.10, 0.50, None),
    (0.01, 0.50, "(std 0.0100 under step2.collapse_std=0.02)"),  # no spread
    # every face near 1: the collapse users of the authors' code report
    (0.05, 0.99, "(5th percentile 0.9900 over step2.collapse_p05=0.98)"),
    (0.01, 0.99, "(std 0.0100 under step2.collapse_std=0.02, 5th percentile 0.9900 over step2.collapse_p05=0.98)"),
    (0.02, 0.98, None),  # the thresholds themselves pass
])
def test_the_guard_reads_the_held_out_spread(std, p05, tripped):
    cfg = load_config([DEFAULT_CONFIG])
    verdict = quality_collapse(cfg, StepSpec(PlannedStep(1, 2, 0), 10), {"val_quality_std": std,
                                                                         "val_quality_p05": p05})
    if tripped is None:
        assert verdict is None
    else:
        assert verdict == (f"step 1 (kind 2, loop 0): the quality collapsed on the held-out set {tripped}: "
                           "every face gets nearly the same quality")
    # Steps that do not learn quality are never judged.
    assert quality_collapse(cfg, StepSpec(PlannedStep(2, 3, 0), 10), {"val_quality_std": std,
                                                                      "val_quality_p05": p05}) is None


def test_the_guard_is_configurable_and_checked():
    with pytest.raises(Exception, match="step2.on_collapse: must be 'fail' or 'warn'"):
        load_config([DEFAULT_CONFIG, TINY], ["step2.on_collapse=ignore"])
    cfg = load_config([DEFAULT_CONFIG, TINY], ["step2.collapse_std=0.5"])
    assert quality_collapse(cfg, StepSpec(PlannedStep(1, 2, 0), 10), {"val_quality_std": 0.2,
                                                                      "val_quality_p05": 0.1})
    assert issubclass(QualityCollapsedError, RuntimeError)


@pytest.mark.integration
def test_a_flow_whose_quality_collapses_fails_in_one_line_then_goes_on_with_warn(stack, tmp_path):
    """step2.lr=200 saturates the quality branch's sigmoid: every held-out face gets the same quality."""
    name = f"collapse-{uuid.uuid4().hex[:6]}"
    args = ["--config", "configs/default.yaml", "--config", "configs/tiny.yaml", f"flow.name={name}",
            f"flow.storage={tmp_path / 'runs'}", f"data.cache_root={tmp_path / 'data'}", "flow.loops=0",
            "step2.lr=200", "step2.epochs=2", "step2.on_collapse=fail"]  # tiny.yaml warns
    failed = submit_flow(stack, args)
    assert failed.returncode != 0
    errors = [line for line in (failed.stdout + failed.stderr).splitlines() if "eqface: error:" in line]
    assert errors and len(set(errors)) == 1, (failed.stdout + failed.stderr)[-3000:]  # one line (Ray echoes it)
    assert errors[0].startswith("eqface: error: step 1 (kind 2, loop 0): the quality collapsed on the held-out "
                                "set ("), errors[0]
    assert errors[0].endswith("(step2.on_collapse=warn lets the flow go on)")
    client = MlflowClient(stack.env()["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("eqface")
    step2 = client.search_runs([experiment.experiment_id], f"tags.`{TAG_FLOW}` = '{name}' and "
                               "tags.`eqface.step` = '2'")[0]
    assert step2.info.status == "FAILED" and "quality collapsed" in step2.data.tags[TAG_COLLAPSED]
    assert step2.data.metrics["val_quality_std"] < 0.02 or step2.data.metrics["val_quality_p05"] > 0.98

    # The way on: the same flow, warned instead of stopped (a resume may change step2.on_collapse).
    warned = submit_flow(stack, [*args, "step2.on_collapse=warn"])
    assert warned.returncode == 0, warned.stdout[-3000:] + warned.stderr[-2000:]
    assert "[eqface] WARNING: step 1 (kind 2, loop 0): the quality collapsed" in warned.stdout
    step2 = client.get_run(step2.info.run_id)
    assert step2.info.status == "FINISHED" and TAG_COLLAPSED in step2.data.tags
