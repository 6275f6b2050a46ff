"""Backbone cost on this CPU: parameters, FLOPs at 112 px, and training throughput.

    python -m benchmarks.backbone_speed                 # params/FLOPs + the throughput grid
    python -m benchmarks.backbone_speed --compile       # also try torch.compile on each config
    python -m benchmarks.backbone_speed --skip-flops --models r18 --sizes 56 --widths 0.5

Throughput = images/s of a full training step (forward, margin loss, backward, SGD step) at batch 64
with torch.set_num_threads(2), for the EQFace net (backbone + quality branch) and a 1000-class
MarginHead; "infer" is eval-mode forward only. Reported for the default (contiguous) memory format
and for channels_last.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import BACKBONE_NAMES, Margin, MarginHead, build_eqface_net, get_backbone


def count_flops(name: str, input_size: int = 112) -> tuple[int, int]:
    backbone = get_backbone(name, input_size=input_size).eval()
    params = sum(p.numel() for p in backbone.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(torch.zeros(1, 3, input_size, input_size))
    return params, counter.get_total_flops()


def time_steps(step, min_seconds: float, min_steps: int = 3) -> float:
    """Seconds per call of `step`, after two warm-up calls."""
    step()
    step()
    count, start = 0, time.perf_counter()
    while count < min_steps or time.perf_counter() - start < min_seconds:
        step()
        count += 1
    return (time.perf_counter() - start) / count


def training_throughput(
    name: str, size: int, width: float, *, batch: int, channels_last: bool, compile_net: bool, seconds: float
) -> tuple[float, float]:
    torch.manual_seed(0)
    net = build_eqface_net(
        backbone=name, input_size=size, width_mult=width, quality_pooled=True, channels_last=channels_last
    )
    head = MarginHead(1000, 512, Margin(scale=64.0, m2=0.5))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    runner = torch.compile(net) if compile_net else net
    optimizer = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    images = (torch.rand(batch, 3, size, size) * 2 - 1).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (batch,))

    def train_step() -> None:
        embedding, quality = runner(images)
        loss = head(embedding, labels, quality).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    net.train()
    train_s = time_steps(train_step, seconds)
    net.eval()

    def infer_step() -> None:
        with torch.inference_mode():
            runner(images)

    infer_s = time_steps(infer_step, seconds / 2)
    return batch / train_s, batch / infer_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mobilefacenet", "r18"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[48, 56])
    parser.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per measurement")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to build)")
    parser.add_argument("--skip-flops", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not args.skip_flops:
        print("| backbone | params (M) | GFLOPs at 112 (multiply-adds) |")
        print("|---|---|---|")
        for name in BACKBONE_NAMES:
            params, flops = count_flops(name)
            print(f"| {name} | {params / 1e6:.2f} | {flops / 2e9:.2f} |", flush=True)
        print()

    variants = [("eager", False, False), ("channels_last", True, False)]
    if args.compile:
        variants += [("compile", False, True), ("compile+channels_last", True, True)]
    print(f"training throughput, batch {args.batch}, {args.threads} threads (images/s)")
    columns = " | ".join(f"{v} train / infer" for v, _, _ in variants)
    print(f"| backbone | input | width | params (M) | {columns} |")
    print("|---|---|---|---|" + "---|" * len(variants))
    for name in args.models:
        for size in args.sizes:
            for width in args.widths:
                backbone = get_backbone(name, input_size=size, width_mult=width)
                params = sum(p.numel() for p in backbone.parameters())
                cells = []
                for _, channels_last, compile_net in variants:
                    train, infer = training_throughput(
                        name,
                        size,
                        width,
                        batch=args.batch,
                        channels_last=channels_last,
                        compile_net=compile_net,
                        seconds=args.seconds,
                    )
                    cells.append(f"{train:.0f} / {infer:.0f}")
                row = " | ".join(cells)
                print(f"| {name} | {size} | {width} | {params / 1e6:.2f} | {row} |", flush=True)


if __name__ == "__main__":
    main()
