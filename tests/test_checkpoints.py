"""Reading checkpoints: a remote checkpoint is read from a download of this process's own."""

from __future__ import annotations

import pyarrow.fs as pafs
import torch
from ray.train import Checkpoint

from flows import checkpoints
from models.margin import MarginHead


def _remote_checkpoint(tmp_path) -> tuple[Checkpoint, MarginHead]:
    """A checkpoint on a filesystem that is not pyarrow's LocalFileSystem: Ray downloads it, as from S3."""
    head = MarginHead(8, 4)
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
    restored = MarginHead(8, 4)
    assert checkpoints.load_state_and_centres(checkpoint, restored)["epoch"] == 3
    assert torch.equal(restored.weight, head.weight)


def test_a_local_checkpoint_is_read_in_place(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    with checkpoints.local_directory(Checkpoint.from_directory(str(directory))) as d:
        assert d == directory
