"""Face alignment from five landmarks: a least-squares similarity onto insightface's 112x112 template.

The template is `arcface_dst` of insightface's `utils/face_align.py` (left eye, right eye, nose tip, left and
right mouth corner, in the image's own left/right). The similarity is Umeyama's closed form (what
scikit-image's `SimilarityTransform.estimate` computes), the warp bilinear. Landmarks are in pixel
coordinates with pixel centres at integers (OpenCV's convention, that of the IJB landmark files); PIL
samples with centres at +0.5, which `warp_affine` corrects for, so a crop matches `cv2.warpAffine`'s.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

TEMPLATE_SIZE = 112
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix M of the similarity (rotation, uniform scale, translation) that maps the points `src`
    onto `dst` with the least squared error: dst ~ M @ [x, y, 1]. Umeyama (1991), reflection excluded."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"similarity_transform: need two (N >= 2, 2) point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 0:
        raise ValueError("similarity_transform: the source points all coincide")
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_var
    m = np.empty((2, 3))
    m[:, :2] = scale * rotation
    m[:, 2] = dst_mean - m[:, :2] @ src_mean
    return m


def invert_affine(m: np.ndarray) -> np.ndarray:
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def warp_affine(img: Image.Image, m: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Output pixel p takes the input at M^-1 p (bilinear, zeros outside), as `cv2.warpAffine(img, M, size)`."""
    inv = invert_affine(np.asarray(m, np.float64))
    # PIL maps output (x + .5, y + .5) to input coordinates whose pixel centres are at +.5; shift both ways.
    a = inv[:, :2]
    t = inv[:, 2] + 0.5 - a @ np.array([0.5, 0.5])
    data = (a[0, 0], a[0, 1], t[0], a[1, 0], a[1, 1], t[1])
    return img.transform(size, Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)


def landmarks_array(values, where: str = "landmarks") -> np.ndarray:
    """Ten numbers (x1 y1 ... x5 y5) or a (5, 2) array -> (5, 2) float64; a clear error otherwise."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size != 10:
        raise ValueError(f"{where}: expected 5 landmarks (10 numbers), got {arr.size}")
    arr = arr.reshape(5, 2)
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: landmarks are not finite ({arr.reshape(-1).tolist()})")
    return arr


def align_face(img: Image.Image, landmarks, output_size: int = TEMPLATE_SIZE) -> Image.Image:
    """The face warped onto the 112x112 template, then resized to `output_size` (the model's input)."""
    m = similarity_transform(landmarks_array(landmarks), ARCFACE_TEMPLATE)
    face = warp_affine(img, m, (TEMPLATE_SIZE, TEMPLATE_SIZE))
    if output_size != TEMPLATE_SIZE:
        face = face.resize((output_size, output_size), Image.Resampling.BILINEAR)
    return face
