import numpy as np
import pytest

from evaluation.aggregation import (
    OnlineAggregator,
    aggregate,
    compare_online_vs_window,
    evaluate_set_pairs,
    match_stream,
)


def unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def test_aggregate_methods_on_two_frames():
    emb = np.array([[10.0, 0.0], [0.0, 0.5]])  # norms differ: features are normalised before averaging
    q = np.array([0.9, 0.3])
    np.testing.assert_allclose(aggregate(emb, q, "mean"), unit([1, 1]))
    np.testing.assert_allclose(aggregate(emb, q, "best"), [1, 0])
    np.testing.assert_allclose(aggregate(emb, q, "qwfa"), unit([0.9, 0.3]))
    np.testing.assert_allclose(aggregate(emb, q, "qwfaf", s_th=0.5), [1, 0])  # the 0.3 frame is dropped
    np.testing.assert_allclose(aggregate(emb, q, "qwfaf", s_th=0.2), unit([0.9, 0.3]))
    np.testing.assert_allclose(aggregate(emb, q, "qwfaf", s_th=0.95), [1, 0])  # none passes: best frame
    np.testing.assert_allclose(aggregate(emb, [0.0, 0.0], "qwfa"), unit([1, 1]))  # all-zero weights: mean


def noisy_set(identity: np.ndarray, n_good: int, n_bad: int, rng: np.random.Generator):
    """Good frames near the identity with quality 0.9, pure-noise frames with quality 0.1."""
    dim = identity.size
    good = identity + 0.3 * rng.normal(size=(n_good, dim)) / np.sqrt(dim)
    bad = rng.normal(size=(n_bad, dim))
    q = np.r_[np.full(n_good, 0.9), np.full(n_bad, 0.1)]
    return np.vstack([good, bad]), q


def test_quality_weighting_beats_the_plain_mean_on_noisy_frames():
    rng = np.random.default_rng(0)
    identity = unit(rng.normal(size=64))
    emb, q = noisy_set(identity, n_good=3, n_bad=12, rng=rng)
    cos = {m: float(aggregate(emb, q, m) @ identity) for m in ("mean", "qwfa", "qwfaf")}
    assert cos["mean"] < cos["qwfa"] < cos["qwfaf"]
    assert cos["qwfaf"] > 0.95
    # qwfaf is exactly qwfa over the frames at or above s_th.
    np.testing.assert_allclose(aggregate(emb, q, "qwfaf", s_th=0.5), aggregate(emb[:3], q[:3], "qwfa"))


def test_evaluate_set_pairs_ranks_methods():
    rng = np.random.default_rng(1)
    dim, n_ids = 64, 40
    ids = np.array([unit(v) for v in rng.normal(size=(n_ids, dim))])
    sets_a, sets_b, same = [], [], []
    for k in range(200):
        a = k % n_ids
        b = a if k % 2 == 0 else (a + 1 + k // 2) % n_ids
        sets_a.append(noisy_set(ids[a], 2, 10, rng))
        sets_b.append(noisy_set(ids[b], 2, 10, rng))
        same.append(a == b)
    res = evaluate_set_pairs(sets_a, sets_b, same, fars=(1e-2,))
    assert set(res) == {"mean", "best", "qwfa", "qwfaf"}
    assert res["qwfaf"]["acc_mean"] == 1.0
    assert res["qwfa"]["auc"] > res["mean"]["auc"]
    assert res["mean"]["acc_mean"] < 0.9


def test_online_aggregator_is_ready_after_the_expected_frames():
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(6, 8))
    qualities = [0.2, 0.9, 0.3, 0.8, 0.7, 0.9]
    agg = OnlineAggregator(s_th=0.5, decide_at=2.0)
    assert agg.template is None
    ready = [agg.update(f, q) for f, q in zip(frames[:5], qualities[:5], strict=True)]
    assert ready == [False, False, False, False, True]  # 0.9 + 0.8 + 0.7 = 2.4 >= 2.0 at frame 5
    assert (agg.frames_seen, agg.frames_used) == (5, 3)
    assert agg.accumulated_quality == pytest.approx(2.4)
    np.testing.assert_allclose(agg.template, aggregate(frames[:5], qualities[:5], "qwfaf", s_th=0.5))
    agg.reset()
    assert agg.frames_seen == 0 and agg.template is None
    # A float sum of 0.7 three times is 2.0999999999999996: still ready at decide_at=2.1.
    agg = OnlineAggregator(s_th=0.5, decide_at=2.1)
    assert [agg.update(frames[i], 0.7) for i in range(3)] == [False, False, True]
    with pytest.raises(ValueError, match="frame 3 qualities: row 0"):
        agg.update(frames[0], float("nan"))


