import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from evaluation.baselines import (
    as_uint8_hwc,
    dropout_only_train_mode,
    feature_norm_quality,
    laplacian_variance,
    random_quality,
    serfiq_quality,
    stochastic_embed_fn_from_module,
)
from evaluation.quality_assessment import (
    curve_area,
    error_versus_discard,
    format_quality_table,
    pair_quality,
    quality_correlation,
    quality_report,
    yaleb_light_angle,
)

FACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "faces"


def synthetic_scores(n_gen: int = 2000, n_imp: int = 5000, seed: int = 0):
    """Genuine and impostor cosine scores that overlap enough to give FNMR around 0.3 at FMR 1e-2."""
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(0.3, 0.15, n_gen), rng.normal(0.0, 0.1, n_imp)]
    same = np.r_[np.ones(n_gen, bool), np.zeros(n_imp, bool)]
    return scores, same


def oracle_quality(scores, same):
    """Minus the true per-pair error rate, on one scale for both kinds of pair.

    A genuine pair errs at every threshold above its score: error = share of impostors scoring at
    least as high. An impostor pair errs at every threshold below it: share of genuines at most as high.
    """
    gen, imp = np.sort(scores[same]), np.sort(scores[~same])
    error = np.where(
        same,
        1 - np.searchsorted(imp, scores, side="left") / imp.size,
        np.searchsorted(gen, scores, side="right") / gen.size,
    )
    return -error


def test_oracle_quality_gives_decreasing_curves_and_the_lowest_areas():
    scores, same = synthetic_scores()
    rng = np.random.default_rng(1)
    oracle = oracle_quality(scores, same)
    methods = {
        "oracle": oracle,
        "noisy_oracle": oracle + rng.normal(0, 0.3, scores.size),
        "random": rng.random(scores.size),
        "inverse": -oracle,
    }
    # Up to 80 % discarded (finer step than the default): the oracle keeps genuine pairs preferentially,
    # so beyond that fewer than 1/FMR impostors would remain for the recomputed variant.
    fractions = np.round(np.arange(0, 0.801, 0.025), 10)
    res = {
        k: error_versus_discard(scores, same, q, fmrs=(1e-2,), discard_fractions=fractions)
        for k, q in methods.items()
    }
    for variant in ("fixed", "recomputed"):
        curve = res["oracle"].fnmr[variant][1e-2]
        assert curve[0] > 0.2
        assert (np.diff(curve) <= 1e-12).all(), variant
        assert curve[-1] == 0.0
        for area in ("0-0.2", "0-0.3", "full"):
            best = res["oracle"].areas[variant][1e-2][area]
            others = [res[k].areas[variant][1e-2][area] for k in methods if k != "oracle"]
            assert best < min(others), (variant, area)
    # Both variants start from the same threshold.
    assert res["random"].fnmr["fixed"][1e-2][0] == res["random"].fnmr["recomputed"][1e-2][0]


def test_random_quality_gives_a_flat_curve():
    scores, same = synthetic_scores()
    curves = {"fixed": [], "recomputed": []}
    for seed in range(5):
        res = error_versus_discard(scores, same, random_quality(scores.size, seed=seed), fmrs=(1e-2,))
        for variant in curves:
            curves[variant].append(res.fnmr[variant][1e-2])
    fractions = res.discard_fractions
    for variant, tol in (("fixed", 0.03), ("recomputed", 0.05)):
        mean_curve = np.mean(curves[variant], axis=0)
        start = mean_curve[0]
        upto = fractions <= 0.8
        assert np.abs(mean_curve[upto] - start).max() < tol, variant
        area = np.mean([curve_area(fractions, c, 0, 0.3) for c in curves[variant]])
        assert area / (0.3 * start) == pytest.approx(1.0, abs=0.05)


def test_tied_qualities_are_not_discarded_in_storage_order():
    # Genuine pairs stored lowest score first: discarding ties by index would look like a perfect quality.
    scores, same = synthetic_scores()
    order = np.lexsort((scores, ~same))
    scores, same = scores[order], same[order]
    constant = np.zeros(scores.size)
    a = error_versus_discard(scores, same, constant, fmrs=(1e-2,))
    b = error_versus_discard(scores, same, constant, fmrs=(1e-2,))
    np.testing.assert_array_equal(a.fnmr["fixed"][1e-2], b.fnmr["fixed"][1e-2])
    curve = a.fnmr["fixed"][1e-2]
    assert np.abs(curve[a.discard_fractions <= 0.5] - curve[0]).max() < 0.05


