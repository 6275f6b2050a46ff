"""Procedural synthetic faces: the embedded default dataset (no downloads).

Every identity has a stable appearance (face shape, skin, hair, eyes, brows, nose, mouth, and fine marks such
as moles, freckles, scars, glasses, beard). Every sample varies pose, lighting and expression, and gets a
ground-truth degradation d in [0, 1] (0 = clean) of one type from DEGRADATION_TYPES whose severity grows
with d.
Faces are drawn at `supersample` x the output size and downsampled for anti-aliasing. Everything is a pure
function of the spec's seed, so the same spec gives byte-identical datasets.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from data import storage
from data.degrade import DEGRADERS, jpeg_quality_for
from data.shards import DatasetError, read_manifest, write_dataset

GENERATOR_VERSION = 3  # bump when rendering changes so cached datasets are regenerated
DEGRADATION_TYPES = ("blur", "noise", "lowres", "occlusion", "jpeg", "mixed")
SPLITS = {"train": 1, "val": 2}

SKIN_TONES = [(255, 224, 196), (241, 194, 160), (224, 172, 125), (198, 134, 88), (160, 102, 62),
              (120, 74, 44), (90, 56, 36), (232, 190, 150)]
HAIR_COLOURS = [(25, 20, 18), (60, 40, 28), (105, 70, 40), (150, 90, 45), (200, 160, 90), (230, 210, 150),
                (140, 140, 140), (170, 60, 30)]
IRIS_COLOURS = [(70, 40, 20), (110, 70, 35), (60, 110, 170), (70, 130, 80), (120, 130, 130), (140, 110, 50)]
HAIR_STYLES = ("bald", "short", "long", "bangs", "side_part", "curly")


@dataclass
class SyntheticSpec:
    num_identities: int = 100
    train_per_identity: int = 40
    val_per_identity: int = 10
    image_size: int = 56
    seed: int = 0
    clean_fraction: float = 0.25
    supersample: int = 3  # render at this multiple of image_size, then downsample
    degradation_types: tuple[str, ...] = DEGRADATION_TYPES
    max_rotation_deg: float = 6.0
    max_shift: float = 0.03  # fraction of the image
    max_yaw: float = 0.8  # 1.0 = features shift by 4% of the image sideways
    target_shard_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        if self.num_identities < 2:
            raise ValueError("num_identities must be >= 2")
        if self.image_size < 16:
            raise ValueError("image_size must be >= 16")
        if not 0.0 <= self.clean_fraction <= 1.0:
            raise ValueError("clean_fraction must be in [0, 1]")
        unknown = set(self.degradation_types) - set(DEGRADATION_TYPES)
        if unknown:
            raise ValueError(f"unknown degradation types {sorted(unknown)}; choose from {DEGRADATION_TYPES}")
        self.degradation_types = tuple(self.degradation_types)

    def cache_key(self) -> str:
        doc = dataclasses.asdict(self)
        doc.pop("target_shard_bytes")  # storage layout, not content
        doc["generator_version"] = GENERATOR_VERSION
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- parameters


@dataclass
class IdentityParams:
    face_w: float
    face_h: float
    jaw: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: str
    hairline: float
    eye_y: float
    eye_dx: float
    eye_w: float
    eye_h: float
    iris: tuple[int, int, int]
    brow_thick: float
    brow_tilt: float
    brow_arch: float
    brow_gap: float
    nose_len: float
    nose_w: float
    nose_style: int
    mouth_y: float
    mouth_w: float
    lip_thick: float
    lip: tuple[int, int, int]
    ear_size: float
    moles: list[tuple[float, float, float]] = field(default_factory=list)  # (u, v, radius) in face coords
    freckles: list[tuple[float, float]] = field(default_factory=list)
    patch: tuple[float, float, float, tuple[int, int, int]] | None = None  # birthmark (u, v, r, colour)
    scar: tuple[float, float, float, float] | None = None
    glasses: str | None = None  # "round" | "square"
    glasses_colour: tuple[int, int, int] = (20, 20, 20)
    beard: str | None = None  # "full" | "moustache" | "goatee"


@dataclass
class SampleParams:
    rotation_deg: float
    shift: tuple[float, float]
    scale: float
    yaw: float
    light_angle: float
    light_strength: float
    brightness: float
    colour_gain: tuple[float, float, float]
    smile: float
    eye_open: float
    brow_raise: float
    background: tuple[tuple[int, int, int], tuple[int, int, int]]
    shirt: tuple[int, int, int]


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    return tuple(min(255, max(0, int(c + rng.normal(0, amount)))) for c in colour)  # type: ignore


def _pick(rng: np.random.Generator, options: list) -> tuple[int, int, int]:
    return options[int(rng.integers(len(options)))]


def sample_identity(rng: np.random.Generator) -> IdentityParams:
    """Draw one identity's stable appearance."""
    skin = _jitter(rng, _pick(rng, SKIN_TONES), 6)
    lip = tuple(int(np.clip(v, 0, 255)) for v in (skin[0] * 0.85 + 20, skin[1] * 0.55, skin[2] * 0.55))
    style = HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]
    moles = [(rng.uniform(-0.75, 0.75), rng.uniform(-0.6, 0.75), rng.uniform(0.012, 0.022))
             for _ in range(int(rng.integers(1, 6)))]
    freckles = ([(rng.uniform(-0.6, 0.6), rng.uniform(0.0, 0.35)) for _ in range(int(rng.integers(10, 22)))]
                if rng.random() < 0.2 else [])
    patch = None
    if rng.random() < 0.25:
        patch = (rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.6), rng.uniform(0.03, 0.06),
                 _jitter(rng, (150, 80, 70), 20))
    scar = None
    if rng.random() < 0.15:
        scar = (rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.5), rng.uniform(0.05, 0.1),
                rng.uniform(0, math.pi))
    return IdentityParams(
        face_w=rng.uniform(0.24, 0.33), face_h=rng.uniform(0.32, 0.39), jaw=rng.uniform(0.0, 0.45),
        skin=skin, hair=_jitter(rng, _pick(rng, HAIR_COLOURS), 8), hair_style=style,
        hairline=rng.uniform(0.45, 0.75),
        eye_y=rng.uniform(0.40, 0.47), eye_dx=rng.uniform(0.08, 0.135), eye_w=rng.uniform(0.045, 0.065),
        eye_h=rng.uniform(0.022, 0.034), iris=_jitter(rng, _pick(rng, IRIS_COLOURS), 10),
        brow_thick=rng.uniform(0.012, 0.03), brow_tilt=rng.uniform(-0.35, 0.35),
        brow_arch=rng.uniform(0.0, 0.03),
        brow_gap=rng.uniform(0.035, 0.065),
        nose_len=rng.uniform(0.08, 0.13), nose_w=rng.uniform(0.025, 0.05), nose_style=int(rng.integers(3)),
        mouth_y=rng.uniform(0.66, 0.72), mouth_w=rng.uniform(0.07, 0.13), lip_thick=rng.uniform(0.008, 0.022),
        lip=lip, ear_size=rng.uniform(0.035, 0.06),
        moles=moles, freckles=freckles, patch=patch, scar=scar,
        glasses=(None if rng.random() < 0.78 else ("round" if rng.random() < 0.5 else "square")),
        glasses_colour=_jitter(rng, _pick(rng, [(20, 20, 20), (120, 60, 20), (150, 150, 160)]), 10),
        beard=(None if rng.random() < 0.75 else ["full", "moustache", "goatee"][int(rng.integers(3))]),
    )


