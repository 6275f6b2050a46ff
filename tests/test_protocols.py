"""IJB / YTF protocol pieces without services: alignment, the readers on sets written in the exact file layouts
from the real faces, template aggregation and TAR@FAR against hand computations, every kind of bad input."""

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve as sklearn_roc_curve

from evaluation.aggregation import aggregate
from evaluation.align import ARCFACE_TEMPLATE, align_face, similarity_transform, warp_affine
from evaluation.protocols import Problems, ProtocolError, ijb, ytf
from evaluation.verification import tar_at_far, tar_at_nearest_far
from flows import protocol_eval
from tests.protocol_sets import FACES, apply, rotation_about, write_ijb, write_ytf

needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason="../shared/data/faces is absent")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    if not FACES.is_dir():
        pytest.skip("../shared/data/faces is absent")
    root = tmp_path_factory.mktemp("protocol_sets")
    return {"ijb": root / "ijb", "ijb_info": write_ijb(root / "ijb"), "ytf": root / "ytf",
            "ytf_info": write_ytf(root / "ytf")}


# ----------------------------------------------------------------------------- alignment


def test_similarity_transform_recovers_a_known_similarity_exactly():
    m = 1.7 * np.array([[np.cos(0.4), -np.sin(0.4)], [np.sin(0.4), np.cos(0.4)]])
    known = np.c_[m, [12.0, -30.0]]
    np.testing.assert_allclose(similarity_transform(ARCFACE_TEMPLATE, apply(known, ARCFACE_TEMPLATE)), known,
                               atol=1e-9)


@needs_faces
def test_a_face_warped_by_a_known_similarity_aligns_back_to_the_same_pixels():
    with Image.open(sorted((FACES / "lfw10").rglob("*.jpg"))[0]) as img:
        face = img.convert("RGB")
    landmarks = ARCFACE_TEMPLATE * (110 / 112) + 70  # LFW: the face is about the central 110 x 110
    reference = np.asarray(align_face(face, landmarks), np.float64)
    moved = rotation_about((125, 125), 30, (10, -6))
    moved[:, :2] *= 1.25  # and scaled
    warped = warp_affine(face, moved, (320, 320))
    back = np.asarray(align_face(warped, apply(moved, landmarks)), np.float64)
    diff = np.abs(back - reference)[8:-8, 8:-8]  # the border mixes in the zeros outside the warped image
    assert diff.mean() < 4 and np.percentile(diff, 95) < 12  # two bilinear resamplings, 0-255 levels
    # Aligning from landmarks that are not the face's gives other pixels: the check above is not trivial.
    wrong = np.asarray(align_face(warped, landmarks), np.float64)
    assert np.abs(wrong - reference)[8:-8, 8:-8].mean() > 4 * diff.mean()


def test_alignment_resizes_to_the_model_input_and_refuses_bad_landmarks():
    img = Image.new("RGB", (100, 100), (120, 60, 30))
    assert align_face(img, ARCFACE_TEMPLATE, 32).size == (32, 32)
    with pytest.raises(ValueError, match=r"\(10 numbers\), got 8"):
        align_face(img, np.zeros(8))
    with pytest.raises(ValueError, match="all coincide"):
        align_face(img, np.zeros(10))


# ----------------------------------------------------------------------------- IJB


def test_ijb_reader_gives_templates_with_several_media(sets):
    faces = list(ijb.iter_faces(str(sets["ijb"]), "ijbc"))
    assert len(faces) == sets["ijb_info"]["images"] == 36
    assert faces[0].image == "loose_crop/1.jpg" and len(faces[0].landmarks) == 10
    media_per_template = {}
    for f in faces:
        media_per_template.setdefault(f.template, set()).add(f.media)
    assert len(media_per_template) == 12 and all(len(m) == 2 for m in media_per_template.values())
    rows = np.concatenate(list(ijb.iter_pairs(str(sets["ijb"] / "meta" / "ijbc_template_pair_label.txt"),
                                              chunk_lines=10)))
    assert rows.shape == (66, 4) and rows[:, 2].sum() == 6
    assert rows[0].tolist() == [1, 2, 1, 1] and rows[-1, 3] == 66  # the last column: the line number


