"""Score a folder of face images: embedding + EQFace quality per image, a contact sheet, rejects.

    python -m flows.score --model <MLflow model URI | checkpoint dir/URI | net.pt> FOLDER
        [--out scores.parquet|scores.csv] [--min-quality 0.3] [--sheet contact.png] [--image-size N]

Images (jpg/jpeg/png/bmp, any depth below FOLDER) are read whole, converted to RGB and resized to the
model's input size: no face detection or alignment, so give it face crops. Files that cannot be read
(empty, not an image, too large, truncated) are listed, skipped and counted. The contact sheet shows at
most SHEET_MAX_IMAGES, evenly spread along the quality order.

Exit status: 0 every image scored; 3 outputs written for the readable images, but some files were skipped
(listed on stderr); 1 no image could be scored; 2 bad arguments or a model that does not load.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data.pipeline import normalise, pixel_limit, to_rgb
from evaluation.verification import embed_images
from flows.evaluate import ModelLoadError, load_model

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Larger images are refused as possible decompression bombs (a face crop is rarely over 4k x 4k).
DEFAULT_MAX_PIXELS = 4096 * 4096
# Larger files are refused unread (a 4k x 4k RGB PNG of pure noise is 48 MiB).
DEFAULT_MAX_BYTES = 64 * 2**20
EXIT_SKIPPED = 3
SHEET_MAX_IMAGES = 400


class UnreadableImageError(ValueError):
    """An image file that cannot be turned into a face crop; the message says why."""


@dataclass
class ScoredImages:
    paths: list[str]  # relative to the folder
    sizes: list[tuple[int, int]]  # original (width, height)
    embeddings: np.ndarray  # (N, E) flip-sum, L2-normalised
    embedding_norms: np.ndarray  # (N,) norm of the raw (unflipped) embedding
    quality: np.ndarray  # (N,)
    unreadable: list[tuple[str, str]]  # (path, reason)


# ----------------------------------------------------------------------------- reading images


def find_images(folder: Path) -> list[Path]:
    """Image files below `folder` (recursively), sorted so output order is stable."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_file(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
                    ) -> Image.Image:
    """The file as an RGB PIL image; raises UnreadableImageError saying what is wrong with it."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UnreadableImageError(f"cannot stat: {exc}") from None
    if size == 0:
        raise UnreadableImageError("empty file (0 bytes)")
    if size > max_bytes:
        raise UnreadableImageError(f"file too large ({size / 2**20:.1f} MiB > --max-bytes "
                                   f"{max_bytes / 2**20:.1f} MiB), not read")
    try:
        with pixel_limit(max_pixels), Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImageError(f"too large, refused as a possible decompression bomb ({exc})") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImageError("not an image PIL can identify") from None
    except Exception as exc:  # truncated data, bad header, unsupported mode, ...
        raise UnreadableImageError(f"{type(exc).__name__}: {exc}") from None


def face_pixels(img: Image.Image, image_size: int) -> np.ndarray:
    """uint8 (S, S, 3): the whole image resized to the model's input, as data.pipeline does."""
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def score_folder(
    net,
    folder: Path,
    image_size: int,
    batch_size: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ScoredImages:
    """Read every image below `folder` and run the model on the readable ones, a batch at a time.

    Memory holds one batch of pixels plus the embeddings, whatever the folder's size.
    """


    paths, sizes, unreadable = [], [], []
    embeddings, raw_norms, quality = [], [], []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            emb = embed_images(net, normalise(np.stack(pending)), batch_size=batch_size, progress=False)
            embeddings.append(emb.embeddings)
            raw_norms.append(np.linalg.norm(emb.raw_embeddings, axis=1))
            quality.append(emb.quality)
            pending.clear()

    for path in tqdm(find_images(folder), desc="scoring images", unit="img", disable=not progress):
        rel = str(path.relative_to(folder))
        try:
            img = read_image_file(path, max_pixels, max_bytes)
        except UnreadableImageError as exc:
            unreadable.append((rel, str(exc)))
            continue
        paths.append(rel)
        sizes.append(img.size)
        pending.append(face_pixels(img, image_size))
        if len(pending) == batch_size:
            flush()
    flush()
    if not paths:
        return ScoredImages([], [], np.zeros((0, 0), np.float32), np.zeros(0), np.zeros(0), unreadable)
    return ScoredImages(
        paths,
        sizes,
        np.concatenate(embeddings),
        np.concatenate(raw_norms),
        np.concatenate(quality),
        unreadable,
    )


# ----------------------------------------------------------------------------- outputs


def write_scores(scored: ScoredImages, out: Path, min_quality: float | None) -> None:
    """Parquet (embedding as one list column) or CSV (one column per embedding dimension)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    n, dim = scored.embeddings.shape
    columns = {
        "path": scored.paths,
        "quality": scored.quality.astype(np.float32).tolist(),
        "embedding_norm": scored.embedding_norms.astype(np.float32).tolist(),
        "width": [w for w, _ in scored.sizes],
        "height": [h for _, h in scored.sizes],
    }
    if min_quality is not None:
        columns["rejected"] = (scored.quality < min_quality).tolist()
    if out.suffix.lower() == ".parquet":

        table = pa.table(
            {
                k: pa.array(np.asarray(v, dtype=np.float32))
                if k in ("quality", "embedding_norm")
                else pa.array(v)
                for k, v in columns.items()
            }
        )
        flat = pa.array(scored.embeddings.astype(np.float32).reshape(-1))
        table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, dim))
        pq.write_table(table, out)
        return
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, *(f"emb_{j}" for j in range(dim))])
        for i in range(n):
            row = [columns[c][i] for c in columns]
            writer.writerow([*row, *(f"{v:.6g}" for v in scored.embeddings[i])])


def sheet_selection(quality: np.ndarray, max_images: int = SHEET_MAX_IMAGES) -> np.ndarray:
    """Indices in quality order, low -> high; above max_images an evenly spaced selection along that order."""
    order = np.argsort(quality, kind="mergesort")
    if order.size <= max_images:
        return order
    return order[np.linspace(0, order.size - 1, max_images).round().astype(int)]


def contact_sheet(
    thumbnails: list[Image.Image],
    quality: np.ndarray,
    names: list[str],
    min_quality: float | None = None,
    cell: int = 96,
    columns: int = 10,
    total: int | None = None,
) -> Image.Image:
    """The thumbnails in the order given (quality low -> high), score and name under each; rejects in red."""
    columns = max(1, min(columns, len(thumbnails)))
    rows = -(-len(thumbnails) // columns)
    caption_h, header_h = 26, 22
    font = ImageFont.load_default()
    title = (
        f"{len(thumbnails)} of {total or len(thumbnails)} images by quality, low -> high "
        "(left to right, top to bottom)"
    )
    if min_quality is not None:
        title += f"; red frame: quality < {min_quality:g}"
    title_width = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font))
    sheet = Image.new(
        "RGB", (max(columns * cell, title_width + 8), header_h + rows * (cell + caption_h)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    for k, (thumb, q, name) in enumerate(zip(thumbnails, quality, names, strict=True)):
        x, y = (k % columns) * cell, header_h + (k // columns) * (cell + caption_h)
        sheet.paste(thumb.resize((cell - 4, cell - 4), Image.BILINEAR), (x + 2, y + 2))
        if min_quality is not None and q < min_quality:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=(220, 0, 0), width=2)
        short = Path(name).name
        short = short if len(short) <= 15 else short[:14] + "~"
        draw.text((x + 2, y + cell), f"{q:.3f}", fill=(0, 0, 0), font=font)
        draw.text((x + 2, y + cell + 12), short, fill=(90, 90, 90), font=font)
    return sheet


def folder_contact_sheet(
    folder: Path, scored: ScoredImages, image_size: int, min_quality: float | None, max_pixels: int
) -> Image.Image:
    """Contact sheet of a scored folder: the selected images are read again (only those)."""
    chosen = sheet_selection(scored.quality)
    thumbs = []
    for i in chosen:
        try:
            thumbs.append(
                Image.fromarray(
                    face_pixels(read_image_file(folder / scored.paths[i], max_pixels), image_size)
                )
            )
        except UnreadableImageError:  # changed on disk since it was scored
            thumbs.append(Image.new("RGB", (image_size, image_size), "grey"))
    return contact_sheet(
        thumbs,
        scored.quality[chosen],
        [scored.paths[i] for i in chosen],
        min_quality,
        total=scored.quality.size,
    )


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.score", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of face images (searched recursively)")
    parser.add_argument(
        "--model",
        required=True,
        help="MLflow model URI (models:/..., runs:/...), checkpoint dir/URI, or net.pt",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("scores.parquet"), help="scores file: .parquet or .csv"
    )
    parser.add_argument("--min-quality", type=float, default=None, help="list images under this quality")
    parser.add_argument(
        "--sheet",
        type=Path,
        default=None,
        help="contact sheet PNG (default: next to --out, <stem>_contact.png)",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="model input size (default: the model's)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse larger images as possible decompression bombs",
    )
    parser.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="skip larger files without reading them"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def fail(message: str, code: int = 2) -> int:
        print(f"score: error: {message}", file=sys.stderr)
        return code

    if not args.folder.is_dir():
        return fail(f"{args.folder}: not a folder")
    if args.out.suffix.lower() not in (".parquet", ".csv"):
        return fail(f"--out {args.out}: must end in .parquet or .csv")
    if args.min_quality is not None and not 0.0 <= args.min_quality <= 1.0:
        return fail(f"--min-quality {args.min_quality}: must be in [0, 1]")

    try:
        net, image_size = load_model(args.model, args.image_size)
    except ModelLoadError as exc:
        return fail(str(exc))

    scored = score_folder(
        net, args.folder, image_size, args.batch_size, args.max_pixels, progress=not args.no_progress,
        max_bytes=args.max_bytes,
    )
    found = len(scored.paths) + len(scored.unreadable)
    if scored.unreadable:
        print(f"unreadable images: {len(scored.unreadable)} of {found} (skipped)", file=sys.stderr)
        for path, reason in scored.unreadable:
            print(f"  {path}: {reason}", file=sys.stderr)
    if not scored.paths:
        if found == 0:
            return fail(f"{args.folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found", 1)
        return fail(f"{args.folder}: none of the {found} images could be read (see the list above)", 1)

    write_scores(scored, args.out, args.min_quality)
    sheet_path = args.sheet or args.out.with_name(f"{args.out.stem}_contact.png")
    sheet_path.parent.mkdir(parents=True, exist_ok=True)
    folder_contact_sheet(args.folder, scored, image_size, args.min_quality, args.max_pixels).save(sheet_path)

    q = scored.quality
    print(
        f"scored {len(scored.paths)} images ({len(scored.unreadable)} unreadable, skipped), "
        f"embedding size {scored.embeddings.shape[1]}, image size {image_size}"
    )
    print(f"quality: min {q.min():.3f}  median {np.median(q):.3f}  mean {q.mean():.3f}  max {q.max():.3f}")
    if args.min_quality is not None:
        rejects = np.flatnonzero(q < args.min_quality)
        print(f"rejects (quality < {args.min_quality:g}): {rejects.size} of {q.size}")
        for i in rejects[np.argsort(q[rejects], kind="mergesort")]:
            print(f"  {q[i]:.3f}  {scored.paths[i]}")
    print(f"scores:        {args.out}")
    print(f"contact sheet: {sheet_path}")
    if scored.unreadable:  # outputs are complete for what could be read; the status says it was not all
        print(f"score: {len(scored.unreadable)} of {found} files skipped as unreadable (listed above); "
              f"exit status {EXIT_SKIPPED}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
