"""The flow's final model as a first-class MLflow model: a pyfunc with a signature and an input example,
registered under `tracking.registered_model`, its version tagged and aliased, with a model card.

    mlflow.pyfunc.load_model("models:/eqface@candidate").predict(images)  -> {"embedding", "quality"}
    mlflow models serve -m models:/eqface@candidate --env-manager local --host 127.0.0.1 --port 5001
    flows.checkpoints.load_net_from("models:/eqface@candidate")            -> the EQFaceNet (artifact net.pt)

Every version carries the tags eqface.flow, TAG_PARENT_RUN, TAG_DATASET (sha256 of the training set's
manifest.json) and `eqface.metric.<name>` for the final step's held-out figures; the alias ALIAS points at
the newest version. The model card (model_card.md, beside the network in the model's artifacts, and the
version's description) says what the model was trained on, how, how well, and what it is not for.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import torch
import yaml
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from data import storage
from data.shards import MANIFEST_NAME, read_manifest
from flows.config import Config
from flows.tracking import TAG_FINAL_MODEL, TAG_FLOW, TAG_REGISTERED_MODEL, FlowTracker
from models import load_eqface_net, save_eqface_net
from models.serving import NET_ARTIFACT

ALIAS = "candidate"
MODEL_NAME = "model"  # the logged model's name on the parent run
CARD_FILE = "model_card.md"
ERC_FILE = "erc.png"
TAG_PARENT_RUN = "eqface.parent_run"
TAG_DATASET = "eqface.dataset_manifest_sha256"
TAG_METRIC = "eqface.metric."
# The held-out figures a version carries as tags (those the final step logged: a small held-out set has
# too few impostor pairs for FAR/FMR 1e-3, logged as NaN, i.e. not at all).
KEY_METRICS = ("val_acc", "val_acc_std", "val_auc", "val_tar_far1e-3", "val_tar_far1e-2", "quality_spearman",
               *(f"erc_auc_fmr{fmr}{base}" for fmr in ("1e-3", "1e-2") for base in ("", "_random", "_sharpness")))
REGISTERED_DESCRIPTION = ("EQFace networks from flows/eqface.py: embedding + explicit quality. Each version's "
                          "description is its model card.")


@dataclass
class PublishedModel:
    model_uri: str  # the logged model (models:/m-...)
    name: str
    version: str

    @property
    def registered_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


# ----------------------------------------------------------------------------- what a version holds


def signature(input_size: int, embedding_size: int):
    """float32 (B, 3, S, S) in; named float32 outputs embedding (B, E) and quality (B,)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    f32 = np.dtype(np.float32)
    return ModelSignature(inputs=Schema([TensorSpec(f32, (-1, 3, input_size, input_size))]),
                          outputs=Schema([TensorSpec(f32, (-1, embedding_size), "embedding"),
                                          TensorSpec(f32, (-1,), "quality")]))


def input_example(input_size: int) -> np.ndarray:
    """One mid-grey image: the smallest valid request (what `mlflow models serve` documents as its example)."""
    return np.zeros((1, 3, input_size, input_size), dtype=np.float32)


def dataset_facts(train_uri: str) -> dict[str, Any]:
    """The training set's size and the sha256 of its manifest.json (which holds every shard's sha256)."""
    raw = storage.read_bytes(storage.join(train_uri, MANIFEST_NAME))
    manifest = read_manifest(train_uri)
    return {"uri": train_uri, "manifest_sha256": hashlib.sha256(raw).hexdigest(),
            "num_samples": manifest.num_samples, "num_classes": manifest.num_classes}


