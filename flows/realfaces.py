"""Shard datasets for the real-faces example (configs/realfaces.yaml) from ../shared/data/faces/.

    python -m flows.realfaces [--out ~/.cache/eqface/datasets/realfaces] [--val-people 6] [--overwrite]

train: Extended Yale B minus the held-out people, plus the 10 LFW people (lfw10/).
val:   the held-out Yale B people (the last --val-people in name order), never seen in training.

Images are stored as PNG: Yale B greyscale becomes 3 equal channels at its own 168 x 192; LFW photos
are not aligned (the face is roughly the central 110 x 110 of 250 x 250), so they are cut to the central
LFW_CROP x LFW_CROP. No resizing: the pipeline resizes to data.image_size when it decodes.

The val rows carry the Yale B lighting as ground truth: `light_angle` (degrees between the light and the
camera axis, from the file name) and `degradation` = light_angle / 180, in [0, 1] and monotone in the
angle, so the flow's `quality_spearman` (Spearman against `degradation`) is the correlation with lighting.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from data import storage
from data.shards import DatasetError, validate_dataset, write_dataset
from evaluation.quality_assessment import yaleb_light_angle

FACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "faces"
DEFAULT_OUT = "~/.cache/eqface/datasets/realfaces"
LFW_CROP = 120


def png_rgb(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def centre_crop(img: Image.Image, size: int) -> Image.Image:
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def yaleb_people(faces: Path) -> list[Path]:
    people = sorted(p for p in (faces / "yaleb").iterdir() if p.is_dir())
    if not people:
        raise FileNotFoundError(f"{faces / 'yaleb'}: no person folders")
    return people


def split_people(faces: Path, val_people: int) -> tuple[list[Path], list[Path]]:
    """(train Yale B people, held-out Yale B people)."""
    people = yaleb_people(faces)
    if not 1 <= val_people < len(people):
        raise ValueError(f"--val-people {val_people}: must be between 1 and {len(people) - 1}")
    return people[:-val_people], people[-val_people:]


def _rows(items: list[tuple[str, Path, bool]], identities: list[str], with_light: bool) -> Iterator[dict]:
    """Shard rows for (identity, file, is_lfw) items; labels follow `identities`."""

    label_of = {name: i for i, name in enumerate(identities)}
    for identity, path, is_lfw in items:
        with Image.open(path) as img:
            img.load()
            image = centre_crop(img, LFW_CROP) if is_lfw else img
            data = png_rgb(image)
        row = {
            "image": data,
            "label": label_of[identity],
            "identity": identity,
            "source": str(path.relative_to(path.parents[2])),
        }
        if with_light:
            angle = yaleb_light_angle(path.name)[2]
            row["light_angle"] = float(angle)
            row["degradation"] = float(angle / 180.0)
        yield row


def build(
    out: str, faces: Path = FACES, val_people: int = 6, overwrite: bool = False, seed: int = 0
) -> dict[str, str]:
    """Write out/train and out/val (rows in a seeded shuffled order, not by person); returns their URIs."""

    train_people, held_out = split_people(faces, val_people)
    lfw_people = sorted(p for p in (faces / "lfw10").iterdir() if p.is_dir())
    train_items = [(p.name, f, False) for p in train_people for f in sorted(p.glob("*.png"))]
    train_items += [(p.name, f, True) for p in lfw_people for f in sorted(p.glob("*.jpg"))]
    val_items = [(p.name, f, False) for p in held_out for f in sorted(p.glob("*.png"))]
    rng = random.Random(seed)
    rng.shuffle(train_items)
    rng.shuffle(val_items)
    uris = {"train": storage.join(out, "train"), "val": storage.join(out, "val")}
    for split, items, with_light in (("train", train_items, False), ("val", val_items, True)):
        identities = sorted({identity for identity, _, _ in items})
        write_dataset(
            uris[split],
            _rows(items, identities, with_light),
            label_to_identity=identities,
            overwrite=overwrite,
            source_desc=f"flows.realfaces from {faces} ({split})",
        )
    return uris


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.realfaces", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="dataset root (local path or s3://...)")
    parser.add_argument("--faces", type=Path, default=FACES, help="the real face sets (yaleb/, lfw10/)")
    parser.add_argument("--val-people", type=int, default=6, help="Yale B people held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="row order")
    parser.add_argument("--overwrite", action="store_true", help="replace existing datasets")
    args = parser.parse_args(argv)


    if not (args.faces / "yaleb").is_dir() or not (args.faces / "lfw10").is_dir():
        print(f"realfaces: error: {args.faces} has no yaleb/ and lfw10/ folders", file=sys.stderr)
        return 2
    out = args.out if args.out.startswith("s3://") else os.path.expanduser(args.out)
    try:
        uris = build(out, args.faces, args.val_people, args.overwrite, args.seed)
        for split, uri in uris.items():
            m = validate_dataset(uri, decode_images=True)
            print(f"{split}: {uri}  ({m.num_samples} images, {m.num_classes} people)")
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"realfaces: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
