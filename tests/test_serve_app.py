"""The recognition service (serve/) as a user runs it: the local stack (Ray head with token auth), the
tiny model, `ray job submit -- python -m serve.deploy configs/serve.yaml`, then HTTP.

One deployment for the module (2 FaceModel replicas): the gallery from ../shared/data/faces (Yale B people),
held-out photos streamed frame by frame and checked against evaluation.aggregation.match_stream run here on
the same frames; replicas killed mid-stream with every frame accounted for; bad input answered with a 4xx.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from evaluation.aggregation import match_stream
from infra.ports import free_port
from infra.stack import Stack
from models import load_eqface_net
from models.serving import embed_and_score
from serve.client import ServiceClient, ServiceRefused
from serve.frames import decode_frame
from serve.gallery import GALLERY_FILE
from tests.conftest import FACES, ROOT
from tests.tiny_model import tiny_model

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (FACES / "yaleb").is_dir(), reason="../shared/data/faces is absent")]

ENROLLED = ["yaleB01", "yaleB02", "yaleB03", "yaleB05", "yaleB06"]
OTHERS = ["yaleB07", "yaleB08", "yaleB09"]
S_TH, DECIDE_AT, THRESHOLD = 0.5, 1.5, 0.5
MAX_FRAME_BYTES = 200_000


def photos(person: str, frontal: bool = True) -> list[Path]:
    """A person's Yale B photos; frontal: lit from within 35 deg azimuth and 20 deg elevation."""
    files = sorted((FACES / "yaleb" / person).glob("*.png"))
    if not frontal:
        return files
    def near(path: Path) -> bool:
        m = re.search(r"A([+-]\d+)E([+-]\d+)", path.name)
        return abs(int(m.group(1))) <= 35 and abs(int(m.group(2))) <= 20
    return [f for f in files if near(f)]


def replica_pids(stack: Stack, deployment: str) -> list[int]:
    """Process ids of the live replicas of a deployment (Ray's state API, with the token)."""
    head = stack.services["ray"]
    url = f"http://127.0.0.1:{head.info['dashboard_port']}/api/v0/actors?limit=1000&detail=1"
    request = urllib.request.Request(url)
    request.add_header("Authorization", f"Bearer {Path(head.info['token_path']).read_text().strip()}")
    with urllib.request.urlopen(request, timeout=10) as resp:
        actors = json.loads(resp.read())["data"]["result"]["result"]
    return [a["pid"] for a in actors
            if a["state"] == "ALIVE" and a.get("class_name") == f"ServeReplica:eqface:{deployment}"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    stack = Stack.load(root / "stack")
    try:
        stack.start_ray(num_cpus=2)
        env = {**os.environ, **stack.env()}
        net_path = tiny_model(root / "net.pt")
        net = load_eqface_net(net_path).eval()
        token_file = root / "api_token"
        token_file.write_text(secrets.token_hex(16))
        port = free_port()
        # A net.pt keeps this module within its time budget; a models:/ URI goes through the same load_net_from
        # (tests/test_model_registry.py), with MLFLOW_TRACKING_URI passed on by serve.deploy (test_serve_parts.py).
        overrides = [f"args.model={net_path}", f"args.gallery={root / 'gallery'}",
                     f"args.state_dir={root / 'state'}", f"args.s_th={S_TH}", f"args.decide_at={DECIDE_AT}",
                     f"args.threshold={THRESHOLD}", f"args.max_frame_bytes={MAX_FRAME_BYTES}",
                     f"args.api_token_file={token_file}", "args.retry_s=90", f"http.port={port}",
                     "replicas.FaceModel=2"]
        job_env = {"RAY_ADDRESS": f"127.0.0.1:{stack.services['ray'].info['gcs_port']}"}
        started = time.monotonic()
        deployed = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"],
             "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": job_env}),
             "--", "python", "-m", "serve.deploy", "configs/serve.yaml", *overrides],
            env=env, capture_output=True, text=True, timeout=400)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        assert f"running at http://127.0.0.1:{port}/" in deployed.stdout
        print(f"deployed in {time.monotonic() - started:.1f} s")
        yield {"stack": stack, "url": f"http://127.0.0.1:{port}", "port": port, "token": token_file.read_text(),
               "net": net, "root": root}
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def api(service) -> ServiceClient:
    return ServiceClient(service["url"], token=service["token"], retry_s=120)


def reference(net, frames: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, qualities) of the frames computed here, as the service's model replicas do."""
    size = net.arch["input_size"]
    pixels = np.stack([decode_frame(f, size, MAX_FRAME_BYTES, 2**24) for f in frames])
    x = torch.from_numpy(np.moveaxis(pixels.astype(np.float32) * (2.0 / 255.0) - 1.0, -1, -3).copy())
    emb, q = embed_and_score(net, x)
    return emb.numpy(), q.numpy()


