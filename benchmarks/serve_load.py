"""Load on the recognition service (serve/): many concurrent camera streams, frames/s, push latency, lost frames.

    python -m benchmarks.serve_load                                   # 100 streams x 30 frames, 1 then 2 replicas
    python -m benchmarks.serve_load --streams 20 --frames 10 --replicas 1 2 3 --model net.pt

Everything on 127.0.0.1: its own local stack (Ray head with token auth, in a temporary state dir), the
service deployed with `ray job submit -- python -m serve.deploy configs/serve.yaml`, the tiny untrained
model of the tests unless --model names one (a net.pt / checkpoint / MLflow URI; MLflow URIs need
MLFLOW_TRACKING_URI), a gallery of 5 Yale B people (../shared/data/faces; synthetic crops without it).
Each stream is one client thread pushing its frames one after another (a camera waits for each answer);
all streams at once. Bounded: --max-seconds per run, after which the remaining frames are not sent.
Lost frames = frames answered 200 - frames the service counted (its per-stream frames_seen); must be 0.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from infra.ports import free_port
from infra.stack import Stack
from serve.client import ServiceClient

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "data" / "faces" / "yaleb"


def face_crops(count: int) -> dict[str, list[bytes]]:
    """Encoded crops per person: Yale B PNGs, or random-noise PNGs where the shared faces are absent."""
    if FACES.is_dir():
        people = sorted(p.name for p in FACES.iterdir())[:count]
        return {p: [f.read_bytes() for f in sorted((FACES / p).glob("*.png"))] for p in people}
    rng = np.random.default_rng(0)
    out = {}
    for k in range(count):
        frames = []
        for _ in range(40):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
            frames.append(buf.getvalue())
        out[f"person{k}"] = frames
    return out


def deploy(stack: Stack, model: str, work: Path, port: int, replicas: int, api_replicas: int) -> float:
    env = {**os.environ, **stack.env()}
    job_env = {"RAY_ADDRESS": f"127.0.0.1:{stack.services['ray'].info['gcs_port']}",
               **({"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]} if "MLFLOW_TRACKING_URI" in os.environ
                  else {})}
    started = time.monotonic()
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"],
         "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": job_env}), "--",
         "python", "-m", "serve.deploy", "configs/serve.yaml", f"args.model={model}",
         f"args.gallery={work / 'gallery'}", f"args.state_dir={work / 'state'}",
         "args.s_th=0.49", "args.decide_at=1.5", f"http.port={port}",
         f"replicas.FaceModel={replicas}", f"replicas.Api={api_replicas}"],
        env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"deploy failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def run_load(url: str, crops: dict[str, list[bytes]], streams: int, frames: int, max_seconds: float,
             tag: str) -> dict:
    people = list(crops)
    latencies: list[list[float]] = [[] for _ in range(streams)]
    answered = [0] * streams
    errors: list[str] = []
    deadline = time.monotonic() + max_seconds
    clients = [ServiceClient(url) for _ in range(streams)]
    names = [f"{tag}-{k}" for k in range(streams)]
    for client, name in zip(clients, names, strict=True):
        client.open(name)
    start_barrier = threading.Barrier(streams + 1)

    def camera(k: int) -> None:
        person = crops[people[k % len(people)]]
        start_barrier.wait()
        try:
            for seq in range(frames):
                if time.monotonic() > deadline:
                    return
                t = time.perf_counter()
                clients[k].push(names[k], seq, person[(seq + k) % len(person)], ts=seq / 25)
                latencies[k].append(time.perf_counter() - t)
                answered[k] += 1
        except Exception as exc:
            errors.append(f"stream {names[k]}: {exc!r}")

    threads = [threading.Thread(target=camera, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    start_barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    counted = [clients[0].status(n)["frames_seen"] for n in names]
    for client, name in zip(clients, names, strict=True):
        client.close(name)
    lat = np.concatenate([np.asarray(x) for x in latencies if x]) if any(latencies) else np.zeros(1)
    return {"streams": streams, "frames_per_stream": frames, "frames_answered": int(sum(answered)),
            "frames_counted": int(sum(counted)), "lost": int(sum(answered) - sum(counted)),
            "not_sent_past_deadline": int(streams * frames - sum(answered) - len(errors)),
            "errors": len(errors), "first_error": errors[0] if errors else "", "wall_s": round(wall, 2),
            "fps": round(sum(answered) / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 1),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1),
            "resends": sum(c.resends for c in clients)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="FaceModel replicas, one run each")
    parser.add_argument("--api-replicas", type=int, default=1, help="replicas of the HTTP ingress (Api)")
    parser.add_argument("--model", default=None, help="default: the tests' tiny untrained model (32 px)")
    parser.add_argument("--max-seconds", type=float, default=180, help="per run: frames not sent by then are skipped")
    parser.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the benchmark's Ray head")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eqface-serve-load-") as tmp:
        work = Path(tmp)
        stack = Stack.load(work / "stack")
        try:
            stack.start_ray(num_cpus=args.num_cpus)
            model = args.model
            if model is None:
                sys.path.insert(0, str(ROOT))
                from tests.tiny_model import tiny_model

                model = str(tiny_model(work / "net.pt"))
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            crops = face_crops(5)
            results = []
            for replicas in args.replicas:
                deploy_s = deploy(stack, model, work, port, replicas, args.api_replicas)
                client = ServiceClient(url)
                for person, frames in crops.items():
                    client.enrol(person, frames[:4])
                run_load(url, crops, 4, 3, 60, f"warm{replicas}")  # first requests pay the replicas' warm-up
                result = {"replicas": replicas, "api_replicas": args.api_replicas, "deploy_s": round(deploy_s, 1),
                          **run_load(url, crops, args.streams, args.frames, args.max_seconds, f"r{replicas}"),
                          "batch_mean": round(client.health()["model"]["batch_mean"], 1)}
                results.append(result)
                print(json.dumps(result), flush=True)
        finally:
            stack.stop_all()
    print("\nreplicas  streams x frames  fps    p50 ms  p99 ms  lost  errors  resends  batch")
    for r in results:
        print(f"{r['replicas']:>8}  {r['streams']:>7} x {r['frames_per_stream']:<6}  {r['fps']:<6} {r['p50_ms']:<7} "
              f"{r['p99_ms']:<7} {r['lost']:<5} {r['errors']:<7} {r['resends']:<8} {r['batch_mean']}")
    return 0 if all(r["lost"] == 0 and r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
