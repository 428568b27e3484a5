"""Block-mean downsampling of uint8 images by an integer factor.

Output pixel (i, j) is the mean of the ``factor x factor`` input block at
``[i*factor, (i+1)*factor) x [j*factor, (j+1)*factor)``, rounded half up
(``(sum + n // 2) // n`` with ``n = factor**2``: exact, integer only). Trailing axes (RGB)
are kept. The right and bottom blocks may be partial; ``edge`` says what happens to them:

- ``"drop"``: partial blocks are left out (``floor(h / factor)`` rows). A pyramid level of a
  slide made from the level above it, as OpenSlide-style pyramids are (sizes ``w // factor``).
- ``"white"``: partial blocks are completed with white (255), as OpenSlide reads beyond the
  slide edge (``ceil(h / factor)`` rows): a low-resolution view covers the whole slide.
- ``"replicate"``: partial blocks are completed by repeating the last row / column
  (``ceil``): the edge keeps its own value (maps, masks).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["EDGES", "Edge", "block_mean", "downsampled_size"]

Edge = Literal["drop", "white", "replicate"]
EDGES: tuple[Edge, ...] = ("drop", "white", "replicate")


def downsampled_size(size: int, factor: int, edge: Edge) -> int:
    """Length of an axis of ``size`` pixels after ``block_mean`` by ``factor``."""
    return size // factor if edge == "drop" else -(-size // factor)


def block_mean(image: np.ndarray, factor: int, edge: Edge) -> np.ndarray:
    """Mean over ``factor x factor`` blocks of a uint8 ``(h, w, ...)`` image, rounded half up."""
    if image.dtype != np.uint8:
        raise TypeError(f"block_mean takes a uint8 image, got {image.dtype}")
    if factor < 1:
        raise ValueError(f"downsampling factor {factor}: use an integer >= 1")
    if edge not in EDGES:
        raise ValueError(f"edge {edge!r}: use one of {', '.join(EDGES)}")
    h, w = image.shape[:2]
    oh, ow = downsampled_size(h, factor, edge), downsampled_size(w, factor, edge)
    if edge != "drop" and (oh * factor, ow * factor) != (h, w):
        pad = [(0, oh * factor - h), (0, ow * factor - w)] + [(0, 0)] * (image.ndim - 2)
        image = (
            np.pad(image, pad, mode="edge")
            if edge == "replicate"
            else np.pad(image, pad, constant_values=255)
        )
    n = factor * factor
    acc_type = np.uint16 if 255 * n + n // 2 <= np.iinfo(np.uint16).max else np.uint32
    acc = np.full((oh, ow, *image.shape[2:]), n // 2, acc_type)  # the rounding offset
    for dy in range(factor):  # summing strided views is much faster than reshape + sum
        for dx in range(factor):
            acc += image[dy : oh * factor : factor, dx : ow * factor : factor]
    return (acc // n).astype(np.uint8)
