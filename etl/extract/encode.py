"""Encoding of region pixels into shard image members (and decoding them back for checks).

JPEG goes through imagecodecs (libjpeg-turbo, the same library Pillow uses, slightly less
overhead); PNG through Pillow. Decoding uses Pillow so that a check does not trust the encoder.
"""

from __future__ import annotations

import io

import imagecodecs
import numpy as np
from PIL import Image

FORMATS = ("jpg", "png")


def encode_region(rgb: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """Encode an (h, w, 3) uint8 RGB array as `fmt` ('jpg' or lossless 'png')."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    if fmt == "jpg":
        return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb), level=quality))
    if fmt == "png":
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise ValueError(f"unknown image format {fmt!r}; use one of {FORMATS}")


def decode_image(data: bytes) -> np.ndarray:
    """Decode an image member to an (h, w, 3) uint8 RGB array (raises on corrupt data)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img.convert("RGB"))