def test_template_features_against_a_hand_computation():
    f = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]])
    templates, medias = np.array([7, 7, 7, 9]), np.array([1, 1, 2, 3])
    q = np.array([0.9, 0.1, 0.5, 0.2])

    def unit(v):
        return v / np.linalg.norm(v)

    ids, feats = ijb.template_features(templates, medias, f, np.ones(4))
    assert ids.tolist() == [7, 9]
    np.testing.assert_allclose(feats[0], unit((f[0] + f[1]) / 2 + f[2]), atol=1e-6)  # mean in media, sum over
    w, keep = ijb.face_weights("qwfa", templates, q, None, None, 0.4)
    np.testing.assert_allclose(ijb.template_features(templates, medias, f, w, keep)[1][0],
                               unit((0.9 * f[0] + 0.1 * f[1]) / 2 + 0.5 * f[2]), atol=1e-6)
    w, keep = ijb.face_weights("qwfaf", templates, q, None, None, 0.4)
    assert keep.tolist() == [True, False, True, True]  # template 9 has no face >= 0.4: its best face stays
    np.testing.assert_allclose(ijb.template_features(templates, medias, f, w, keep)[1][0],
                               unit(0.9 * f[0] + 0.5 * f[2]), atol=1e-6)
    w, _ = ijb.face_weights("detector", templates, q, np.array([1.0, 3.0, 1.0, 1.0]), None, 0.4)
    np.testing.assert_allclose(ijb.template_features(templates, medias, f, w)[1][0],
                               unit((f[0] + 3 * f[1]) / 2 + f[2]), atol=1e-6)


def test_a_template_whose_every_weight_is_zero_falls_back_to_the_mean_as_aggregate_does():
    f = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]])
    templates, medias = np.array([7, 7, 7, 9]), np.array([1, 1, 2, 3])
    q = np.array([0.0, 0.0, 0.0, 0.2])  # template 7: quality underflow on every face
    ids, feats = ijb.template_features(templates, medias, f, q)
    _, plain = ijb.template_features(templates, medias, f, np.ones(4))
    np.testing.assert_allclose(feats[0], plain[0], atol=1e-6)  # not a zero vector
    np.testing.assert_allclose(feats[1], f[3], atol=1e-6)  # a template with weight keeps its weighting
    # The same faces through aggregate (one medium each, so the within-medium mean does not enter).
    single = np.arange(3)
    np.testing.assert_allclose(ijb.template_features(np.zeros(3, int), single, f[:3], q[:3])[1][0],
                               aggregate(f[:3], q[:3], "qwfa"), atol=1e-6)


def test_tar_at_far_table_against_a_hand_computation():
    genuine = np.array([0.95, 0.9, 0.72, 0.3])
    impostor = np.array([0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.2, 0.1, 0.05, 0.0])
    scores = np.r_[genuine, impostor]
    labels = np.r_[np.ones(4, bool), np.zeros(10, bool)]
    metrics, notes = protocol_eval.tar_table({"qwfa": scores}, labels, fars=(1e-1, 1e-2))
    # FAR 0.1 of 10 impostors: at most one above the threshold, so t = 0.7 and 3 of 4 genuine pass.
    assert metrics["tar_far1e-1_qwfa"] == pytest.approx(0.75)
    assert np.isnan(metrics["tar_far1e-2_qwfa"]) and "needs >= 100" in notes[0]
    assert protocol_eval.far_key(1e-4) == "1e-4" and protocol_eval.far_key(1e-6) == "1e-6"
    # insightface's column: the ROC point nearest the target. FAR 0.1 lies on the ROC (t = 0.7): the same 0.75;
    # FAR 0.01 is nearest the (0, 0.5) point (t = 0.8, no impostor above it): 2 of 4, where ours says n/a.
    assert metrics["insightface_tar_far1e-1_qwfa"] == pytest.approx(0.75)
    assert metrics["insightface_tar_far1e-2_qwfa"] == pytest.approx(0.5)
    table = protocol_eval.format_table("ijbc", {f"{kind}tar_far{protocol_eval.far_key(f)}_{w}": 0.5
                                                for f in protocol_eval.PROTOCOL_FARS for w in ijb.WEIGHTINGS
                                                for kind in ("", "insightface_")})
    assert table.splitlines()[0].startswith("| weighting | TAR@FAR<=1e-6 | insightface 1e-6 | TAR@FAR<=1e-5 |")


