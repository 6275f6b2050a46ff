"""benchmarks/set_aggregation.py: track generation, and the protocol on constructed embeddings.

The embeddings are built so that a frame's noise grows with its ground-truth degradation and its
quality is 1 - degradation: the situation where quality-weighted aggregation must pay off.
"""

import numpy as np
import pytest

from benchmarks.set_aggregation import (
    DECIDE_SWEEP,
    degradation_profile,
    drift,
    format_results,
    make_synthetic_tracks,
    online_wins,
    run_protocol,
)
from data.synthetic import SyntheticSpec, sample_variation


@pytest.fixture(scope="module")
def tracks():
    # 12 identities x 3 tracks x 12 frames at 16 px: ~1 s to render.
    return make_synthetic_tracks(12, 3, 12, image_size=16, seed=0, supersample=1)


def noisy_sets(tracks, base_noise: float = 0.2, degraded_noise: float = 3.0, dim: int = 32, seed: int = 0):
    """Per track: unit identity centre + N(0, (base + extra * d^2)^2) per dimension; quality = 1 - d."""
    rng = np.random.default_rng(seed)
    n_ids = max(t.identity for t in tracks) + 1
    centres = rng.normal(size=(n_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sets = []
    for t in tracks:
        d = t.degradation.astype(np.float64)
        emb = centres[t.identity] + (base_noise + degraded_noise * d**2)[:, None] * rng.normal(
            size=(d.size, dim)
        )
        quality = np.clip(1 - d + 0.05 * rng.normal(size=d.size), 0, 1)
        sets.append((emb, quality))
    return sets, np.array([t.identity for t in tracks])


def test_tracks_have_the_asked_shape_and_a_degradation_that_changes_along_them(tracks):
    assert len(tracks) == 36
    assert [t.identity for t in tracks[:6]] == [0, 0, 0, 1, 1, 1]
    for t in tracks:
        assert t.images.shape == (12, 3, 16, 16) and t.images.dtype == np.float32
        assert t.images.min() >= -1.0 and t.images.max() <= 1.0
        assert t.degradation.shape == (12,)
        assert 0.0 <= t.degradation.min() and t.degradation.max() <= 1.0
        assert np.ptp(t.degradation) >= 0.2  # at least half a wave between a near-clean and a bad level
    # Identities look different, frames of one track look alike more than frames of another identity.
    a, b, other = tracks[0].images, tracks[1].images, tracks[3].images
    assert not np.array_equal(a, b)
    assert np.abs(a[0] - other[0]).mean() > 0.05


def test_tracks_are_reproducible_from_the_seed():
    first = make_synthetic_tracks(2, 2, 3, image_size=16, seed=5, supersample=1)
    again = make_synthetic_tracks(2, 2, 3, image_size=16, seed=5, supersample=1)
    other = make_synthetic_tracks(2, 2, 3, image_size=16, seed=6, supersample=1)
    assert all(np.array_equal(x.images, y.images) for x, y in zip(first, again, strict=True))
    assert not np.array_equal(first[0].images, other[0].images)


def test_tracks_refuse_sizes_without_genuine_pairs():
    with pytest.raises(ValueError, match="tracks_per_identity"):
        make_synthetic_tracks(3, 1, 4, image_size=16)


def test_degradation_profile_stays_in_range():
    for seed in range(50):
        d = degradation_profile(20, np.random.default_rng(seed))
        assert d.min() >= 0 and d.max() <= 1 and np.ptp(d) >= 0.2


def test_drift_interpolates_pose_and_keeps_the_surroundings():
    spec = SyntheticSpec(num_identities=2, image_size=16)
    rng = np.random.default_rng(0)
    a, b = sample_variation(rng, spec), sample_variation(rng, spec)
    assert drift(a, b, 0.0) == a
    mid = drift(a, b, 0.5)
    assert mid.yaw == pytest.approx((a.yaw + b.yaw) / 2)
    assert mid.shift == pytest.approx(tuple((x + y) / 2 for x, y in zip(a.shift, b.shift, strict=True)))
    assert mid.background == a.background and mid.shirt == a.shirt


def test_quality_weighted_aggregation_beats_mean_pooling_on_degrading_tracks(tracks):
    sets, labels = noisy_sets(tracks)
    res = run_protocol(sets, labels, seed=0)
    acc = {m: r["acc_mean"] for m, r in res["set_pairs"].items()}
    auc = {m: r["auc"] for m, r in res["set_pairs"].items()}
    assert res["set_pairs"]["mean"]["num_genuine"] == 36  # 3 pairs of tracks per identity
    assert acc["qwfa"] >= acc["mean"] + 0.03, acc
    assert acc["qwfaf"] >= acc["mean"] + 0.02, acc
    assert auc["qwfa"] > auc["mean"] and auc["qwfaf"] > auc["mean"], auc
    # s_th defaults to the lower quartile of frame quality, decide_at to three frames of median quality.
    all_q = np.concatenate([q for _, q in sets])
    assert res["s_th"] == pytest.approx(np.quantile(all_q, 0.25))
    assert res["decide_at"] == pytest.approx(3 * np.median(all_q))


def test_mean_pooling_is_as_good_when_quality_says_nothing(tracks):
    # Control: same noise for every frame and quality unrelated to it; weighting cannot help much.
    sets, labels = noisy_sets(tracks, base_noise=0.8, degraded_noise=0.0)
    rng = np.random.default_rng(1)
    sets = [(e, rng.random(len(q))) for e, q in sets]
    res = run_protocol(sets, labels, seed=0)
    acc = {m: r["acc_mean"] for m, r in res["set_pairs"].items()}
    assert acc["mean"] >= acc["qwfa"] - 0.02, acc
    assert acc["mean"] > acc["best"], acc  # one frame is worse than all of them


def test_online_aggregator_decides_with_fewer_frames_than_a_window_at_equal_accuracy(tracks):
    sets, labels = noisy_sets(tracks)
    online = run_protocol(sets, labels, seed=0)["online"]
    window = online["window_frames_at_equal_accuracy"]
    assert online["online_accuracy"] >= 0.8
    assert window is not None, online["window_accuracy"]
    assert online["online_mean_frames"] < window, online
    # The window needs many frames because its first ones are often the degraded ones.
    assert online["window_accuracy"][1] < online["online_accuracy"]


def test_online_sweep_trades_frames_for_accuracy_and_beats_the_window_at_most_points(tracks):
    sets, labels = noisy_sets(tracks)
    res = run_protocol(sets, labels, seed=0)
    sweep = res["online_sweep"]
    median = float(np.median(np.concatenate([q for _, q in sets])))
    assert [p["decide_at"] for p in sweep] == pytest.approx([m * median for m in DECIDE_SWEEP])
    frames = [p["online_mean_frames"] for p in sweep]
    assert frames == sorted(frames) and frames[-1] > frames[0]  # a later decision reads more frames
    assert sweep[DECIDE_SWEEP.index(3.0)]["online_accuracy"] == res["online"]["online_accuracy"]  # the default
    assert sum(online_wins(p) for p in sweep) >= 4, sweep
    assert "the online aggregator needs fewer frames than the window at" in format_results("t", res)


@pytest.mark.integration
def test_tiny_model_training_runs_step_1_then_step_2_on_the_right_parts(tmp_path):
    """The benchmark's own model comes from the flow's step runner: step 1 moves the backbone and not the
    quality branch; step 2 moves the quality branch only, the class centres stay."""
    import torch

    from benchmarks.set_aggregation import train_tiny_model
    from flows import checkpoints
    from models import build_eqface_net
    from models.partial_fc import assemble_centres

    net, step1, step2 = train_tiny_model(tmp_path, image_size=16, num_identities=4, per_identity=8, epochs=1,
                                         quality_epochs=2)

    def snapshot(checkpoint):
        return {k: v.detach().clone() for k, v in checkpoints.load_net(checkpoint).state_dict().items()}

    after_1, after_2 = snapshot(step1), snapshot(step2)
    torch.manual_seed(0)  # step 1's fresh network, as the step builds it: seeded with flow.seed + 1000 * index
    start = build_eqface_net(**net.arch).state_dict()
    assert not torch.equal(start["backbone.fc.weight"], after_1["backbone.fc.weight"])
    assert all(torch.equal(start[k], after_1[k]) for k in start if k.startswith("quality."))
    assert not torch.equal(after_1["quality.fc1.weight"], after_2["quality.fc1.weight"])
    assert all(torch.equal(after_1[k], after_2[k]) for k in after_1 if k.startswith("backbone."))
    with step1.as_directory() as d1, step2.as_directory() as d2:
        assert torch.equal(assemble_centres(d1), assemble_centres(d2))
    assert not net.training