def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random colour pulled halfway towards a random grey (real backgrounds are rarely saturated)."""
    grey = rng.uniform(40, 220)
    return tuple(int(0.5 * grey + 0.5 * v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def sample_variation(rng: np.random.Generator, spec: SyntheticSpec) -> SampleParams:
    """Draw one sample's pose, lighting, expression and surroundings."""
    return SampleParams(
        rotation_deg=rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg),
        shift=(rng.uniform(-spec.max_shift, spec.max_shift), rng.uniform(-spec.max_shift, spec.max_shift)),
        scale=rng.uniform(1.05, 1.2),
        yaw=rng.uniform(-spec.max_yaw, spec.max_yaw),
        light_angle=rng.uniform(0, 2 * math.pi),
        light_strength=rng.uniform(0.0, 0.35),
        brightness=rng.uniform(0.8, 1.15),
        colour_gain=tuple(rng.uniform(0.92, 1.08, size=3)),  # type: ignore[arg-type]
        smile=rng.uniform(-0.4, 1.0),
        eye_open=rng.uniform(0.55, 1.1),
        brow_raise=rng.uniform(-0.008, 0.012),
        background=(_muted(rng), _muted(rng)),
        shirt=_muted(rng),
    )


# ------------------------------------------------------------------------------------------- rendering


