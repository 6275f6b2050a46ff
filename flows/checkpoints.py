"""The checkpoint of a training step: one directory, written by rank 0, reported through ray.train.report.

    state.pt   backbone / quality / optimizer state, epochs done, per-epoch metric history
    centres_<start>_<end>.pt   class centres, one file per shard (models.partial_fc), any world size
    net.pt     backbone + quality branch as an EQFaceNet (models.save_eqface_net): what evaluation loads
    meta.json  step kind, flow position, epochs done, the byte size of every file written beside it:
               readable without torch, written last

A checkpoint is addressed by a URI (local path or s3://...), which is what MLflow records.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from ray.train import Checkpoint

from data import storage
from infra.ray_errors import exception_chain, remote_error_message
from models import load_eqface_net, save_eqface_net
from models.partial_fc import SHARD_FILE, load_sharded_centres, save_sharded_centres
from models.safe_load import load_weights

STATE_FILE = "state.pt"
NET_FILE = "net.pt"
META_FILE = "meta.json"


def write_checkpoint_dir(directory: Path, state: dict[str, Any], net: torch.nn.Module, meta: dict) -> None:

    torch.save(state, directory / STATE_FILE)
    save_eqface_net(net, directory / NET_FILE)
    # Sizes let a reader tell a whole file from one cut short (a local copy interrupted mid-file).
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != META_FILE}
    (directory / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=2, sort_keys=True))


def checkpoint_uri(checkpoint) -> str:
    """URI of a ray.train.Checkpoint: its path on the storage filesystem, with s3:// where it is on S3."""

    if isinstance(checkpoint.filesystem, pafs.S3FileSystem):
        return f"s3://{checkpoint.path.lstrip('/')}"
    return checkpoint.path


def from_uri(uri: str, net_only: bool = False):
    """ray.train.Checkpoint for a URI recorded in MLflow; a clear error when it is gone or incomplete.
    `net_only`: only the network will be read (evaluation), not the training state."""

    fs, path = storage.resolve(uri)
    check_complete(fs, path, uri, net_only)
    return Checkpoint(path=path, filesystem=fs)


def check_complete(fs, path: str, uri: str, net_only: bool = False) -> dict:
    """The checkpoint's meta, once every file it needs is there; FileNotFoundError naming what is missing.

    Ray uploads a checkpoint's files in directory-listing order (not the order they were written), and with
    a sharded head each rank uploads its own centre shard into the same directory: an upload cut short can
    leave meta.json without state.pt or without a shard, so meta.json alone does not make a checkpoint
    whole. S3 objects appear whole or not at all; a local file may be cut short, so every file meta.json
    lists (rank 0's) must have the size it was written with.
    """

    listing = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    sizes = {info.base_name: info.size for info in listing if info.type == pafs.FileType.File}
    if META_FILE not in sizes:
        what = "is missing" if not sizes else f"is incomplete (no {META_FILE}; has {', '.join(sorted(sizes))})"
        raise FileNotFoundError(f"checkpoint {uri} {what}")
    with fs.open_input_stream(f"{path}/{META_FILE}") as f:
        try:
            meta = json.loads(f.read())
        except ValueError:
            meta = None
    if not isinstance(meta, dict):
        raise FileNotFoundError(f"checkpoint {uri} is incomplete ({META_FILE} is not a JSON object)")
    missing = [name for name in ((NET_FILE,) if net_only else (STATE_FILE, NET_FILE)) if not sizes.get(name)]
    if not net_only:
        missing += _missing_centres(list(sizes), meta.get("num_classes"))
    if missing:
        raise FileNotFoundError(f"checkpoint {uri} is incomplete (missing {', '.join(missing)})")
    written = meta.get("files") or {}  # none in checkpoints from before sizes were recorded
    needed = [NET_FILE] if net_only else list(written)
    short = [f"{name} has {sizes[name]} of {written[name]} bytes" for name in needed
             if name in written and name in sizes and sizes[name] != written[name]]
    if short:
        raise FileNotFoundError(f"checkpoint {uri} is incomplete ({'; '.join(short)})")
    return meta


