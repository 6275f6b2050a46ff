import io

import numpy as np
import pytest
from PIL import Image

from evaluation import plots
from evaluation.plots import plot_erc, plot_quality_by_degradation, plot_quality_grid, plot_quality_histogram, plot_roc
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


@pytest.fixture()
def drawn(monkeypatch):
    """Every figure a plot function renders, in order, so a test reads back what it shows."""
    figures = []
    render = plots._png

    def keep(fig, path, dpi=100):
        figures.append(fig)
        return render(fig, path, dpi)

    monkeypatch.setattr(plots, "_png", keep)
    return figures


@pytest.fixture(scope="module")
def scored_pairs():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0.3, 0.15, 300), rng.normal(0.0, 0.1, 1500)]
    same = np.r_[np.ones(300, bool), np.zeros(1500, bool)]
    return scores, same


def test_erc_plot_has_one_panel_per_fmr(scored_pairs, tmp_path, drawn):
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
    # Each panel draws every method's curve, point for point, under the method's name.
    panels = drawn[0].axes
    assert [ax.get_title() for ax in panels] == ["fixed threshold, FMR=0.001", "fixed threshold, FMR=0.01"]
    for ax, fmr in zip(panels, (1e-3, 1e-2), strict=True):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["eqface", "random"]
        for line, curve in zip(lines, curves.values(), strict=True):
            np.testing.assert_array_equal(line.get_xdata(), curve.discard_fractions)
            np.testing.assert_array_equal(line.get_ydata(), curve.fnmr["fixed"][fmr])
    assert drawn[0].get_suptitle() == "test"
    with pytest.raises(ValueError, match="variant 'edc'"):
        plot_erc(curves, variant="edc")


def test_histogram_bars_are_the_counts(drawn):
    q = np.random.default_rng(0).random(100)
    check_png(plot_quality_histogram(q, bins=7))
    counts, edges = np.histogram(q, bins=7)
    bars = drawn[0].axes[0].patches
    assert [bar.get_height() for bar in bars] == counts.tolist()
    np.testing.assert_allclose([bar.get_x() for bar in bars], edges[:-1])
    check_png(plot_quality_histogram({"a": np.zeros(10), "b": np.ones(10)}, bins=5))
    ax = drawn[1].axes[0]
    assert sum(bar.get_height() for bar in ax.patches) == 20  # both sets, 10 each
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["a", "b"]


def test_roc_plot_draws_the_roc_points(scored_pairs, drawn):
    scores, same = scored_pairs
    result = verify_scores(scores, same)
    check_png(plot_roc(result))
    fpr, tpr = result["roc"]["fpr"], result["roc"]["tpr"]
    line = drawn[0].axes[0].get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), fpr[fpr > 0])  # a log axis has no place for FPR 0
    np.testing.assert_array_equal(line.get_ydata(), tpr[fpr > 0])
    assert drawn[0].axes[0].get_xscale() == "log"
    check_png(plot_roc({"model": result, "tuple": (fpr, tpr)}, log_fpr=False))
    lines = drawn[1].axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["model", "tuple"]
    for line in lines:
        np.testing.assert_array_equal(line.get_xdata(), fpr)


def test_quality_by_degradation_draws_the_mean_at_each_level(drawn):
    level = np.array([0, 0, 1, 1, 2, 2, 1, 2])
    kind = np.array(["none", "none", "blur", "blur", "blur", "blur", "noise", "noise"])
    quality = np.array([0.9, 0.7, 0.6, 0.4, 0.3, 0.1, 0.75, 0.5])
    check_png(plot_quality_by_degradation(level, quality, kind), min_width=100, min_height=100)
    bars = drawn[0].axes[0].containers  # one errorbar per kind, the clean photos as its level 0
    assert [bar.get_label() for bar in bars] == ["blur", "noise"]
    np.testing.assert_allclose(bars[0].lines[0].get_xydata(), [[0, 0.8], [1, 0.5], [2, 0.2]])
    np.testing.assert_allclose(bars[1].lines[0].get_xydata(), [[0, 0.8], [1, 0.75], [2, 0.5]])


def test_quality_grid_from_both_image_formats(tmp_path, drawn):
    rng = np.random.default_rng(0)
    q = rng.random(12)
    uint8_hwc = rng.integers(0, 256, size=(12, 24, 20, 3), dtype=np.uint8)
    float_chw = uint8_hwc.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    a = plot_quality_grid(uint8_hwc, q, n=4, path=tmp_path / "grid.png")
    b = plot_quality_grid(float_chw, q, n=4)
    assert check_png(a) == check_png(b)
    # Top row the 4 lowest qualities, lowest first; bottom row the 4 highest, highest last; each face is its image.
    order = np.argsort(q)
    expect = [*order[:4], *order[-4:]]
    faces = drawn[0].axes
    assert [ax.get_xlabel() for ax in faces] == [f"{q[i]:.3f}" for i in expect]
    for ax, i in zip(faces, expect, strict=True):
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), uint8_hwc[i])
    check_png(plot_quality_grid(uint8_hwc[:3, :, :, 0], q[:3], n=8))  # greyscale, n capped at N
    with pytest.raises(ValueError, match="12 images but 11 qualities"):
        plot_quality_grid(uint8_hwc, q[:11])
