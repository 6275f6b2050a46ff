"""The checkpoint of a training step: one directory, written by rank 0, reported through ray.train.report.

    state.pt   backbone / quality / optimizer state, epochs done, per-epoch metric history
    centres_<start>_<end>.pt   class centres, one file per shard (models.partial_fc), any world size
    net.pt     backbone + quality branch as an EQFaceNet (models.save_eqface_net): what evaluation loads
    meta.json  step kind, flow position, epochs done: readable without torch

A checkpoint is addressed by a URI (local path or s3://...), which is what MLflow records.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from data import storage

STATE_FILE = "state.pt"
NET_FILE = "net.pt"
META_FILE = "meta.json"


def write_checkpoint_dir(directory: Path, state: dict[str, Any], net: torch.nn.Module, meta: dict) -> None:
    from models import save_eqface_net

    torch.save(state, directory / STATE_FILE)
    save_eqface_net(net, directory / NET_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def checkpoint_uri(checkpoint) -> str:
    """URI of a ray.train.Checkpoint: its path on the storage filesystem, with s3:// where it is on S3."""
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.S3FileSystem):
        return f"s3://{checkpoint.path.lstrip('/')}"
    return checkpoint.path


def from_uri(uri: str):
    """ray.train.Checkpoint for a URI recorded in MLflow; a clear error when it is gone."""
    from ray.train import Checkpoint

    fs, path = storage.resolve(uri)
    import pyarrow.fs as pafs

    info = fs.get_file_info(storage.resolve(storage.join(uri, META_FILE))[1])
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"checkpoint {uri} is missing or incomplete (no {META_FILE})")
    return Checkpoint(path=path, filesystem=fs)


def save_centres(head: torch.nn.Module, directory: Path) -> None:
    """Class centres as centres_<start>_<end>.pt: the same files for a full or a sharded head."""
    from models.partial_fc import save_sharded_centres

    save_sharded_centres(head, directory)


def load_centres(checkpoint, head: torch.nn.Module) -> None:
    """Fill a full or sharded head with its rows, whatever number of workers wrote the checkpoint."""
    from models.partial_fc import load_sharded_centres

    with checkpoint.as_directory() as d:
        load_sharded_centres(head, d)


def read_meta(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return json.loads((Path(d) / META_FILE).read_text())


def load_state(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)


def load_net(checkpoint):
    """The EQFaceNet (backbone + quality branch) of a checkpoint, on CPU, in eval mode."""
    from models import load_eqface_net

    with checkpoint.as_directory() as d:
        net = load_eqface_net(Path(d) / NET_FILE)
    return net.eval()


def load_net_from(path_or_uri: str):
    """EQFaceNet from a checkpoint directory/URI, a net.pt file, or an MLflow model URI (models:/..., runs:/...)."""
    if path_or_uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow.pytorch

        return mlflow.pytorch.load_model(path_or_uri, map_location="cpu").eval()
    if path_or_uri.endswith(".pt") and not storage.is_s3(path_or_uri):
        from models import load_eqface_net

        return load_eqface_net(path_or_uri).eval()
    return load_net(from_uri(path_or_uri))


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="eqface-ckpt-")