def test_too_few_impostors_give_nan_and_a_note():
    scores, same = synthetic_scores(n_gen=500, n_imp=1500)
    res = error_versus_discard(scores, same, oracle_quality(scores, same), fmrs=(1e-3, 1e-2))
    assert np.isfinite(res.fnmr["fixed"][1e-3]).all()
    rec = res.fnmr["recomputed"][1e-3]
    # 1000 impostors are needed for FMR 1e-3: the recomputed curve stops once a third of the pairs are gone.
    assert np.isfinite(rec[0]) and np.isnan(rec[-1])
    assert math.isnan(res.areas["recomputed"][1e-3]["full"])
    assert any("recomputed, FMR=0.001" in n for n in res.notes)
    few = error_versus_discard(scores[:900], same[:900], np.zeros(900), fmrs=(1e-3,))
    assert np.isnan(few.fnmr["fixed"][1e-3]).all()


def test_curve_area_and_flat_keys():
    x = np.round(np.arange(0, 0.951, 0.05), 10)
    assert curve_area(x, 1 - x, 0, 0.2) == pytest.approx(0.2 - 0.02)
    assert curve_area(x, np.full(x.size, 0.5), 0, 0.3) == pytest.approx(0.15)
    scores, same = synthetic_scores(n_gen=200, n_imp=1000)
    keys = error_versus_discard(scores, same, np.zeros(1200)).flat_areas()
    assert "fixed_fmr0.001_auc0-0.2" in keys and "recomputed_fmr0.01_aucfull" in keys and len(keys) == 12


def test_pair_quality_is_the_minimum_and_checks_indices():
    q = np.array([0.1, 0.9, 0.5])
    np.testing.assert_allclose(pair_quality(q, [[0, 1], [1, 2]]), [0.1, 0.5])
    with pytest.raises(ValueError, match=r"pairs: row 1 \[1, 3\] indexes outside 3 samples"):
        pair_quality(q, [[0, 1], [1, 3]])


