"""Image degradations of known severity d in [0, 1] (0 = clean): blur, noise, low resolution, occlusion, JPEG.

One set of functions for the three places that degrade faces: the synthetic faces (data/synthetic.py), the
training augmentation of real photos (data/augment.py, `AugmentConfig.degrade_prob`), and the held-out
degraded real faces whose quality must fall as d rises (flows/realfaces.py). Sizes scale with the image
(the constants were chosen at 56 px). A greyscale photo stays greyscale: noise and occluders are grey
on it, so colour never tells a degraded grey face from a clean one.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEGRADATION_KINDS = ("blur", "noise", "lowres", "occlusion", "jpeg")


def is_grey(img: Image.Image) -> bool:
    if img.mode in ("L", "LA", "I", "F"):
        return True
    x = np.asarray(img.convert("RGB"))
    return bool((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all())


def blur(img: Image.Image, d: float, rng: np.random.Generator) -> Image.Image:
    radius = (0.3 + 5.5 * d ** 1.2) * img.width / 56
    return img.filter(ImageFilter.GaussianBlur(radius))


def noise(img: Image.Image, d: float, rng: np.random.Generator) -> Image.Image:
    x = np.asarray(img, dtype=np.float32)
    # low light: contrast drops as noise rises, like a sensor pushed to high gain
    mean = x.mean()
    x = mean + (x - mean) * (1 - 0.55 * d)
    shape = x.shape[:2] + (1,) if is_grey(img) else x.shape  # luminance noise on a grey photo
    x = x + rng.normal(0, 3 + 100 * d ** 1.3, shape)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def lowres(img: Image.Image, d: float, rng: np.random.Generator) -> Image.Image:
    side = max(3, round(img.width * (4 / 56) ** d))  # geometric: 56 px -> 15 px at d=0.5 -> 4 px at d=1
    small = img.resize((side, side), Image.BOX)
    return small.resize(img.size, Image.BILINEAR if rng.random() < 0.5 else Image.NEAREST)


def occlusion(img: Image.Image, d: float, rng: np.random.Generator) -> Image.Image:
    S = img.width
    grey = is_grey(img)
    out = img.copy()
    draw = ImageDraw.Draw(out)
    covered = 0.85 * d  # fraction of the face box to hide
    face = (0.2 * S, 0.15 * S, 0.8 * S, 0.9 * S)
    fw, fh = face[2] - face[0], face[3] - face[1]
    n = 1 + int(rng.integers(0, 3))
    for _ in range(n):
        area = covered / n * fw * fh * 1.3
        aspect = rng.uniform(0.5, 2.0)
        w, h = min(S, math.sqrt(area * aspect)), min(S, math.sqrt(area / aspect))
        x0 = rng.uniform(face[0] - w * 0.3, face[2] - w * 0.7)
        y0 = rng.uniform(face[1] - h * 0.3, face[3] - h * 0.7)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if grey:
            colour = (round(sum(colour) / 3),) * 3
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
    return out


def jpeg_quality_for(d: float) -> int:
    return max(1, round(92 * (1 / 92) ** d))  # geometric: q 58 at d=0.1, 10 at d=0.5, 1 at d=1


def jpeg(img: Image.Image, d: float, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=jpeg_quality_for(d))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


DEGRADERS = {"blur": blur, "noise": noise, "lowres": lowres, "occlusion": occlusion, "jpeg": jpeg}


def degrade(img: Image.Image, d: float, kind: str, rng: np.random.Generator) -> Image.Image:
    """`img` with degradation `kind` at severity d (d = 0: unchanged)."""
    if kind not in DEGRADERS:
        raise ValueError(f"unknown degradation {kind!r} (valid: {', '.join(DEGRADATION_KINDS)})")
    return img if d <= 0 else DEGRADERS[kind](img.convert("RGB"), d, rng)