def model_card(cfg: Config, arch: dict[str, Any], parent_id: str, data: dict[str, Any], step_run_id: str,
               metrics: dict[str, float], has_erc: bool) -> str:
    """Markdown: training data, model, held-out figures, the error-versus-discard plot, intended use, limits."""
    size, dim = arch["input_size"], arch["embedding_size"]
    figures = "\n".join(f"| `{k}` | {v:.4f} |" for k, v in metrics.items()) or "| (none logged) | |"
    val = cfg.data.val or "the synthetic set's held-out split"
    synthetic = cfg.data.train == "synthetic"
    erc = (f"![error versus discard]({ERC_FILE})\n\n`{ERC_FILE}` beside this card: FNMR at a fixed threshold "
           "(FMR 1e-3 / 1e-2) as the lowest-quality pairs are discarded, EQFace quality against random and "
           "sharpness baselines; a curve that falls faster is a better quality." if has_erc else
           "No held-out set: no error-versus-discard plot.")
    return f"""# EQFace model of flow `{cfg.flow.name}`

MLflow parent run `{parent_id}`; held-out figures from its final step run `{step_run_id}`.

## Training data
- `{data['uri']}`{' (built-in synthetic faces)' if synthetic else ''}: {data['num_samples']} images of \
{data['num_classes']} identities; manifest.json sha256 `{data['manifest_sha256']}`.
- Held out: {val}.

## Model
- {arch['backbone']} (width {arch['width_mult']}) + EQFace quality branch, {dim}-d embedding, {size} x {size} input.
- Input: float32 (B, 3, {size}, {size}), RGB, (pixel - 127.5) / 127.5; whole face crops resized, no detection
  or alignment.
- Outputs: `embedding` (B, {dim}), L2-normalised sum of the image's and its mirror's embeddings;
  `quality` (B,) in [0, 1]: how recognisable the face is to this model.

## Held-out figures
| metric | value |
|---|---|
{figures}

`val_*`: 10-fold pair accuracy, TAR at FAR 1e-3, ROC AUC; `erc_auc_*`: area under the error-versus-discard
curve (lower is better; `_random`, `_sharpness`: baselines); `quality_spearman`: against known degradation.

## Error versus discard
{erc}

## Config
```yaml
{yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip()}
```

## Intended use
Face verification and search on face crops like the training data's, and quality-aware use of the same
crops: rejecting or down-weighting low-quality faces (QWDF filtering, quality-weighted set aggregation).

## Limits
- {'Trained on synthetic faces only: not a model for real photographs.' if synthetic else
   f'Trained on {data["num_samples"]} images of {data["num_classes"]} identities; the figures above are on '
   'held-out data of the same source and need not hold elsewhere.'}
- Quality is specific to this network; quality thresholds must be chosen on the user's own data.
- No face detection or alignment; crops unlike the training crops (pose, scale, alignment) score lower.
- Not evaluated across demographic groups; not for decisions about people without human review.
"""


# ----------------------------------------------------------------------------- logging and registering


def log_pyfunc(tracking_uri: str, parent_id: str, net_path: Path, card_path: Path, erc_path: Path | None,
               arch: dict[str, Any]):
    """Log the pyfunc (models.serving.EQFacePyfunc, from code: models/mlflow_model.py with `models/`) on the
    parent run; its ModelInfo."""
    artifacts = {NET_ARTIFACT: str(net_path), "model_card": str(card_path)}
    if erc_path is not None:
        artifacts["erc"] = str(erc_path)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=parent_id):
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(_models_dir() / "mlflow_model.py"), artifacts=artifacts,
            code_paths=[str(_models_dir())],
            signature=signature(arch["input_size"], arch["embedding_size"]),
            input_example=input_example(arch["input_size"]),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
        )


