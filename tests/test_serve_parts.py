"""The recognition service's parts without Serve: settings, deploy config, frames, gallery, the streams' journal."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from evaluation.aggregation import aggregate, identify, match_stream
from infra.stack import Stack
from serve.app import State
from serve.config import ServiceConfig, ServiceConfigError
from serve.deploy import DeployError, app_runtime_env, load_config
from serve.errors import ServiceError
from serve.frames import BadFrame, decode_frame
from serve.gallery import GALLERY_FILE, Gallery
from serve.streams import JOURNAL_FILE, StreamBook
from tests.conftest import ROOT


def png(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, size[::-1], dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_serve_yaml_holds_every_setting_with_its_default():
    app = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())["applications"][0]
    assert app["args"] == ServiceConfig().to_args()
    assert app["import_path"] == "serve.app:build"


@pytest.mark.parametrize(("args", "message"), [
    ({"s_th": 1.5}, "serve config s_th: must be in [0, 1]"),
    ({"decide_at": 0}, "serve config decide_at: must be > 0"),
    ({"after_decision": "pause"}, "serve config after_decision: must be one of continue, stop"),
    ({"threshold": "high"}, "serve config threshold: expected float, got str"),
    ({"max_batch_size": True}, "serve config max_batch_size: expected int"),
    ({"state_dir": "s3://bucket/state"}, "serve config state_dir: must be a local directory"),
    ({"modle": "x"}, "serve config modle: unknown key"),
])
def test_bad_settings_fail_in_one_line_naming_the_key(args, message):
    with pytest.raises(ServiceConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ServiceConfig.from_args(args)


def test_deploy_overrides_and_exposure():
    config = load_config(str(ROOT / "configs" / "serve.yaml"), ["args.s_th=0.3", "http.port=9001",
                                                                 "replicas.FaceModel=3"])
    app = config["applications"][0]
    assert app["args"]["s_th"] == 0.3 and config["http_options"]["port"] == 9001
    assert {"name": "FaceModel", "num_replicas": 3} in app["deployments"]
    with pytest.raises(DeployError, match="State has exactly one replica"):
        load_config(str(ROOT / "configs" / "serve.yaml"), ["replicas.State=2"])
    with pytest.raises(DeployError, match="reachable from other machines: set args.api_token_file"):
        load_config(str(ROOT / "configs" / "serve.yaml"), ["http.host=0.0.0.0"])
    assert load_config(str(ROOT / "configs" / "serve.yaml"), ["http.host=0.0.0.0", "args.api_token_file=/t"])
    with pytest.raises(DeployError, match="serve config decide_at"):
        load_config(str(ROOT / "configs" / "serve.yaml"), ["args.decide_at=-1"])


def test_the_application_gets_the_jobs_code_and_tracking_uri():
    """What the replicas need to import serve.app and load models:/ URIs (tests/test_model_registry.py loads every
    MLflow URI form through the same flows.checkpoints.load_net_from the model replicas call)."""
    job_env = {"working_dir": "gcs://_ray_pkg_0123.zip", "env_vars": {"X": "1"}}
    env = app_runtime_env({"name": "eqface"}, job_env, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert env == {"working_dir": "gcs://_ray_pkg_0123.zip", "env_vars": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}}
    own = {"working_dir": "s3://code/eqface.zip", "env_vars": {"MLFLOW_TRACKING_URI": "https://mlflow.internal"}}
    assert app_runtime_env({"runtime_env": own}, job_env, {"MLFLOW_TRACKING_URI": "http://x"}) == own
    assert app_runtime_env({}, {}, {}) == {}


def test_frames_are_decoded_resized_or_refused():
    assert decode_frame(png(), 32, 10**6, 10**6).shape == (32, 32, 3)
    for data, status, text in ((b"", 400, "empty image"), (b"GIF89a-no", 400, "not an image"),
                               (png()[:len(png()) // 2], 400, "undecodable image"), (png(), 413, "max_frame_bytes"),
                               (png((300, 300)), 413, "image too large")):
        with pytest.raises(BadFrame, match=text) as refused:
            decode_frame(data, 32, 100 if status == 413 and text == "max_frame_bytes" else 10**6, 10_000)
        assert refused.value.status == status


def unit(rng, dim=8):
    v = rng.normal(size=dim)
    return v / np.linalg.norm(v)


def test_gallery_persists_and_refuses_another_models_templates(tmp_path):
    rng = np.random.default_rng(0)
    gallery = Gallery.load(str(tmp_path))
    emb, q = np.stack([unit(rng) for _ in range(3)]), np.array([0.9, 0.2, 0.6])
    gallery.enrol("alice", emb, q, "model-a")
    gallery.enrol("bob", np.stack([unit(rng)]), np.array([0.5]), "model-a")
    again = Gallery.load(str(tmp_path))
    assert [g["identity"] for g in again.list()] == ["alice", "bob"] and again.model == "model-a"
    np.testing.assert_allclose(again.identities["alice"].template, aggregate(emb, q, "qwfa"), atol=1e-6)
    assert again.identify(emb[0], 0.0)[0] in {"alice", "bob"}
    with pytest.raises(ServiceError, match="not the one the gallery was enrolled with") as refused:
        again.enrol("carol", emb, q, "model-b")
    assert refused.value.status == 409
    again.remove("alice")
    again.remove("bob")
    assert Gallery.load(str(tmp_path)).list() == []
    again.enrol("carol", emb, q, "model-b")  # an empty gallery takes any model
    (tmp_path / GALLERY_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a gallery file this service wrote"):
        Gallery.load(str(tmp_path))


def stream_frames(rng, n=12):
    centre = unit(rng)
    return [(centre + 0.3 * unit(rng), float(q)) for q in rng.uniform(0.2, 1.0, n)]


def test_stream_decides_as_match_stream_and_counts_each_frame_once(tmp_path):
    rng = np.random.default_rng(1)
    gallery = np.stack([unit(rng) for _ in range(4)])
    ids = ["a", "b", "c", "d"]
    frames = stream_frames(rng)
    book = StreamBook(str(tmp_path), s_th=0.5, decide_at=1.5, after_decision="stop")

    def identify(template):
        scores = gallery @ template
        best = int(np.argmax(scores))
        return (ids[best] if scores[best] >= -1 else None), float(scores[best])

    book.open("cam")
    answers = [book.push("cam", seq, seq / 25, f"d{seq}", e, q, "m", identify) for seq, (e, q) in enumerate(frames)]
    expected = match_stream(frames, gallery, ids, -1, s_th=0.5, decide_at=1.5)
    first = next(a["decision"] for a in answers if a["decisions"])
    assert first["identity"] == expected.identity and first["seq"] == expected.frames_needed - 1
    assert first["score"] == pytest.approx(expected.score)
    assert answers[-1]["decisions"] == 1  # "stop": later frames are counted, not used
    assert book.status("cam")["frames_seen"] == len(frames)
    # A resend of the last frame is answered again, not counted; anything else out of order is refused.
    assert book.push("cam", 11, 0.0, "d11", *frames[11], "m", identify)["duplicate"]
    for seq, digest, text in ((11, "other", "already counted with another frame"), (3, "d3", "out of order"),
                              (13, "d13", "skips ahead: the next frame is seq 12")):
        with pytest.raises(ServiceError, match=text) as refused:
            book.push("cam", seq, 0.0, digest, *frames[0], "m", identify)
        assert refused.value.status == 409
    with pytest.raises(ServiceError, match="another model"):
        book.push("cam", 12, 0.0, "d12", *frames[0], "m2", identify)
    assert book.status("cam")["frames_seen"] == len(frames)
    with pytest.raises(ServiceError, match="unknown") as refused:
        book.push("nope", 0, 0.0, "x", *frames[0], "m", identify)
    assert refused.value.status == 404


def test_a_new_book_carries_on_every_open_stream_from_the_journal(tmp_path):
    rng = np.random.default_rng(2)
    frames = stream_frames(rng, 20)
    identify = lambda t: ("a", 0.9)  # noqa: E731
    live = StreamBook(str(tmp_path), 0.5, 1.5, "continue")
    live.open("one")
    live.open("gone")
    live.close("gone")
    answers = [live.push("one", s, None, f"d{s}", e, q, "m", identify) for s, (e, q) in enumerate(frames[:10])]
    # A State replica killed while writing: its last line is torn (that frame was never answered).
    with open(tmp_path / JOURNAL_FILE, "ab") as f:
        f.write(b'{"op": "frame", "stream": "one", "se')
    restarted = StreamBook(str(tmp_path), 0.5, 1.5, "continue")
    assert restarted.status("one") == live.status("one") and "gone" not in restarted.streams
    assert restarted.push("one", 9, None, "d9", *frames[9], "m", identify) == {**answers[-1], "duplicate": True}
    rest = [restarted.push("one", s, None, f"d{s}", e, q, "m", identify) for s, (e, q) in enumerate(frames) if s >= 10]
    # The same answers as one book that never stopped.
    straight = StreamBook(str(tmp_path / "straight"), 0.5, 1.5, "continue")
    straight.open("one")
    expected = [straight.push("one", s, None, f"d{s}", e, q, "m", identify) for s, (e, q) in enumerate(frames)]
    assert rest == expected[10:]
    # Compacted at start: one snapshot line for the one open stream (+ the frames since).
    lines = [json.loads(x) for x in (tmp_path / JOURNAL_FILE).read_text().splitlines()]
    assert lines[0]["op"] == "snapshot" and lines[0]["stream"] == "one" and len(lines) == 1 + 10
    (tmp_path / JOURNAL_FILE).write_text('garbage\n{"op": "open"}\n')
    with pytest.raises(ValueError, match="line 1: not a journal record"):
        StreamBook(str(tmp_path), 0.5, 1.5)


def test_a_replay_under_changed_settings_rebuilds_what_was_answered(tmp_path):
    """The journal holds the s_th and after_decision each frame was answered under: a State restarted with other
    settings carries on every stream exactly where it was, then applies its own settings to new frames."""
    rng = np.random.default_rng(3)
    frames = stream_frames(rng, 14)
    identify = lambda t: ("a", 0.9)  # noqa: E731
    live = StreamBook(str(tmp_path), 0.5, 1.5, "continue")
    live.open("cam")
    answers = [live.push("cam", s, None, f"d{s}", e, q, "m", identify) for s, (e, q) in enumerate(frames)]
    assert answers[-1]["decisions"] >= 2 and any(0.5 <= q < 0.9 for _, q in frames)
    records = [json.loads(x) for x in (tmp_path / JOURNAL_FILE).read_text().splitlines()]
    assert {(r["s_th"], r["after_decision"]) for r in records if r["op"] == "frame"} == {(0.5, "continue")}
    restarted = StreamBook(str(tmp_path), 0.9, 3.0, "stop")  # another s_th, decide_at and rule
    assert restarted.status("cam") == live.status("cam")
    np.testing.assert_array_equal(restarted.streams["cam"].agg._sum, live.streams["cam"].agg._sum)
    # New frames follow the new settings: s_th 0.9 drops a frame of quality 0.7 that the old one used.
    nxt = restarted.push("cam", 14, None, "d14", frames[0][0], 0.7, "m", identify)
    assert not nxt["used"] and nxt["frames_seen"] == 15


def _state(tmp_path):
    settings = {"model": "unused-by-State", "gallery": str(tmp_path / "gallery"), "state_dir": str(tmp_path / "state"),
                "s_th": 0.5, "decide_at": 1.5}
    return State.func_or_class(settings)  # the replica's own class, outside Serve


def test_a_resend_is_answered_from_the_journal_before_the_gallery_and_model_checks(tmp_path):
    rng = np.random.default_rng(4)
    state = _state(tmp_path)
    state.enrol("alice", np.stack([unit(rng)]), np.array([0.9]), "model-a")
    state.open("cam")
    embedding = unit(rng)
    first = state.push("cam", 0, None, "d0", embedding, 0.8, "model-a")
    state.remove("alice")  # the gallery changes (empty now) after the frame was answered
    assert state.check_frame("cam", 0, "d0") == {**first, "duplicate": True}
    assert state.push("cam", 0, None, "d0", embedding, 0.8, "model-b") == {**first, "duplicate": True}
    assert state.stats()["duplicates"] == 2 and state.status("cam")["frames_seen"] == 1
    assert state.check_frame("cam", 1, "d1") is None  # the next frame: the ingress runs the model
    with pytest.raises(ServiceError, match="gallery is empty") as refused:
        state.push("cam", 1, None, "d1", embedding, 0.8, "model-a")
    assert refused.value.status == 409


def test_the_identify_threshold_is_strict_as_in_evaluation(tmp_path):
    gallery = Gallery.load(str(tmp_path))
    gallery.enrol("alice", np.array([[1.0, 0.0]]), np.array([1.0]), "m")
    probe = np.array([0.6, 0.8])  # cosine 0.6 to alice, exactly
    for threshold in (0.6, 0.5999):
        expected = identify(probe, np.array([[1.0, 0.0]]), ["alice"], threshold)
        assert gallery.identify(probe, threshold) == pytest.approx(expected)
    assert gallery.identify(probe, 0.6)[0] is None and gallery.identify(probe, 0.5999)[0] == "alice"


@pytest.mark.integration
def test_the_gallery_lives_on_s3_too(tmp_path):
    stack = Stack.load(tmp_path / "stack")
    try:
        stack.start_s3(buckets=("eqface-serve",))
        with pytest.MonkeyPatch.context() as monkeypatch:
            for key, value in stack.env().items():
                monkeypatch.setenv(key, value)
            rng = np.random.default_rng(3)
            gallery = Gallery.load("s3://eqface-serve/gallery")
            gallery.enrol("alice", np.stack([unit(rng), unit(rng)]), np.array([0.7, 0.4]), "m")
            again = Gallery.load("s3://eqface-serve/gallery")
            assert again.list() == gallery.list() and again.model == "m"
            np.testing.assert_allclose(again.identities["alice"].template, gallery.identities["alice"].template)
    finally:
        stack.stop_all()
