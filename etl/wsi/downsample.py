"""Downsampling of uint8 images: block means by an integer factor, area averages by any factor.

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

``area_resize`` is the same filter for any factor >= 1 (physical-scale reads, ``etl.wsi.scale``):
output pixel i along an axis is the mean of the input over ``[left + i*step, left + (i+1)*step)``
(``step`` = box length / output length), each input pixel weighted by the part of it inside that
interval (exact area averaging, as OpenCV's INTER_AREA; PIL's BOX filter instead counts a pixel
wholly or not at all by its centre). Rows first, then columns, as sparse products in float32,
rounded half up. On a whole-pixel box with an integer step it equals ``block_mean`` ("drop")
(bit-exact for power-of-two steps; other steps may differ by one at exact halves).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

__all__ = ["EDGES", "Edge", "area_resize", "block_mean", "downsampled_size"]

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


def _area_matrix(start: float, stop: float, n: int, size: int, channels: int) -> sp.csr_matrix:
    """(n * channels, size * channels) sparse weights: output pixel i over [start, stop) / n.

    Row ``i * channels + c`` holds, for input pixel j, the part of [j, j + 1) inside output
    pixel i's interval divided by its length, at column ``j * channels + c``.
    """
    step = (stop - start) / n
    lo = start + np.arange(n) * step
    idx = np.floor(lo).astype(np.int64)[:, None] + np.arange(int(np.ceil(step)) + 1)
    overlap = np.minimum(lo[:, None] + step, idx + 1) - np.maximum(lo[:, None], idx)
    weights = (np.clip(overlap, 0.0, None) / step).astype(np.float32)
    idx = np.minimum(idx, size - 1)  # only zero weights reach past the end
    k = idx.shape[1]
    chan = np.arange(channels)[None, :, None]
    cols = (idx[:, None, :] * channels + chan).reshape(-1)
    data = np.broadcast_to(weights[:, None, :], (n, channels, k)).reshape(-1)
    indptr = np.arange(0, n * channels * k + 1, k)
    return sp.csr_matrix((data, cols, indptr), shape=(n * channels, size * channels))


def area_resize(
    image: np.ndarray,
    size: tuple[int, int],
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Area average of a uint8 ``(h, w, ...)`` image's ``box`` to ``size`` = (width, height).

    ``box`` = (left, top, right, bottom) in input pixel units, fractions allowed (default: the
    whole image); it must lie inside the image and be at least ``size`` on each axis (this
    filter only shrinks). Trailing axes (RGB) are kept.
    """
    if image.dtype != np.uint8:
        raise TypeError(f"area_resize takes a uint8 image, got {image.dtype}")
    h, w = image.shape[:2]
    left, top, right, bottom = box if box is not None else (0.0, 0.0, float(w), float(h))
    out_w, out_h = size
    if not (0 <= left < right <= w and 0 <= top < bottom <= h):
        raise ValueError(f"box {box} is not inside the {w} x {h} image")
    if out_w < 1 or out_h < 1 or right - left < out_w or bottom - top < out_h:
        raise ValueError(
            f"area_resize only shrinks: box {right - left:g} x {bottom - top:g} "
            f"to {out_w} x {out_h}"
        )
    channels = int(np.prod(image.shape[2:], dtype=np.int64))
    rows = _area_matrix(top, bottom, out_h, h, 1)
    cols = _area_matrix(left, right, out_w, w, channels)
    # sparse @ dense both times (scipy's fast path): rows, then columns on the transpose
    by_rows = rows @ image.reshape(h, w * channels).astype(np.float32)
    out = cols @ np.ascontiguousarray(by_rows.T)
    out += 0.5  # weights sum to 1: values stay within [0, 255.5)
    pixels = np.floor(out, out=out).astype(np.uint8).T
    return np.ascontiguousarray(pixels).reshape(out_h, out_w, *image.shape[2:])
