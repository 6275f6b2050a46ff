"""The whole flow under load: memory of every process kind per step, and a leak check.

    python benchmarks/flow_load.py [--identities 2000 --per-identity 50 --workers 4 --cpus-per-worker 0.25]
        [--interval 3] [--work DIR] [--json flow_load.json] [key.sub=value ...]

Starts its own Ray head (2 logical CPUs, token auth) and MLflow server (infra.stack), generates (or reuses)
a synthetic dataset of identities x per-identity images, and submits the real flow to that cluster as a user
does (`ray job submit -- python flows/eqface.py`, steps 1, 2, 3, 2, one epoch each, a small model), with
`scaling.num_workers` training workers: over-subscribed on a 2-core machine, cpus_per_worker small enough
that the workers leave one logical CPU for Ray Data's decoding tasks.

Every --interval seconds it samples RSS, USS and PSS of every process of its Ray cluster (the flow's driver
included), classified by what the process runs (its Ray proctitle): the driver, Ray Train workers, Ray Data
tasks, Ray Data / Train actors, the validation task, Ray's own daemons; and, apart, the object-store pages a
process alone has touched (they count in its USS but are Ray's shared memory, not its heap). Step boundaries
come from the driver's log lines. It prints peak memory per process kind per step, memory at the end of step 3 against
the end of step 1 (a leak shows as growth in the processes that live through the flow: driver, pooled Ray
workers, Ray daemons), wall time per step and the flow's own images/s, and writes everything, the sampled
timeline included, to --json. Run it under the CPU lock: `flock /tmp/eqface-cpu.lock python ...`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.synthetic import SyntheticSpec, ensure_synthetic_dataset  # noqa: E402
from infra.stack import Stack  # noqa: E402

try:
    import psutil
except ImportError:  # Ray ships its own copy (ray/thirdparty_files), put on sys.path by `import ray`
    import ray  # noqa: F401

    psutil = importlib.import_module("psutil")

MiB = 2**20
STEP_START = re.compile(r"\[eqface\] step (\d+) \(kind (\d), loop (\d+)\) -> run (\w+)")
STEP_DONE = re.compile(r"\[eqface\] step (\d+) done")
# Ray names a worker process after what it runs (setproctitle); the first match wins.
KINDS = [
    ("driver", ("flows/eqface.py",)),
    ("train worker", ("RayTrainWorker", "_setup_torch_process_group", "_propagate_data_context")),
    ("train controller/actors", ("TrainController", "PlacementGroupCleaner", "SynchronizationActor", "_RunLease",
                                 "_RowTally", "PreemptionWatcher", "TrainStateActor")),
    ("ray data task", ("ReadParquet", "MapBatches", "_read_row_group", "decode_batch", "_split_single_block")),
    ("ray data actors", ("SplitCoordinator", "_StatsActor", "AutoscalingCoordinator", "DatasetManager")),
    ("validation task", ("validate_checkpoints",)),
    ("ray worker starting", ("default_worker.py",)),
    ("ray daemons", ("DashboardAgent", "RuntimeEnvAgent", "JobSupervisor")),
]
IDLE = "ray::IDLE"


def classify(cmd: str) -> str:
    for kind, needles in KINDS:
        if any(n in cmd for n in needles):
            return kind
    return "ray worker (other)" if cmd.startswith("ray::") else "ray daemons"


def label_samples(samples: list[dict]) -> None:
    """Sets each process's "kind"; a pooled worker between tasks (ray::IDLE) keeps its last task's kind."""
    last: dict[int, str] = {}
    for sample in samples:
        for p in sample["procs"]:
            if p["cmd"].startswith(IDLE):
                p["kind"] = last.get(p["pid"], "idle ray worker")
            else:
                p["kind"] = last[p["pid"]] = classify(p["cmd"])


def object_store_private(proc: psutil.Process) -> int:
    """Bytes of the object store's shared memory (/dev/shm/plasma...) that only this process has touched:
    they count in its USS, yet are Ray's object store, not the process's own heap."""
    total = 0
    for m in proc.memory_maps(grouped=True):
        if m.path.startswith("/dev/shm") or "plasma" in m.path:
            total += m.private_clean + m.private_dirty
    return total


class Sampler(threading.Thread):
    """Samples every process of the Ray cluster (the flow's driver included) every `interval` seconds."""

    def __init__(self, ray_pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.ray_pid, self.interval = ray_pid, interval
        self.samples: list[dict] = []  # {"t", "procs": [{"pid", "cmd", "rss", "uss", "pss", "shm"}], "available"}
        self.stop_event = threading.Event()

    def sample(self) -> None:
        t = time.monotonic()
        try:
            root = psutil.Process(self.ray_pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        procs = []
        for proc in tree:
            try:
                cmd = " ".join(proc.cmdline()) or proc.name()
                mem = proc.memory_full_info()
                shm = object_store_private(proc)
            except psutil.Error:
                continue
            procs.append({"pid": proc.pid, "cmd": cmd[:200], "rss": mem.rss, "uss": mem.uss, "pss": mem.pss,
                          "shm": shm})
        self.samples.append({"t": t, "procs": procs, "available": psutil.virtual_memory().available})

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)
        self.sample()


def step_windows(events: list[tuple[float, str]]) -> list[dict]:
    """[{index, kind, loop, run_id, start, end}] from the driver's timestamped log lines."""
    steps: dict[int, dict] = {}
    for t, line in events:
        if m := STEP_START.search(line):
            steps[int(m[1])] = {"index": int(m[1]), "kind": int(m[2]), "loop": int(m[3]), "run_id": m[4],
                                "start": t, "end": None}
        elif (m := STEP_DONE.search(line)) and int(m[1]) in steps:
            steps[int(m[1])]["end"] = t
    return [steps[i] for i in sorted(steps)]


FIELDS = ("rss", "uss", "pss", "heap", "max_rss", "n")


def per_kind(sample: dict) -> dict[str, dict[str, float]]:
    """{kind: {rss, uss, pss, heap = USS without object-store pages (sums, MiB), max_rss (largest single
    process, MiB), n}} of one sample."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0.0))
    for p in sample["procs"]:
        for k in (out[p["kind"]], out["ALL processes"]):
            k["rss"] += p["rss"] / MiB
            k["uss"] += p["uss"] / MiB
            k["pss"] += p["pss"] / MiB
            k["heap"] += (p["uss"] - p.get("shm", 0)) / MiB
            k["max_rss"] = max(k["max_rss"], p["rss"] / MiB)
            k["n"] += 1
    return out


def analyse(samples: list[dict], steps: list[dict]) -> dict:
    """Peak per kind per step, and each kind's memory at the end of each step (its last sample there)."""
    result: dict = {"steps": []}
    for step in steps:
        window = [s for s in samples if step["start"] <= s["t"] <= (step["end"] or float("inf"))]
        peaks: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0.0))
        end: dict[str, dict[str, float]] = {}
        for s in window:
            for kind, v in per_kind(s).items():
                for key in FIELDS:
                    peaks[kind][key] = max(peaks[kind][key], v[key])
                end[kind] = v  # last sample of the window in which the kind was present
        result["steps"].append({**step, "wall_s": (step["end"] or window[-1]["t"]) - step["start"] if window else None,
                                "samples": len(window), "peak": dict(peaks), "at_end": end})
    return result


