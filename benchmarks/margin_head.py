"""Margin-head cost: forward+backward step time and peak memory, unsharded vs sharded, r = 1 vs 0.1.

    python -m benchmarks.margin_head                        # 10k, 100k, 1M identities
    python -m benchmarks.margin_head --classes 10000 --steps 5

Batch 128 of 512-d embeddings with a quality s_i each (both require grad, as in EQFace training).
"unsharded" is one process with 2 threads (MarginHead for r = 1, ShardedMarginHead in a world of one
for r = 0.1); "sharded x2" is two gloo processes with 1 thread each (the 2 cores), each holding half
of the centres and a batch of 64 (global batch 128). Each configuration runs in a fresh process;
peak memory is that process's peak RSS minus its RSS just before the head was built (for the
sharded runs: the larger of the two workers, and their sum).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import Margin, MarginHead, ShardedMarginHead

ARCFACE = Margin(scale=64.0, m2=0.5)

EMBEDDING = 512


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(head: torch.nn.Module, batch: int, num_classes: int, steps: int) -> float:
    """Seconds per forward+backward after one warm-up step."""
    generator = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    embeddings = torch.randn(batch, EMBEDDING, generator=generator).requires_grad_()
    quality = torch.rand(batch, generator=generator).requires_grad_()
    labels = torch.randint(0, num_classes, (batch,), generator=generator)

    def step() -> None:
        head(embeddings, labels, quality).loss.backward()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def unsharded(num_classes: int, sample_rate: float, batch: int, steps: int) -> dict:
    torch.set_num_threads(2)
    before = rss_mib()
    if sample_rate >= 1:
        head = MarginHead(num_classes, EMBEDDING, ARCFACE)
    else:
        head = ShardedMarginHead(num_classes, EMBEDDING, ARCFACE, sample_rate=sample_rate)
    seconds = measure(head, batch, num_classes, steps)
    return {"step_s": seconds, "peak_mib": peak_rss_mib() - before, "total_mib": peak_rss_mib() - before}


def sharded_worker(rank: int, port: int, num_classes: int, sample_rate: float, batch: int, steps: int, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        before = rss_mib()
        head = ShardedMarginHead(num_classes, EMBEDDING, ARCFACE, sample_rate=sample_rate)
        seconds = measure(head, batch // 2, num_classes, steps)
        out.put((rank, seconds, peak_rss_mib() - before))
    finally:
        dist.destroy_process_group()


def sharded(num_classes: int, sample_rate: float, batch: int, steps: int) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(
        sharded_worker,
        args=(port, num_classes, sample_rate, batch, steps, queue),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    results = [queue.get() for _ in range(2)]
    return {
        "step_s": max(r[1] for r in results),
        "peak_mib": max(r[2] for r in results),
        "total_mib": sum(r[2] for r in results),
    }


def run_one(args: argparse.Namespace) -> None:
    run = sharded if args.mode == "sharded" else unsharded
    print(json.dumps(run(args.one, args.sample_rate, args.batch, args.steps)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: a single config
    parser.add_argument("--mode", choices=["unsharded", "sharded"], help=argparse.SUPPRESS)
    parser.add_argument("--sample-rate", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return
    print(f"margin head, batch {args.batch}, {EMBEDDING}-d, forward+backward, mean of {args.steps} steps")
    print("| identities | layout | r | step (s) | peak memory per process (MiB) | all processes (MiB) |")
    print("|---|---|---|---|---|---|")
    for num_classes in args.classes:
        for mode, label in (("unsharded", "unsharded (1 proc, 2 threads)"), ("sharded", "sharded x2 gloo")):
            for rate in (1.0, 0.1):
                command = [sys.executable, "-m", "benchmarks.margin_head", "--one", str(num_classes)]
                command += ["--mode", mode, "--sample-rate", str(rate), "--batch", str(args.batch)]
                command += ["--steps", str(args.steps)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"| {num_classes:,} | {label} | {rate} | failed: {done.stderr.strip()[-200:]} |||")
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"| {num_classes:,} | {label} | {rate} | {result['step_s']:.3f} | "
                    f"{result['peak_mib']:.0f} | {result['total_mib']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
