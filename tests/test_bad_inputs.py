"""Bad input met through the real commands: one clear line naming the file/row/option, a non-zero exit, and
nothing already written lost.

Already proven elsewhere, not repeated here: bad config keys/types, out-of-range margins (loss.m1/m2/scale)
and malformed YAML (test_config.py, test_flow_errors.py); an absent MLflow server or Ray cluster and a
dataset without a manifest (test_flow_errors.py); every shard/manifest disagreement that validate_dataset
finds file by file: missing/empty shard, row count, checksum, label out of range, missing column
(test_shards.py); corrupt files at conversion (test_convert.py); unreadable images in evaluation pair sets
(test_evaluate_cli.py); empty/non-image/truncated/decompression-bomb files in score (test_score_cli.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from data.pipeline import decode_image, load_arrays
from data.shards import DatasetError, read_manifest, validate_dataset, write_dataset
from flows.config import ConfigError, load_config, with_overrides
from flows.eqface import DEFAULT_CONFIG, training_plan
from flows.preflight import check_data_fits, check_resources
from flows.runner import prepare_datasets
from flows.steps import PlannedStep
from infra.stack import free_port
from tests.conftest import ROOT, submit_flow

TINY = DEFAULT_CONFIG.parent / "tiny.yaml"
IDS = ["ann", "bob", "cat", "dan"]


# ---------------------------------------------------------------------------------------------- datasets


def png(seed: int, size: int = 32, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(uri: Path, per_id: int, *, ids: list[str] = IDS, bad: dict[int, bytes] | None = None,
                 extra: dict | None = None, seed: int = 0, shard_bytes: int = 20_000) -> list[tuple[str, int]]:
    """A 32 px dataset whose manifest states 32x32, rows `bad` replaced; returns (shard file, row) per row."""
    rows = []
    for i in range(len(ids) * per_id):
        label = i % len(ids)
        image = (bad or {}).get(i) or png(seed * 100_000 + i)
        rows.append({"image": image, "label": label, "identity": ids[label], "source": f"s{seed}:{i}",
                     **(extra or {})})
    manifest = write_dataset(str(uri), rows, label_to_identity=ids, image_size=32, target_shard_bytes=shard_bytes)
    return [(shard["file"], r) for shard in manifest.shards for r in range(shard["rows"])]


def mix_in(uri: Path, foreign: Path) -> str:
    """Copy the first shard of `foreign` into `uri` as one more shard and list it in the manifest with its
    true rows, size and checksum: what a careless copy between dataset folders does."""
    doc = json.loads((uri / "manifest.json").read_text())
    source = foreign / read_manifest(str(foreign)).shards[0]["file"]
    name = f"part-{len(doc['shards']):05d}.parquet"
    data = source.read_bytes()
    (uri / name).write_bytes(data)
    rows = pq.ParquetFile(source).metadata.num_rows
    doc["shards"].append({"file": name, "rows": rows, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    doc["num_samples"] += rows
    (uri / "manifest.json").write_text(json.dumps(doc))
    return f"{uri}/{name}"


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-inputs")


@pytest.fixture(scope="module")
def val_set(data_root) -> Path:
    make_dataset(data_root / "val", per_id=6, seed=9)
    return data_root / "val"


# ---------------------------------------------------------------------------------------------- images


def test_wrong_size_image_is_an_error_naming_shard_and_row(tmp_path):
    where = make_dataset(tmp_path / "ds", per_id=6, bad={13: png(13, size=48)})
    shard, row = where[13]
    expected = (f"wrong-size image at {tmp_path / 'ds' / shard} row {row} (identity=bob, source=s0:13): "
                "image is 48x48 px, the dataset's manifest says 32x32")
    with pytest.raises(DatasetError) as err:
        load_arrays(str(tmp_path / "ds"), image_size=32)  # validation and evaluation read through this
    assert str(err.value) == expected
    with pytest.raises(DatasetError, match=rf"{shard}: row {row} \(identity 'bob'\): image is 48x48 px, the "
                                           r"manifest says 32x32 \(a shard from another dataset\?\)"):
        validate_dataset(str(tmp_path / "ds"), decode_images=True)
    # A dataset that states no single size (mixed at conversion) is resized, as it declares.
    rows = [{"image": png(i, size=32 + 8 * (i % 2)), "label": i % 2, "identity": IDS[i % 2], "source": f"m{i}"}
            for i in range(6)]
    assert write_dataset(str(tmp_path / "mixed"), rows, label_to_identity=IDS[:2]).image_size is None
    assert load_arrays(str(tmp_path / "mixed"), image_size=32)["image"].shape == (6, 3, 32, 32)


def test_any_channel_layout_decodes_to_the_same_rgb_pixels():
    grey = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)

    def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    rgb = np.repeat(grey[..., None], 3, axis=2)
    layouts = {
        "L": Image.fromarray(grey),
        "RGBA": Image.fromarray(np.dstack([rgb, np.full_like(grey, 255)])),
        "LA": Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), "LA"),
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),  # 16-bit: PIL's convert("RGB") would clip to white
        "CMYK (TIFF)": Image.fromarray(rgb).convert("CMYK"),
    }
    for name, img in layouts.items():
        fmt = "TIFF" if name.startswith("CMYK") else "PNG"
        out = np.asarray(decode_image(encoded(img, fmt), 32, expect_size=(32, 32)))
        assert out.shape == (32, 32, 3), name
        assert np.abs(out.astype(int) - rgb).max() <= 1, name


def test_shards_from_another_dataset_are_refused(tmp_path):
    base = tmp_path / "a"
    make_dataset(base, per_id=4)
    # The same names and labels, one more column: a shard of a synthetic-style dataset.
    make_dataset(tmp_path / "other-schema", per_id=2, seed=1, extra={"degradation": 0.5})
    # The same schema, other people under the same labels.
    make_dataset(tmp_path / "other-people", per_id=2, seed=2, ids=["eve", "fay", "gus", "hal"])
    # The same people and more of them: labels beyond this dataset's classes.
    make_dataset(tmp_path / "more-classes", per_id=1, seed=3, ids=["eve", *IDS[1:], "ivy", "joe"])
    cases = {
        "other-schema": r"column\(s\) \['degradation'\] are not in the manifest's columns "
                        r"\['image', 'label', 'identity', 'source'\] \(a shard from another dataset\?\)",
        "other-people": r"row 0: identity 'eve' does not match label_to_identity\[0\]",
        "more-classes": r"row 4: label 4 out of range 0..3",
    }
    for foreign, message in cases.items():
        target = tmp_path / f"mixed-{foreign}"
        target.mkdir()
        for f in base.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        shard = mix_in(target, tmp_path / foreign)
        with pytest.raises(DatasetError, match=rf"^{shard}: {message}"):
            validate_dataset(str(target))


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(("overrides", "message"), [
    (["flow.loops=-1"], "flow.loops: must be >= 0, got -1"),
    (["model.head=sharded", "model.head_sample_rate=0"], "model.head_sample_rate: must be in (0, 1], got 0.0"),
    (["model.head=sharded", "model.head_sample_rate=1.5"], "model.head_sample_rate: must be in (0, 1], got 1.5"),
    (["model.head_sample_rate=0.5"], "model.head_sample_rate: negative-centre sampling needs model.head: sharded"),
    (["loss.m3=1.0"], "loss.m3: must be in [0, 1), got 1.0"),
])
def test_contradictory_or_out_of_range_options(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config([DEFAULT_CONFIG, TINY], overrides)
    assert str(err.value) == message


def test_every_step3_has_a_step2_teacher_before_it():
    """The plan cannot express a step 3 without a teacher: flow.loops is the only knob, and it is >= 0."""
    for loops in range(5):
        kinds = [s.kind for s in training_plan(loops)]
        assert all(2 in kinds[:i] for i, kind in enumerate(kinds) if kind == 3)
        assert kinds[0] == 1 and kinds[-1] == 2


def test_scaling_that_the_data_cannot_feed():
    cfg = load_config([DEFAULT_CONFIG, TINY], ["model.head=sharded", "scaling.num_workers=5",
                                                "scaling.cpus_per_worker=0.1"])
    with pytest.raises(ConfigError, match=r"^model.head: sharded over scaling.num_workers=5 needs at least 5 "
                                          r"classes; the training set has 4"):
        check_data_fits(cfg, num_classes=4, num_train=1000)
    cfg = load_config([DEFAULT_CONFIG, TINY], ["step3.batch_size=64"])
    with pytest.raises(ConfigError, match=r"^step3.batch_size: 64 per worker x 2 workers = 128 images per step, "
                                          r"more than the 100 training images"):
        check_data_fits(cfg, num_classes=12, num_train=100)
    check_data_fits(load_config([DEFAULT_CONFIG, TINY], ["step3.batch_size=64", "flow.loops=0"]), 12, 100)


def test_gpu_workers_on_an_autoscaling_cluster_are_not_refused():
    """docs/cluster.md's cluster starts GPU nodes on demand: 0 GPUs now, up to 2 x 1 through the autoscaler."""
    cfg = load_config([DEFAULT_CONFIG, TINY], ["scaling.use_gpu=true"])
    check_resources(cfg, {"CPU": 4.0}, ceiling={"CPU": 12.0, "GPU": 2.0})
    with pytest.raises(ConfigError, match=r"^scaling.use_gpu: 3 workers need 3 GPUs \(1 each\) but the Ray cluster "
                                          r"has 2 at most, autoscaling included; set scaling.use_gpu=false or "
                                          r"scaling.num_workers<=2$"):
        check_resources(load_config([DEFAULT_CONFIG, TINY], ["scaling.use_gpu=true", "scaling.num_workers=3"]),
                        {"CPU": 4.0}, ceiling={"CPU": 12.0, "GPU": 2.0})
    check_resources(load_config([DEFAULT_CONFIG, TINY], ["scaling.num_workers=4", "scaling.cpus_per_worker=0.25"]),
                    {"CPU": 2.0}, ceiling=None)  # what benchmarks/flow_load.py runs on this 2-core machine


