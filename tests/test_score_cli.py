"""`python -m flows.score` on a tiny model and a folder of good and bad image files written here."""

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows import score
from tests.tiny_model import tiny_model

ROOT = Path(__file__).resolve().parents[1]
GOOD = ["a.png", "b.jpg", "sub/grey.png", "sub/rgba.png", "sub/deep/sixteen.png", "c.BMP"]
BAD = {
    "empty.jpg": "empty file",
    "text.png": "not an image",
    "bomb.png": "decompression bomb",
    "cut.jpg": "Truncated",
}


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says width x height: what a decompression bomb looks like to a reader."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR payload starts after signature + length + type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def write_folder(folder: Path) -> None:
    rng = np.random.default_rng(0)

    def noise(*shape, dtype=np.uint8, high=256):
        return rng.integers(0, high, shape, dtype=dtype)

    for name in GOOD:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise(40, 40, 3)).save(folder / "a.png")
    Image.fromarray(noise(48, 36, 3)).save(folder / "b.jpg")
    Image.fromarray(noise(50, 60)).save(folder / "sub/grey.png")  # 1 channel
    Image.fromarray(noise(30, 30, 4)).save(folder / "sub/rgba.png")  # 4 channels
    Image.fromarray(noise(20, 20, dtype=np.uint16, high=65535)).save(
        folder / "sub/deep/sixteen.png"
    )  # 16 bit
    Image.fromarray(noise(33, 33, 3)).save(folder / "c.BMP")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not a picture")
    (folder / "bomb.png").write_bytes(png_claiming_size(60_000, 60_000))
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64, 3)).save(buf, format="JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[:400])
    (folder / "notes.txt").write_text("ignored: not an image suffix")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    folder = root / "faces"
    write_folder(folder)
    return tiny_model(root / "net.pt"), folder, root


def test_scores_every_readable_image_and_lists_the_bad_ones(setup, capsys):
    model, folder, root = setup
    out = root / "run1" / "scores.parquet"
    assert score.main(["--model", str(model), str(folder), "--out", str(out), "--no-progress"]) == 3  # skipped some
    captured = capsys.readouterr()
    table = pq.read_table(out)
    assert sorted(table.column("path").to_pylist()) == sorted(GOOD)
    emb = np.asarray(table.column("embedding").to_pylist())
    assert emb.shape == (6, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    quality = np.asarray(table.column("quality").to_pylist())
    assert ((quality > 0) & (quality < 1)).all() and np.unique(quality).size == 6
    paths, widths, heights = (table.column(c).to_pylist() for c in ("path", "width", "height"))
    sizes = {p: (w, h) for p, w, h in zip(paths, widths, heights, strict=True)}
    assert sizes["b.jpg"] == (36, 48) and sizes["sub/grey.png"] == (60, 50)
    assert "unreadable images: 4 of 10 (skipped)" in captured.err
    for name, reason in BAD.items():
        line = next(line for line in captured.err.splitlines() if line.strip().startswith(name))
        assert reason in line, line
    assert "scored 6 images (4 unreadable, skipped)" in captured.out
    sheet = Image.open(root / "run1" / "scores_contact.png")
    assert sheet.width >= 6 * 96 and sheet.height > 96


def test_same_image_gets_same_scores_whatever_its_channel_layout(setup, tmp_path):
    model, _, _ = setup
    rgb = np.random.default_rng(3).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "grey.png")
    Image.fromarray(np.repeat(rgb[..., None], 3, axis=2)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, rgb, rgb, np.full_like(rgb, 255)])).save(tmp_path / "rgba.png")
    out = tmp_path / "s.parquet"
    assert score.main(["--model", str(model), str(tmp_path), "--out", str(out), "--no-progress"]) == 0
    t = pq.read_table(out)
    q = np.asarray(t.column("quality").to_pylist())
    np.testing.assert_allclose(q, q[0], atol=1e-6)
    emb = np.asarray(t.column("embedding").to_pylist())
    np.testing.assert_allclose(emb, np.broadcast_to(emb[0], emb.shape), atol=1e-5)