def _scale_colour(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(min(255, max(0, int(v * f))) for v in c)  # type: ignore[return-value]


def _face_outline(cx: float, cy: float, a: float, b: float, jaw: float,
                  n: int = 64) -> list[tuple[float, float]]:
    pts = []
    for t in np.linspace(0, 2 * math.pi, n, endpoint=False):
        x, y = math.cos(t), math.sin(t)
        if y > 0:  # narrow the lower half towards the chin
            x *= 1 - jaw * y * y
        pts.append((cx + a * x, cy + b * y))
    return pts


def _draw_face_layer(ident: IdentityParams, var: SampleParams, size: int) -> Image.Image:
    """The head (hair, face, features, shoulders) on a transparent canvas, upright and centred."""
    S = size
    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    def P(x: float, y: float) -> tuple[float, float]:
        return (x * S, y * S)

    def ellipse(cx: float, cy: float, rx: float, ry: float, fill=None, outline=None,
                width: float = 0) -> None:
        draw.ellipse([P(cx - rx, cy - ry), P(cx + rx, cy + ry)], fill=fill, outline=outline,
                     width=max(1, int(width * S)) if outline else 0)

    cx, cy = 0.5, 0.52
    a, b = ident.face_w, ident.face_h
    yaw_dx = 0.04 * var.yaw  # features move sideways with head turn; the outline moves less
    fx = cx + yaw_dx
    skin, hair = ident.skin, ident.hair
    shade = _scale_colour(skin, 0.82)

    # shoulders and neck
    ellipse(cx, 1.05, 0.42, 0.2, fill=var.shirt)
    draw.rectangle([P(cx - a * 0.45, cy + b * 0.6), P(cx + a * 0.45, 0.9)], fill=shade)
    # long hair falls behind the head
    if ident.hair_style == "long":
        draw.rectangle([P(cx - a * 1.12, cy - b * 0.2), P(cx + a * 1.12, cy + b * 1.15)], fill=hair)
        ellipse(cx, cy - b * 0.2, a * 1.12, b * 0.95, fill=hair)
    # ears
    for side in (-1, 1):
        ex = cx + side * a * (0.98 - 0.08 * side * var.yaw)
        ellipse(ex, cy - 0.01, ident.ear_size * 0.6, ident.ear_size, fill=shade)
    # face
    draw.polygon([P(*p) for p in _face_outline(cx + yaw_dx * 0.3, cy, a, b, ident.jaw)], fill=skin)

    _draw_hair(draw, P, ellipse, ident, cx + yaw_dx * 0.3, cy, a, b)
    _draw_marks(draw, P, ellipse, ident, fx, cy, a, b)
    _draw_eyes_and_brows(draw, P, ellipse, ident, var, fx)
    _draw_nose(draw, P, ident, fx, shade)
    _draw_mouth(draw, P, ellipse, ident, var, fx)
    if ident.beard:
        _draw_beard(draw, P, ident, fx, cy, a, b)
    if ident.glasses:
        _draw_glasses(draw, P, ellipse, ident, var, fx)
    return layer


def _draw_hair(draw, P, ellipse, ident: IdentityParams, cx: float, cy: float, a: float, b: float) -> None:
    style, hair = ident.hair_style, ident.hair
    if style == "bald":
        for side in (-1, 1):  # a little hair above the ears
            ellipse(cx + side * a * 0.93, cy - b * 0.15, a * 0.12, b * 0.25, fill=hair)
        return
    if style == "curly":
        rng = np.random.default_rng(int(ident.hairline * 1e6))  # curl layout is part of the identity
        for t in np.linspace(math.pi * 1.02, math.pi * 1.98, 16):
            r = a * rng.uniform(0.22, 0.3)
            ellipse(cx + a * 1.02 * math.cos(t), cy + b * 0.95 * math.sin(t), r, r, fill=hair)
        ellipse(cx, cy - b * 0.78, a * 0.9, b * 0.3, fill=hair)
        return
    # cap: outer arc over the top of the head, closed by a hairline curve across the forehead
    top = [(cx + a * 1.08 * math.cos(t), cy + b * 1.1 * math.sin(t))
           for t in np.linspace(math.pi * 1.0, math.pi * 2.0, 24)]
    hl = cy - b * ident.hairline
    xs = np.linspace(1.0, -1.0, 24)
    if style == "bangs":
        line = [(cx + a * x, cy - b * 0.42 + (0.012 if i % 2 else 0.0)) for i, x in enumerate(xs)]
    elif style == "side_part":
        line = [(cx + a * x, hl + b * 0.25 * (x + 1) / 2 - b * 0.08 * (1 - x * x)) for x in xs]
    else:  # short / long
        line = [(cx + a * x, hl + b * 0.35 * x * x) for x in xs]
    draw.polygon([P(*p) for p in top + line], fill=hair)


def _draw_marks(draw, P, ellipse, ident: IdentityParams, cx: float, cy: float, a: float, b: float) -> None:
    if ident.patch:
        u, v, r, colour = ident.patch
        ellipse(cx + a * u, cy + b * v, r, r * 0.8, fill=colour)
    for u, v, r in ident.moles:
        ellipse(cx + a * u, cy + b * v, r, r, fill=(55, 35, 25))
    for u, v in ident.freckles:
        ellipse(cx + a * u, cy + b * v, 0.006, 0.006, fill=_scale_colour(ident.skin, 0.7))
    if ident.scar:
        u, v, length, angle = ident.scar
        x0, y0 = cx + a * u, cy + b * v
        dx, dy = length * math.cos(angle) / 2, length * math.sin(angle) / 2
        draw.line([P(x0 - dx, y0 - dy), P(x0 + dx, y0 + dy)], fill=(150, 60, 60),
                  width=max(1, int(0.008 * draw.im.size[0])))


def _draw_eyes_and_brows(draw, P, ellipse, ident: IdentityParams, var: SampleParams, fx: float) -> None:
    brow_colour = _scale_colour(ident.hair, 0.8) if ident.hair_style != "bald" else (70, 50, 35)
    for side in (-1, 1):
        # the eye on the side the head turns away from looks narrower
        ew = ident.eye_w * (1 - 0.18 * side * var.yaw)
        ex, ey = fx + side * ident.eye_dx, ident.eye_y
        eh = ident.eye_h * var.eye_open
        ellipse(ex, ey, ew, eh, fill=(240, 238, 232))
        ir = min(ident.eye_h * 0.9, ew * 0.55)
        irh = min(ir, eh)
        ellipse(ex + 0.01 * var.yaw, ey, ir, irh, fill=ident.iris)
        ellipse(ex + 0.01 * var.yaw, ey, ir * 0.45, min(ir * 0.45, eh), fill=(10, 10, 10))
        draw.arc([P(ex - ew, ey - eh), P(ex + ew, ey + eh)], 180, 360, fill=(40, 30, 25), width=2)
        # brow: an arched thick polyline; tilt is mirrored so it is symmetric about the face
        by = ey - ident.brow_gap - var.brow_raise
        pts = []
        for t in np.linspace(0, 1, 8):
            x = ex + side * (t - 0.4) * ew * 2.4
            y = by - ident.brow_arch * math.sin(math.pi * t) - ident.brow_tilt * (t - 0.5) * 0.04
            pts.append(P(x, y))
        draw.line(pts, fill=brow_colour, width=max(1, int(ident.brow_thick * draw.im.size[0])), joint="curve")


def _draw_nose(draw, P, ident: IdentityParams, fx: float, shade: tuple[int, int, int]) -> None:
    top = ident.eye_y + 0.02
    bottom = ident.eye_y + ident.nose_len
    w = ident.nose_w
    dark = _scale_colour(shade, 0.75)
    S = draw.im.size[0]
    if ident.nose_style == 0:
        draw.line([P(fx + w * 0.3, top), P(fx + w * 0.5, bottom), P(fx - w * 0.5, bottom)], fill=dark,
                  width=max(1, S // 80))
    elif ident.nose_style == 1:
        draw.polygon([P(fx, top), P(fx + w, bottom), P(fx - w, bottom)], fill=shade)
        draw.line([P(fx - w, bottom), P(fx + w, bottom)], fill=dark, width=max(1, S // 80))
    else:
        for side in (-1, 1):
            nx = fx + side * w * 0.55
            draw.ellipse([P(nx - 0.01, bottom - 0.008), P(nx + 0.01, bottom + 0.008)], fill=dark)
        draw.arc([P(fx - w, bottom - 0.03), P(fx + w, bottom + 0.012)], 20, 160, fill=dark,
                 width=max(1, S // 90))


def _draw_mouth(draw, P, ellipse, ident: IdentityParams, var: SampleParams, fx: float) -> None:
    my, w, th = ident.mouth_y, ident.mouth_w, ident.lip_thick
    curve = 0.025 * var.smile
    xs = np.linspace(-1, 1, 16)
    upper = [(fx + w * x, my - curve * (1 - x * x) - th * 0.5 * (1 - x * x) + curve) for x in xs]
    mid = [(fx + w * x, my - curve * (1 - x * x) + curve) for x in xs[::-1]]
    lower = [(fx + w * x, my - curve * (1 - x * x) + th * (1 - x * x) + curve) for x in xs[::-1]]
    if var.smile > 0.7:  # open smile shows teeth
        draw.polygon([P(*p) for p in upper + lower], fill=(245, 240, 235))
    draw.polygon([P(*p) for p in upper + mid], fill=ident.lip)
    draw.polygon([P(*p) for p in [(x, y + th * 0.3) for x, y in mid[::-1]] + lower], fill=ident.lip)
    draw.line([P(*p) for p in mid], fill=_scale_colour(ident.lip, 0.5), width=max(1, draw.im.size[0] // 120))


def _draw_beard(draw, P, ident: IdentityParams, fx: float, cy: float, a: float, b: float) -> None:
    colour = _scale_colour(ident.hair, 0.9)
    my, w = ident.mouth_y, ident.mouth_w
    if ident.beard in ("moustache", "full"):
        draw.polygon([P(fx - w * 1.1, my - 0.005), P(fx, my - 0.03), P(fx + w * 1.1, my - 0.005),
                      P(fx, my - 0.012)], fill=colour)
    if ident.beard == "goatee":
        draw.ellipse([P(fx - w * 0.5, my + 0.03), P(fx + w * 0.5, cy + b * 0.98)], fill=colour)
    if ident.beard == "full":
        outline = _face_outline(fx, cy, a, b, ident.jaw)
        lower = [p for p in outline if p[1] > my - 0.01]
        lower.sort(key=lambda p: p[0])
        draw.polygon([P(*p) for p in lower] + [P(fx + w * 0.9, my + 0.025), P(fx - w * 0.9, my + 0.025)],
                     fill=colour)


def _draw_glasses(draw, P, ellipse, ident: IdentityParams, var: SampleParams, fx: float) -> None:
    r = ident.eye_w * 1.45
    for side in (-1, 1):
        ex, ey = fx + side * ident.eye_dx, ident.eye_y
        if ident.glasses == "round":
            ellipse(ex, ey, r, r * 0.85, outline=ident.glasses_colour, width=0.012)
        else:
            draw.rectangle([P(ex - r, ey - r * 0.7), P(ex + r, ey + r * 0.7)], outline=ident.glasses_colour,
                           width=max(1, int(0.012 * draw.im.size[0])))
    draw.line([P(fx - ident.eye_dx + r, ident.eye_y), P(fx + ident.eye_dx - r, ident.eye_y)],
              fill=ident.glasses_colour, width=max(1, int(0.01 * draw.im.size[0])))


@functools.lru_cache(maxsize=8)
def _ramp(S: int) -> Image.Image:
    return Image.linear_gradient("L").resize((S, S))


def _background(var: SampleParams, S: int) -> Image.Image:
    """Vertical two-colour gradient."""
    ramp = _ramp(S)
    return Image.composite(Image.new("RGBA", (S, S), var.background[1] + (255,)),
                           Image.new("RGBA", (S, S), var.background[0] + (255,)), ramp)


def _apply_lighting(rgb: np.ndarray, var: SampleParams) -> np.ndarray:
    """Directional light (a linear ramp across the image), overall brightness and white balance."""
    S = rgb.shape[0]
    coords = np.linspace(-1, 1, S, dtype=np.float32)
    gx, gy = np.meshgrid(coords, coords)
    ramp = math.cos(var.light_angle) * gx + math.sin(var.light_angle) * gy
    gain = var.brightness * (1 + var.light_strength * ramp)[..., None] * np.array(var.colour_gain, np.float32)
    return rgb * gain


def render_face(ident: IdentityParams, var: SampleParams, image_size: int,
                supersample: int = 3) -> Image.Image:
    """Render a clean face (no degradation) as an RGB image of image_size x image_size."""
    S = image_size * supersample
    layer = _draw_face_layer(ident, var, S)
    # pose: rotate about the centre, scale, shift (PIL wants the output->input map)
    theta = math.radians(var.rotation_deg)
    cos_t, sin_t = math.cos(theta) / var.scale, math.sin(theta) / var.scale
    c = S / 2
    ax, ay = c + var.shift[0] * S, c + var.shift[1] * S
    matrix = (cos_t, sin_t, c - cos_t * ax - sin_t * ay, -sin_t, cos_t, c + sin_t * ax - cos_t * ay)
    layer = layer.transform((S, S), Image.AFFINE, matrix, resample=Image.BILINEAR)
    scene = _background(var, S)
    scene.alpha_composite(layer)
    small = scene.convert("RGB").reduce(supersample)  # box-filter downsampling = area anti-aliasing
    # lighting is smooth, so it can be applied after downsampling (9x fewer pixels)
    lit = _apply_lighting(np.asarray(small, dtype=np.float32), var)
    return Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------- degradation


def _bad_exposure(img: Image.Image, d: float, rng: np.random.Generator) -> Image.Image:
    """Poor captures also get contrast loss, colour casts and exposure errors; negligible at small d."""
    s = d * d
    x = np.asarray(img, dtype=np.float32)
    mean = x.mean(axis=(0, 1), keepdims=True)
    x = mean + (x - mean) * (1 - 0.5 * s)
    x = x * (1 + rng.normal(0, 0.25 * s, 3)).astype(np.float32) + rng.normal(0, 40 * s)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def degrade(img: Image.Image, d: float, kind: str,
            rng: np.random.Generator) -> tuple[Image.Image, int | None]:
    """Apply degradation `kind` at severity d. Returns (image, JPEG quality to encode with, None = PNG)."""
    if d <= 0 or kind == "none":
        return img, None
    img = _bad_exposure(img, d, rng)
    if kind == "mixed":
        kinds = list(rng.choice(["blur", "noise", "lowres", "occlusion"], size=2, replace=False))
        for k in kinds:
            img = DEGRADERS[k](img, d * rng.uniform(0.75, 1.0), rng)
        return img, jpeg_quality_for(d * 0.8)
    if kind == "jpeg":
        return img, jpeg_quality_for(d)  # encoded once, at the final quality
    return DEGRADERS[kind](img, d, rng), None


def encode(img: Image.Image, jpeg_quality: int | None) -> bytes:
    buf = io.BytesIO()
    if jpeg_quality is None:
        img.save(buf, format="PNG", compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- dataset


def identity_name(index: int) -> str:
    return f"synth-{index:05d}"


def identity_params(spec: SyntheticSpec, index: int) -> IdentityParams:
    return sample_identity(np.random.default_rng([spec.seed, 7777, index]))


def _degradation_plan(spec: SyntheticSpec, split: str, index: int, n: int) -> list[tuple[float, str]]:
    """Per identity and split: exactly round(clean_fraction * n) clean samples, the rest d ~ U(0, 1]."""
    rng = np.random.default_rng([spec.seed, 5555, SPLITS[split], index])
    n_clean = round(spec.clean_fraction * n)
    clean = set(rng.permutation(n)[:n_clean].tolist())
    plan = []
    for k in range(n):
        if k in clean:
            plan.append((0.0, "none"))
        else:
            d = float(1.0 - rng.random())  # (0, 1]
            plan.append((d, spec.degradation_types[int(rng.integers(len(spec.degradation_types)))]))
    return plan


def render_sample(spec: SyntheticSpec, split: str, index: int, k: int, ident: IdentityParams | None = None,
                  plan: list[tuple[float, str]] | None = None) -> dict:
    """One dataset row: sample k of identity `index` in `split` (ident/plan may be passed in as a cache)."""
    ident = ident or identity_params(spec, index)
    n = spec.train_per_identity if split == "train" else spec.val_per_identity
    d, kind = (plan or _degradation_plan(spec, split, index, n))[k]
    rng = np.random.default_rng([spec.seed, SPLITS[split], index, k])
    var = sample_variation(rng, spec)
    img = render_face(ident, var, spec.image_size, spec.supersample)
    img, quality = degrade(img, d, kind, rng)
    return {
        "image": encode(img, quality),
        "label": index,
        "identity": identity_name(index),
        "source": f"synthetic:seed={spec.seed}:{split}:{index}:{k}",
        "degradation": float(np.float32(d)),
        "degradation_type": kind,
    }


def _render_chunk(spec: SyntheticSpec, split: str, items: list[tuple[int, int]]) -> list[dict]:
    n = spec.train_per_identity if split == "train" else spec.val_per_identity
    idents: dict[int, IdentityParams] = {}
    plans: dict[int, list[tuple[float, str]]] = {}
    rows = []
    for index, k in items:
        if index not in idents:
            idents[index] = identity_params(spec, index)
            plans[index] = _degradation_plan(spec, split, index, n)
        rows.append(render_sample(spec, split, index, k, idents[index], plans[index]))
    return rows


def _split_order(spec: SyntheticSpec, split: str) -> list[tuple[int, int]]:
    """All (identity, sample) pairs in a seeded shuffled order, so shards are not sorted by label."""
    n = spec.train_per_identity if split == "train" else spec.val_per_identity
    items = [(i, k) for i in range(spec.num_identities) for k in range(n)]
    perm = np.random.default_rng([spec.seed, 9999, SPLITS[split]]).permutation(len(items))
    return [items[j] for j in perm]


def generate_rows(spec: SyntheticSpec, split: str, pool: cf.Executor | None = None,
                  chunk_size: int = 50) -> Iterator[dict]:
    """Rows of one split in a fixed order, rendered in `pool` when given (same bytes either way)."""
    items = _split_order(spec, split)
    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
    if pool is None:
        for chunk in chunks:
            yield from _render_chunk(spec, split, chunk)
        return
    for rows in pool.map(_render_chunk, [spec] * len(chunks), [split] * len(chunks), chunks):
        yield from rows


@contextlib.contextmanager
def _render_pool(workers: int | None) -> Iterator[cf.Executor | None]:
    workers = workers if workers is not None else len(os.sched_getaffinity(0))
    if workers <= 1:
        yield None
        return
    # fork: spawn would re-import the caller's __main__ in every worker, which re-runs scripts without a
    # main guard (and would then wait forever on our cache lock). The workers only draw with PIL/numpy,
    # so forking from a threaded parent (a Ray worker) is safe here.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield pool


def _is_complete(uris: dict[str, str]) -> bool:
    try:
        for uri in uris.values():
            read_manifest(uri)
        return True
    except DatasetError:
        return False


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_splits(root_uri: str, spec: SyntheticSpec, workers: int | None) -> None:
    with _render_pool(workers) as pool:
        for split in SPLITS:
            _write_split(root_uri, spec, split, pool)


def _write_split(root_uri: str, spec: SyntheticSpec, split: str, pool: cf.Executor | None) -> None:
    write_dataset(
        storage.join(root_uri, split),
        generate_rows(spec, split, pool),
        label_to_identity=[identity_name(i) for i in range(spec.num_identities)],
        image_size=[spec.image_size, spec.image_size],
        target_shard_bytes=spec.target_shard_bytes,
        overwrite=True,
        source_desc=f"data.synthetic {json.dumps(dataclasses.asdict(spec))}",
    )


def ensure_synthetic_dataset(root: str, spec: SyntheticSpec, workers: int | None = None) -> dict[str, str]:
    """Return {"train": uri, "val": uri}, generating the dataset under root/synthetic-<key>/ on first use.

    Only a complete dataset (both manifests written) counts as cached. Locally, concurrent callers serialise
    on a lock file and the data is generated in a temporary directory renamed into place, so a crash never
    leaves a half-written cache. On S3 the manifests (written last, one PUT each) mark completeness.
    """
    if not storage.is_s3(root):
        root = storage.resolve(root)[1]  # absolute, so the URIs work from any working directory
    name = f"synthetic-{spec.cache_key()}"
    final = storage.join(root, name)
    uris = {split: storage.join(final, split) for split in SPLITS}
    if _is_complete(uris):
        return uris
    if storage.is_s3(root):
        _write_splits(final, spec, workers)
        return uris
    _, root_path = storage.resolve(root)
    with _file_lock(os.path.join(root_path, f".{name}.lock")):
        if _is_complete(uris):  # another caller finished while we waited
            return uris
        tmp = os.path.join(root_path, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            _write_splits(tmp, spec, workers)
            if os.path.exists(os.path.join(root_path, name)):
                shutil.rmtree(os.path.join(root_path, name))  # an incomplete leftover
            os.replace(tmp, os.path.join(root_path, name))
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return uris


def contact_sheet(spec: SyntheticSpec, split: str = "train", identities: int = 8, per_identity: int = 8,
                  scale: int = 2) -> Image.Image:
    """A grid of rendered samples (rows: identities, columns: samples) for eyeballing the generator."""
    s = spec.image_size * scale
    sheet = Image.new("RGB", (per_identity * s, identities * s), (255, 255, 255))
    for i in range(identities):
        ident = identity_params(spec, i)
        for k in range(per_identity):
            row = render_sample(spec, split, i, k, ident)
            img = Image.open(io.BytesIO(row["image"])).convert("RGB").resize((s, s), Image.NEAREST)
            sheet.paste(img, (k * s, i * s))
    return sheet
