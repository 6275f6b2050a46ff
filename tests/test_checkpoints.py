"""Reading checkpoints: a remote checkpoint is read from a download of this process's own."""

from __future__ import annotations

import pyarrow.fs as pafs
import torch
from ray.train import Checkpoint

from flows import checkpoints
from models.margin import Margin, MarginHead


def _remote_checkpoint(tmp_path) -> tuple[Checkpoint, MarginHead]:
    """A checkpoint on a filesystem that is not pyarrow's LocalFileSystem: Ray downloads it, as from S3."""
    head = MarginHead(8, 4, Margin(scale=64.0, m2=0.5))
    torch.nn.init.normal_(head.weight)
    directory = tmp_path / "store" / "ckpt"
    directory.mkdir(parents=True)
    checkpoints.save_centres(head, directory)
    torch.save({"backbone": {}, "epoch": 3}, directory / checkpoints.STATE_FILE)
    store = pafs.SubTreeFileSystem(str(tmp_path / "store"), pafs.LocalFileSystem())
    return Checkpoint("ckpt", filesystem=store), head


def test_each_reader_of_a_remote_checkpoint_gets_its_own_copy(tmp_path):
    checkpoint, head = _remote_checkpoint(tmp_path)
    with checkpoints.local_directory(checkpoint) as first:
        with checkpoints.local_directory(checkpoint) as second:
            assert first != second  # a second download can never rewrite the files the first is reading
            assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())
        assert not second.exists() and (first / checkpoints.STATE_FILE).exists()
    assert not first.exists()
    restored = MarginHead(8, 4, Margin(scale=64.0, m2=0.5))
    assert checkpoints.load_state_and_centres(checkpoint, restored)["epoch"] == 3
    assert torch.equal(restored.weight, head.weight)


def test_a_local_checkpoint_is_read_in_place(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    with checkpoints.local_directory(Checkpoint.from_directory(str(directory))) as d:
        assert d == directory


def test_a_full_disk_under_a_real_pyarrow_upload_is_named_without_privileges(tmp_path):
    """What a worker sees when its checkpoint upload (pyarrow's copy_files, as Ray Train uploads) meets a full
    disk, without root: /dev/full answers every write with ENOSPC. The end-to-end case, a flow on a full or
    read-only tmpfs, is tests/test_faults_training.py's (it mounts one, so it needs root)."""
    source = tmp_path / "epoch-2"
    source.mkdir()
    net = torch.nn.Linear(4, 2)
    torch.save(net.state_dict(), source / checkpoints.STATE_FILE)
    earlier = tmp_path / "store" / "epoch-1"
    earlier.mkdir(parents=True)
    (earlier / checkpoints.STATE_FILE).write_bytes(b"kept")
    target = tmp_path / "store" / "epoch-2"
    target.mkdir()
    (target / checkpoints.STATE_FILE).symlink_to("/dev/full")
    try:
        pafs.copy_files(str(source), str(target), destination_filesystem=pafs.LocalFileSystem())
    except OSError as exc:
        refused = exc
    else:
        raise AssertionError("a write to /dev/full succeeded")
    assert checkpoints.storage_failure(refused) == "storage is full (no space left on device)"
    assert checkpoints.storage_failure(RuntimeError("worker died")) is None
    assert (earlier / checkpoints.STATE_FILE).read_bytes() == b"kept"
