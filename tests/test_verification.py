import numpy as np
import pytest
import torch

from evaluation import verification
from evaluation.verification import (
    best_accuracy_threshold,
    count_available_pairs,
    flip_sum_embeddings,
    make_pairs,
    roc_curve,
    verify,
    verify_scores,
)


def clustered_embeddings(n_classes: int, per_class: int, dim: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    centers = rng.normal(size=(n_classes, dim))
    return centers[labels] + noise * rng.normal(size=(labels.size, dim)), labels


def test_perfect_embedding_gives_accuracy_one_and_tar_one():
    emb, labels = clustered_embeddings(20, 20, 32, noise=0.01)
    pairs, same = make_pairs(labels, 1000, 10000, seed=0)
    r = verify(emb[pairs[:, 0]], emb[pairs[:, 1]], same)
    assert r["acc_mean"] == 1.0 and r["acc_std"] == 0.0
    assert r["tar_at_far"] == {1e-2: 1.0, 1e-3: 1.0, 1e-4: 1.0}
    assert r["auc"] == 1.0
    assert r["notes"] == []
    gen, imp = r["roc"]["tpr"], r["roc"]["fpr"]
    assert gen[0] == 0 and imp[0] == 0 and gen[-1] == 1 and imp[-1] == 1


def test_tar_is_nan_with_a_reason_when_impostors_are_too_few():
    emb, labels = clustered_embeddings(20, 20, 32, noise=0.01)
    pairs, same = make_pairs(labels, 500, 2000, seed=0)
    r = verify(emb[pairs[:, 0]], emb[pairs[:, 1]], same)
    assert r["tar_at_far"][1e-2] == 1.0 and r["tar_at_far"][1e-3] == 1.0
    assert np.isnan(r["tar_at_far"][1e-4])
    assert len(r["notes"]) == 1 and "2000 impostor pairs" in r["notes"][0] and "10000" in r["notes"][0]


def test_unrelated_embeddings_are_at_chance():
    rng = np.random.default_rng(1)
    same = rng.random(2000) < 0.5
    r = verify(rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16)), same)
    assert 0.4 < r["acc_mean"] < 0.6
    assert abs(r["auc"] - 0.5) < 0.05


def test_tar_at_far_known_values():
    impostors = np.arange(1000) / 1000  # 0.000 ... 0.999
    genuine = np.array([0.9995, 0.995, 0.9895, 0.989])
    scores = np.r_[genuine, impostors]
    same = np.r_[np.ones(4, bool), np.zeros(1000, bool)]
    r = verify_scores(scores, same, n_folds=2)
    # FAR 1e-2: 10 impostors may pass -> threshold 0.989 (score > t); FAR 1e-3: 1 may pass -> 0.998.
    assert r["far_thresholds"][1e-2] == pytest.approx(0.989)
    assert r["far_thresholds"][1e-3] == pytest.approx(0.998)
    assert r["tar_at_far"][1e-2] == 0.75
    assert r["tar_at_far"][1e-3] == 0.25
    assert np.isnan(r["tar_at_far"][1e-4])