def mlflow_step_metrics(uri: str, flow_name: str) -> dict[int, dict[str, float]]:

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("eqface")
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`eqface.flow` = '{flow_name}' and tags.`eqface.role` = 'step'")
    return {int(r.data.tags["eqface.step_index"]): dict(r.data.metrics) for r in runs}


def print_report(report: dict) -> None:
    steps = report["analysis"]["steps"]
    kinds = sorted({k for s in steps for k in s["peak"]}, key=lambda k: -max(s["peak"].get(k, {}).get("rss", 0)
                                                                           for s in steps))
    head = "".join(f"  step {s['index']} (k{s['kind']})" for s in steps)
    print(f"\npeak RSS per process kind, MiB: sum over its processes / largest one / most processes at once\n"
          f"{'process kind':<24}{head}")
    for kind in kinds:
        cells = []
        for s in steps:
            p = s["peak"].get(kind)
            cells.append(f"{p['rss']:7.0f}/{p['max_rss']:5.0f}/{p['n']:<2.0f}" if p else f"{'-':>16}")
        print(f"{kind:<24}" + "".join(f"  {c:>16}" for c in cells))
    print(f"\npeak USS (unique memory) per process kind, MiB: all / without the object-store pages it holds\n"
          f"{'process kind':<24}{head}")
    for kind in kinds:
        cells = [f"{s['peak'][kind]['uss']:.0f}/{s['peak'][kind]['heap']:.0f}" if kind in s["peak"] else "-"
                 for s in steps]
        print(f"{kind:<24}" + "".join(f"  {c:>16}" for c in cells))
    by_index = {s["index"]: s for s in steps}
    if 0 in by_index and 2 in by_index:
        print("\nleak check: memory at the end of step 3 (index 2) vs the end of step 1 (index 0), MiB")
        print(f"{'process kind':<24}" + "".join(f"{c:>11}" for c in ("RSS s1", "RSS s3", "delta", "USS s1",
                                                                     "USS s3", "delta", "heap s1", "heap s3",
                                                                     "delta")))
        for kind in kinds:
            a, b = by_index[0]["at_end"].get(kind), by_index[2]["at_end"].get(kind)
            if a and b:
                print(f"{kind:<24}" + "".join(f"{a[k]:11.0f}{b[k]:11.0f}{b[k] - a[k]:+11.0f}"
                                              for k in ("rss", "uss", "heap")))
    print("\nwall time per step (training + validation + tracking)")
    for s in steps:
        m = report["mlflow"].get(s["index"], {})
        extra = f", {m['images_per_s']:.0f} img/s training" if "images_per_s" in m else ""
        extra += f", val_acc {m['val_acc']:.3f}" if "val_acc" in m else ""
        wall = f"{s['wall_s']:.0f} s" if s["wall_s"] is not None else "?"
        print(f"  step {s['index']} (kind {s['kind']}): {wall}{extra}")
    print(f"  whole flow (driver start to exit): {report['flow_wall_s']:.0f} s; dataset ready in "
          f"{report['dataset_s']:.0f} s; lowest available system memory {report['min_available_mib']:.0f} MiB")