def test_workers_must_leave_one_node_a_whole_cpu_for_decoding():
    """Two 1-CPU nodes hold 2 CPUs in all, but SPREAD puts a 0.5-CPU worker on each, and no decode task
    (1 CPU, on one node) could ever start: the flow would wait for its first batch forever."""
    def cfg(*overrides):
        return load_config([DEFAULT_CONFIG, TINY], ["scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
                                                    *overrides])

    two_small = [{"CPU": 1.0}, {"CPU": 1.0}]
    check_resources(cfg("scaling.placement_strategy=PACK"), {"CPU": 2.0}, None, two_small)  # both on one node
    with pytest.raises(ConfigError, match=r"^scaling: 2 workers x 0.5 CPU placed SPREAD on the Ray cluster's "
                                          r"nodes of 1, 1 CPUs leave no node a whole CPU for Ray Data decoding"):
        check_resources(cfg("scaling.placement_strategy=SPREAD"), {"CPU": 2.0}, None, two_small)
    # tests/test_multinode.py's rehearsal: a 2-CPU head and a 1-CPU node, SPREAD
    check_resources(cfg("scaling.placement_strategy=SPREAD"), {"CPU": 3.0}, None, [{"CPU": 2.0}, {"CPU": 1.0}])
    with pytest.raises(ConfigError, match=r"^scaling: only 0 of 2 workers x 1.5 CPU fit on the Ray cluster's "
                                          r"nodes of 2, 2 CPUs \(a worker cannot span nodes\)"):
        check_resources(cfg("scaling.cpus_per_worker=1.5", "scaling.placement_strategy=STRICT_PACK"),
                        {"CPU": 4.0}, None, [{"CPU": 2.0}, {"CPU": 2.0}])
    with pytest.raises(ConfigError, match=r"^scaling: only 0 of 3 workers x 0.5 CPU fit"):
        check_resources(cfg("scaling.num_workers=3", "scaling.placement_strategy=STRICT_SPREAD"),
                        {"CPU": 4.0}, None, [{"CPU": 2.0}, {"CPU": 2.0}])
    check_resources(cfg("scaling.placement_strategy=STRICT_SPREAD"), {"CPU": 4.0}, None, [{"CPU": 2.0}, {"CPU": 2.0}])
    # A GPU worker needs its GPU and its CPUs on the same node; the 0-CPU head of docs/cluster.md hosts none.
    gpu = cfg("scaling.use_gpu=true", "scaling.cpus_per_worker=4")
    check_resources(gpu, {"CPU": 16.0, "GPU": 2.0}, None, [{"CPU": 0.0}, {"CPU": 8.0, "GPU": 1.0},
                                                           {"CPU": 8.0, "GPU": 1.0}])
    with pytest.raises(ConfigError, match=r"^scaling: only 1 of 2 workers x 4 CPU \+ 1 GPU fit"):
        check_resources(gpu, {"CPU": 12.0, "GPU": 2.0}, None, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 4.0},
                                                               {"CPU": 0.0, "GPU": 1.0}])
    # With an autoscaler the nodes of today say nothing about those it will start.
    check_resources(cfg("scaling.placement_strategy=SPREAD"), {"CPU": 2.0}, {"CPU": 8.0}, two_small)