def test_match_stream():
    gallery = np.eye(5)
    ids = ["a", "b", "c", "d", "e"]
    rng = np.random.default_rng(0)
    probe = [(gallery[3] + 0.1 * rng.normal(size=5), q) for q in (0.1, 0.9, 0.9, 0.9)]
    d = match_stream(iter(probe), gallery, ids, threshold=0.5, s_th=0.5, decide_at=1.8)
    assert d.identity == "d" and d.frames_needed == 3 and d.ready and d.score > 0.9
    d = match_stream(iter(probe), gallery, ids, threshold=0.999, s_th=0.5, decide_at=1.8)
    assert d.identity is None and d.frames_needed == 3  # best score under the threshold: rejected
    d = match_stream(iter(probe[:2]), gallery, ids, threshold=0.5, s_th=0.5, decide_at=1.8)
    assert d.identity == "d" and d.frames_needed == 2 and not d.ready  # stream ended first
    d = match_stream(iter(probe[:1]), gallery, ids, threshold=0.5, s_th=0.5, decide_at=1.8)
    assert d.identity is None and np.isnan(d.score) and not d.ready  # no usable frame
    d = match_stream(iter(probe), gallery, ids, threshold=0.5, s_th=0.5, decide_at=10, max_frames=2)
    assert d.frames_needed == 2 and not d.ready
    with pytest.raises(ValueError, match="gallery has 5 rows but gallery_ids has 4"):
        match_stream(iter(probe), gallery, ids[:4], threshold=0.5)


def test_online_needs_fewer_frames_than_a_fixed_window():
    # Each probe: 3 low-quality frames pointing at a wrong identity w, then good frames close to the
    # right identity r (with a 0.1 lean towards w). The online aggregator skips the bad frames and
    # decides after 2 good ones (frame 5). A plain-mean window of the first L frames has r ahead of w
    # only once (L - 3) * 0.8955 > 3, i.e. L >= 7.
    dim = 8
    gallery = np.eye(dim)
    gallery_ids = list(range(dim))
    streams, true_ids = [], []
    for r in range(4):
        w = r + 4
        good = unit(gallery[r] + 0.1 * gallery[w])
        emb = np.vstack([np.tile(gallery[w], (3, 1)), np.tile(good, (9, 1))])
        q = np.r_[np.full(3, 0.1), np.full(9, 0.9)]
        streams.append((emb, q))
        true_ids.append(r)
    out = compare_online_vs_window(
        streams, true_ids, gallery, gallery_ids, threshold=0.5, s_th=0.5, decide_at=1.8
    )
    assert out["online_accuracy"] == 1.0
    assert out["online_mean_frames"] == 5.0 and out["online_ready_fraction"] == 1.0
    assert out["window_accuracy"][6] == 0.0 and out["window_accuracy"][7] == 1.0
    assert out["window_frames_at_equal_accuracy"] == 7
    # A quality-filtered window is right as soon as it holds one good frame.
    out = compare_online_vs_window(
        streams, true_ids, gallery, gallery_ids, 0.5, s_th=0.5, decide_at=1.8, window_method="qwfaf"
    )
    assert out["window_frames_at_equal_accuracy"] == 4


def test_bad_sets_are_named():
    with pytest.raises(ValueError, match="set: 2 embeddings but 3 qualities"):
        aggregate(np.ones((2, 4)), [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="qualities: row 1 is -0.5"):
        aggregate(np.ones((2, 4)), [0.5, -0.5])
    with pytest.raises(ValueError, match="unknown method 'median'"):
        aggregate(np.ones((2, 4)), [0.5, 0.5], "median")
