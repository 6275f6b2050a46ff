"""`python -m flows.evaluate` on a tiny model, a labelled synthetic shard set and a pairs dataset."""

import json

import numpy as np
import pytest
import torch

from data.pairs import write_pairs_dataset
from data.shards import write_dataset
from data.synthetic import SyntheticSpec, generate_rows, identity_name
from evaluation import flip_sum_embeddings, make_pairs, quality_correlation, verify, yaleb_light_angle
from evaluation.verification import kfold_accuracy
from flows import evaluate
from models import load_eqface_net
from tests.tiny_model import tiny_model

SPEC = SyntheticSpec(num_identities=8, train_per_identity=8, val_per_identity=1, image_size=32)
PLOTS = ["erc_fixed.png", "erc_recomputed.png", "roc.png", "quality_histogram.png", "quality_extremes.png"]


def yaleb_name(k: int) -> str:
    azimuths, elevations = (0, 10, -25, 50, -70, 85, 110, -130), (0, 20, -35, 45)
    az, el = azimuths[k % 8], elevations[(k // 8) % 4]
    return f"yaleB01_P00A{az:+04d}E{el:+03d}.png"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    rows = list(generate_rows(SPEC, "train"))  # 64 images of 8 identities, with `degradation`
    names = [identity_name(i) for i in range(SPEC.num_identities)]
    write_dataset(str(root / "labelled"), rows, label_to_identity=names)

    # Pairs dataset: no degradation column, Yale B style file names instead, 5 folds, one corrupt image.
    pair_rows = [
        {"image": r["image"], "label": r["label"], "identity": r["identity"], "source": yaleb_name(k)}
        for k, r in enumerate(rows)
    ]
    pair_rows[5]["image"] = b"\x89PNG\r\n\x1a\n this is not really a PNG"
    labels = np.array([r["label"] for r in rows])
    pairs, is_same = make_pairs(labels, 120, 600, seed=3)
    folds = np.arange(len(pairs)) % 5
    write_pairs_dataset(str(root / "pairs"), pair_rows, pairs, is_same, folds, label_to_identity=names)
    return {
        "model": tiny_model(root / "net.pt"),
        "root": root,
        "rows": rows,
        "pairs": pairs,
        "labels": labels,
    }


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = evaluate.main([*args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dataset_mode_prints_the_tables_and_writes_plots_and_json(setup, capsys):
    out = setup["root"] / "out1"
    code, stdout, _ = run(
        [
            "--model",
            str(setup["model"]),
            "--dataset",
            str(setup["root"] / "labelled"),
            "--num-genuine",
            "150",
            "--num-impostor",
            "1500",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    assert "1650 pairs (150 genuine, 1500 impostor)" in stdout
    assert "10 contiguous folds" in stdout
    assert "TAR@FAR=0.0001 n/a" in stdout and "needs >= 10000" in stdout  # 1500 impostors cannot measure 1e-4
    for variant in ("threshold fixed on all pairs", "threshold re-derived at each discard level"):
        assert variant in stdout
    for method in ("eqface", "random", "norm", "sharpness"):
        assert sum(line.startswith(method + " ") for line in stdout.splitlines()) == 2  # one row per variant
    assert "serfiq" not in stdout
    assert "correlation of quality with degradation over 64 images" in stdout
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000
    report = json.loads((out / "report.json").read_text())
    v = report["verification"]
    assert (v["num_genuine"], v["num_impostor"], report["num_pairs"]) == (150, 1500, 1650)
    assert v["tar_at_far"]["0.0001"] is None and 0 <= v["tar_at_far"]["0.01"] <= 1
    assert report["unreadable_images"] == {"count": 0, "items": [], "pairs_dropped": 0}
    assert set(report["erc"]) == {"eqface", "random", "norm", "sharpness"}
    assert len(report["erc"]["eqface"]) == 2 * 2 * 3 + 2  # variants x FMRs x ranges + FNMR at no discard
    assert len(report["erc_curves"]["eqface"]["fnmr"]["fixed"]["0.001"]) == 20

    # The same numbers from the evaluation library directly: same pairs (make_pairs, seed 0), same model.
    net = load_eqface_net(setup["model"]).eval()
    pairs, is_same = make_pairs(setup["labels"], 150, 1500, seed=0)
    from data.pipeline import load_arrays

    data = load_arrays(str(setup["root"] / "labelled"), image_size=32)
    emb = flip_sum_embeddings(lambda x: net(torch.as_tensor(x)), data["image"])
    expected = verify(emb[pairs[:, 0]], emb[pairs[:, 1]], is_same)
    assert v["acc_mean"] == pytest.approx(expected["acc_mean"], abs=1e-9)
    assert v["auc"] == pytest.approx(expected["auc"], abs=1e-6)
    with torch.no_grad():
        quality = net(torch.from_numpy(data["image"]))[1].numpy()
    rho = quality_correlation(quality, data["degradation"])["spearman"]
    assert report["correlation"]["methods"]["eqface"]["spearman"] == pytest.approx(rho, abs=1e-6)


def test_pairs_mode_uses_the_sets_folds_skips_unreadable_images_and_adds_serfiq(setup, capsys):
    out = setup["root"] / "out2"
    code, stdout, _ = run(
        [
            "--model",
            str(setup["model"]),
            "--pairs",
            str(setup["root"] / "pairs"),
            "--out",
            str(out),
            "--serfiq",
        ],
        capsys,
    )
    assert code == 0
    uses_bad = int((setup["pairs"] == 5).any(axis=1).sum())
    assert uses_bad > 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_pairs"] == len(setup["pairs"]) - uses_bad
    assert report["num_images"] == 63
    unreadable = report["unreadable_images"]
    assert unreadable["count"] == 1 and unreadable["pairs_dropped"] == uses_bad
    assert "row 5 (source 'yaleB01_P00A" in unreadable["items"][0]
    assert f"unreadable images skipped: 1 ({uses_bad} pairs using them dropped)" in stdout
    assert "row 5 (source 'yaleB01_P00A" in stdout
    assert "(the set's own 5 folds)" in stdout
    assert len(report["verification"]["fold_accuracies"]) == 5
    assert "serfiq" in report["erc"] and sum(line.startswith("serfiq ") for line in stdout.splitlines()) == 2
    # Ground truth comes from the Yale B file names: the off-axis lighting angle.
    c = report["correlation"]
    assert c["ground_truth"] == "yaleb_light_angle" and c["num_images"] == 63
    assert set(c["methods"]) == {"eqface", "random", "norm", "sharpness", "serfiq"}
    assert -1 <= c["methods"]["sharpness"]["spearman"] <= 1
    assert yaleb_light_angle(yaleb_name(9))[2] > 0  # the names really parse


def test_fold_accuracy_uses_the_given_folds():
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3])
    is_same = np.array([True, True, False, False, True, False])
    accs, thresholds = kfold_accuracy(scores, is_same, folds=np.array([0, 0, 0, 1, 1, 1]))
    assert accs.tolist() == [1.0, 1.0] and thresholds.shape == (2,)
    # Fold 1 alone puts the threshold between 0.3 and 0.7, so fold 0's genuine 0.25 is rejected.
    accs, _ = kfold_accuracy(
        np.array([0.9, 0.25, 0.1, 0.2, 0.7, 0.3]), is_same, folds=np.array([0, 0, 0, 1, 1, 1])
    )
    assert accs[0] == pytest.approx(2 / 3)


def test_errors_exit_2_with_a_clear_message(setup, capsys):
    code, _, err = run(["--model", str(setup["model"]), "--pairs", str(setup["root"] / "nowhere")], capsys)
    assert code == 2 and "no pairs.json" in err
    code, _, err = run(
        ["--model", str(setup["root"] / "missing.pt"), "--pairs", str(setup["root"] / "pairs")], capsys
    )
    assert code == 2 and "cannot load model" in err
    code, _, err = run(
        ["--model", str(setup["model"]), "--dataset", str(setup["root"] / "labelled"), "--image-size", "48"],
        capsys,
    )
    assert code == 2 and "takes 32 x 32 images" in err
