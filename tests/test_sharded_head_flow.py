"""The sharded class-centre head inside real Ray Train steps, resumed on a different number of workers.

Step 1 with 2 workers (each holds half the centres) -> step 2 with 1 worker -> step 3 with 2 workers,
each step starting from the previous step's checkpoint through the flow's own `run_step`; and one step
interrupted after an epoch and resumed mid-way on 2 -> 1 -> 2 workers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch

from flows import checkpoints
from flows.config import load_config
from flows.eqface import DEFAULT_CONFIG
from flows.runner import prepare_datasets, run_step
from flows.steps import PlannedStep, StepSpec
from models.partial_fc import assemble_centres

pytestmark = pytest.mark.integration
TINY = DEFAULT_CONFIG.parent / "tiny.yaml"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _centre_files(ckpt) -> list[tuple[int, int]]:
    """Class ranges of the centre shards in a checkpoint."""
    with ckpt.as_directory() as d:
        names = [p.stem.split("_")[1:] for p in Path(d).glob("centres_*.pt")]
    return sorted((int(a), int(b)) for a, b in names)


def _centres_and_backbone(ckpt):
    with ckpt.as_directory() as d:
        centres = assemble_centres(d)
    return centres, checkpoints.load_state(ckpt)["backbone"]


def test_sharded_checkpoints_move_between_worker_counts(local_ray, tmp_path):
    def config(workers: int):
        return load_config([DEFAULT_CONFIG, TINY], [
            f"flow.storage={tmp_path / 'runs'}", f"data.cache_root={tmp_path / 'data'}", "model.head=sharded",
            f"scaling.num_workers={workers}", "step1.epochs=1", "flow.max_failures=0"])

    data = prepare_datasets(config(2))
    step1 = run_step(config(2), StepSpec(PlannedStep(0, 1, 0), data.num_classes), data, "sharded-s1")
    assert _centre_files(step1) == [(0, 6), (6, 12)]

    step2 = run_step(config(1), StepSpec(PlannedStep(1, 2, 0), data.num_classes, init_checkpoint=step1), data,
                     "sharded-s2")
    assert _centre_files(step2) == [(0, 12)]
    centres1, backbone1 = _centres_and_backbone(step1)
    centres2, backbone2 = _centres_and_backbone(step2)
    assert torch.equal(centres1, centres2)  # resharded 2 -> 1 exactly; step 2 keeps centres fixed
    assert all(torch.equal(backbone1[k], backbone2[k]) for k in backbone1)

    step3 = run_step(config(2), StepSpec(PlannedStep(2, 3, 0), data.num_classes, init_checkpoint=step2,
                                         teacher_checkpoint=step2), data, "sharded-s3")
    assert _centre_files(step3) == [(0, 6), (6, 12)]
    centres3, _ = _centres_and_backbone(step3)
    assert centres3.shape == centres1.shape and not torch.equal(centres3, centres2)  # 1 -> 2, then trained
    history = checkpoints.load_state(step3)["history"]
    assert 0.0 <= history[-1]["top1"] <= 1.0 and history[-1]["loss"] > 0


def test_an_interrupted_step_resumes_from_its_last_checkpoint(local_ray, tmp_path):
    """A Ray Train run re-started under the same name continues after its last epoch, not from scratch."""
    def config(epochs: int):
        return load_config([DEFAULT_CONFIG, TINY], [
            f"flow.storage={tmp_path / 'runs'}", f"data.cache_root={tmp_path / 'data'}", "scaling.num_workers=1",
            f"step1.epochs={epochs}", "flow.max_failures=0"])

    data = prepare_datasets(config(1))
    first = run_step(config(1), StepSpec(PlannedStep(0, 1, 0), data.num_classes), data, "resume-me")
    history1 = checkpoints.load_state(first)["history"]
    # The "interrupted" run had done 1 of 2 epochs; the same run name picks it up at epoch 2.
    second = run_step(config(2), StepSpec(PlannedStep(0, 1, 0), data.num_classes), data, "resume-me")
    history2 = checkpoints.load_state(second)["history"]
    assert [h["epoch"] for h in history2] == [1, 2]
    assert history2[0] == history1[0]  # epoch 1 was not re-run


def test_an_interrupted_sharded_step_resumes_on_fewer_then_more_workers(local_ray, tmp_path):
    """Epoch 1 on 2 workers, epoch 2 resumed on 1, epoch 3 resumed on 2: each resume continues the same Ray
    Train run from its last checkpoint, with the class centres resharded to the new number of workers."""
    def config(workers: int, epochs: int):
        return load_config([DEFAULT_CONFIG, TINY], [
            f"flow.storage={tmp_path / 'runs'}", f"data.cache_root={tmp_path / 'data'}", "model.head=sharded",
            f"scaling.num_workers={workers}", f"step1.epochs={epochs}", "flow.max_failures=0"])

    data = prepare_datasets(config(2, 1))
    previous = None
    for workers, epochs in ((2, 1), (1, 2), (2, 3)):
        ckpt = run_step(config(workers, epochs), StepSpec(PlannedStep(0, 1, 0), data.num_classes), data, "resharded")
        state, (centres, _) = checkpoints.load_state(ckpt), _centres_and_backbone(ckpt)
        assert state["world_size"] == workers
        assert _centre_files(ckpt) == ([(0, 12)] if workers == 1 else [(0, 6), (6, 12)])
        assert [h["epoch"] for h in state["history"]] == list(range(1, epochs + 1))
        if previous is not None:
            assert state["history"][:-1] == previous[0]["history"]  # earlier epochs were not re-run
            # The centres went on from the checkpoint's (a re-initialised head would be unrelated to them).
            cosine = torch.nn.functional.cosine_similarity(centres, previous[1], dim=1)
            assert cosine.min() > 0.9, cosine
        previous = (state, centres)