def find_version(client: MlflowClient, name: str, parent_id: str):
    """The version registered from this flow's parent run, if any (a resumed or retried flow reuses it)."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{parent_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def register(client: MlflowClient, name: str, info, parent_id: str, tags: dict[str, str], card: str):
    """A new version of `name` for the logged model, tagged, with the card as description; idempotent (a
    retry after a lost answer finds the version it created)."""
    existing = find_version(client, name, parent_id)
    if existing is not None:
        return existing
    try:
        client.create_registered_model(name, description=REGISTERED_DESCRIPTION)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, source=info.model_uri, run_id=parent_id, tags=tags,
                                       description=card, model_id=info.model_id)


def point_alias(client: MlflowClient, name: str) -> None:
    """Move ALIAS to the newest version of `name` (another flow may have registered one meanwhile)."""
    newest = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    client.set_registered_model_alias(name, ALIAS, str(newest))


def log_final_model(tracker: FlowTracker, net, metrics: dict[str, float], step_run_id: str, train_uri: str) -> str:
    """The final EQFaceNet as a registered MLflow pyfunc model of the flow's parent run, which is then finished;
    returns the logged model's URI. `step_run_id`: the run of the step that made the network (its held-out
    figures go on the version and the card)."""
    what = "logging the final model"
    published = publish(tracker, net, step_run_id, train_uri)
    now = int(time.time() * 1000)
    tracker.call(what, tracker.client.log_batch, tracker.parent_id,
                 metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v],
                 tags=[RunTag(TAG_REGISTERED_MODEL, published.registered_uri)])
    tracker.call(what, tracker.client.set_tag, tracker.parent_id, TAG_FINAL_MODEL, published.model_uri)
    tracker.call(what, tracker.client.set_terminated, tracker.parent_id, "FINISHED")
    return published.model_uri


def publish(tracker: FlowTracker, net, step_run_id: str, train_uri: str) -> PublishedModel:
    """Log, register, tag and alias the final network, every MLflow call riding out an outage
    (FlowTracker.call); a flow whose version exists already only moves the alias."""
    call, client, tracking_uri, cfg, parent_id = (tracker.call, tracker.client, tracker.uri, tracker.cfg,
                                                  tracker.parent_id)
    what = "publishing the final model"
    name = cfg.tracking.registered_model
    version = call(what, find_version, client, name, parent_id)
    if version is None:
        step = call(what, client.get_run, step_run_id)
        metrics = {k: step.data.metrics[k] for k in KEY_METRICS if k in step.data.metrics}
        data = dataset_facts(train_uri)
        with tempfile.TemporaryDirectory(prefix="eqface-model-") as d:
            erc = call(what, _download_erc, client, step_run_id, Path(d))
            card = model_card(cfg, net.arch, parent_id, data, step_run_id, metrics, erc is not None)
            (Path(d) / CARD_FILE).write_text(card)
            save_eqface_net(net, Path(d) / "net.pt")
            # A retry after an outage mid-upload logs the model again (a new model id); the version names
            # the one kept.
            info = call(what, log_pyfunc, tracking_uri, parent_id, Path(d) / "net.pt", Path(d) / CARD_FILE, erc,
                        net.arch, timeout_s=None)
        tags = {TAG_FLOW: cfg.flow.name, TAG_PARENT_RUN: parent_id, TAG_DATASET: data["manifest_sha256"],
                **{f"{TAG_METRIC}{k}": f"{v:.6g}" for k, v in metrics.items()}}
        version = call(what, register, client, name, info, parent_id, tags, card)
    call(what, point_alias, client, name)
    return PublishedModel(version.source, name, version.version)


def _download_erc(client: MlflowClient, step_run_id: str, directory: Path) -> Path | None:
    names = {a.path for a in client.list_artifacts(step_run_id, "plots")}
    if f"plots/{ERC_FILE}" not in names:
        return None
    return Path(client.download_artifacts(step_run_id, f"plots/{ERC_FILE}", str(directory)))


def _models_dir() -> Path:
    """The `models` package travels with the MLflow model, so it loads without this repository."""
    return Path(__file__).resolve().parents[1] / "models"


# ----------------------------------------------------------------------------- loading


def load_net(uri: str):
    """The EQFaceNet of an MLflow model URI (models:/name@alias, models:/name/3, models:/m-..., runs:/...):
    its artifact net.pt; a model logged before the pyfunc (mlflow.pytorch flavour) loads through that."""
    with tempfile.TemporaryDirectory(prefix="eqface-model-") as d:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=d))
        flavors = Model.load(str(local)).flavors
        if "pytorch" in flavors:
            return mlflow.pytorch.load_model(str(local), map_location="cpu").eval()
        artifacts = flavors.get("python_function", {}).get("artifacts", {})
        if NET_ARTIFACT not in artifacts:
            raise ValueError(f"{uri}: not an EQFace model (no '{NET_ARTIFACT}' artifact in its MLmodel)")
        return load_eqface_net(local / artifacts[NET_ARTIFACT]["path"]).eval()
