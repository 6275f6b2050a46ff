"""The real-faces datasets (flows/realfaces.py) and a small real-faces flow with its held-out figures.

Built from a sample of ../shared/data/faces copied into a temporary folder (never into the repository); the
tests skip when that folder is absent.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from data.pipeline import load_arrays
from data.shards import read_manifest
from flows import realfaces
from flows.tracking import TAG_COLLAPSED, TAG_FLOW
from tests.conftest import FACES, submit_flow

pytestmark = pytest.mark.skipif(not FACES.is_dir(), reason=f"real face sets not present at {FACES}")


def sample_faces(root: Path, yale_people: int = 8, lfw_people: int = 100) -> Path:
    """A copy of some Yale B people, some LFW people (those with many photos first, so some are held out), and
    lfw10/ as it is: the layout flows.realfaces reads."""
    for person in sorted((FACES / "yaleb").iterdir())[:yale_people]:
        shutil.copytree(person, root / "yaleb" / person.name)
    people = sorted((FACES / "lfwgrey").iterdir(), key=lambda p: (-min(len(list(p.iterdir())), 20), p.name))
    for person in people[:lfw_people]:
        shutil.copytree(person, root / "lfwgrey" / person.name)
    shutil.copytree(FACES / "lfw10", root / "lfw10")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    faces = sample_faces(tmp_path_factory.mktemp("faces"))
    out = tmp_path_factory.mktemp("realfaces")
    uris = realfaces.build(str(out), faces, val_people=2, lfw_val_fraction=0.3, max_per_person=4)
    return {"faces": faces, "uris": uris}


def test_people_are_split_not_photos_and_every_image_is_grey(built):
    manifests = {name: read_manifest(uri) for name, uri in built["uris"].items()}
    train = set(manifests["train"].label_to_identity)
    for held_out in ("val", "lfw", "degraded"):
        assert not train & set(manifests[held_out].label_to_identity), held_out
    assert set(manifests["val"].label_to_identity) == {"yaleB07", "yaleB08"}  # the last Yale B people
    assert {f"yaleB0{i}" for i in range(1, 7)} <= train and len(train) > 60  # most of the 100 LFW people
    # lfw10/'s people are one person each with their lfwgrey/ photos (Colin_Powell is in both).
    assert len([n for n in train | set(manifests["lfw"].label_to_identity) if n == "Colin_Powell"]) == 1
    for name, uri in built["uris"].items():
        data = load_arrays(uri, image_size=32)
        pixels = data["image"]
        assert np.array_equal(pixels[:, 0], pixels[:, 1]) and np.array_equal(pixels[:, 1], pixels[:, 2]), name
    counts = dict(zip(manifests["train"].label_to_identity,
                      np.bincount(load_arrays(built["uris"]["train"], image_size=16)["label"]), strict=True))
    assert max(n for person, n in counts.items() if not person.startswith("yaleB")) == 4  # --max-per-person
    assert min(n for person, n in counts.items() if person.startswith("yaleB")) > 50  # every lighting of Yale B


def test_the_held_out_sets_carry_their_ground_truth(built):
    val = load_arrays(built["uris"]["val"], image_size=32, columns_extra=("degradation", "light_angle"))
    assert np.allclose(val["degradation"], val["light_angle"] / 180) and val["light_angle"].max() > 70
    degraded = load_arrays(built["uris"]["degraded"], image_size=64,
                           columns_extra=("degradation", "degradation_type"))
    kinds = set(degraded["degradation_type"].tolist())
    assert kinds == {"none", "blur", "noise", "lowres", "occlusion", "jpeg"}
    assert set(np.unique(degraded["degradation"]).tolist()) == {0.0, 0.25, 0.5, 0.75, 1.0}
    per_face = len(realfaces.SEVERITIES) * len(realfaces.DEGRADATION_KINDS) + 1
    assert len(degraded["label"]) % per_face == 0
    lfw = load_arrays(built["uris"]["lfw"], image_size=32)
    assert np.bincount(lfw["label"]).min() >= 2  # every held-out LFW person gives genuine pairs


def test_bad_input_is_one_line_naming_it(built, tmp_path):
    with pytest.raises(ValueError, match=r"1 held-out people are also in training \(e.g. 'someone'\)"):
        realfaces.check_people_apart({"someone": [], "other": []}, {"someone": []})
    with pytest.raises(ValueError, match="--val-people 8: must be between 1 and 7"):
        realfaces.split_people(built["faces"], val_people=8)
    assert realfaces.main(["--faces", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2


@pytest.mark.integration
def test_a_small_real_faces_flow_logs_its_held_out_figures(built, stack, tmp_path):
    uris = built["uris"]
    name = f"rf-{uuid.uuid4().hex[:6]}"
    args = ["--config", "configs/default.yaml", "--config", "configs/realfaces.yaml", f"flow.name={name}",
            f"data.train={uris['train']}", f"data.val={uris['val']}", f"data.eval_sets.lfw={uris['lfw']}",
            f"data.eval_sets.degraded={uris['degraded']}", f"flow.storage={tmp_path / 'runs'}", "data.image_size=32",
            "model.width_mult=0.25", "model.embedding_size=32", "model.quality_hidden=32", "step1.epochs=2",
            "step2.epochs=1", "step3.epochs=1", "step1.batch_size=16", "step2.batch_size=16", "step3.batch_size=16",
            "data.shuffle_buffer=256", "step2.on_collapse=warn", "flow.loops=0"]
    done = submit_flow(stack, args)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    client = MlflowClient(stack.env()["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("eqface")
    steps = client.search_runs([experiment.experiment_id], f"tags.`{TAG_FLOW}` = '{name}' and tags.`eqface.role` "
                               "= 'step'", order_by=["tags.`eqface.step_index` ASC"])
    assert [s.data.tags["eqface.step"] for s in steps] == ["1", "2"]
    for quality_step in steps[1:]:
        metrics = quality_step.data.metrics
        for kind in realfaces.DEGRADATION_KINDS:
            assert -1 <= metrics[f"degraded/quality_spearman_{kind}"] <= 1
        for method in ("", "_random", "_sharpness", "_norm", "_serfiq"):
            assert 0 <= metrics[f"lfw/edc_pauc20_fmr1e-2{method}"] <= 0.2
        assert -1 <= metrics["quality_spearman"] <= 1 and metrics["val_quality_p05"] <= metrics["val_quality_mean"]
        plots = {a.path for a in client.list_artifacts(quality_step.info.run_id, "plots")}
        assert {"plots/lfw_erc.png", "plots/degraded_quality_by_degradation.png"} <= plots
        # A few epochs on a sample may collapse: then warned (step2.on_collapse=warn) and tagged, never silent.
        warned = f"WARNING: step {quality_step.data.tags['eqface.step_index']} (kind 2, loop 0): the quality collapsed"
        assert (TAG_COLLAPSED in quality_step.data.tags) == (warned in done.stdout)
    assert "lfw/edc_pauc20_fmr1e-2" not in steps[0].data.metrics  # step 1 has no quality
