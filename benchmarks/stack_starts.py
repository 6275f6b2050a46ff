"""Starts of the local Ray head in a row: each start picks its ports together (infra.ports) and must come up.

    python -m benchmarks.stack_starts --starts 30

Prints the start times and the number of distinct port pairs; tests/test_ports.py runs a shorter series.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import psutil

from infra.stack import Stack


def start_ray_heads(state_dir: Path, starts: int) -> tuple[list[float], set[tuple[int, int]]]:
    """Start and stop (by pid) the Ray head `starts` times; the seconds each start took and the (GCS, dashboard)
    ports each got. Fails on the first start that does not come up, that does not listen on the ports picked for
    it, or that runs a Ray Client server."""
    stack = Stack.load(state_dir)
    times, ports = [], set()
    try:
        for _ in range(starts):
            t0 = time.monotonic()
            head = stack.start_ray(num_cpus=1, object_store_mb=80)
            times.append(time.monotonic() - t0)
            picked = (head.info["gcs_port"], head.info["dashboard_port"])
            ports.add(picked)
            tree = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
            if any("ray.util.client.server" in " ".join(p.cmdline()) for p in tree):
                raise AssertionError("a Ray Client server started without ray_client=True")
            listening = {c.laddr.port for p in tree for c in p.net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN}
            if not set(picked) <= listening:
                raise AssertionError(f"start {len(times)}: the GCS and dashboard ports picked, {picked}, are not "
                                     f"both listening (the head listens on {sorted(listening)})")
            stack.stop("ray")
    finally:
        stack.stop_all()
    return times, ports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=30)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="eqface-starts-") as d:
        times, ports = start_ray_heads(Path(d), args.starts)
    ordered = sorted(times)
    print(f"{args.starts} starts of the Ray head, all up: {time.monotonic() - started:.0f} s in all, start "
          f"{ordered[0]:.1f}-{ordered[-1]:.1f} s (median {ordered[len(ordered) // 2]:.1f} s); "
          f"{len(ports)} distinct port pairs")


if __name__ == "__main__":
    main()
