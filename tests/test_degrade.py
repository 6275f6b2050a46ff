"""Degradations of known severity (data/degrade.py), and as a training augmentation (data/augment.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data.augment import AugmentConfig, augment_image
from data.degrade import DEGRADATION_KINDS, degrade, is_grey
from evaluation.baselines import laplacian_variance


def _face(grey: bool) -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    base = 128 + 60 * np.sin(x / 3.0) * np.cos(y / 4.0)
    rgb = np.stack([base, base, base] if grey else [base, base * 0.8, 255 - base], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("kind", DEGRADATION_KINDS)
def test_more_severity_moves_the_image_further_from_the_original(kind):
    img = _face(grey=False)
    x = np.asarray(img, dtype=np.float64)
    errors = [np.abs(np.asarray(degrade(img, d, kind, np.random.default_rng(0)), dtype=np.float64) - x).mean()
              for d in (0.0, 0.25, 0.5, 1.0)]
    assert errors[0] == 0.0
    assert errors[1] < errors[3] and errors[2] < errors[3], errors


def _detail_kept(clean: Image.Image, degraded: Image.Image) -> float:
    """Correlation of the two images' fine detail (each minus its blur); 0 for a result with none left."""
    def fine(img: Image.Image) -> np.ndarray:
        grey = img.convert("L")
        return (np.asarray(grey, dtype=np.float64) - np.asarray(grey.filter(ImageFilter.GaussianBlur(2)))).ravel()
    a, b = fine(clean), fine(degraded)
    return 0.0 if b.std() == 0 else float(np.corrcoef(a, b)[0, 1])


def test_blur_and_low_resolution_remove_detail_step_by_step():
    """Less and less of the clean face's fine detail survives. Not measured by the Laplacian's variance: lowres
    upsampling with NEAREST (half the time) adds block edges of its own."""
    img = _face(grey=True)
    for kind in ("blur", "lowres"):
        for seed in range(4):
            kept = [_detail_kept(img, degrade(img, d, kind, np.random.default_rng(seed))) for d in (0.0, 0.5, 1.0)]
            assert kept[0] > kept[1] > kept[2], (kind, seed, kept)
    sharpness = [float(laplacian_variance(np.asarray(degrade(img, d, "blur", np.random.default_rng(1)))[None]
                                          .transpose(0, 3, 1, 2) / 127.5 - 1)[0]) for d in (0.0, 0.5, 1.0)]
    assert sharpness[0] > sharpness[1] > sharpness[2], sharpness


@pytest.mark.parametrize("kind", DEGRADATION_KINDS)
def test_a_grey_photo_stays_grey(kind):
    img = _face(grey=True)
    assert is_grey(img)
    for seed in range(3):
        assert is_grey(degrade(img, 0.8, kind, np.random.default_rng(seed))), kind


def test_unknown_kind_and_bad_augment_settings_name_the_problem():
    with pytest.raises(ValueError, match="unknown degradation 'smear'"):
        degrade(_face(True), 0.5, "smear", np.random.default_rng(0))
    with pytest.raises(ValueError, match="degrade_kinds must be some of"):
        AugmentConfig(degrade_kinds=("blur", "smear"))
    with pytest.raises(ValueError, match="degrade_max must be in"):
        AugmentConfig(degrade_max=0.0)


def test_the_augmentation_degrades_about_its_share_of_images():
    img = _face(grey=True)
    cfg = AugmentConfig(hflip=False, crop_scale_min=1.0, degrade_prob=0.3)
    changed = sum(not np.array_equal(np.asarray(augment_image(img, cfg, np.random.default_rng(s))), np.asarray(img))
                  for s in range(400))
    assert 0.22 * 400 < changed < 0.38 * 400
    assert cfg.degraded_fraction() == pytest.approx(0.3)
    off = AugmentConfig(hflip=False, crop_scale_min=1.0)
    assert np.array_equal(np.asarray(augment_image(img, off, np.random.default_rng(0))), np.asarray(img))