def _missing_centres(names: list[str], num_classes: int | None) -> list[str]:
    """What the centres_<start>_<end>.pt files lack to tile [0, num_classes) (one file per writing rank)."""

    shards = sorted((int(m.group(1)), int(m.group(2))) for m in map(SHARD_FILE.match, names) if m)
    if not shards:
        return ["centres_<start>_<end>.pt"]
    covered = 0
    for start, end in shards:
        if start != covered:
            break
        covered = end
    if num_classes is not None and covered != num_classes:
        return [f"the class centres from {covered} to {num_classes}"]
    return []


def save_centres(head: torch.nn.Module, directory: Path) -> None:
    """Class centres as centres_<start>_<end>.pt: the same files for a full or a sharded head."""

    save_sharded_centres(head, directory)


@contextlib.contextmanager
def local_directory(checkpoint: Checkpoint) -> Iterator[Path]:
    """The checkpoint's files on this machine. A remote one is downloaded into a directory of this process's
    own: Ray's shared download (`Checkpoint.as_directory`) lets a second process on the same machine download
    again over files the first is still reading, which then reads a torn file (two Ray nodes on one host)."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with temp_dir() as d:
        yield Path(checkpoint.to_directory(d))


def read_meta(checkpoint) -> dict:
    with local_directory(checkpoint) as d:
        return json.loads((d / META_FILE).read_text())


def load_state(checkpoint) -> dict[str, Any]:
    with local_directory(checkpoint) as d:
        return load_weights(d / STATE_FILE)  # tensors and plain data only: never code


def load_state_and_centres(checkpoint, head: torch.nn.Module) -> dict[str, Any]:
    """load_state, and the head filled with its class rows (full or sharded, whatever number of workers wrote
    them), from one download of the checkpoint."""
    with local_directory(checkpoint) as d:
        load_sharded_centres(head, d)
        return load_weights(d / STATE_FILE)


def load_net(checkpoint):
    """The EQFaceNet (backbone + quality branch) of a checkpoint, on CPU, in eval mode."""

    with local_directory(checkpoint) as d:
        net = load_eqface_net(d / NET_FILE)
    return net.eval()


def load_net_from(path_or_uri: str):
    """EQFaceNet from a checkpoint directory/URI, a net.pt file, or an MLflow model URI (models:/..., runs:/...)."""
    if path_or_uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        # MLflow only for a model URI: training workers and the GPU host (which has no MLflow) never give one.
        from flows.model_registry import load_net as load_registered_net

        return load_registered_net(path_or_uri)
    if path_or_uri.endswith(".pt") and not storage.is_s3(path_or_uri):
        return load_eqface_net(path_or_uri).eval()
    return load_net(from_uri(path_or_uri, net_only=True))


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="eqface-ckpt-")


# ---------------------------------------------------------------------------------------------
# Storage that refuses a checkpoint


class CheckpointStorageError(RuntimeError):
    """A checkpoint could not be written because the storage refuses it (full, read-only, no permission).

    Ray Train still retries it `flow.max_failures` times, each from the last checkpoint (space may be freed
    meanwhile); the checkpoints written before stay whole, since a failed one is never registered.
    """


def _storage_reasons() -> dict[int, str]:

    return {errno.ENOSPC: "storage is full (no space left on device)", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "storage is read-only", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def storage_failure(exc: BaseException) -> str | None:
    """Why a write failed when the storage itself refused it, else None. pyarrow's OSErrors often carry
    the errno only in their text ("[errno 28] No space left on device"), so both are read."""


    reasons = _storage_reasons()
    for e in exception_chain(exc):
        if getattr(e, "errno", None) in reasons:
            return reasons[e.errno]
        for code in re.findall(r"\[errno (\d+)\]", str(e), flags=re.IGNORECASE):
            if int(code) in reasons:
                return reasons[int(code)]
    return None


def storage_error_from(exc: BaseException, storage_uri: str, step_name: str) -> CheckpointStorageError | None:
    """The storage failure behind a Ray Train failure (worker or controller side), as one clear error.

    Ray hands the driver the workers' errors as formatted tracebacks, so the worker's own message is
    recovered from the text; a failure outside it (the controller writing its run state) is named here,
    for the step `step_name`.
    """

    message = remote_error_message(exc, CheckpointStorageError)
    if message is not None:
        return CheckpointStorageError(message)
    reason = storage_failure(exc)
    if reason is None:
        return None
    return CheckpointStorageError(
        f"{step_name}: cannot write Ray Train's checkpoints or run state to {storage_uri}: {reason}")
