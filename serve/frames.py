"""An encoded face crop (the body of a frame push, or one image of an enrolment) -> the model's pixels.

Whole crops are resized to the model's input, as flows.score and training do: no detection or alignment.
A frame that cannot be used raises BadFrame with one line saying why (the API answers it as a 4xx).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from data.pipeline import pixel_limit, to_rgb
from serve.errors import ServiceError


class BadFrame(ServiceError):
    """An image the service refuses (400: undecodable, 413: too large)."""


def decode_frame(data: bytes, image_size: int, max_bytes: int, max_pixels: int) -> np.ndarray:
    """uint8 (S, S, 3) RGB pixels of an encoded image, resized to image_size x image_size."""
    if not data:
        raise BadFrame("empty image (0 bytes)")
    if len(data) > max_bytes:
        raise BadFrame(f"image too large ({len(data)} bytes > max_frame_bytes {max_bytes})", status=413)
    try:
        with pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise BadFrame(f"image too large ({img.width}x{img.height} px > max_pixels {max_pixels})",
                               status=413)
            img.load()
            rgb = to_rgb(img)
    except BadFrame:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadFrame(f"image too large, refused as a possible decompression bomb ({exc})", status=413) from None
    except Image.UnidentifiedImageError:
        raise BadFrame("not an image PIL can decode (JPEG, PNG, BMP, ...)") from None
    except Exception as exc:  # truncated data, bad header, unsupported mode, ...
        raise BadFrame(f"undecodable image: {type(exc).__name__}: {exc}") from None
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)