def test_empty_gallery_and_missing_token_are_refused(service, api):
    with pytest.raises(ServiceRefused) as refused:
        api.open("early")
    assert refused.value.status == 409 and "gallery is empty" in refused.value.message
    anonymous = ServiceClient(service["url"], retry_s=1)
    with pytest.raises(ServiceRefused) as refused:
        anonymous.gallery()
    assert refused.value.status == 401
    # Serve's HTTP proxy listens on loopback only.
    bound = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port ==
             service["port"]}
    assert bound == {"127.0.0.1"}


def test_enrol_then_streams_decide_as_match_stream_does(service, api):
    net = service["net"]
    gallery = {}
    for person in ENROLLED:
        images = [p.read_bytes() for p in photos(person)[::2][:4]]
        answer = api.enrol(person, images)
        assert answer["images"] == 4
        gallery[person] = answer
    assert [g["identity"] for g in api.gallery()] == sorted(ENROLLED)

    # The same gallery built here: QWFA templates of the same photos.
    from evaluation.aggregation import aggregate
    templates = np.stack([aggregate(*reference(net, [p.read_bytes() for p in photos(person)[::2][:4]]), "qwfa")
                          for person in ENROLLED])

    streams = {person: [p.read_bytes() for p in photos(person)[1::2][:8]] for person in ENROLLED + OTHERS}
    answers: dict[str, list[dict]] = {}

    def run(person: str) -> None:
        client = ServiceClient(service["url"], token=service["token"])
        client.open(f"cam-{person}")
        answers[person] = [client.push(f"cam-{person}", seq, frame, ts=seq / 25) for seq, frame in
                           enumerate(streams[person])]

    threads = [threading.Thread(target=run, args=(p,)) for p in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(answers) == set(streams)
    for person, frames in streams.items():
        emb, q = reference(net, frames)
        got = answers[person]
        assert [a["seq"] for a in got] == list(range(len(frames)))
        np.testing.assert_allclose([a["quality"] for a in got], q, atol=1e-4)
        assert [a["used"] for a in got] == list(q >= S_TH)
        expected = match_stream(zip(emb, q, strict=True), templates, ENROLLED, THRESHOLD, S_TH, DECIDE_AT)
        first = next((a["decision"] for a in got if a["decisions"] >= 1), None)
        assert (first is not None) == expected.ready, person
        if expected.ready:
            assert first["seq"] == expected.frames_needed - 1
            assert first["identity"] == expected.identity
            assert first["score"] == pytest.approx(expected.score, abs=1e-4)
            assert first["status"] == ("identified" if expected.identity else "unknown")
        status = api.close(f"cam-{person}")
        assert status["frames_seen"] == len(frames) and status["frames_used"] == int((q >= S_TH).sum())
    # Every enrolled person's stream was identified as that person (closed set: the tiny net cannot reject
    # strangers, so the others are only checked against match_stream above).
    decided = {p: next(a["decision"] for a in answers[p] if a["decisions"]) for p in ENROLLED}
    assert all(d["identity"] == p for p, d in decided.items()), decided


def test_score_gives_each_image_its_quality_and_embedding(service, api):
    frames = [p.read_bytes() for p in photos("yaleB01")[:3]]
    emb, q = reference(service["net"], frames)
    results = api.score(frames)
    np.testing.assert_allclose([r["quality"] for r in results], q, atol=1e-4)
    np.testing.assert_allclose(np.array([r["embedding"] for r in results]), emb, atol=1e-4)


def test_bad_input_gets_a_clear_4xx_and_the_stream_stays_usable(service, api):
    frame = photos("yaleB02")[0].read_bytes()
    api.open("bad")
    cases = [
        (lambda: api.push("bad", 0, b"not an image"), 400, "not an image PIL can decode"),
        (lambda: api.push("bad", 0, b""), 400, "empty image"),
        (lambda: api.push("bad", 0, os.urandom(MAX_FRAME_BYTES + 1)), 413, "too large"),
        (lambda: api.push("bad", 1, frame), 409, "skips ahead: the next frame is seq 0"),
        (lambda: api.push("nowhere", 0, frame), 404, "stream 'nowhere': unknown"),
        (lambda: api._request("POST", "/streams/bad/frames", params={"seq": "x"}, data=frame), 400, "seq must be"),
        (lambda: api._request("POST", "/streams/bad/frames", params={"seq": 0, "ts": "nan"}, data=frame), 400,
         "ts must be a finite number"),
        (lambda: api._request("PUT", "/gallery/x", json={"images": ["%%"]}), 400, "image 0: not base64"),
        (lambda: api._request("PUT", "/gallery/bad name", json={"images": []}), 400, "a name is"),
        (lambda: api.remove("nobody"), 404, "'nobody': not in the gallery"),
    ]
    for call, status, text in cases:
        with pytest.raises(ServiceRefused) as refused:
            call()
        assert refused.value.status == status and text in refused.value.message, refused.value
    first = api.push("bad", 0, frame)
    assert first["frames_seen"] == 1 and not first["duplicate"]
    sent = api.health()["api"]["frames_to_model"]  # one Api replica: every push goes through it
    again = api.push("bad", 0, frame)  # a resend: answered from the journal, not counted, the model not run
    assert again["duplicate"] and again["frames_seen"] == 1 and again["quality"] == first["quality"]
    assert api.health()["api"]["frames_to_model"] == sent
    for seq, status, text in ((0, 409, "already counted with another frame"), (5, 409, "skips ahead")):
        with pytest.raises(ServiceRefused) as refused:
            api.push("bad", seq, photos("yaleB02")[1].read_bytes())
        assert refused.value.status == status and text in refused.value.message
    assert api.push("bad", 1, photos("yaleB02")[1].read_bytes())["frames_seen"] == 2
    with pytest.raises(ServiceRefused) as refused:
        api.push("bad", 0, frame)
    assert refused.value.status == 409 and "out of order" in refused.value.message
    assert api.close("bad")["frames_seen"] == 2


def test_killed_replicas_lose_no_frame_and_count_none_twice(service, api):
    stack = service["stack"]
    people = ENROLLED
    frames = {p: [f.read_bytes() for f in photos(p, frontal=False)[:30]] for p in people}
    pushed = {p: 0 for p in people}
    answers: dict[str, list[dict]] = {p: [] for p in people}
    progress = threading.Semaphore(0)
    clients = {p: ServiceClient(service["url"], token=service["token"], retry_s=150) for p in people}
    errors = []

    def run(person: str) -> None:
        try:
            clients[person].open(f"kill-{person}")
            for seq, frame in enumerate(frames[person]):
                answers[person].append(clients[person].push(f"kill-{person}", seq, frame, ts=seq / 25))
                pushed[person] += 1
                progress.release()
        except Exception as exc:  # reported below: the thread must not die silently
            errors.append(f"{person}: {exc!r}")

    model_pids, state_pids = replica_pids(stack, "FaceModel"), replica_pids(stack, "State")
    assert len(model_pids) == 2 and len(state_pids) == 1
    threads = [threading.Thread(target=run, args=(p,)) for p in people]
    for t in threads:
        t.start()
    total = sum(len(f) for f in frames.values())
    for _ in range(total // 3):
        progress.acquire(timeout=120)
    os.kill(model_pids[0], signal.SIGKILL)  # a model replica, mid-stream
    for _ in range(total // 3):
        progress.acquire(timeout=120)
    os.kill(state_pids[0], signal.SIGKILL)  # the state holder, mid-stream
    for t in threads:
        t.join(240)
    assert not errors, errors
    health = api.health()["state"]
    assert health["pid"] != state_pids[0] and health["replayed_records"] > 0  # a new State replica, journal read
    for person in people:
        status = api.status(f"kill-{person}")
        # frames pushed = frames counted, each once, in order
        assert pushed[person] == status["frames_seen"] == 30 and status["last_seq"] == 29, (person, status)
        used = sum(a["used"] for a in answers[person] if not a["duplicate"])
        assert status["frames_used"] == used
        assert [a["seq"] for a in answers[person]] == list(range(30))
        api.close(f"kill-{person}")
    # The gallery survived the State replica's restart (it is read back from its file).
    assert [g["identity"] for g in api.gallery()] == sorted(ENROLLED)
    assert sorted(json.loads((service["root"] / "gallery" / GALLERY_FILE).read_text())["identities"]) == \
        sorted(ENROLLED)
    print(f"resends: {sum(c.resends for c in clients.values())}, duplicates answered: "
          f"{sum(a['duplicate'] for p in people for a in answers[p])}")


def test_delete_removes_the_application(service, api):
    stack = service["stack"]
    env = {**os.environ, **stack.env()}
    job_env = {"RAY_ADDRESS": f"127.0.0.1:{stack.services['ray'].info['gcs_port']}"}
    deleted = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"],
         "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": job_env}),
         "--", "python", "-m", "serve.deploy", "--delete"],
        env=env, capture_output=True, text=True, timeout=300)
    assert deleted.returncode == 0 and "deleted application 'eqface'" in deleted.stdout, deleted.stdout[-2000:]
    with pytest.raises(ServiceRefused) as refused:  # the proxy stays, the routes are gone
        ServiceClient(service["url"], token=service["token"], retry_s=1).gallery()
    assert refused.value.status == 404
