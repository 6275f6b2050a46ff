"""Readers for the public face-verification protocols: IJB-B / IJB-C templates, YouTube Faces videos.

Each reader yields one `Face` per image, streaming the protocol's own files (IJB-C: 469k images, 15.6M
pairs), and its pairs in chunks. Bad input raises `ProtocolError` with one line naming the file and line.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from data import storage


class ProtocolError(ValueError):
    """A protocol file that cannot be used as it is; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Face:
    """One image of a protocol: where it is, which template / media (IJB) or video (YTF) it belongs to."""

    image: str  # path relative to the protocol root
    template: int | str  # IJB template id; YTF "person/video"
    media: int | str  # IJB media id; YTF "person/video" (a video is its own medium)
    landmarks: tuple[float, ...] | None  # 10 numbers x1 y1 ... x5 y5 in the image, or None (no alignment)
    detector_score: float  # IJB: the detector's score; YTF: NaN
    where: str  # "file:line" that named this image, for error messages


def open_text(uri: str):
    """A text stream of a local or s3:// file (data.storage), or ProtocolError when it is missing."""
    fs, path = storage.resolve(uri)
    try:
        stream = fs.open_input_stream(path)
    except (FileNotFoundError, OSError) as exc:
        raise ProtocolError(f"{uri}: missing protocol file ({exc.__class__.__name__})") from None
    return io.TextIOWrapper(stream, encoding="utf-8", errors="strict")


class Problems:
    """Bad input found while reading: raised at once (the default), or, with `skip`, counted and the item
    left out. The first `keep` messages are kept for the report."""

    def __init__(self, skip: bool = False, keep: int = 20) -> None:
        self.skip = skip
        self.keep = keep
        self.count = 0
        self.examples: list[str] = []

    def report(self, message: str) -> None:
        if not self.skip:
            raise ProtocolError(message)
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(message)

    def as_dict(self) -> dict:
        return {"count": self.count, "examples": list(self.examples)}
