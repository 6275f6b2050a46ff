"""Throughput of the protocol evaluation's embedding job (flows/protocol_eval.py) against a single-process loop.

    python -m benchmarks.protocol_throughput                       # 300 IJB-style crops, mobilefacenet 112 px
    python -m benchmarks.protocol_throughput --people 30 --photos 10 --backbone r18 --actors 2 --batch-size 64

Both paths do the same work on the same images, an IJB set written from ../shared/data/faces (LFW photos as
rotated loose crops with five landmarks, tests/protocol_sets.py): read each file, decode, align from the
landmarks onto the 112x112 template, run the untrained network on the image and its mirror (flip-sum
embedding, quality). (a) one Python loop, torch on one thread and on every core; (b) the Ray Data job:
decode and align as tasks (fused into the actors when both ask for CPUs only, as here), the model in
`--actors` actors, shards written to Parquet. Ray's start-up is left out of (b); the actors' start is in it.

Extrapolation to IJB-C's 469,375 images assumes the cost per image stays what it is here (the crops here are
160x160 JPEGs; IJB-C's loose crops vary in size, larger ones decode slower). Per GPU: the network's FLOPs
(twice: the mirror too) at an assumed sustained --gpu-tflops (default 200, a quarter of an H200's dense
bf16 peak, what convolutional inference at batch 256 reaches in our experience; not measured here: no GPU),
and decoding + alignment on --cpus-per-gpu cores at the per-core rate measured here; the slower of the two
bounds the job.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from benchmarks.backbone_speed import count_flops
from data import storage
from evaluation.protocols import Problems, ijb
from evaluation.verification import embed_images
from flows import protocol_eval
from models import build_eqface_net, save_eqface_net
from tests.protocol_sets import FACES, write_ijb

IJBC_IMAGES = 469_375


def single_process(faces, root: str, net, image_size: int, batch_size: int) -> tuple[float, float]:
    """(seconds for everything, seconds for read + decode + align alone) of the plain loop."""
    decode_s, start = 0.0, time.perf_counter()
    for i in range(0, len(faces), batch_size):
        t0 = time.perf_counter()
        pixels = np.stack([protocol_eval.face_pixels(storage.read_bytes(storage.join(root, f.image)), f.landmarks,
                                                     image_size, 1.0) for f in faces[i:i + batch_size]])
        decode_s += time.perf_counter() - t0
        x = np.ascontiguousarray(np.moveaxis(pixels.astype(np.float32) * (2 / 255) - 1, -1, 1))
        embed_images(net, x, batch_size)
    return time.perf_counter() - start, decode_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=30)
    parser.add_argument("--photos", type=int, default=10)
    parser.add_argument("--backbone", default="mobilefacenet")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--actors", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gpu-tflops", type=float, default=200.0)
    parser.add_argument("--cpus-per-gpu", type=int, default=16)
    parser.add_argument("--gpu-backbone", default="r100", help="the network the per-GPU figure is for")
    args = parser.parse_args()
    if not FACES.is_dir():
        raise SystemExit(f"{FACES} is absent: the benchmark builds its set from it")

    with tempfile.TemporaryDirectory(prefix="eqface-protocol-bench-") as d:
        root = Path(d) / "ijb"
        info = write_ijb(root, n_people=args.people, photos=args.photos)
        faces = list(ijb.iter_faces(str(root), "ijbc", Problems()))
        torch.manual_seed(0)
        net = build_eqface_net(backbone=args.backbone, input_size=args.input_size).eval()
        save_eqface_net(net, Path(d) / "net.pt")
        print(f"{info['images']} images in {info['templates']} templates, {args.backbone} at {args.input_size} px, "
              f"batch {args.batch_size}, {os.cpu_count()} CPUs")

        loop = {}
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            single_process(faces[: args.batch_size], str(root), net, args.input_size, args.batch_size)  # warm-up
            loop_s, decode_s = single_process(faces, str(root), net, args.input_size, args.batch_size)
            loop[threads] = len(faces) / loop_s
            decode_rate = len(faces) / decode_s
            print(f"single process, torch on {threads} thread(s): {loop[threads]:8.1f} img/s  ({loop_s:.1f} s; "
                  f"read+decode+align alone {decode_rate:.1f} img/s on one core)")
        loop_rate = max(loop.values())

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        opts = protocol_eval.ProtocolOptions(protocol="ijbc", root=str(root), model=str(Path(d) / "net.pt"),
                                             out=str(Path(d) / "out"), batch_size=args.batch_size,
                                             actors=args.actors, shard_size=max(1, len(faces) // 4), progress=False)
        start = time.perf_counter()
        protocol_eval.embed_missing_shards(opts, net, args.input_size, faces, str(Path(d) / "out" / "emb"))
        ray_s = time.perf_counter() - start
        ray_rate = len(faces) / ray_s
        ray.shutdown()
        print(f"ray data job, {args.actors} actor(s) of 1 CPU: {ray_rate:8.1f} img/s  ({ray_s:.1f} s, "
              f"{ray_rate / loop_rate:.2f}x the faster loop)")

    best = max(loop_rate, ray_rate)
    print(f"IJB-C ({IJBC_IMAGES:,} images) on this machine at {best:.1f} img/s: {IJBC_IMAGES / best / 3600:.1f} h")
    _, flops = count_flops(args.gpu_backbone, 112)
    model_rate = args.gpu_tflops * 1e12 / (2 * flops)
    cpu_rate = decode_rate * args.cpus_per_gpu
    gpu_rate = min(model_rate, cpu_rate)
    print(f"per GPU ({args.gpu_backbone}, {2 * flops / 1e9:.1f} GFLOP per face with its mirror, at an assumed "
          f"{args.gpu_tflops:g} TFLOP/s: {model_rate:,.0f} img/s; decode+align on {args.cpus_per_gpu} cores: "
          f"{cpu_rate:,.0f} img/s): {gpu_rate:,.0f} img/s, IJB-C in {IJBC_IMAGES / gpu_rate / 60:.1f} min "
          f"({'decode-bound' if cpu_rate < model_rate else 'model-bound'})")


if __name__ == "__main__":
    main()