def test_csv_output_and_min_quality_rejects(setup, capsys):
    model, folder, root = setup
    first = root / "run2" / "first.parquet"
    assert score.main(["--model", str(model), str(folder), "--out", str(first), "--no-progress"]) == 3
    table = pq.read_table(first)
    quality = dict(zip(table.column("path").to_pylist(), table.column("quality").to_pylist(), strict=True))
    threshold = float(np.median(list(quality.values())))
    capsys.readouterr()
    out, sheet = root / "run2" / "scores.csv", root / "run2" / "sheet.png"
    args = [
        "--model",
        str(model),
        str(folder),
        "--out",
        str(out),
        "--min-quality",
        str(threshold),
        "--sheet",
        str(sheet),
        "--no-progress",
    ]
    assert score.main(args) == 3
    stdout = capsys.readouterr().out
    import csv

    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and [f"emb_{j}" for j in range(16)] == list(rows[0])[-16:]
    expected = sorted((q, p) for p, q in quality.items() if q < threshold)
    assert 0 < len(expected) < 6
    for row in rows:
        assert (row["rejected"] == "True") == (quality[row["path"]] < threshold)
        assert float(row["quality"]) == pytest.approx(quality[row["path"]], abs=1e-6)
    assert f"rejects (quality < {threshold:g}): {len(expected)} of 6" in stdout
    listed = [line.split()[-1] for line in stdout.splitlines() if line.startswith("  0.")]
    assert listed == [p for _, p in expected]  # lowest quality first
    assert sheet.is_file()


def test_contact_sheet_orders_images_from_low_to_high_quality():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    thumbs = [Image.new("RGB", (32, 32), c) for c in colours]
    quality = np.array([0.9, 0.1, 0.5, 0.3])
    chosen = score.sheet_selection(quality)
    assert chosen.tolist() == [1, 3, 2, 0]
    names = ["r", "g", "b", "y"]
    sheet = score.contact_sheet(
        [thumbs[i] for i in chosen], quality[chosen], [names[i] for i in chosen], min_quality=0.2, cell=40
    )
    header = 22
    centres = [sheet.getpixel((k * 40 + 20, header + 20)) for k in range(4)]
    assert centres == [colours[i] for i in (1, 3, 2, 0)]  # g (0.1), y (0.3), b (0.5), r (0.9)
    assert sheet.getpixel((0, header + 20)) == (220, 0, 0)  # the reject (0.1 < 0.2) is framed in red
    assert sheet.getpixel((40, header + 20)) != (220, 0, 0)


def test_sheet_shows_an_even_selection_along_the_quality_order_of_a_large_folder():
    quality = np.random.default_rng(0).random(1000)
    chosen = score.sheet_selection(quality, max_images=400)
    assert chosen.size == 400 and np.unique(chosen).size == 400
    assert chosen[0] == np.argmin(quality) and chosen[-1] == np.argmax(quality)
    assert (np.diff(quality[chosen]) > 0).all()


def test_fails_with_a_clear_message_when_nothing_can_be_scored(setup, tmp_path, capsys):
    model, _, _ = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_text("nope")
    assert (
        score.main(["--model", str(model), str(bad), "--out", str(tmp_path / "s.csv"), "--no-progress"]) == 1
    )
    err = capsys.readouterr().err
    assert "none of the 2 images could be read" in err and "a.jpg: empty file" in err
    assert not (tmp_path / "s.csv").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert score.main(["--model", str(model), str(empty), "--no-progress"]) == 1
    assert "no images" in capsys.readouterr().err


def test_bad_arguments_exit_2_naming_the_problem(setup, tmp_path, capsys):
    model, folder, _ = setup
    assert score.main(["--model", str(tmp_path / "missing.pt"), str(folder), "--no-progress"]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert score.main(["--model", str(model), str(folder), "--out", str(tmp_path / "x.json")]) == 2
    assert "must end in .parquet or .csv" in capsys.readouterr().err
    assert score.main(["--model", str(model), str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert score.main(["--model", str(model), str(folder), "--image-size", "64"]) == 2
    assert "takes 32 x 32 images" in capsys.readouterr().err


@pytest.mark.integration
def test_runs_as_a_module_with_progress_bars(setup, tmp_path):
    model, folder, _ = setup
    out = tmp_path / "s.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.score", "--model", str(model), str(folder), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr  # 4 unreadable files skipped
    assert "scoring images" in proc.stderr and "10/10" in proc.stderr  # the tqdm bar
    assert pq.read_table(out).num_rows == 6
