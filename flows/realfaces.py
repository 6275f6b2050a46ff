"""Shard datasets for the real-faces example (configs/realfaces.yaml) from ../shared/data/faces/.

    python -m flows.realfaces [--out ~/.cache/eqface/datasets/realfaces] [--val-people 6]
        [--lfw-val-fraction 0.2] [--max-per-person 30] [--overwrite]

People are split, never photos (an LFW person in both lfw10/ and lfwgrey/ is one person):
  train     Extended Yale B but the last --val-people, and the LFW people of lfwgrey/ + lfw10/ that are not held
            out, at most --max-per-person photos each (5 people have 52-530 photos; the cap keeps classes even)
  val       the held-out Yale B people; `light_angle` and `degradation` = light_angle / 180 per row, so the
            flow's `quality_spearman` is the correlation of quality with the lighting (negative is right)
  lfw       held-out LFW people with 2 to 20 photos (a --lfw-val-fraction of them, chosen by a hash of the name):
            real genuine and impostor pairs for error-versus-discard
  degraded  held-out faces (one photo of each held-out LFW person, and the held-out Yale B photos lit within
            25 degrees of the camera axis) clean and with each of data/degrade.py's degradations at severities
            0.25, 0.5, 0.75, 1: `degradation`, `degradation_type` and the clean `photo` per row, at DEGRADED_SIZE px
Every image is greyscale (3 equal channels): Yale B and lfwgrey/ are grey, and the colour of lfw10/ would
otherwise tell its 10 people from the rest. LFW photos are not aligned (the face is roughly the central
110 x 110 of 250 x 250), so they are cut to the central LFW_CROP x LFW_CROP; the pipeline resizes to
data.image_size when it decodes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data import storage
from data.degrade import DEGRADATION_KINDS, degrade
from data.shards import DatasetError, validate_dataset, write_dataset
from evaluation.quality_assessment import yaleb_light_angle

FACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "faces"
DEFAULT_OUT = "~/.cache/eqface/datasets/realfaces"
LFW_CROP = 120
DEGRADED_SIZE = 64  # the degraded set is made at configs/realfaces.yaml's data.image_size, as training degrades
SEVERITIES = (0.25, 0.5, 0.75, 1.0)
FRONTAL_DEGREES = 25.0
LFW_VAL_MAX_PHOTOS = 20
SPLITS = ("train", "val", "lfw", "degraded")


@dataclass(frozen=True)
class Photo:
    person: str
    path: Path
    root: Path  # ../shared/data/faces: `source` is the path below it

    @property
    def source(self) -> str:
        return str(self.path.relative_to(self.root))

    @property
    def is_lfw(self) -> bool:
        return not self.person.startswith("yaleB")


def stable_hash(*parts: str) -> int:
    """Independent of PYTHONHASHSEED and of the order files are listed in."""
    return int(hashlib.sha256("/".join(parts).encode()).hexdigest()[:12], 16)


def yaleb_people(faces: Path) -> dict[str, list[Photo]]:
    people = {p.name: [Photo(p.name, f, faces) for f in sorted(p.glob("*.png"))]
              for p in sorted((faces / "yaleb").iterdir()) if p.is_dir()}
    if not people:
        raise FileNotFoundError(f"{faces / 'yaleb'}: no person folders")
    return people


def lfw_people(faces: Path) -> dict[str, list[Photo]]:
    """One entry per person name over lfwgrey/ and lfw10/; a photo in both (same file name) counts once."""
    people: dict[str, dict[str, Photo]] = {}
    for folder in ("lfwgrey", "lfw10"):
        for person in sorted(p for p in (faces / folder).iterdir() if p.is_dir()):
            photos = people.setdefault(person.name, {})
            for f in sorted(person.glob("*.jpg")):
                photos.setdefault(f.name, Photo(person.name, f, faces))
    return {name: sorted(photos.values(), key=lambda p: p.path.name) for name, photos in sorted(people.items())}


@dataclass
class Split:
    train: dict[str, list[Photo]]
    val: dict[str, list[Photo]]
    lfw: dict[str, list[Photo]]


def split_people(faces: Path, val_people: int = 6, lfw_val_fraction: float = 0.2,
                 max_per_person: int = 30) -> Split:
    yale = yaleb_people(faces)
    if not 1 <= val_people < len(yale):
        raise ValueError(f"--val-people {val_people}: must be between 1 and {len(yale) - 1}")
    if not 0 < lfw_val_fraction < 1:
        raise ValueError(f"--lfw-val-fraction {lfw_val_fraction}: must be in (0, 1)")
    if max_per_person < 2:
        raise ValueError(f"--max-per-person {max_per_person}: must be >= 2")
    names = sorted(yale)
    val = {name: yale[name] for name in names[-val_people:]}
    train = {name: yale[name] for name in names[:-val_people]}
    lfw_val: dict[str, list[Photo]] = {}
    for name, photos in lfw_people(faces).items():
        if 2 <= len(photos) <= LFW_VAL_MAX_PHOTOS and stable_hash("lfw-val", name) % 1000 < lfw_val_fraction * 1000:
            lfw_val[name] = photos
        else:  # a seeded choice among a big class's photos, not its first (alphabetical = chronological) ones
            train[name] = sorted(photos, key=lambda p: stable_hash("cap", p.source))[:max_per_person]
    check_people_apart(train, {**val, **lfw_val})
    return Split(train, val, lfw_val)


def check_people_apart(train: dict[str, list[Photo]], held_out: dict[str, list[Photo]]) -> None:
    both = sorted(set(train) & set(held_out))
    if both:
        raise ValueError(f"{len(both)} held-out people are also in training (e.g. {both[0]!r}): the held-out figures "
                         f"would not be held out")


def grey_image(photo: Photo) -> Image.Image:
    with Image.open(photo.path) as img:
        img.load()
        grey = img.convert("L")
    if photo.is_lfw:
        left, top = (grey.width - LFW_CROP) // 2, (grey.height - LFW_CROP) // 2
        grey = grey.crop((left, top, left + LFW_CROP, top + LFW_CROP))
    return grey.convert("RGB")


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def light_columns(photo: Photo) -> dict[str, float]:
    angle = yaleb_light_angle(photo.path.name)[2]
    return {"light_angle": float(angle), "degradation": float(angle / 180.0)}


def _rows(photos: list[Photo], label_of: dict[str, int], with_light: bool) -> Iterator[dict]:
    for photo in photos:
        row = {"image": png(grey_image(photo)), "label": label_of[photo.person], "identity": photo.person,
               "source": photo.source}
        if with_light:
            row.update(light_columns(photo))
        yield row


def degraded_faces(split: Split) -> list[Photo]:
    """One photo per held-out LFW person (a seeded choice) and the near-frontally lit held-out Yale B photos."""
    lfw = [min(photos, key=lambda p: stable_hash("degraded", p.source)) for photos in split.lfw.values()]
    yale = [p for photos in split.val.values() for p in photos
            if yaleb_light_angle(p.path.name)[2] <= FRONTAL_DEGREES]
    return lfw + yale


def _degraded_rows(photos: list[Photo], label_of: dict[str, int], seed: int) -> Iterator[dict]:
    for photo in photos:
        clean = grey_image(photo).resize((DEGRADED_SIZE, DEGRADED_SIZE), Image.BILINEAR)
        variants = [("none", 0.0)] + [(kind, d) for kind in DEGRADATION_KINDS for d in SEVERITIES]
        for kind, d in variants:
            rng = np.random.default_rng(stable_hash(str(seed), photo.source, kind, str(d)))
            image = clean if kind == "none" else degrade(clean, d, kind, rng)
            yield {"image": png(image), "label": label_of[photo.person], "identity": photo.person,
                   "source": f"{photo.source}#{kind}@{d:g}", "photo": photo.source, "degradation": float(d),
                   "degradation_type": kind}


def build(out: str, faces: Path = FACES, val_people: int = 6, lfw_val_fraction: float = 0.2,
          max_per_person: int = 30, overwrite: bool = False, seed: int = 0) -> dict[str, str]:
    """Write out/{train,val,lfw,degraded} (rows in a seeded shuffled order, not by person); returns their URIs."""
    split = split_people(faces, val_people, lfw_val_fraction, max_per_person)
    rng = random.Random(seed)
    uris = {name: storage.join(out, name) for name in SPLITS}
    plans = {
        "train": (split.train, lambda photos, labels: _rows(photos, labels, with_light=False)),
        "val": (split.val, lambda photos, labels: _rows(photos, labels, with_light=True)),
        "lfw": (split.lfw, lambda photos, labels: _rows(photos, labels, with_light=False)),
    }
    for name, (people, rows) in plans.items():
        photos = [p for person in people.values() for p in person]
        rng.shuffle(photos)
        identities = sorted(people)
        write_dataset(uris[name], rows(photos, {n: i for i, n in enumerate(identities)}),
                      label_to_identity=identities, overwrite=overwrite,
                      source_desc=f"flows.realfaces from {faces} ({name})")
    photos = degraded_faces(split)
    identities = sorted({p.person for p in photos})
    write_dataset(uris["degraded"], _degraded_rows(photos, {n: i for i, n in enumerate(identities)}, seed),
                  label_to_identity=identities, image_size=DEGRADED_SIZE, overwrite=overwrite,
                  source_desc=f"flows.realfaces from {faces} (held-out faces, degraded)")
    return uris


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.realfaces", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="dataset root (local path or s3://...)")
    parser.add_argument("--faces", type=Path, default=FACES, help="the real face sets (yaleb/, lfw10/, lfwgrey/)")
    parser.add_argument("--val-people", type=int, default=6, help="Yale B people held out for validation")
    parser.add_argument("--lfw-val-fraction", type=float, default=0.2,
                        help="of the LFW people with 2-20 photos, the fraction held out")
    parser.add_argument("--max-per-person", type=int, default=30, help="training photos per person at most")
    parser.add_argument("--seed", type=int, default=0, help="row order and the degradations' noise")
    parser.add_argument("--overwrite", action="store_true", help="replace existing datasets")
    args = parser.parse_args(argv)

    missing = [name for name in ("yaleb", "lfw10", "lfwgrey") if not (args.faces / name).is_dir()]
    if missing:
        print(f"realfaces: error: {args.faces} has no {', '.join(f'{m}/' for m in missing)} folder", file=sys.stderr)
        return 2
    out = args.out if args.out.startswith("s3://") else os.path.expanduser(args.out)
    try:
        uris = build(out, args.faces, args.val_people, args.lfw_val_fraction, args.max_per_person, args.overwrite,
                     args.seed)
        for split, uri in uris.items():
            m = validate_dataset(uri, decode_images=True)
            print(f"{split}: {uri}  ({m.num_samples} images, {m.num_classes} people)")
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"realfaces: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