def test_roc_and_auc_on_a_hand_example():
    fpr, tpr, thr = roc_curve(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert thr[0] == np.inf
    r = verify_scores([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], n_folds=2)
    assert r["auc"] == pytest.approx(0.75)
    # Tied scores form a single ROC step.
    fpr, tpr, _ = roc_curve(np.array([0.5, 0.5]), np.array([True, False]))
    np.testing.assert_allclose(fpr, [0, 1])
    np.testing.assert_allclose(tpr, [0, 1])


def test_best_threshold_matches_brute_force_with_ties():
    rng = np.random.default_rng(3)
    same = rng.random(300) < 0.4
    scores = np.round(rng.normal(size=300) + same, 1)  # rounding makes many ties
    t, acc = best_accuracy_threshold(scores, same)
    candidates = np.r_[scores.min() - 1, np.unique(scores)]
    brute = max(np.mean((scores > c) == same) for c in candidates)
    assert acc == pytest.approx(brute)
    assert np.mean((scores > t) == same) == pytest.approx(acc)


def test_ten_fold_threshold_comes_from_the_other_nine_folds():
    # Folds 1..9: genuine in [0.6, 0.9], impostors in [0.1, 0.4]. Fold 0: ten genuine pairs at 0.45.
    # Fold 0 is scored at the midpoint 0.5 learnt from the others -> 0 correct; every other fold sees
    # fold 0 in training, which moves its cut below 0.45 -> all correct.
    rng = np.random.default_rng(0)
    scores, same = [np.full(10, 0.45)], [np.ones(10, bool)]
    for _ in range(9):
        scores.append(np.r_[rng.uniform(0.6, 0.9, 5), rng.uniform(0.1, 0.4, 5)])
        same.append(np.r_[np.ones(5, bool), np.zeros(5, bool)])
    r = verify_scores(np.concatenate(scores), np.concatenate(same))
    np.testing.assert_allclose(r["fold_accuracies"], [0] + [1] * 9)
    assert r["acc_mean"] == pytest.approx(0.9)
    assert r["acc_std"] == pytest.approx(0.3)
    assert r["best_threshold_accuracy"] == 1.0


def test_make_pairs_is_valid_seeded_and_distinct():
    labels = np.repeat(np.arange(15), 6)
    pairs, same = make_pairs(labels, 200, 400, seed=7)
    assert pairs.shape == (600, 2) and same.sum() == 200
    assert (pairs[:, 0] < pairs[:, 1]).all()  # no self pairs, canonical order
    assert len({tuple(p) for p in pairs.tolist()}) == 600  # no duplicates
    np.testing.assert_array_equal(labels[pairs[:, 0]] == labels[pairs[:, 1]], same)
    again, _ = make_pairs(labels, 200, 400, seed=7)
    other, _ = make_pairs(labels, 200, 400, seed=8)
    np.testing.assert_array_equal(pairs, again)
    assert not np.array_equal(pairs, other)
    # Shuffled, so contiguous folds hold both kinds.
    assert all(0 < chunk.sum() < chunk.size for chunk in np.array_split(same, 10))


def test_make_pairs_can_take_every_genuine_pair_and_refuses_more():
    labels = np.repeat(np.arange(5), 4)  # 5 * C(4, 2) = 30 genuine pairs
    pairs, same = make_pairs(labels, 30, 0, seed=0)
    assert len({tuple(p) for p in pairs.tolist()}) == 30 and same.all()
    with pytest.raises(ValueError, match="asked for 31 genuine pairs but only 30"):
        make_pairs(labels, 31, 0)


def test_make_pairs_rejection_sampling_path(monkeypatch):
    monkeypatch.setattr(verification, "_ENUMERATE_LIMIT", 0)
    labels = np.repeat(np.arange(30), 5)
    pairs, same = make_pairs(labels, 100, 300, seed=1)
    assert len({tuple(p) for p in pairs.tolist()}) == 400
    assert (pairs[:, 0] < pairs[:, 1]).all()
    np.testing.assert_array_equal(labels[pairs[:, 0]] == labels[pairs[:, 1]], same)


def test_make_pairs_never_joins_samples_of_one_group():
    labels = np.array([0, 0, 0, 1, 1])
    groups = np.array([0, 0, 1, 1, 2])
    assert count_available_pairs(labels, groups) == (3, 5)
    pairs, same = make_pairs(labels, 3, 5, seed=0, groups=groups)
    got = {tuple(p) for p in pairs[same].tolist()}
    assert got == {(0, 2), (1, 2), (3, 4)}
    assert {tuple(p) for p in pairs[~same].tolist()} == {(0, 3), (0, 4), (1, 3), (1, 4), (2, 4)}
    with pytest.raises(ValueError, match="only 5 exist"):
        make_pairs(labels, 0, 6, groups=groups)


def test_flip_sum_embeddings():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3 * 4 * 5, 8))

    def embed_fn(x):
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        return flat @ w, np.full(len(x), 0.5)

    images = rng.uniform(-1, 1, size=(6, 3, 4, 5))
    emb = flip_sum_embeddings(embed_fn, images, batch_size=4)
    expected = embed_fn(images)[0] + embed_fn(images[..., ::-1])[0]
    np.testing.assert_allclose(emb, expected / np.linalg.norm(expected, axis=1, keepdims=True))
    # Flip-sum is invariant to flipping the input.
    np.testing.assert_allclose(flip_sum_embeddings(embed_fn, images[..., ::-1].copy()), emb)
    # torch in, torch out works the same and quality can come back too.
    wt = torch.as_tensor(w)
    emb_t, q = flip_sum_embeddings(
        lambda x: (x.reshape(len(x), -1).double() @ wt, torch.full((len(x),), 0.5)),
        torch.as_tensor(images),
        return_quality=True,
    )
    np.testing.assert_allclose(emb_t, emb, atol=1e-12)
    np.testing.assert_allclose(q, 0.5)


def test_bad_inputs_name_the_row():
    emb = np.ones((5, 4))
    bad = emb.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="emb_b: row 3"):
        verify(emb, bad, [1, 0, 1, 0, 1], n_folds=2)
    with pytest.raises(ValueError, match="is_same: row 2 is 2"):
        verify(emb, emb, [1, 0, 2, 0, 1], n_folds=2)
    with pytest.raises(ValueError, match="same shape"):
        verify(emb, emb[:4], [1, 0, 1, 0, 1], n_folds=2)
    with pytest.raises(ValueError, match="both genuine and impostor"):
        verify(emb, emb, [1, 1, 1, 1, 1], n_folds=2)