def write_report(raw: dict, path: Path) -> None:
    """Print the tables and write them, with the per-kind timeline, to `path` (JSON)."""
    samples = raw["samples"]
    label_samples(samples)
    report = {k: v for k, v in raw.items() if k not in ("samples", "events")}
    report["min_available_mib"] = min(s["available"] for s in samples) / MiB
    report["analysis"] = analyse(samples, step_windows(raw["events"]))
    report["mlflow"] = {int(k): v for k, v in raw["mlflow"].items()}
    report["timeline"] = [{"t": round(s["t"], 1), "available_mib": round(s["available"] / MiB),
                           "kinds": {k: {"rss": round(v["rss"], 1), "uss": round(v["uss"], 1), "n": v["n"]}
                                     for k, v in per_kind(s).items()}} for s in samples]
    print_report(report)
    path.write_text(json.dumps(report, indent=1))
    print(f"\n[load] numbers written to {path} (raw samples: {path.with_suffix('.raw.json')})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=2000)
    parser.add_argument("--per-identity", type=int, default=50)
    parser.add_argument("--val-per-identity", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cpus-per-worker", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=128, help="per worker, every step")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between memory samples")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "eqface" / "flow_load")
    parser.add_argument("--json", type=Path, default=Path("flow_load.json"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the flow is stopped")
    parser.add_argument("--report-from", type=Path, default=None, help="only redo the report from a .raw.json")
    parser.add_argument("overrides", nargs="*", help="more key.sub=value config overrides")
    args = parser.parse_args(argv)
    if args.report_from:
        write_report(json.loads(args.report_from.read_text()), args.json)
        return 0


    work = args.work.expanduser().resolve()
    started = time.monotonic()
    spec = SyntheticSpec(num_identities=args.identities, train_per_identity=args.per_identity,
                         val_per_identity=args.val_per_identity, image_size=args.image_size, seed=0)
    ensure_synthetic_dataset(str(work / "data"), spec)  # what the flow's prepare_datasets finds cached
    dataset_s = time.monotonic() - started
    print(f"[load] dataset of {args.identities * args.per_identity} training images ready in {dataset_s:.0f} s",
          flush=True)

    name = f"load-{uuid.uuid4().hex[:6]}"
    overrides = [
        f"flow.name={name}", f"flow.storage={work / 'runs'}", f"data.cache_root={work / 'data'}",
        f"data.synthetic.num_identities={args.identities}", f"data.synthetic.train_per_identity={args.per_identity}",
        f"data.synthetic.val_per_identity={args.val_per_identity}", f"data.image_size={args.image_size}",
        "model.width_mult=0.25", "model.embedding_size=32", "model.quality_hidden=32",
        *(f"step{k}.epochs=1" for k in (1, 2, 3)), *(f"step{k}.batch_size={args.batch_size}" for k in (1, 2, 3)),
        f"scaling.num_workers={args.workers}", f"scaling.cpus_per_worker={args.cpus_per_worker}",
        "flow.max_failures=0", *args.overrides,
    ]
    stack = Stack.load(work / f"stack-{name}")
    sampler = None
    driver = None
    try:
        stack.start_mlflow()
        ray_svc = stack.start_ray(num_cpus=2)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.update(stack.env())
        # As a user submits it (tests/conftest.py): the driver runs on the cluster, under its job supervisor.
        # RAY_ADDRESS pins the driver and the workers to this cluster's GCS, never another on this host.
        job_env = {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
                   "RAY_ADDRESS": f"127.0.0.1:{ray_svc.info['gcs_port']}"}
        sampler = Sampler(ray_svc.pid, args.interval)
        sampler.start()
        flow_start = time.monotonic()
        driver = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"],
             "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": job_env}), "--",
             "python", "flows/eqface.py", "--config", "configs/default.yaml", *overrides],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        events: list[tuple[float, str]] = []
        tail: list[str] = []

        def read() -> None:
            for line in driver.stdout:
                events.append((time.monotonic(), line))
                tail.append(line)
                del tail[:-200]
                if line.startswith("[eqface]") or "error" in line.lower():
                    print(f"[load +{time.monotonic() - flow_start:5.0f}s] {line.rstrip()}", flush=True)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = driver.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            driver.kill()
            code = driver.wait()
            print(f"[load] flow stopped after --timeout {args.timeout:.0f} s", flush=True)
        reader.join(timeout=10)
        flow_wall = time.monotonic() - flow_start
        sampler.stop_event.set()
        sampler.join(timeout=30)
        if code != 0:
            print("".join(tail[-60:]), file=sys.stderr)
        raw = {
            "config_overrides": overrides, "driver_exit": code, "flow_wall_s": flow_wall, "dataset_s": dataset_s,
            "train_images": args.identities * args.per_identity, "interval_s": args.interval,
            "mlflow": mlflow_step_metrics(stack.env()["MLFLOW_TRACKING_URI"], name) if code == 0 else {},
            # times relative to the driver's start
            "events": [(t - flow_start, line) for t, line in events if line.startswith("[eqface]")],
            "samples": [{**s, "t": s["t"] - flow_start} for s in sampler.samples],
        }
        raw_path = args.json.with_suffix(".raw.json")
        raw_path.write_text(json.dumps(raw))  # first: a report that fails can be redone with --report-from
        write_report(raw, args.json)
        return 0 if code == 0 else 1
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        if sampler is not None:
            sampler.stop_event.set()
        stack.stop_all()


if __name__ == "__main__":
    sys.exit(main())
