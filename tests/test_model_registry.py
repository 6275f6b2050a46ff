"""The final model as a first-class MLflow model, against the real MLflow server of the test stack.

Two flows' final models are published through model_registry.log_final_model exactly as flows/eqface.py does
at its end (a parent run, a completed final step run with held-out metrics and its erc.png, the training
set's manifest): pyfunc predict, signature and input example, loading without this repository, registry
versions / tags / alias, load_net_from on every MLflow URI form, the model card, the old mlflow.pytorch
flavour, and `mlflow models serve` over REST for real face crops, equal to flows.score.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from data.convert import Options, convert_recordio
from data.pipeline import normalise
from evaluation.verification import embed_images
from flows import model_registry
from flows.checkpoints import load_net_from
from flows.config import config_from_dict, load_config
from flows.steps import PlannedStep
from flows.tracking import TAG_FINAL_MODEL, TAG_FLOW, TAG_REGISTERED_MODEL, FlowTracker
from models import load_eqface_net
from tests.conftest import FACES, ROOT
from tests.tiny_model import tiny_model

pytestmark = pytest.mark.integration

FIXTURE_PACK = ROOT / "tests" / "fixtures" / "insightface" / "rec_builder" / "train"
STEP_METRICS = [{"val_acc": 0.91, "val_tar_far1e-3": 0.5, "erc_auc_fmr1e-3": 0.12, "erc_auc_fmr1e-3_random": 0.2},
                {"val_acc": 0.93, "val_tar_far1e-3": 0.6, "erc_auc_fmr1e-3": 0.10, "erc_auc_fmr1e-3_random": 0.2}]


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 20, 200)).save(buf, format="PNG")
    return buf.getvalue()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def publish_flow(uri: str, registered: str, flow_name: str, net, metrics: dict, train: str) -> dict:
    """What the end of flows/eqface.py run_flow does, on a parent run with one completed final step run."""
    cfg = load_config([ROOT / "configs" / "default.yaml", ROOT / "configs" / "tiny.yaml"],
                      [f"flow.name={flow_name}", f"tracking.registered_model={registered}", f"tracking.uri={uri}"])
    tracker = FlowTracker(cfg)
    parent_id, _ = tracker.start_flow()
    step = tracker.step_run(PlannedStep(3, 2, 1))
    tracker.complete_step(step.run_id, "/nonexistent/checkpoint", metrics, {"erc.png": png(len(flow_name))})
    model_uri = model_registry.log_final_model(tracker, net, {"final_val_acc": metrics["val_acc"]}, step.run_id, train)
    return {"tracker": tracker, "parent_id": parent_id, "step_id": step.run_id, "model_uri": model_uri,
            "net": net, "metrics": metrics, "erc": png(len(flow_name))}


@pytest.fixture(scope="module")
def registry(stack, tmp_path_factory):
    uri = stack.env()["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    work = tmp_path_factory.mktemp("registry")
    train = str(work / "train")
    convert_recordio(str(FIXTURE_PACK), train, opts=Options(workers=1, progress=False))
    first = load_eqface_net(tiny_model(work / "a.pt")).eval()
    second = load_eqface_net(tiny_model(work / "b.pt")).eval()
    with torch.no_grad():
        second.quality.fc2.bias.add_(0.5)  # a different network: the alias must name the right one
    name = f"reg-{uuid.uuid4().hex[:6]}"
    flows = [publish_flow(uri, name, f"{name}-flow{i}", net, STEP_METRICS[i], train)
             for i, net in enumerate((first, second))]
    return {"uri": uri, "name": name, "flows": flows, "client": MlflowClient(uri), "train": train, "work": work}


def test_pyfunc_takes_a_float32_batch_and_returns_named_embedding_and_quality(registry):
    flow = registry["flows"][0]
    model = mlflow.pyfunc.load_model(flow["model_uri"])
    sig = model.metadata.signature
    assert sig.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 3, 32, 32)}}]
    assert [(o["name"], o["tensor-spec"]["shape"]) for o in sig.outputs.to_dict()] == [
        ("embedding", (-1, 16)), ("quality", (-1,))]
    example = model.input_example
    assert example.dtype == np.float32 and example.shape == (1, 3, 32, 32)
    images = (np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32) * 2 - 1)
    out = model.predict(images)
    want = embed_images(flow["net"], images, progress=False)  # what flows.evaluate / flows.score compute
    assert set(out) == {"embedding", "quality"}
    np.testing.assert_allclose(out["embedding"], want.embeddings, atol=1e-6, rtol=0)
    np.testing.assert_allclose(out["quality"], want.quality, atol=1e-6, rtol=0)
    assert np.ptp(out["quality"]) > 1e-3
    with pytest.raises(Exception, match=r"\(-1, 3, 32, 32\)"):
        model.predict(np.zeros((2, 3, 16, 16), np.float32))  # the signature refuses a wrong shape


def test_the_model_loads_without_this_repository(registry, tmp_path):
    flow = registry["flows"][0]
    code = ("import numpy as np, mlflow.pyfunc\n"
            f"m = mlflow.pyfunc.load_model({flow['model_uri']!r})\n"
            "out = m.predict(np.zeros((2, 3, 32, 32), np.float32))\n"
            "import models; print(models.__file__)\n"
            "print(out['quality'].tolist())\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = registry["uri"]
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    models_file, quality = done.stdout.strip().splitlines()[-2:]
    assert not models_file.startswith(str(ROOT)), models_file  # the copy that travels in the model
    with torch.no_grad():
        _, want = flow["net"](torch.zeros(2, 3, 32, 32))
    np.testing.assert_allclose(json.loads(quality), want.numpy(), atol=1e-6)


def test_registry_versions_tags_and_alias(registry):
    client, name, flows = registry["client"], registry["name"], registry["flows"]
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    manifest_sha = model_registry.dataset_facts(registry["train"])["manifest_sha256"]
    for version, flow in zip(versions, flows, strict=True):
        tags = version.tags
        assert tags[TAG_FLOW] == flow["tracker"].cfg.flow.name
        assert tags[model_registry.TAG_PARENT_RUN] == flow["parent_id"] == version.run_id
        assert tags[model_registry.TAG_DATASET] == manifest_sha
        assert {k.removeprefix(model_registry.TAG_METRIC): float(v) for k, v in tags.items()
                if k.startswith(model_registry.TAG_METRIC)} == flow["metrics"]
        assert version.source == flow["model_uri"]
        assert version.description.startswith(f"# EQFace model of flow `{tags[TAG_FLOW]}`")
        run_tags = client.get_run(flow["parent_id"]).data.tags
        assert run_tags[TAG_FINAL_MODEL] == flow["model_uri"]
        assert run_tags[TAG_REGISTERED_MODEL] == f"models:/{name}/{version.version}"
    assert client.get_model_version_by_alias(name, model_registry.ALIAS).version == "2"  # the newest

    # Publishing the first flow again (a resumed flow, or a retry) adds no version; the alias stays newest.
    first = flows[0]
    again = model_registry.log_final_model(first["tracker"], first["net"], {}, first["step_id"], registry["train"])
    assert again == first["model_uri"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert client.get_model_version_by_alias(name, model_registry.ALIAS).version == "2"


def test_load_net_from_every_mlflow_uri_form(registry):
    name, (first, second) = registry["name"], registry["flows"]
    cases = {f"models:/{name}@{model_registry.ALIAS}": second, f"models:/{name}/1": first, f"models:/{name}/2": second,
             first["model_uri"]: first, f"runs:/{first['parent_id']}/{model_registry.MODEL_NAME}": first}
    for uri, flow in cases.items():
        net = load_net_from(uri)
        assert type(net).__name__ == "EQFaceNet" and not net.training, uri
        assert same_weights(net, flow["net"]), uri


def test_model_card_holds_data_config_figures_plot_and_limits(registry, tmp_path):
    flow = registry["flows"][1]
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=flow["model_uri"], dst_path=str(tmp_path)))
    card = (local / "artifacts" / model_registry.CARD_FILE).read_text()
    assert (local / "artifacts" / model_registry.ERC_FILE).read_bytes() == flow["erc"]
    facts = model_registry.dataset_facts(registry["train"])
    for needle in ("## Training data", f"{facts['num_samples']} images of {facts['num_classes']} identities",
                   facts["manifest_sha256"], "## Held-out figures", "| `val_acc` | 0.9300 |",
                   f"![error versus discard]({model_registry.ERC_FILE})", "## Intended use", "## Limits",
                   f"`{flow['step_id']}`", "(B, 3, 32, 32)"):
        assert needle in card, needle
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config_from_dict(config) == flow["tracker"].cfg


def test_a_model_of_the_old_pytorch_flavour_still_loads(registry):
    net = registry["flows"][0]["net"]
    with mlflow.start_run(experiment_id=registry["flows"][0]["tracker"].experiment_id):
        info = mlflow.pytorch.log_model(net, name="old", code_paths=[str(ROOT / "models")],
                                        serialization_format="pickle", pip_requirements=["torch"])
    assert same_weights(load_net_from(info.model_uri), net)


# ----------------------------------------------------------------------------- mlflow models serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.skipif(not (FACES / "lfw5590").is_dir(), reason="real faces not available (../shared/data/faces)")
def test_mlflow_models_serve_gives_flows_score_results_over_rest(registry, tmp_path):
    crops = tmp_path / "crops"
    crops.mkdir()
    for path in sorted((FACES / "lfw5590").glob("*.jpg"))[:8]:  # 80 x 80 RGB face crops
        shutil.copy(path, crops / path.name)
    name = registry["name"]
    uri = f"models:/{name}@{model_registry.ALIAS}"
    from flows.score import face_pixels, find_images, main, read_image_file

    assert main(["--model", uri, str(crops), "--out", str(tmp_path / "scores.parquet"), "--no-progress"]) == 0
    scores = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    batch = normalise(np.stack([face_pixels(read_image_file(p), 32) for p in find_images(crops)]))
    assert [r["path"] for r in scores] == [p.name for p in find_images(crops)]

    port = free_port()
    bin_dir = Path(sys.executable).parent  # the server runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if http(f"http://127.0.0.1:{port}/ping")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not come up"
            time.sleep(1)
        status, body = http(f"http://127.0.0.1:{port}/invocations", json.dumps({"inputs": batch.tolist()}).encode())
        assert status == 200, body[:2000]
        predictions = json.loads(body)["predictions"]
        status, _ = http(f"http://127.0.0.1:{port}/invocations",
                         json.dumps({"inputs": batch[:, :, :16, :16].tolist()}).encode())
        assert status == 400  # a wrong shape is refused by the signature
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its worker: the group we started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    np.testing.assert_allclose(np.asarray(predictions["embedding"]), np.stack([r["embedding"] for r in scores]),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(predictions["quality"]), [r["quality"] for r in scores], atol=1e-5, rtol=0)
    assert np.ptp(predictions["quality"]) > 1e-3  # real crops, different scores
