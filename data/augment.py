"""Training-time image augmentation with PIL + numpy (no torchvision here).

Besides flips and crops: the EQFace authors' JPEG and down/up rescaling, and the degradations of
data/degrade.py (blur, noise, low resolution, occlusion, JPEG at a random severity), so that on a small
real-face set some photos of every identity stay hard to recognise while the good ones remain the majority.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.degrade import DEGRADATION_KINDS, degrade


@dataclass
class AugmentConfig:
    hflip: bool = True
    crop_scale_min: float = 0.9  # random resized crop: area fraction in [crop_scale_min, 1]; 1.0 = off
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (40, 90)
    rescale_prob: float = 0.0
    rescale_min: float = 0.3  # down-then-up scaling, factor drawn from [rescale_min, 1]
    # A degradation of data/degrade.py, kind drawn from degrade_kinds, severity from (0, degrade_max].
    degrade_prob: float = 0.0
    degrade_kinds: tuple[str, ...] = DEGRADATION_KINDS
    degrade_max: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if not 0.0 < self.rescale_min <= 1.0:
            raise ValueError(f"rescale_min must be in (0, 1], got {self.rescale_min}")
        for name in ("jpeg_prob", "rescale_prob", "degrade_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"jpeg_quality must satisfy 1 <= lo <= hi <= 100, got {self.jpeg_quality}")
        self.jpeg_quality = (int(lo), int(hi))
        unknown = sorted(set(self.degrade_kinds) - set(DEGRADATION_KINDS))
        if unknown or not self.degrade_kinds:
            raise ValueError(f"degrade_kinds must be some of {', '.join(DEGRADATION_KINDS)}, got "
                             f"{list(self.degrade_kinds)}")
        self.degrade_kinds = tuple(self.degrade_kinds)
        if not 0.0 < self.degrade_max <= 1.0:
            raise ValueError(f"degrade_max must be in (0, 1], got {self.degrade_max}")

    def degraded_fraction(self) -> float:
        """The share of each identity's training images that get some degradation (JPEG, rescale or data/degrade.py)."""
        return 1 - (1 - self.degrade_prob) * (1 - self.jpeg_prob) * (1 - self.rescale_prob)


def random_resized_crop(img: Image.Image, scale_min: float, rng: np.random.Generator) -> Image.Image:
    """Crop a random box covering [scale_min, 1] of the area (aspect ratio within 10% of the original)."""
    w, h = img.size
    area = rng.uniform(scale_min, 1.0)
    aspect = math.exp(rng.uniform(math.log(0.9), math.log(1.1)))
    cw = min(w, max(1, round(w * math.sqrt(area * aspect))))
    ch = min(h, max(1, round(h * math.sqrt(area / aspect))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return img.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def down_up_rescale(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    small = img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR)
    return small.resize((w, h), Image.BILINEAR)


def augment_image(img: Image.Image, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """Apply flip, crop, degradation, rescale and JPEG in that order; output has the input's size and mode RGB."""
    img = img.convert("RGB")
    if cfg.hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if cfg.crop_scale_min < 1.0:
        img = random_resized_crop(img, cfg.crop_scale_min, rng)
    if cfg.degrade_prob > 0 and rng.random() < cfg.degrade_prob:
        kind = cfg.degrade_kinds[int(rng.integers(len(cfg.degrade_kinds)))]
        img = degrade(img, cfg.degrade_max * (1.0 - rng.random()), kind, rng)
    if cfg.rescale_prob > 0 and rng.random() < cfg.rescale_prob:
        img = down_up_rescale(img, rng.uniform(cfg.rescale_min, 1.0))
    if cfg.jpeg_prob > 0 and rng.random() < cfg.jpeg_prob:
        img = jpeg_roundtrip(img, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
    return img