def test_correlations():
    q = np.random.default_rng(0).random(50)
    c = quality_correlation(q, np.exp(3 * q))
    assert c["spearman"] == pytest.approx(1.0) and c["kendall"] == pytest.approx(1.0)
    c = quality_correlation(q, -(q**3))
    assert c["spearman"] == pytest.approx(-1.0) and c["kendall"] == pytest.approx(-1.0)
    # Ties get average ranks: x ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4).
    assert quality_correlation([1, 1, 2, 3], [1, 2, 3, 4])["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(quality_correlation([1, 1, 1], [1, 2, 3])["spearman"])
    with pytest.raises(ValueError, match="ground_truth: row 1"):
        quality_correlation([1, 2, 3], [1, np.nan, 3])


def test_yaleb_light_angle():
    assert yaleb_light_angle("yaleB01_P00A+000E+00.png") == (0.0, 0.0, 0.0)
    az, el, off = yaleb_light_angle(Path("/x/yaleB05/yaleB05_P00A-035E+40.png"))
    assert (az, el) == (-35.0, 40.0)
    assert off == pytest.approx(
        math.degrees(math.acos(math.cos(math.radians(35)) * math.cos(math.radians(40))))
    )
    assert off == pytest.approx(51.13, abs=0.01)
    assert yaleb_light_angle("yaleB10_P00A+000E+90.png")[2] == pytest.approx(90.0)
    assert yaleb_light_angle("yaleB10_P00A+130E+20.png")[2] > 90
    with pytest.raises(ValueError, match="yaleB01_P00_Ambient.pgm"):
        yaleb_light_angle("yaleB01_P00_Ambient.pgm")


def test_yaleb_brightness_falls_with_off_axis_light():
    root = FACES / "yaleb"
    if not root.is_dir():
        pytest.skip(f"real faces not available at {root}")
    from PIL import Image

    files = sorted((root / "yaleB01").glob("*.png")) + sorted((root / "yaleB02").glob("*.png"))
    assert len(files) > 100
    images = np.stack([np.asarray(Image.open(f)) for f in files])
    angles = [yaleb_light_angle(f)[2] for f in files]
    corr = quality_correlation(images.reshape(len(files), -1).mean(axis=1), angles)
    assert corr["spearman"] < -0.8 and corr["kendall"] < -0.6


# ----------------------------------------------------------------------------- baselines


def test_laplacian_variance_known_values_and_formats():
    flat = np.full((1, 8, 8), 77, np.uint8)
    checker = ((np.indices((8, 8)).sum(axis=0) % 2) * 255).astype(np.uint8)[None]
    # Each interior pixel sees four opposite neighbours: Laplacian = +-4 * 255 everywhere.
    np.testing.assert_allclose(laplacian_variance(np.concatenate([flat, checker])), [0.0, (4 * 255) ** 2])
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    blurred = ((sharp[:, :-1, :-1].astype(float) + sharp[:, 1:, 1:]) / 2).astype(np.uint8)
    assert (laplacian_variance(blurred) < laplacian_variance(sharp[:, :-1, :-1])).all()
    as_float_chw = sharp.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(laplacian_variance(as_float_chw), laplacian_variance(sharp), rtol=1e-4)
    np.testing.assert_array_equal(as_uint8_hwc(as_float_chw), sharp)
    with pytest.raises(ValueError, match="dtype int64"):
        laplacian_variance(np.zeros((1, 8, 8), np.int64))


def test_norm_and_random_baselines():
    np.testing.assert_allclose(feature_norm_quality([[3.0, 4.0], [0.0, 1.0]]), [5.0, 1.0])
    r = random_quality(100, seed=3)
    np.testing.assert_array_equal(r, random_quality(100, seed=3))
    assert r.min() >= 0 and r.max() < 1 and not np.array_equal(r, random_quality(100, seed=4))


def test_serfiq_known_values():
    images = np.zeros((3, 2))
    assert np.allclose(serfiq_quality(lambda x: np.ones((len(x), 4)), images, m=5), 1.0)
    calls = []

    def alternating(x):  # passes alternate between two orthogonal directions: distance sqrt(2)
        calls.append(1)
        return np.tile(np.eye(2)[len(calls) % 2], (len(x), 1))

    np.testing.assert_allclose(serfiq_quality(alternating, images, m=2), 2 / (1 + math.exp(math.sqrt(2))))


def test_serfiq_ranks_noisier_images_lower():
    noise = torch.tensor([0.01, 0.1, 0.3, 1.0])
    base = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))

    def stochastic(x):
        idx = torch.as_tensor(x).long()
        return base[idx] + noise[idx, None] * torch.randn(len(idx), 16)

    rng_state = torch.get_rng_state()
    q = serfiq_quality(stochastic, np.arange(4), m=10, batch_size=3, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone
    assert (np.diff(q) < 0).all()
    np.testing.assert_allclose(q, serfiq_quality(stochastic, np.arange(4), m=10, batch_size=3, seed=0))


def test_serfiq_module_wrapper_enables_only_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.0), nn.Linear(16, 8))
    model.train()
    bn = model[1]
    running_mean = bn.running_mean.clone()
    x = torch.randn(5, 8)
    fn = stochastic_embed_fn_from_module(model, p=0.5)
    a, b = fn(x), fn(x)
    assert not np.allclose(a, b)  # dropout active at p=0.5
    assert torch.equal(bn.running_mean, running_mean)  # BatchNorm stayed in eval mode
    assert model.training and bn.training and model[2].p == 0.0  # modes and rate restored
    with dropout_only_train_mode(model):
        assert not model.training and not bn.training and model[2].training
    # With the model's own p=0 the passes agree and SER-FIQ gives quality 1.
    np.testing.assert_allclose(serfiq_quality(stochastic_embed_fn_from_module(model), x, m=3), 1.0)
    assert (serfiq_quality(fn, x, m=8) < 1).all()
    with pytest.raises(ValueError, match="no nn.Dropout"):
        stochastic_embed_fn_from_module(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- report


def test_quality_report_table():
    rng = np.random.default_rng(0)
    n_classes, per_class, dim = 30, 10, 16
    labels = np.repeat(np.arange(n_classes), per_class)
    centers = rng.normal(size=(n_classes, dim))
    sigma = rng.uniform(0.2, 3.0, labels.size)  # per-image noise: the true quality is 1 / sigma
    emb = centers[labels] + sigma[:, None] * rng.normal(size=(labels.size, dim))
    images = rng.integers(0, 256, size=(labels.size, 8, 8), dtype=np.uint8)
    table = quality_report(
        emb,
        1 / sigma,
        labels,
        images=images,
        extra_qualities={"inverse": sigma},
        num_genuine=1000,
        num_impostor=5000,
    )
    assert list(table) == ["eqface", "random", "norm", "sharpness", "inverse"]
    key = "fixed_fmr0.01_auc0-0.3"
    assert table["eqface"][key] < table["random"][key] < table["inverse"][key]
    assert table["eqface"]["num_genuine"] == 1000 and table["eqface"]["num_impostor"] == 5000
    text = format_quality_table(table, columns=[key, "num_genuine"])
    lines = text.splitlines()
    assert len(lines) == 2 + 5 and key in lines[0] and lines[2].startswith("eqface")
    with pytest.raises(ValueError, match="'sharpness' needs images"):
        quality_report(emb, 1 / sigma, labels)
    with pytest.raises(ValueError, match="quality 'x': 3 values for 300"):
        quality_report(emb, 1 / sigma, labels, baselines=(), extra_qualities={"x": [1, 2, 3]})