# ---------------------------------------------------------------------------------------------- the flow


def flow_args(name: str, work: Path, train: Path, val: Path, *extra: str) -> list[str]:
    return ["--config", "configs/default.yaml", "--config", "configs/tiny.yaml", f"flow.name={name}",
            f"flow.storage={work / 'runs'}", f"data.train={train}", f"data.val={val}", "data.image_size=32",
            "flow.loops=0", "step1.epochs=1", "flow.max_failures=0", *extra]


def runs_of(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name("eqface")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"tags.`eqface.flow` = '{name}'")


def last_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "eqface: error: " in line]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return lines[-1].split("eqface: error: ", 1)[1]


@pytest.mark.integration
def test_corrupt_image_stops_the_flow_naming_shard_and_row(stack, data_root, val_set):
    train = data_root / "corrupt-train"
    where = make_dataset(train, per_id=16, bad={37: b"\x89PNG\r\n\x1a\n but not really"})
    before = file_digests(train)
    name = f"corrupt-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    proc = submit_flow(stack, flow_args(name, data_root, train, val_set), timeout=600)
    assert proc.returncode != 0
    shard, row = where[37]
    expected = (f"corrupt image at {train / shard} row {row} (identity=bob, source=s0:37): "
                "not an image PIL can identify")
    assert last_error_line(proc) == expected
    assert time.monotonic() - started < 300
    # Nothing lost: the dataset is untouched; MLflow says which step failed and why.
    assert file_digests(train) == before
    runs = {r.data.tags["eqface.role"]: r for r in runs_of(MlflowClient(stack.env()["MLFLOW_TRACKING_URI"]), name)}
    assert runs["step"].info.status == runs["flow"].info.status == "FAILED"
    assert expected in runs["step"].data.tags["eqface.error"]

    # The way on: the same flow again with data.skip_corrupt=true resumes it (the only config change allowed
    # besides scaling/tracking) in the same runs, skipping and counting the bad row.
    proc = submit_flow(stack, flow_args(name, data_root, train, val_set, "data.skip_corrupt=true"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    client = MlflowClient(stack.env()["MLFLOW_TRACKING_URI"])
    resumed = runs_of(client, name)
    assert sorted(r.data.tags["eqface.role"] for r in resumed) == ["flow", "step", "step"]  # steps 1 and 2
    step1 = client.get_run(runs["step"].info.run_id)
    assert step1.info.status == "FINISHED" and step1.data.metrics["corrupt_images_skipped"] == 1
    assert step1.data.tags["eqface.skipped_rows"].startswith(f"{train / shard} row {row}")
    assert file_digests(train) == before


@pytest.mark.integration
def test_skip_corrupt_skips_counts_and_reports_bad_rows(stack, data_root, val_set):
    train = data_root / "skip-train"
    bad = {5: b"\x00", 22: b"GIF89a truncated", 41: png(41, size=40)}  # one byte, corrupt, wrong size
    where = make_dataset(train, per_id=16, bad=bad)
    name = f"skip-{uuid.uuid4().hex[:6]}"
    proc = submit_flow(stack, flow_args(name, data_root, train, val_set, "data.skip_corrupt=true"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    client = MlflowClient(stack.env()["MLFLOW_TRACKING_URI"])
    steps = sorted((r for r in runs_of(client, name) if r.data.tags["eqface.role"] == "step"),
                   key=lambda r: int(r.data.tags["eqface.step_index"]))
    assert [r.data.tags["eqface.step"] for r in steps] == ["1", "2"]
    named = sorted(f"{train / where[i][0]} row {where[i][1]}" for i in bad)
    for run in steps:  # every step reads (and skips) the data again, and says so
        assert run.info.status == "FINISHED"
        assert run.data.metrics["corrupt_images_skipped"] == 3
        listed = run.data.tags["eqface.skipped_rows"].splitlines()
        assert sorted(line.split(" (")[0] for line in listed) == named
    assert proc.stdout.count("skipped 3 corrupt or wrong-size images (data.skip_corrupt=true)") == 2


@pytest.mark.integration
def test_shards_of_another_dataset_stop_the_flow_before_anything_is_written(stack, data_root, val_set):
    train = data_root / "mixed-train"
    make_dataset(train, per_id=4)
    make_dataset(data_root / "synthetic-like", per_id=2, seed=1, extra={"degradation": 0.5})
    shard = mix_in(train, data_root / "synthetic-like")
    name = f"mixed-{uuid.uuid4().hex[:6]}"
    proc = submit_flow(stack, flow_args(name, data_root, train, val_set), timeout=300)
    assert proc.returncode != 0
    assert last_error_line(proc).startswith(f"{shard}: column(s) ['degradation'] are not in the manifest's columns")
    assert runs_of(MlflowClient(stack.env()["MLFLOW_TRACKING_URI"]), name) == []
    assert not (data_root / "runs").exists() or not any((data_root / "runs").glob(f"{name}-*"))


@pytest.mark.integration
@pytest.mark.parametrize(("overrides", "message"), [
    (["scaling.use_gpu=true"], "scaling.use_gpu: 2 workers need 2 GPUs (1 each) but the Ray cluster has 0 (and "
                               "no autoscaler can add more); set scaling.use_gpu=false"),
    (["scaling.num_workers=4"], "scaling: 4 workers x 0.5 CPU + 1 CPU for Ray Data decoding = 3 CPUs, but the Ray "
                                "cluster has 2 (and no autoscaler can add more); lower scaling.num_workers or "
                                "scaling.cpus_per_worker"),
])
def test_workers_the_cluster_cannot_host_fail_at_once(stack, data_root, val_set, overrides, message):
    """Ray Train would wait for such workers forever (it retries placing them without limit)."""
    train = data_root / "clean-train"
    if not train.exists():
        make_dataset(train, per_id=16)
    name = f"gpu-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    proc = submit_flow(stack, flow_args(name, data_root, train, val_set, *overrides), timeout=300)
    assert proc.returncode != 0
    assert last_error_line(proc) == message
    assert time.monotonic() - started < 120
    assert runs_of(MlflowClient(stack.env()["MLFLOW_TRACKING_URI"]), name) == []


@pytest.mark.integration
def test_resume_whose_checkpoint_is_gone_names_the_step_and_keeps_the_runs(stack, data_root, val_set):
    from flows.tracking import FlowTracker

    train = data_root / "clean-train"
    if not train.exists():
        make_dataset(train, per_id=16)
    name = f"gone-{uuid.uuid4().hex[:6]}"
    args = flow_args(name, data_root, train, val_set)
    uri = stack.env()["MLFLOW_TRACKING_URI"]
    # A flow whose step 0 finished earlier, its checkpoint since deleted (storage cleaned up by hand).
    cfg = load_config([ROOT / "configs/default.yaml", TINY], [a for a in args if "=" in a])
    tracker = FlowTracker(with_overrides(cfg, {"tracking.uri": uri}))
    parent_id, _ = tracker.start_flow()
    step0 = tracker.step_run(PlannedStep(0, 1, 0))
    gone = data_root / "runs" / "deleted-checkpoint"
    tracker.complete_step(step0.run_id, str(gone), {"val_acc": 0.5}, {})
    tracker.client.set_terminated(parent_id, "FAILED")

    proc = submit_flow(stack, args, timeout=300)
    assert proc.returncode != 0
    line = last_error_line(proc)
    assert line.startswith(f"step 0 (kind 1) is complete in MLflow run {step0.run_id}, but checkpoint {gone}")
    assert line.endswith("; restore it, or run the flow under a new flow.name")
    runs = runs_of(MlflowClient(uri), name)
    assert {r.info.run_id for r in runs} == {parent_id, step0.run_id}  # no new runs
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[step0.run_id].info.status == "FINISHED" and by_id[step0.run_id].data.metrics["val_acc"] == 0.5
    assert by_id[parent_id].info.status == "FAILED" and line in by_id[parent_id].data.tags["eqface.error"]


# ---------------------------------------------------------------------------------------------- the CLIs


def run_cli(module: str, args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env={**full, **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_net(data_root) -> Path:
    from tests.tiny_model import tiny_model

    return tiny_model(data_root / "net.pt")


@pytest.mark.integration
def test_missing_mlflow_run_or_model_exits_2_naming_it(stack, data_root, val_set, tiny_net):
    env = {"MLFLOW_TRACKING_URI": stack.env()["MLFLOW_TRACKING_URI"]}
    faces = data_root / "faces"
    faces.mkdir(exist_ok=True)
    (faces / "a.png").write_bytes(png(1))
    missing_run = uuid.uuid4().hex
    proc = run_cli("flows.score", ["--model", f"runs:/{missing_run}/model", str(faces), "--no-progress"], env)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"score: error: cannot load model 'runs:/{missing_run}/model': ")
    assert f"Run with id={missing_run} not found" in line

    proc = run_cli("flows.evaluate", ["--model", "models:/no-such-model/3", "--dataset", str(val_set),
                                      "--out", str(data_root / "eval"), "--no-progress"], env)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("evaluate: error: cannot load model 'models:/no-such-model/3': ")
    assert "no-such-model" in line.split(": ", 2)[2]
    assert not (data_root / "eval").exists()

    proc = run_cli("flows.evaluate", ["--model", str(data_root / "runs" / "no-checkpoint-here"), "--dataset",
                                      str(val_set), "--out", str(data_root / "eval"), "--no-progress"], env)
    assert proc.returncode == 2
    assert "no-checkpoint-here" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.integration
def test_unreachable_mlflow_fails_in_seconds_not_minutes(data_root):
    port = free_port()
    started = time.monotonic()
    proc = run_cli("flows.score", ["--model", "runs:/0123456789abcdef/model", str(data_root), "--no-progress"],
                   {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"score: error: cannot load model 'runs:/0123456789abcdef/model': MLflow tracking server at "
        f"http://127.0.0.1:{port} is unreachable ([Errno 111] Connection refused)")
    assert time.monotonic() - started < 120  # the MLflow client alone retries for ~4 minutes (slack: a loaded CI)


@pytest.mark.integration
def test_score_lists_skips_and_counts_bad_files_and_says_so_in_its_status(tmp_path, tiny_net):
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "good1.png").write_bytes(png(1, size=40))
    (faces / "good2.jpg").write_bytes(png(2))  # a PNG named .jpg still reads
    (faces / "empty.png").write_bytes(b"")
    (faces / "notes.jpg").write_text("a shopping list, not a face")
    with (faces / "huge.jpg").open("wb") as f:  # 65 MiB, sparse: refused unread
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(65 * 2**20)
    with (faces / "big.png").open("wb") as f:  # 51 MiB under the limit, but not an image
        f.truncate(51 * 2**20)
    out = tmp_path / "scores.parquet"
    started = time.monotonic()
    proc = run_cli("flows.score", ["--model", str(tiny_net), str(faces), "--out", str(out), "--no-progress"], {})
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - started < 60
    assert sorted(pq.read_table(out).column("path").to_pylist()) == ["good1.png", "good2.jpg"]
    assert (tmp_path / "scores_contact.png").is_file()
    assert "scored 2 images (4 unreadable, skipped)" in proc.stdout
    err = proc.stderr.splitlines()
    assert "unreadable images: 4 of 6 (skipped)" in err
    reasons = {line.split(":")[0].strip(): line.split(": ", 1)[1] for line in err if line.startswith("  ")}
    assert reasons == {
        "big.png": "not an image PIL can identify",
        "empty.png": "empty file (0 bytes)",
        "huge.jpg": "file too large (65.0 MiB > --max-bytes 64.0 MiB), not read",
        "notes.jpg": "not an image PIL can identify",
    }
    assert err[-1] == "score: 4 of 6 files skipped as unreadable (listed above); exit status 3"


# ---------------------------------------------------------------------------------------------- real-face recipe


def test_held_out_people_who_are_also_in_training_are_refused(tmp_path):
    make_dataset(tmp_path / "train", per_id=4)
    make_dataset(tmp_path / "held", per_id=3, ids=["eve", "bob"], seed=3)
    make_dataset(tmp_path / "val", per_id=3, seed=4)
    cfg = load_config([DEFAULT_CONFIG, TINY], [f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'val'}",
                                                f"data.eval_sets.people={tmp_path / 'held'}"])
    with pytest.raises(DatasetError) as err:
        prepare_datasets(cfg)
    assert str(err.value) == ("data.eval_sets.people: 1 of its people are also in data.train (e.g. 'bob'), so its "
                              "figures would not be held out")


def test_a_training_set_of_one_photo_per_person_is_refused(tmp_path):
    make_dataset(tmp_path / "train", per_id=1)
    make_dataset(tmp_path / "val", per_id=3, seed=4)
    for holdout in ("0", "0.25"):
        cfg = load_config([DEFAULT_CONFIG, TINY], [f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'val'}",
                                                    f"data.quality_holdout={holdout}"])
        with pytest.raises(DatasetError) as err:
            prepare_datasets(cfg)
        assert str(err.value) == (f"{tmp_path / 'train'}: every identity has one photo; EQFace learns quality "
                                  "from photos of the same person that are harder than others, so it needs several "
                                  "photos per person")


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.augment.degrade_prob=0.6"], "data.augment: degrade_prob 0.6, jpeg_prob 0.0 and rescale_prob 0.0 "
                                        "degrade 60% of each identity's training images, leaving more degraded "
                                        "than clean ones; keep it at most 50%"),
    (["data.augment.degrade_prob=0.3", "data.augment.jpeg_prob=0.3"], "degrade 51% of each identity's"),
    (["data.quality_holdout=1.0"], "data.quality_holdout: must be in [0, 1), got 1.0"),
    (["data.augment.degrade_kinds=[blur, smear]"], "degrade_kinds must be some of blur, noise, lowres"),
])
def test_a_recipe_that_would_leave_more_degraded_than_clean_photos_is_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config([DEFAULT_CONFIG, TINY], overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_empty_training_set_is_refused(tmp_path):
    with pytest.raises(DatasetError) as err:
        make_dataset(tmp_path / "train", per_id=0)
    assert "\n" not in str(err.value) and str(tmp_path / "train") in str(err.value)
