import io

import numpy as np
import pytest
from PIL import Image

from evaluation.plots import plot_erc, plot_quality_grid, plot_quality_histogram, plot_roc
from evaluation.quality_assessment import error_versus_discard
from evaluation.verification import verify_scores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(data: bytes, min_width: int = 200, min_height: int = 150) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    img = Image.open(io.BytesIO(data))
    img.load()  # decodes the whole file: fails on a truncated PNG
    assert img.format == "PNG"
    assert img.width >= min_width and img.height >= min_height
    return img.size


@pytest.fixture(scope="module")
def scored_pairs():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0.3, 0.15, 300), rng.normal(0.0, 0.1, 1500)]
    same = np.r_[np.ones(300, bool), np.zeros(1500, bool)]
    return scores, same


def test_erc_plot_has_one_panel_per_fmr(scored_pairs, tmp_path):
    scores, same = scored_pairs
    rng = np.random.default_rng(1)
    curves = {
        "eqface": error_versus_discard(scores, same, np.where(same, scores, -scores)),
        "random": error_versus_discard(scores, same, rng.random(scores.size)),
    }
    path = tmp_path / "out" / "erc.png"
    data = plot_erc(curves, variant="fixed", path=path, title="test")
    assert path.read_bytes() == data
    two_panels = check_png(data)
    one_panel = check_png(plot_erc(curves, variant="recomputed", fmrs=[1e-2]))
    assert two_panels[0] > 1.5 * one_panel[0]
    with pytest.raises(ValueError, match="variant 'edc'"):
        plot_erc(curves, variant="edc")


def test_histogram_and_roc(scored_pairs):
    scores, same = scored_pairs
    check_png(plot_quality_histogram(np.random.default_rng(0).random(100)))
    check_png(plot_quality_histogram({"a": np.zeros(10), "b": np.ones(10)}, bins=5))
    result = verify_scores(scores, same)
    check_png(plot_roc(result))
    check_png(
        plot_roc({"model": result, "tuple": (result["roc"]["fpr"], result["roc"]["tpr"])}, log_fpr=False)
    )


def test_quality_grid_from_both_image_formats(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.random(12)
    uint8_hwc = rng.integers(0, 256, size=(12, 24, 20, 3), dtype=np.uint8)
    float_chw = uint8_hwc.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    a = plot_quality_grid(uint8_hwc, q, n=4, path=tmp_path / "grid.png")
    b = plot_quality_grid(float_chw, q, n=4)
    assert check_png(a) == check_png(b)
    check_png(plot_quality_grid(uint8_hwc[:3, :, :, 0], q[:3], n=8))  # greyscale, n capped at N
    with pytest.raises(ValueError, match="12 images but 11 qualities"):
        plot_quality_grid(uint8_hwc, q[:11])
