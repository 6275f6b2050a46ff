"""Set and video aggregation: mean / best / QWFA / QWFAF on set pairs; online aggregation vs a fixed window.

    python -m benchmarks.set_aggregation                              # trains a tiny model first (~3 min)
    python -m benchmarks.set_aggregation --model <MLflow URI | checkpoint dir/URI | net.pt>
    python -m benchmarks.set_aggregation --identities 40 --tracks-per-identity 3 --track-length 16

(a) Synthetic tracks: one identity per track (data/synthetic.py faces), pose and lighting drifting
    smoothly from one random pose to another, and a degradation of one kind whose severity rises and
    falls along the track. Set pairs: two tracks of the same identity are genuine, of two identities
    impostor. Online vs window: each identity's first track enrols a gallery template (QWFA), the other
    tracks are probe streams identified against it (closed set).
(b) Yale B: each person's photos, shuffled, cut into sets of --yaleb-set-size; lighting varies within a
    set, so some frames are mostly shadow. Same protocol. Skipped when ../shared/data/faces is absent.

Quality scales differ between models, so the thresholds are set from the frames' own qualities: s_th
(QWFAF and the online aggregator) defaults to their lower quartile, so QWFAF drops about the worst
quarter of each set; the online aggregator decides once the quality of the frames it kept adds up to
decide_at (default: three frames of median quality).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image

from data.pipeline import decode_image, normalise
from data.synthetic import (
    DEGRADATION_TYPES,
    SampleParams,
    SyntheticSpec,
    degrade,
    encode,
    identity_params,
    render_face,
    sample_variation,
)
from evaluation import aggregate, compare_online_vs_window, evaluate_set_pairs, make_pairs
from evaluation.aggregation import METHODS
from evaluation.quality_assessment import quality_correlation, yaleb_light_angle
from evaluation.verification import count_available_pairs, embed_images
from flows import checkpoints
from flows.config import DEFAULT_CONFIG, load_config
from flows.evaluate import ModelLoadError, load_model, to_jsonable
from flows.runner import prepare_datasets, run_step
from flows.steps import PlannedStep, StepKind, StepSpec
from models import save_eqface_net

FACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "faces"
TRACK_SEED_OFFSET = 90_000  # track identities are drawn from their own seed: never the training identities

Sets = list[tuple[np.ndarray, np.ndarray]]  # per set: (embeddings (n, E), qualities (n,))


# ----------------------------------------------------------------------------- (a) synthetic tracks


@dataclass
class Track:
    identity: int
    kind: str  # degradation type along the whole track
    degradation: np.ndarray  # (T,) ground truth per frame, 0 = clean
    images: np.ndarray  # float32 (T, 3, S, S) in [-1, 1]


def degradation_profile(length: int, rng: np.random.Generator) -> np.ndarray:
    """Severity per frame: a smooth random wave between a low (near clean) and a high level."""
    low, high = rng.uniform(0.0, 0.15), rng.uniform(0.6, 1.0)
    cycles, phase = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * math.pi)
    t = np.arange(length) / max(1, length - 1)
    return low + (high - low) * 0.5 * (1 + np.cos(phase + 2 * math.pi * cycles * t))


_DRIFTING = (
    "rotation_deg",
    "scale",
    "yaw",
    "light_angle",
    "light_strength",
    "brightness",
    "smile",
    "eye_open",
    "brow_raise",
    "shift",
    "colour_gain",
)


def drift(start: SampleParams, end: SampleParams, t: float) -> SampleParams:
    """Pose, lighting and expression a fraction t of the way from start to end; surroundings stay."""
    changes: dict[str, Any] = {}
    for name in _DRIFTING:
        a, b = getattr(start, name), getattr(end, name)
        changes[name] = (
            tuple((1 - t) * x + t * y for x, y in zip(a, b, strict=True))
            if isinstance(a, tuple)
            else (1 - t) * a + t * b
        )
    return dataclasses.replace(start, **changes)


def render_track(
    spec: SyntheticSpec, identity: int, length: int, kind: str, rng: np.random.Generator
) -> Track:

    ident = identity_params(spec, identity)
    start, end = sample_variation(rng, spec), sample_variation(rng, spec)
    degradation = degradation_profile(length, rng)
    frames = []
    for k, d in enumerate(degradation):
        img = render_face(ident, drift(start, end, k / max(1, length - 1)), spec.image_size, spec.supersample)
        img, jpeg_quality = degrade(img, float(d), kind, rng)
        if jpeg_quality is not None:  # JPEG artefacts only exist once encoded
            img = Image.open(io.BytesIO(encode(img, jpeg_quality))).convert("RGB")
        frames.append(np.asarray(img, dtype=np.uint8))
    return Track(identity, kind, degradation.astype(np.float32), normalise(np.stack(frames)))


def make_synthetic_tracks(
    num_identities: int,
    tracks_per_identity: int,
    track_length: int,
    image_size: int,
    seed: int = 0,
    kinds: tuple[str, ...] = DEGRADATION_TYPES,
    supersample: int = 3,
) -> list[Track]:
    """Tracks of synthetic faces, identity-major (all tracks of identity 0 first); fully seeded."""
    if tracks_per_identity < 2:
        raise ValueError(f"tracks_per_identity={tracks_per_identity}: need >= 2 for genuine set pairs")
    if track_length < 1 or num_identities < 2:
        raise ValueError(
            f"need track_length >= 1 and num_identities >= 2, got {track_length}, {num_identities}"
        )
    spec = SyntheticSpec(
        num_identities=num_identities,
        image_size=image_size,
        seed=TRACK_SEED_OFFSET + seed,
        supersample=supersample,
    )
    tracks = []
    for identity in range(num_identities):
        for k in range(tracks_per_identity):
            rng = np.random.default_rng([seed, 31337, identity, k])
            kind = kinds[int(rng.integers(len(kinds)))]
            tracks.append(render_track(spec, identity, track_length, kind, rng))
    return tracks


# ----------------------------------------------------------------------------- (b) Yale B sets


def yaleb_sets(
    root: Path, image_size: int, set_size: int, seed: int = 0, max_people: int | None = None
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, list[str]]:
    """(images float32 (N,3,S,S), sets as index arrays, set labels, file names) from root/yaleb/<person>/."""

    people = sorted(p for p in (root / "yaleb").iterdir() if p.is_dir())[:max_people]
    rng = np.random.default_rng(seed)
    pixels, names, sets, set_labels = [], [], [], []
    for label, person in enumerate(people):
        files = sorted(person.glob("*.png"))
        start = len(pixels)
        for f in files:
            pixels.append(np.asarray(decode_image(f.read_bytes(), image_size), dtype=np.uint8))
            names.append(f.name)
        order = start + rng.permutation(len(files))
        for k in range(len(files) // set_size):
            sets.append(order[k * set_size : (k + 1) * set_size])
            set_labels.append(label)
    return normalise(np.stack(pixels)), sets, np.asarray(set_labels), names


# ----------------------------------------------------------------------------- the protocol


def set_pair_results(
    sets: Sets,
    labels: np.ndarray,
    s_th: float,
    seed: int = 0,
    max_genuine: int = 2000,
    impostors_per_genuine: int = 5,
) -> dict[str, dict[str, Any]]:
    """Verification of set pairs for each aggregation method: {method: evaluation.verify result}."""
    labels = np.asarray(labels)
    have_gen, have_imp = count_available_pairs(labels)
    n_gen = min(max_genuine, have_gen)
    pairs, is_same = make_pairs(labels, n_gen, min(impostors_per_genuine * n_gen, have_imp), seed=seed)
    return evaluate_set_pairs(
        [sets[i] for i in pairs[:, 0]], [sets[i] for i in pairs[:, 1]], is_same, methods=METHODS, s_th=s_th
    )


def online_vs_window(sets: Sets, labels: np.ndarray, s_th: float, decide_at: float) -> dict[str, Any]:
    """First set of each identity enrols (QWFA); the others are streams identified against the gallery."""

    labels = np.asarray(labels)
    gallery_ids = sorted(set(labels.tolist()))
    first = {lab: int(np.flatnonzero(labels == lab)[0]) for lab in gallery_ids}
    gallery = np.stack([aggregate(*sets[first[lab]], method="qwfa") for lab in gallery_ids])
    probes = [i for i in range(len(sets)) if i not in set(first.values())]
    return compare_online_vs_window(
        [sets[i] for i in probes],
        [labels[i].item() for i in probes],
        gallery,
        gallery_ids,
        threshold=-1.0,  # closed set: every probe is someone enrolled
        s_th=s_th,
        decide_at=decide_at,
    )


# decide_at of the online sweep, in frames of median quality: a quick decision to a careful one.
DECIDE_SWEEP = (1.0, 2.0, 3.0, 4.0, 6.0)


def run_protocol(
    sets: Sets, labels: np.ndarray, s_th: float | None = None, decide_at: float | None = None, seed: int = 0
) -> dict[str, Any]:
    """Both comparisons on one collection of sets; s_th / decide_at default as in the module docstring.

    One operating point of the online aggregator says little (it trades frames for accuracy), so it is
    also run at every decide_at of DECIDE_SWEEP ("online_sweep"): each point against the window length
    that reaches the same accuracy."""
    all_q = np.concatenate([q for _, q in sets])
    median = float(np.median(all_q))
    s_th = float(np.quantile(all_q, 0.25)) if s_th is None else s_th
    decide_at = 3 * median if decide_at is None else decide_at
    sweep = []
    for frames in DECIDE_SWEEP:
        point = online_vs_window(sets, labels, s_th, frames * median)
        sweep.append({"decide_at": frames * median, "median_frames": frames, **point})
    # The default decide_at is one of the sweep's points: its comparison is not run twice.
    online = next((p for p in sweep if p["decide_at"] == decide_at), None)
    if online is None:
        online = online_vs_window(sets, labels, s_th, decide_at)
    return {
        "s_th": s_th,
        "decide_at": decide_at,
        "set_pairs": set_pair_results(sets, labels, s_th, seed=seed),
        "online": online,
        "online_sweep": sweep,
        "num_sets": len(sets),
        "frames_per_set": float(np.mean([len(q) for _, q in sets])),
    }


def online_wins(point: dict[str, Any]) -> bool:
    """Fewer frames on average than the shortest window that is as accurate (a window never that accurate
    counts as a win)."""
    window = point["window_frames_at_equal_accuracy"]
    return window is None or point["online_mean_frames"] < window


def format_results(title: str, res: dict[str, Any]) -> str:
    first = next(iter(res["set_pairs"].values()))
    lines = [
        f"{title}: {res['num_sets']} sets of {res['frames_per_set']:.1f} frames; "
        f"{first['num_genuine']} genuine / {first['num_impostor']} impostor set pairs; "
        f"s_th={res['s_th']:.3f}, decide_at={res['decide_at']:.3f}",
        f"  {'method':<7} {'accuracy':>17} {'TAR@FAR=1e-2':>13} {'AUC':>7}",
    ]
    for method, r in res["set_pairs"].items():
        tar = r["tar_at_far"].get(1e-2, float("nan"))
        lines.append(
            f"  {method:<7} {r['acc_mean']:>8.4f} ± {r['acc_std']:.4f} "
            f"{'n/a' if math.isnan(tar) else f'{tar:.4f}':>13} {r['auc']:>7.4f}"
        )
    o = res["online"]
    window = o["window_frames_at_equal_accuracy"]
    lines.append(
        f"  online aggregator: rank-1 accuracy {o['online_accuracy']:.4f} "
        f"after {o['online_mean_frames']:.2f} "
        f"frames on average (median {o['online_median_frames']:g}; "
        f"{o['online_ready_fraction']:.0%} of streams reached decide_at)"
    )
    lines.append(
        "  fixed window (first L frames, mean pooling) reaches that accuracy at "
        + (f"L = {window} frames" if window is not None else "no L (not even the whole stream)")
    )
    lines.append(
        "  window accuracy by L: " + ", ".join(f"{k}:{v:.3f}" for k, v in o["window_accuracy"].items())
    )
    lines.append("  online sweep (decide_at in frames of median quality):")
    lines.append(f"    {'decide_at':>9} {'x median':>8} {'accuracy':>8} {'frames':>7} {'window L':>8}  fewer frames")
    for point in res["online_sweep"]:
        window = point["window_frames_at_equal_accuracy"]
        lines.append(
            f"    {point['decide_at']:>9.3f} {point['median_frames']:>8g} {point['online_accuracy']:>8.4f} "
            f"{point['online_mean_frames']:>7.2f} {'-' if window is None else window:>8}  "
            f"{'yes' if online_wins(point) else 'no'}"
        )
    wins = sum(online_wins(p) for p in res["online_sweep"])
    lines.append(f"    the online aggregator needs fewer frames than the window at {wins} of "
                 f"{len(res['online_sweep'])} operating points")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- model


def train_tiny_model(
    work_dir: Path,
    image_size: int = 32,
    num_identities: int = 160,
    per_identity: int = 16,
    epochs: int = 16,
    quality_epochs: int = 6,
    seed: int = 0,
) -> tuple[torch.nn.Module, Any, Any]:
    """A small EQFaceNet trained on synthetic faces by the flow's own step runner on a local Ray: step 1
    (backbone), then step 2 (quality). Returns (the step-2 network, step 1's checkpoint, step 2's)."""
    cfg = load_config([DEFAULT_CONFIG], [
        f"data.image_size={image_size}", f"data.synthetic.num_identities={num_identities}",
        f"data.synthetic.train_per_identity={per_identity}", "data.synthetic.val_per_identity=2",
        f"data.synthetic.seed={seed}", f"data.cache_root={work_dir / 'data'}", f"flow.storage={work_dir / 'runs'}",
        f"flow.seed={seed}", "model.embedding_size=64", "model.quality_hidden=64", f"step1.epochs={epochs}",
        f"step2.epochs={quality_epochs}", "scaling.num_workers=1",
    ])
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        data = prepare_datasets(cfg)
        step1 = run_step(cfg, StepSpec(PlannedStep(0, StepKind.BACKBONE, 0), data.num_classes), data, "tiny-step1")
        step2 = run_step(cfg, StepSpec(PlannedStep(1, StepKind.QUALITY, 0), data.num_classes, init_checkpoint=step1),
                         data, "tiny-step2")
        return checkpoints.load_net(step2), step1, step2
    finally:
        ray.shutdown()


def embed_sets(
    net: torch.nn.Module, images: np.ndarray, index_sets: list[np.ndarray], progress: bool = True
) -> tuple[Sets, np.ndarray]:
    """Per set (flip-sum embeddings, EQFace qualities), and the quality of every image."""
    emb = embed_images(net, images, batch_size=128, progress=progress)
    return [(emb.embeddings[i], emb.quality[i]) for i in index_sets], emb.quality


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.set_aggregation", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--model",
        default=None,
        help="MLflow model URI, checkpoint dir/URI or net.pt "
        "(default: train a tiny model on synthetic faces first)",
    )
    p.add_argument("--image-size", type=int, default=None, help="only for a model that does not record it")
    p.add_argument("--identities", type=int, default=30)
    p.add_argument("--tracks-per-identity", type=int, default=3)
    p.add_argument("--track-length", type=int, default=16)
    p.add_argument("--s-th", type=float, default=None, help="quality threshold (default: lower quartile)")
    p.add_argument("--decide-at", type=float, default=None, help="default: 3 x median frame quality")
    p.add_argument("--yaleb-set-size", type=int, default=8)
    p.add_argument("--faces", type=Path, default=FACES, help="real face sets root (part b)")
    p.add_argument("--no-yaleb", action="store_true", help="skip part (b)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    p.add_argument("--save-model", type=Path, default=None, help="keep the tiny model (net.pt) for --model")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.model:
        try:
            net, image_size = load_model(args.model, args.image_size)
        except ModelLoadError as exc:
            print(f"set_aggregation: error: {exc}", file=sys.stderr)
            return 2
        print(f"model: {args.model} ({image_size} px)")
    else:
        image_size = args.image_size or 32
        print(f"model: none given; training a tiny EQFaceNet on synthetic faces ({image_size} px), steps 1 and 2")
        with tempfile.TemporaryDirectory(prefix="eqface-set-aggregation-") as work:
            net, _, _ = train_tiny_model(Path(work), image_size=image_size, seed=args.seed)
        if args.save_model:
            args.save_model.parent.mkdir(parents=True, exist_ok=True)
            save_eqface_net(net, args.save_model)
    torch.set_grad_enabled(False)
    report: dict[str, Any] = {"model": args.model or "tiny (trained in-process)", "image_size": image_size}

    tracks = make_synthetic_tracks(
        args.identities, args.tracks_per_identity, args.track_length, image_size, seed=args.seed
    )
    images = np.concatenate([t.images for t in tracks])
    bounds = np.cumsum([0] + [len(t.images) for t in tracks])
    sets, quality = embed_sets(
        net,
        images,
        [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
        progress=not args.no_progress,
    )
    degradation = np.concatenate([t.degradation for t in tracks])
    res = run_protocol(
        sets, np.array([t.identity for t in tracks]), args.s_th, args.decide_at, seed=args.seed
    )
    res["quality_vs_degradation_spearman"] = quality_correlation(quality, degradation)["spearman"]
    report["synthetic_tracks"] = res
    print()
    print(
        format_results(
            f"(a) synthetic tracks ({args.identities} identities x {args.tracks_per_identity})", res
        )
    )
    print(f"  Spearman(quality, degradation) over all frames: {res['quality_vs_degradation_spearman']:.3f}")

    if args.no_yaleb:
        print("\n(b) Yale B: skipped (--no-yaleb)")
    elif not (args.faces / "yaleb").is_dir():
        print(f"\n(b) Yale B: skipped ({args.faces / 'yaleb'} is absent)")
    else:
        y_images, y_sets, y_labels, names = yaleb_sets(
            args.faces, image_size, args.yaleb_set_size, seed=args.seed
        )
        sets, quality = embed_sets(net, y_images, y_sets, progress=not args.no_progress)
        res = run_protocol(sets, y_labels, args.s_th, args.decide_at, seed=args.seed)
        angle = np.array([yaleb_light_angle(n)[2] for n in names])
        res["quality_vs_light_angle_spearman"] = quality_correlation(quality, angle)["spearman"]
        report["yaleb"] = res
        print()
        print(format_results(f"(b) Yale B ({len(set(y_labels.tolist()))} people)", res))
        print(
            "  Spearman(quality, off-axis light angle) over all photos: "
            f"{res['quality_vs_light_angle_spearman']:.3f}"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        for part in ("synthetic_tracks", "yaleb"):  # ROC points would dwarf the numbers that matter
            for r in report.get(part, {}).get("set_pairs", {}).values():
                r.pop("roc", None)
        args.json.write_text(json.dumps(to_jsonable(report), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