def _insightface_tar(scores, labels, far):
    """insightface's IJB 1:1 script, step for step: sklearn's ROC, flipped, the first nearest point."""
    fpr, tpr, _ = sklearn_roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, index = min(zip(abs(fpr - far), range(len(fpr)), strict=True))
    return tpr[index]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_nearest_point_tar_equals_insightfaces_own_computation(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    labels = rng.random(n) < 0.1
    # Rounded scores: many ties and collinear runs, where sklearn's dropped points matter.
    scores = np.round(np.where(labels, rng.normal(0.6, 0.15, n), rng.normal(0.2, 0.15, n)), 2)
    fars = (1e-4, 1e-3, 3e-3, 1e-2, 1e-1, 0.5)
    ours = tar_at_nearest_far(scores, labels, fars)
    for far in fars:
        assert ours[far] == _insightface_tar(scores, labels, far), far
    # Where the nearest ROC point lies above the target FAR the two conventions differ.
    strict, _, _ = tar_at_far(scores, labels, fars)
    assert any(ours[f] > strict[f] for f in fars if np.isfinite(strict[f]))


def test_pair_scores_are_the_cosine_of_the_template_features(sets, tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 2 1\n2 3 0\n\n")
    ids = np.array([1, 2, 3])
    feats = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32)
    scores, labels = ijb.pair_scores(str(pairs), {"mean": (ids, feats)})
    np.testing.assert_allclose(scores["mean"], [0.6, 0.8])
    assert labels.tolist() == [True, False]


def _copy_meta(sets, tmp_path, name, edit):
    root = tmp_path / "ijb"
    (root / "meta").mkdir(parents=True)
    for f in (sets["ijb"] / "meta").iterdir():
        text = f.read_text()
        (root / "meta" / f.name).write_text(edit(text) if f.name == name else text)
    return root


def test_missing_meta_file_is_one_line_naming_it(sets, tmp_path):
    root = _copy_meta(sets, tmp_path, "", str)
    (root / "meta" / "ijbc_name_5pts_score.txt").unlink()
    with pytest.raises(ProtocolError, match=r"missing meta file\(s\): .*ijbc_name_5pts_score.txt$"):
        list(ijb.iter_faces(str(root), "ijbc"))


def test_landmark_row_of_the_wrong_length_names_file_and_line(sets, tmp_path):
    def drop_a_number(text):
        lines = text.splitlines()
        lines[3] = " ".join(lines[3].split()[:-2] + lines[3].split()[-1:])
        return "\n".join(lines) + "\n"

    root = _copy_meta(sets, tmp_path, "ijbc_name_5pts_score.txt", drop_a_number)
    with pytest.raises(ProtocolError, match=r"ijbc_name_5pts_score.txt:4: expected .*\(12 fields\), got 11$"):
        list(ijb.iter_faces(str(root), "ijbc"))
    problems = Problems(skip=True)
    assert len(list(ijb.iter_faces(str(root), "ijbc", problems))) == 35 and problems.count == 1


def test_malformed_lines_and_templates_without_images_name_file_and_line(sets, tmp_path):
    root = _copy_meta(sets, tmp_path, "ijbc_face_tid_mid.txt", lambda t: t.replace("3.jpg 1 102", "3.jpg one 102"))
    with pytest.raises(ProtocolError, match=r"ijbc_face_tid_mid.txt:3: template and media must be integers"):
        list(ijb.iter_faces(str(root), "ijbc"))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 2 1\n1 2\n")
    with pytest.raises(ProtocolError, match=r"pairs.txt:2: expected 'template template 1\|0', got '1 2'"):
        list(ijb.iter_pairs(str(pairs)))
    pairs.write_text("1 2 1\n1 99 0\n")
    ids, feats = np.array([1, 2]), np.eye(2, dtype=np.float32)
    with pytest.raises(ProtocolError, match=r"pairs.txt:2: template 99 has no \(readable\) image"):
        ijb.pair_scores(str(pairs), {"mean": (ids, feats)})
    problems = Problems(skip=True)
    scores, labels = ijb.pair_scores(str(pairs), {"mean": (ids, feats)}, problems)
    assert labels.size == 1 and problems.count == 1


def test_an_image_that_fails_to_decode_names_the_file_and_its_meta_line(sets, tmp_path):
    (tmp_path / "loose_crop").mkdir()
    (tmp_path / "loose_crop" / "1.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    faces = list(ijb.iter_faces(str(sets["ijb"]), "ijbc"))[:2]
    batch = {k: np.array([v, v2], dtype=object) for k, v, v2 in
             zip(("image", "landmarks", "where"), (faces[0].image, list(faces[0].landmarks), faces[0].where),
                 ("loose_crop/2.jpg", list(faces[1].landmarks), faces[1].where), strict=True)}
    out = protocol_eval.decode_batch(batch, root=str(tmp_path), image_size=32, center_crop=1.0)
    assert out["pixels"].shape == (2, 32, 32, 3)
    assert "loose_crop/1.jpg (listed at " in out["error"][0] and "ijbc_face_tid_mid.txt:1" in out["error"][0]
    assert "UnidentifiedImageError" in out["error"][0]
    assert "FileNotFoundError" in out["error"][1]  # 2.jpg is not in this root


# ----------------------------------------------------------------------------- YTF


def test_ytf_reader_gives_videos_in_frame_order(sets):
    pairs = ytf.read_splits(str(sets["ytf"]))
    assert len(pairs) == 20 and pairs[0].split == 1 and pairs[0].same and not pairs[1].same
    faces = list(ytf.iter_faces(str(sets["ytf"]), pairs))
    assert len(faces) == 100 and faces[0].template == "yaleB01/0"
    assert [f.image.rsplit(".", 2)[1] for f in faces[:5]] == ["1", "2", "3", "4", "5"]
    assert len(list(ytf.iter_faces(str(sets["ytf"]), pairs, frames_per_video=2))) == 40


def test_ytf_bad_lines_and_missing_videos(sets, tmp_path):
    (tmp_path / "splits.txt").write_text("split number, first, second, same\n1, a/0, b/0, 1\n2, a/0, 1\n")
    with pytest.raises(ProtocolError, match=r"splits.txt:3: expected 'split, first video, second video, ..., "
                                            r"same', got 3 fields"):
        ytf.read_splits(str(tmp_path))
    (tmp_path / "splits.txt").write_text("1, a/0, b/0, 1\n")
    pairs = ytf.read_splits(str(tmp_path))
    with pytest.raises(ProtocolError, match=r"splits.txt:1: video 'a/0' has no folder .*aligned_images_DB/a/0"):
        list(ytf.iter_faces(str(tmp_path), pairs))
    (tmp_path / "aligned_images_DB" / "a" / "0").mkdir(parents=True)
    with pytest.raises(ProtocolError, match=r"splits.txt:1: video 'a/0' has no frames"):
        list(ytf.iter_faces(str(tmp_path), pairs))


def test_video_features_and_accuracy_over_the_splits():
    videos = np.array(["a/0", "a/0", "b/0"], dtype=object)
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    q = np.array([0.9, 0.1, 0.5])
    feats = ytf.video_features(videos, emb, q, ("mean", "qwfaf"), s_th=0.5)
    np.testing.assert_allclose(feats["mean"]["a/0"], [2**-0.5, 2**-0.5])
    np.testing.assert_allclose(feats["qwfaf"]["a/0"], [1.0, 0.0])  # the 0.1 frame is dropped
    pair = ytf.VideoPair(1, "a/0", "b/0", False, "splits.txt:2")
    scores, same, splits = ytf.pair_scores([pair], feats)
    np.testing.assert_allclose(scores["qwfaf"], [0.6])
    assert same.tolist() == [False] and splits.tolist() == [1]


def test_embeddings_of_another_model_or_face_list_are_refused_before_anything_runs(sets, tmp_path):
    opts = protocol_eval.ProtocolOptions(protocol="ijbc", root=str(sets["ijb"]), model="a.pt", out=str(tmp_path))
    faces, _ = protocol_eval.list_faces(opts, Problems())
    out_dir = str(tmp_path / protocol_eval.EMBEDDINGS_DIR)
    protocol_eval.check_run_record(out_dir, protocol_eval.run_record(opts, 32, faces), overwrite=False)
    protocol_eval.check_run_record(out_dir, protocol_eval.run_record(opts, 32, faces), overwrite=False)  # same: ok
    (tmp_path / protocol_eval.EMBEDDINGS_DIR / "part-00000.parquet").write_bytes(b"kept")
    other = protocol_eval.ProtocolOptions(protocol="ijbc", root=str(sets["ijb"]), model="b.pt", out=str(tmp_path))
    with pytest.raises(ProtocolError, match=r"holds embeddings made with model='a.pt', not 'b.pt'; use another "
                                            r"--out, or --overwrite"):
        protocol_eval.check_run_record(out_dir, protocol_eval.run_record(other, 32, faces), overwrite=False)
    with pytest.raises(ProtocolError, match="made with num_faces=36, not 35"):
        protocol_eval.check_run_record(out_dir, protocol_eval.run_record(opts, 32, faces[1:]), overwrite=False)
    assert (tmp_path / protocol_eval.EMBEDDINGS_DIR / "part-00000.parquet").read_bytes() == b"kept"
    protocol_eval.check_run_record(out_dir, protocol_eval.run_record(other, 32, faces), overwrite=True)
    assert not (tmp_path / protocol_eval.EMBEDDINGS_DIR / "part-00000.parquet").exists()


def test_shards_are_reused_only_when_their_footer_says_they_are_complete(tmp_path):
    columns = {"index": [0, 1], "image": ["a", "b"], "template": [1, 1], "media": [5, 6],
               "embedding": [np.ones(4), np.ones(4)], "quality": [0.5, 0.6], "detector_score": [0.9, 0.8],
               "norm": [1.0, 2.0]}
    protocol_eval.write_part(str(tmp_path), 0, 0, 3, columns, ["image c: broken"])
    assert protocol_eval.shard_complete(str(tmp_path), 0, 0, 3)  # 2 rows + 1 skipped = the shard's 3 faces
    assert not protocol_eval.shard_complete(str(tmp_path), 0, 0, 4)  # another shard size
    assert not protocol_eval.shard_complete(str(tmp_path), 1, 3, 6)  # not written
    (tmp_path / "part-00001.parquet").write_bytes(b"PAR1 cut")
    assert not protocol_eval.shard_complete(str(tmp_path), 1, 3, 6)  # unreadable: computed again
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    table, skipped = protocol_eval.read_embeddings(str(tmp_path), [(0, 0, 3)])
    assert table.column_names[:4] == ["index", "image", "template", "media"] and skipped == ["image c: broken"]


def test_the_command_line_asks_for_root_and_reports_bad_protocol_input_in_one_line(tmp_path, capsys):
    from flows import evaluate
    from tests.tiny_model import tiny_model

    for argv in (["--model", "m", "--protocol", "ijbc"], ["--model", "m", "--protocol", "ytf", "--root", "r",
                                                          "--pairs", "p"], ["--model", "m"]):
        with pytest.raises(SystemExit):
            evaluate.parse_args(argv)
    capsys.readouterr()
    model = tiny_model(tmp_path / "net.pt")
    (tmp_path / "ijb" / "meta").mkdir(parents=True)
    code = evaluate.main(["--model", str(model), "--protocol", "ijbb", "--root", str(tmp_path / "ijb"),
                          "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("evaluate: error: missing meta file(s): ") and "ijbb_face_tid_mid.txt" in err[0]
