"""`ray job submit ... -- python -m flows.evaluate --protocol ...` on tiny IJB-C and YTF sets written from the
real faces, a tiny model registered in a real MLflow server: outputs, a hand check of the table from the
Parquet embeddings, the model's run, resume without duplicates, a bad image skipped and counted."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from flows.model_registry import log_pyfunc
from models import load_eqface_net
from tests.conftest import submit_flow
from tests.protocol_sets import FACES, write_ijb, write_ytf
from tests.tiny_model import tiny_model

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not FACES.is_dir(), reason="../shared/data/faces is absent")]


@pytest.fixture(scope="module")
def setup(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol_eval")
    write_ijb(root / "ijb")
    write_ytf(root / "ytf")
    net_path = tiny_model(root / "net.pt")
    card = root / "card.md"
    card.write_text("tiny test model")
    uri = stack.env()["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("protocol-eval")).info.run_id
    info = log_pyfunc(uri, run_id, net_path, card, None, load_eqface_net(net_path).arch)
    client.set_terminated(run_id)
    return {"root": root, "model": info.model_uri, "run_id": run_id, "client": client, "stack": stack}


def evaluate(setup, *args: str):
    return submit_flow(setup["stack"], ["flows.evaluate", "--model", setup["model"], "--no-progress", *args],
                       timeout=600, script="-m")


def hand_tar_at_far_1e1_mean(table, pair_lines: list[str]) -> float:
    """TAR@FAR=0.1 of plain template means, the slow obvious way: per template, per medium, loops."""
    media: dict = {}
    for t, m, e in zip(table["template"].to_pylist(), table["media"].to_pylist(),
                       table["embedding"].to_pylist(), strict=True):
        media.setdefault(t, {}).setdefault(m, []).append(np.asarray(e, np.float64))
    feats = {}
    for t, by_media in media.items():
        v = sum(np.mean(faces, axis=0) for faces in by_media.values())
        feats[t] = v / np.linalg.norm(v)
    genuine, impostor = [], []
    for line in pair_lines:
        a, b, same = (int(x) for x in line.split())
        (genuine if same else impostor).append(float(feats[a] @ feats[b]))
    impostor.sort(reverse=True)
    threshold = impostor[int(0.1 * len(impostor))]  # at most 10% of impostors above it
    return float(np.mean(np.array(genuine) > threshold))


def test_ijbc_through_ray_job_submit_writes_the_table_parquet_and_logs_to_the_models_run(setup):
    out = setup["root"] / "ijb_out"
    proc = evaluate(setup, "--protocol", "ijbc", "--root", str(setup["root"] / "ijb"), "--out", str(out),
                    "--shard-size", "10", "--actors", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "embedded 36, reused 0 of 4 shards" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 36 and metrics["num_templates"] == 12 and metrics["num_pairs"] == 66
    for w in ("mean", "qwfa", "qwfaf", "detector", "norm"):
        assert 0 <= metrics[f"tar_far1e-1_{w}"] <= 1
        assert metrics[f"tar_far1e-4_{w}"] is None  # 60 impostor pairs cannot measure 1e-4
    table = pq.read_table(out / "embeddings.parquet")
    assert {"image", "template", "media", "embedding", "quality", "detector_score"} <= set(table.column_names)
    assert sorted(table["index"].to_pylist()) == list(range(36))
    pair_lines = (setup["root"] / "ijb" / "meta" / "ijbc_template_pair_label.txt").read_text().splitlines()
    assert metrics["tar_far1e-1_mean"] == pytest.approx(hand_tar_at_far_1e1_mean(table, pair_lines))
    assert "| qwfaf |" in (out / "table.md").read_text() and (out / "roc.png").stat().st_size > 1000

    client = setup["client"]
    logged = client.get_run(setup["run_id"]).data.metrics
    assert logged["ijbc.tar_far1e-1_qwfa"] == pytest.approx(metrics["tar_far1e-1_qwfa"])
    names = {f.path for f in client.list_artifacts(setup["run_id"], "evaluation/ijbc")}
    assert names == {"evaluation/ijbc/metrics.json", "evaluation/ijbc/table.md", "evaluation/ijbc/roc.png"}
    assert client.get_run(setup["run_id"]).info.status == "FINISHED"  # not reopened

    # An interrupted run: one shard missing, one half-written temp file left behind. Only that shard is
    # computed again; the rows and the figures are the same, none twice.
    first = {p.name: p.read_bytes() for p in (out / "embeddings.parquet").glob("part-*.parquet")}
    (out / "embeddings.parquet" / "part-00002.parquet").unlink()
    (out / "embeddings.parquet" / ".part-00003.parquet.tmp-1-abcd").write_bytes(b"PAR1 cut short")
    proc = evaluate(setup, "--protocol", "ijbc", "--root", str(setup["root"] / "ijb"), "--out", str(out),
                    "--shard-size", "10")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "embedded 10, reused 3 of 4 shards" in proc.stdout
    again = pq.read_table(out / "embeddings.parquet")
    assert sorted(again["index"].to_pylist()) == list(range(36))
    np.testing.assert_allclose(np.asarray(again.sort_by("index")["embedding"].to_pylist()),
                               np.asarray(table.sort_by("index")["embedding"].to_pylist()), atol=1e-6)
    assert {n: b for n, b in first.items() if n != "part-00002.parquet"}.items() <= \
        {p.name: p.read_bytes() for p in (out / "embeddings.parquet").glob("part-*.parquet")}.items()
    assert json.loads((out / "metrics.json").read_text())["tar_far1e-1_qwfa"] == metrics["tar_far1e-1_qwfa"]


def test_ytf_through_ray_job_submit_with_a_bad_frame_skipped_and_counted(setup):
    root = setup["root"] / "ytf"
    bad = root / "aligned_images_DB" / "yaleB03" / "1" / "aligned_detect_1.2.jpg"
    bad.write_bytes(b"\xff\xd8\xff truncated")
    out = setup["root"] / "ytf_out"
    proc = evaluate(setup, "--protocol", "ytf", "--root", str(root), "--out", str(out), "--skip-bad",
                    "--batch-size", "16")
    metrics = json.loads((out / "metrics.json").read_text())
    assert "skipped: 1 bad input(s)" in proc.stdout + proc.stderr  # exit status 3: outputs written, input skipped
    assert metrics["skipped"]["count"] == 1 and "aligned_detect_1.2.jpg" in metrics["skipped"]["examples"][0]
    assert metrics["num_images"] == 99 and metrics["num_videos"] == 20 and metrics["num_splits"] == 10
    for m in ("mean", "qwfa", "qwfaf"):
        assert 0.4 <= metrics[f"ytf_acc_{m}"] <= 1 and metrics[f"ytf_std_{m}"] >= 0
    assert "ytf.ytf_acc_qwfaf" in setup["client"].get_run(setup["run_id"]).data.metrics
    assert Path(out / "table.md").read_text().startswith("| method | accuracy (%)")
