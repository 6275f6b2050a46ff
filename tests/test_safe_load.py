"""Nothing that loads our files runs code from them: a crafted checkpoint whose pickle would run code is refused
in one line, and the code does not run. Each crafted file is first shown to be armed: a plain unpickling
(torch.load(weights_only=False), in a child process) does run it."""

from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint

from flows import checkpoints
from flows.config import load_config, with_overrides
from flows.eqface import DEFAULT_CONFIG
from flows.runner import prepare_datasets
from flows.step_model import build_net_and_head
from flows.steps import PlannedStep
from flows.tracking import FlowTracker
from models import Margin, MarginHead, build_eqface_net, load_sharded_centres
from models.safe_load import UnsafeFileError, load_weights
from tests.conftest import submit_flow
from tests.tiny_model import tiny_model

ROOT = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickled, it calls builtins.exec on a line that creates `marker`: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _armed(path: Path, marker: Path) -> None:
    """A plain unpickling of `path` runs its code (here, harmlessly: it only writes the marker); then the marker
    is removed again."""
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran", "the crafted file did not run its code even when fully unpickled"
    marker.unlink()


def _refused(exc_info: pytest.ExceptionInfo, path: Path, marker: Path) -> None:
    message = str(exc_info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: refused") and "exec" in message, message
    assert not marker.exists(), "the crafted file's code ran"


def test_a_crafted_training_state_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "ran"
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    state = directory / checkpoints.STATE_FILE
    torch.save({"backbone": {}, "epoch": 3, "history": [], "payload": _RunsCode(marker)}, state)
    _armed(state, marker)
    with pytest.raises(UnsafeFileError) as refused:
        checkpoints.load_state(Checkpoint.from_directory(str(directory)))  # what a resuming worker calls
    _refused(refused, state, marker)


@pytest.mark.integration
def test_a_crafted_net_file_is_refused_by_the_loaders_and_the_cli(tmp_path):
    marker = tmp_path / "ran"
    net_file = tmp_path / "net.pt"
    torch.save({"arch": {"backbone": "mobilefacenet"}, "state_dict": _RunsCode(marker)}, net_file)
    _armed(net_file, marker)
    with pytest.raises(UnsafeFileError) as refused:
        checkpoints.load_net_from(str(net_file))
    _refused(refused, net_file, marker)
    # The evaluation CLI, as a user runs it on a model file from shared storage: one line, status 2.
    pairs = tmp_path / "no-pairs"  # never reached: the model is read first
    done = subprocess.run([sys.executable, "-m", "flows.evaluate", "--model", str(net_file), "--pairs", str(pairs),
                           "--out", str(tmp_path / "eval")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "refused: not only tensors and plain data" in last and str(net_file) in last, done.stderr[-2000:]
    assert not marker.exists()


def test_a_crafted_centre_shard_is_refused(tmp_path):
    marker = tmp_path / "ran"
    shard = tmp_path / "centres_0_4.pt"
    torch.save({"class_start": 0, "class_end": 4, "weight": _RunsCode(marker)}, shard)
    _armed(shard, marker)
    head = MarginHead(4, 8, Margin(scale=64.0, m2=0.5))
    with pytest.raises(UnsafeFileError) as refused:
        load_sharded_centres(head, tmp_path)
    _refused(refused, shard, marker)


def test_real_checkpoints_still_load(tmp_path):
    """A whole checkpoint as a step writes it (state with optimizer and history, net.pt) loads as before."""
    net = build_eqface_net(backbone="mobilefacenet", input_size=32, width_mult=0.25, embedding_size=16,
                           quality_hidden=8)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.zeros(2, 3, 32, 32))[0].sum().backward()
    optimizer.step()
    state = {"backbone": net.backbone.state_dict(), "quality": net.quality.state_dict(),
             "optimizer": optimizer.state_dict(), "epoch": 2, "history": [{"epoch": 2, "loss": 1.5}],
             "world_size": 1, "head_type": "full"}
    checkpoints.write_checkpoint_dir(tmp_path, state, net, {"kind": 1})
    loaded = checkpoints.load_state(Checkpoint.from_directory(str(tmp_path)))
    assert loaded["history"] == [{"epoch": 2, "loss": 1.5}] and loaded["epoch"] == 2
    assert loaded["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert all(torch.equal(loaded["backbone"][k], v) for k, v in net.backbone.state_dict().items())
    assert checkpoints.load_net_from(str(tmp_path / checkpoints.NET_FILE)).arch == net.arch
    assert checkpoints.load_net_from(str(tiny_model(tmp_path / "tiny.pt"))).arch["input_size"] == 32


def test_plain_data_files_load_and_others_name_what_they_asked_for(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.ones(2), "b": [1, 2.5, "x", None, (True,)]}, plain)
    assert load_weights(plain)["b"] == [1, 2.5, "x", None, (True,)]
    crafted = tmp_path / "system.pt"
    torch.save({"x": _Shell()}, crafted)
    with pytest.raises(UnsafeFileError, match=r"system\.pt: refused: .*(posix|os)\.system"):
        load_weights(crafted)


class _Shell:
    def __reduce__(self):
        import os

        return os.system, ("true",)


@pytest.mark.integration
def test_a_flow_resuming_from_a_crafted_checkpoint_stops_in_one_line(stack, tmp_path):
    """Shared storage holds step 1's checkpoint, recorded complete in MLflow, whose state.pt someone replaced by a
    crafted one (sizes in meta.json matching). The flow resumes: step 2's Ray Train worker reads it, refuses it,
    and the flow ends with one line naming the file; the code never ran."""
    marker = tmp_path / "ran"
    overrides = [f"flow.name=crafted-{tmp_path.name[-12:]}", f"flow.storage={tmp_path / 'runs'}",
                 f"data.cache_root={tmp_path / 'data'}", "flow.loops=0", "flow.max_failures=0",
                 "scaling.num_workers=1"]
    files = [DEFAULT_CONFIG, ROOT / "configs" / "tiny.yaml"]
    cfg = load_config(files, overrides)
    data = prepare_datasets(cfg)
    net, head = build_net_and_head(cfg, data.num_classes)
    crafted = tmp_path / "runs" / "planted" / "checkpoint_000001"
    crafted.mkdir(parents=True)
    checkpoints.save_centres(head, crafted)
    state = {"backbone": net.backbone.state_dict(), "epoch": 1, "history": [], "payload": _RunsCode(marker)}
    checkpoints.write_checkpoint_dir(crafted, state, net, {"kind": 1, "num_classes": data.num_classes})
    tracker = FlowTracker(with_overrides(cfg, {"tracking.uri": stack.env()["MLFLOW_TRACKING_URI"]}))
    tracker.start_flow()
    tracker.complete_step(tracker.step_run(PlannedStep(0, 1, 0)).run_id, str(crafted), {}, {})

    done = submit_flow(stack, [arg for f in files for arg in ("--config", str(f))] + overrides, timeout=600)
    assert done.returncode != 0
    assert "step 0 (kind 1) already complete" in done.stdout
    refused = f"eqface: error: {crafted / checkpoints.STATE_FILE}: refused: not only tensors and plain data " \
              f"(its pickle asks for exec)"
    assert refused in done.stdout + done.stderr, (done.stdout + done.stderr)[-4000:]
    assert not marker.exists()
