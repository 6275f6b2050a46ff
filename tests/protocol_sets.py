"""Tiny IJB and YouTube Faces sets in the protocols' exact file layouts, built from the real faces in
../shared/data/faces (tests/test_protocols.py, tests/test_protocol_eval.py, benchmarks/protocol_throughput.py).

IJB: LFW people with many photos; each person gives two templates, each of several media (photos grouped),
every photo a rotated "loose crop" with its five landmarks (insightface's template placed on LFW's face
box, then moved by the crop's rotation). YTF: Yale B lighting series; each person gives two videos, the
better-lit half of the series and the worse-lit half.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.align import ARCFACE_TEMPLATE, warp_affine
from evaluation.quality_assessment import yaleb_light_angle

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
CROP = 160
# LFW's face is about the central 110 x 110 of its 250 x 250 photos: insightface's 112 template on that box.
LFW_LANDMARKS = ARCFACE_TEMPLATE * (110 / 112) + 70


def rotation_about(center: tuple[float, float], degrees: float, shift: tuple[float, float]) -> np.ndarray:
    """2x3 similarity: rotate about `center` by `degrees`, then move by `shift`."""
    a = np.deg2rad(degrees)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    c = np.asarray(center, float)
    return np.c_[r, c - r @ c + np.asarray(shift, float)]


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ m[:, :2].T + m[:, 2]


def lfw_people(n_people: int, photos: int, exclude: tuple[str, ...] = ()) -> list[tuple[str, list[Path]]]:
    people = []
    for folder in sorted((FACES / "lfwgrey").iterdir()):
        if folder.name in exclude:
            continue
        files = sorted(folder.glob("*.jpg"))
        if len(files) >= photos:
            people.append((folder.name, files[:photos]))
        if len(people) == n_people:
            break
    return people


def write_ijb(root: Path, name: str = "ijbc", n_people: int = 6, photos: int = 6, seed: int = 0,
              exclude: tuple[str, ...] = ()) -> dict:
    """meta/<name>_{face_tid_mid,name_5pts_score,template_pair_label}.txt and loose_crop/*.jpg.

    Person p: template 2p+1 = photos 0..h-1, template 2p+2 = photos h..; within a template, media of two
    photos then one. Pairs: every template pair (genuine: the two of one person). `exclude`: people to leave
    out (e.g. a model's training people). Returns what was written.
    """
    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "loose_crop").mkdir(exist_ok=True)
    face_lines, mark_lines, owners = [], [], {}
    image_no, media_no = 0, 100
    for p, (_, files) in enumerate(lfw_people(n_people, photos, exclude)):
        half = len(files) // 2
        for t, group in ((2 * p + 1, files[:half]), (2 * p + 2, files[half:])):
            owners[t] = p
            media_sizes = [2, 1] * len(group)
            k = 0
            for size in media_sizes:
                if k >= len(group):
                    break
                media_no += 1
                for path in group[k:k + size]:
                    image_no += 1
                    m = rotation_about((125, 125), rng.uniform(-25, 25), rng.uniform(-8, 8, 2))
                    m[:, 2] -= (250 - CROP) / 2  # and cut the central CROP x CROP
                    with Image.open(path) as img:
                        crop = warp_affine(img.convert("RGB"), m, (CROP, CROP))
                    crop.save(root / "loose_crop" / f"{image_no}.jpg", quality=95)
                    marks = apply(m, LFW_LANDMARKS).reshape(-1)
                    score = rng.uniform(0.6, 1.0)
                    face_lines.append(f"{image_no}.jpg {t} {media_no}")
                    mark_lines.append(f"{image_no}.jpg " + " ".join(f"{v:.3f}" for v in marks) + f" {score:.4f}")
                k += size
    templates = sorted(owners)
    pair_lines = [f"{a} {b} {int(owners[a] == owners[b])}" for i, a in enumerate(templates) for b in templates[i + 1:]]
    (root / "meta" / f"{name}_face_tid_mid.txt").write_text("\n".join(face_lines) + "\n")
    (root / "meta" / f"{name}_name_5pts_score.txt").write_text("\n".join(mark_lines) + "\n")
    (root / "meta" / f"{name}_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    return {"images": image_no, "templates": len(templates), "pairs": len(pair_lines),
            "genuine": sum(line.endswith(" 1") for line in pair_lines)}


def write_ytf(root: Path, n_people: int = 10, frames: int = 5, last: bool = False) -> dict:
    """splits.txt and aligned_images_DB/<person>/<video>/aligned_detect_<video>.<frame>.jpg.

    Person i: video 0 = `frames` of the better-lit half of its Yale B series, video 1 = of the worse-lit
    half. Split i+1 holds the genuine pair of person i and an impostor pair (i's video 0, i+1's video 1).
    `last`: the last people in name order (those flows.realfaces holds out) instead of the first.
    """
    people = sorted(p.name for p in (FACES / "yaleb").iterdir() if p.is_dir())
    people = people[-n_people:] if last else people[:n_people]
    for person in people:
        series = sorted((FACES / "yaleb" / person).glob("*_P00A*.png"), key=lambda p: yaleb_light_angle(p.name)[2])
        half = len(series) // 2
        for video, part in ((0, series[:half]), (1, series[half:])):
            folder = root / "aligned_images_DB" / person / str(video)
            folder.mkdir(parents=True, exist_ok=True)
            for frame, k in enumerate(np.linspace(0, len(part) - 1, frames).round().astype(int), start=1):
                with Image.open(part[k]) as img:
                    img.convert("RGB").save(folder / f"aligned_detect_{video}.{frame}.jpg", quality=95)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["split number, first name, second name, first index, second index, same?"]
    for i, person in enumerate(people):
        other = people[(i + 1) % len(people)]
        lines.append(f"{i + 1}, {person}/0, {person}/1, 1, 1")
        lines.append(f"{i + 1}, {person}/0, {other}/1, 0, 0")
    (root / "splits.txt").write_text("\n".join(lines) + "\n")
    return {"videos": 2 * len(people), "frames": 2 * len(people) * frames, "pairs": 2 * len(people)}
