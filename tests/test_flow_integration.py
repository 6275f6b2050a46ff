"""The flow end to end: `ray job submit` against a real Ray head and a real MLflow server.

Tiny config (configs/tiny.yaml), 2 DDP workers. Asserts the MLflow run tree, its metrics and
artifacts, checkpoints that load, the frozen backbone of step 2, the final MLflow model (a registered
pyfunc), and that a re-submit skips every finished step without creating runs.
"""

from __future__ import annotations

import uuid

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows import checkpoints
from flows.config import Config
from flows.tracking import (
    TAG_CHECKPOINT,
    TAG_COMPLETE,
    TAG_FINAL_MODEL,
    TAG_FLOW,
    TAG_KIND,
    TAG_LOOP,
    TAG_REGISTERED_MODEL,
)
from tests.conftest import submit_flow

pytestmark = pytest.mark.integration

EPOCH_METRICS = ("loss", "top1", "lr", "images_per_s")
QUALITY_METRICS = ("quality_mean", "quality_std", "quality_p05", "quality_p50", "quality_p95")


@pytest.fixture(scope="module")
def flow(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("flow")
    name = f"it-{uuid.uuid4().hex[:6]}"
    args = ["--config", "configs/default.yaml", "--config", "configs/tiny.yaml", f"flow.name={name}",
            f"flow.storage={work / 'runs'}", f"data.cache_root={work / 'data'}", "scaling.num_workers=2"]
    first = submit_flow(stack, args)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    client = MlflowClient(stack.env()["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("eqface")
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`{TAG_FLOW}` = '{name}' and tags.`eqface.role` = 'flow'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["tags.`eqface.step_index` ASC"])
    return {"client": client, "parent": parent, "children": children, "args": args, "stdout": first.stdout,
            "experiment": experiment}


def test_run_tree_follows_the_training_plan(flow):
    parent, children = flow["parent"], flow["children"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["loss.m2"] == str(Config().loss.m2) and parent.data.params["flow.loops"] == "1"
    assert [(c.data.tags[TAG_KIND], c.data.tags[TAG_LOOP]) for c in children] == [
        ("1", "0"), ("2", "0"), ("3", "0"), ("2", "1")]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags[TAG_COMPLETE] == "true"
        assert child.data.params == parent.data.params  # the same config object everywhere
    assert f"parent run id:    {parent.info.run_id}" in flow["stdout"]


def test_every_step_logs_the_same_epoch_metrics(flow):
    client = flow["client"]
    epochs = {"1": 2, "2": 1, "3": 1}  # configs/tiny.yaml
    for child in flow["children"]:
        kind = child.data.tags[TAG_KIND]
        for key in EPOCH_METRICS:
            history = client.get_metric_history(child.info.run_id, key)
            assert [m.step for m in history] == list(range(1, epochs[kind] + 1)), (kind, key)
        assert all(m.value > 0 for m in client.get_metric_history(child.info.run_id, "images_per_s"))
        for key in QUALITY_METRICS:
            present = bool(client.get_metric_history(child.info.run_id, key))
            assert present == (kind in ("2", "3")), (kind, key)
        quality = child.data.metrics.get("quality_mean")
        if quality is not None:
            assert 0.0 <= quality <= 1.0
            assert 0.0 <= child.data.metrics["quality_p05"] <= child.data.metrics["quality_p95"] <= 1.0
        assert 0.0 <= child.data.metrics["val_acc"] <= 1.0


def test_quality_steps_log_plots(flow):
    client = flow["client"]
    for child in flow["children"]:
        names = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
        if child.data.tags[TAG_KIND] in ("2", "3"):
            assert {"plots/quality_histogram.png", "plots/erc.png", "plots/quality_extremes.png"} <= names
        else:
            assert not names


def test_checkpoints_load_and_step2_keeps_the_backbone_bit_identical(flow):
    from models.partial_fc import assemble_centres

    states = []
    for child in flow["children"]:
        ckpt = checkpoints.from_uri(child.data.tags[TAG_CHECKPOINT])
        meta = checkpoints.read_meta(ckpt)
        assert meta["kind"] == int(child.data.tags[TAG_KIND]) and meta["epoch"] == meta["epochs"]
        state = checkpoints.load_state(ckpt)
        with ckpt.as_directory() as d:
            state["centres"] = assemble_centres(d)
        assert state["centres"].shape == (12, 32)  # tiny: 12 identities, 32-d
        states.append(state)
        net = checkpoints.load_net(ckpt)
        emb, quality = net(torch.zeros(2, 3, 32, 32))
        assert emb.shape == (2, 32) and quality.shape == (2,)
    step1, step2, step3, final2 = states
    for a, b in ((step1, step2), (step3, final2)):
        assert a["backbone"].keys() == b["backbone"].keys()
        assert all(torch.equal(a["backbone"][k], b["backbone"][k]) for k in a["backbone"])
        assert torch.equal(a["centres"], b["centres"])  # class centres stay fixed in step 2 by default
    assert not all(torch.equal(step2["quality"][k], step1["quality"][k]) for k in step1["quality"])


def test_final_model_is_a_registered_pyfunc_giving_embedding_and_quality(flow):
    import mlflow.pyfunc
    import numpy as np

    from flows.model_registry import ALIAS, TAG_METRIC, TAG_PARENT_RUN

    client, parent = flow["client"], flow["client"].get_run(flow["parent"].info.run_id)
    uri = parent.data.tags[TAG_FINAL_MODEL]
    assert uri.startswith("models:/")
    mlflow.set_tracking_uri(client.tracking_uri)
    out = mlflow.pyfunc.load_model(uri).predict(np.random.default_rng(0).random((3, 3, 32, 32), np.float32) * 2 - 1)
    assert out["embedding"].shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)
    assert out["quality"].shape == (3,) and bool(((out["quality"] >= 0) & (out["quality"] <= 1)).all())
    assert f"final model URI:  {uri}" in flow["stdout"]

    # Registered under tracking.registered_model (default eqface): this flow's version, tagged; the alias
    # names the newest version (other flows of this test session register under the same name).
    registered = parent.data.tags[TAG_REGISTERED_MODEL]
    name, version = registered.removeprefix("models:/").split("/")
    assert name == "eqface"
    mv = client.get_model_version(name, version)
    assert mv.source == uri and mv.run_id == parent.info.run_id
    assert mv.tags[TAG_FLOW] == parent.data.tags[TAG_FLOW] and mv.tags[TAG_PARENT_RUN] == parent.info.run_id
    final_step = flow["children"][-1]
    assert float(mv.tags[f"{TAG_METRIC}val_acc"]) == pytest.approx(final_step.data.metrics["val_acc"], rel=1e-5)
    newest = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    assert client.get_model_version_by_alias(name, ALIAS).version == str(newest)
    # The logged and the registered model are the final step's network, weight for weight, and predict what it
    # computes: the flip-sum embedding, normalised, and the quality of the unflipped image.
    final_net = checkpoints.load_net(checkpoints.from_uri(final_step.data.tags[TAG_CHECKPOINT])).eval()
    expected = final_net.state_dict()
    for loaded in (checkpoints.load_net_from(registered), checkpoints.load_net_from(uri)):
        weights = loaded.state_dict()
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
    x = torch.from_numpy(np.random.default_rng(0).random((3, 3, 32, 32), np.float32) * 2 - 1)
    with torch.no_grad():
        emb, quality = final_net(x)
        flip_sum = torch.nn.functional.normalize(emb + final_net(torch.flip(x, dims=[3]))[0], dim=1)
    np.testing.assert_allclose(out["embedding"], flip_sum.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["quality"], quality.numpy(), atol=1e-6)


def test_resubmit_skips_finished_steps_and_creates_no_runs(flow, stack):
    client, experiment = flow["client"], flow["experiment"]
    before = {r.info.run_id for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    again = submit_flow(stack, flow["args"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("already complete") == 4
    after = {r.info.run_id for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    assert after == before


def test_a_resume_under_a_changed_config_is_refused_and_changes_nothing(flow, stack):
    """The README's "a resume under a changed config is refused (scaling and tracking settings may change)":
    the same flow.name with another loss.m2 and another worker count names loss.m2 alone, and leaves the runs."""
    client, experiment, parent = flow["client"], flow["experiment"], flow["parent"]
    before = {r.info.run_id: r.info.status for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    name = parent.data.tags[TAG_FLOW]
    refused = submit_flow(stack, [*flow["args"], "loss.m2=0.35", "scaling.num_workers=1"])
    assert refused.returncode != 0
    expected = (f"flow '{name}' already exists in MLflow with a different config (loss.m2: 0.3 -> 0.35); "
                "resume it unchanged or choose a new flow.name")
    assert expected in refused.stdout + refused.stderr, refused.stdout[-3000:] + refused.stderr[-3000:]
    after = {r.info.run_id: r.info.status for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    assert after == before  # no run added, none reopened
