"""The FROC curve as a PNG, drawn with PIL (no plotting library).

FPs per slide in [0, 8] against lesion sensitivity, with the sensitivities at the six FP rates
of the score marked in red; beyond the curve's last point the line is held (as ``np.interp``
holds it). Written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from etl.atomic import atomic_path
from etl.evaluate.froc import FP_RATES

__all__ = ["plot_froc"]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def plot_froc(
    fps: Sequence[float],
    sens: Sequence[float],
    path: str | PathLike[str],
    *,
    rates: Sequence[float] = FP_RATES,
    at: Sequence[float] | None = None,
    score: float | None = None,
    xmax: float = 8.0,
) -> Path:
    """Draw the FROC curve (FPs per slide in [0, xmax] vs sensitivity) as a PNG with PIL."""
    w, h, left, right, top, bottom = 720, 520, 80, 30, 50, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    small, big = _font(13), _font(16)
    pw, ph = w - left - right, h - top - bottom

    def px(x: float, y: float) -> tuple[float, float]:
        return left + pw * min(max(x, 0.0), xmax) / xmax, top + ph * (1.0 - y)

    for k in range(11):  # y grid and ticks every 0.1
        tick = k / 10
        d.line([px(0, tick), px(xmax, tick)], fill=(225, 225, 225))
        d.text((left - 8, px(0, tick)[1]), f"{tick:.1f}", fill="black", font=small, anchor="rm")
    for k in range(int(xmax) + 1):
        d.line([px(k, 0), px(k, 1)], fill=(225, 225, 225))
        d.text((px(k, 0)[0], top + ph + 8), f"{k}", fill="black", font=small, anchor="mt")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    x = np.asarray(fps, np.float64)[::-1]
    y = np.asarray(sens, np.float64)[::-1]
    keep = np.isfinite(y) & (x <= xmax)
    pts = [px(a, b) for a, b in zip(x[keep], y[keep], strict=True)]
    if len(x) and np.isfinite(y).all() and x[-1] > xmax:  # carry the line to the right edge
        pts.append(px(xmax, float(np.interp(xmax, x, y))))
    if len(pts) > 1:
        d.line(pts, fill=(20, 60, 160), width=3)
    if len(pts) and x[-1] < xmax:  # np.interp holds the last sensitivity beyond the curve
        d.line([pts[-1], px(xmax, y[-1])], fill=(150, 170, 215), width=2)
    if at is not None:
        for r, s in zip(rates, at, strict=True):
            if s is not None and math.isfinite(s):
                cx, cy = px(r, s)
                d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=(200, 40, 40))
    title = "FROC" + (
        f" = {score:.3f}"
        if score is not None and math.isfinite(score)
        else " (undefined: no lesion)"
    )
    d.text(
        (left + pw / 2, top / 2),
        title + "  (red: sensitivity at 1/4, 1/2, 1, 2, 4, 8 FP)",
        fill="black",
        font=big,
        anchor="mm",
    )
    d.text(
        (left + pw / 2, h - 22),
        "average number of false positives per slide",
        fill="black",
        font=big,
        anchor="mm",
    )
    label = Image.new("RGB", (ph, 24), "white")
    ImageDraw.Draw(label).text(
        (ph / 2, 12), "lesion detection sensitivity", fill="black", font=big, anchor="mm"
    )
    img.paste(label.rotate(90, expand=True), (8, top))
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
