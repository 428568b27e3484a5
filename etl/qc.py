"""Quality control of a coordinate file: one thumbnail per slide with its regions drawn.

Each region is drawn as its ``region_size`` square centred on its level-0 centre, outlined
in the colour of its labels (green: every cell normal, red: every cell tumor, orange: mixed),
with its grid cells drawn inside and tumor cells shaded red; the tissue mask outline is drawn
in blue. A user sees at a glance whether coordinates land on tissue, on the lesions, and in
the right orientation (a [y, x] / [x, y] swap or a corner/centre mix-up shows at once).

Outputs ``<out>/<slide name>.qc.png`` (written to a temporary file, then renamed). No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from etl.atomic import atomic_path
from etl.extract.coords import Region, RegionTable
from etl.wsi.formats import key_stem
from etl.wsi.reader import Backend, SlideError, open_slide
from etl.wsi.tissue import thumbnail, tissue_mask

__all__ = ["COLOURS", "QcResult", "draw_qc", "qc_slide", "qc_table", "region_colour"]

COLOURS = {
    "normal": (0, 170, 0),
    "tumor": (220, 0, 0),
    "mixed": (255, 140, 0),
    "tissue": (0, 90, 255),
}
LEGEND_PX = 18


@dataclass
class QcResult:
    """One slide's thumbnail and what it shows."""

    slide: Path
    png: Path | None
    regions: int
    off_tissue: int = 0  # region centres outside the tissue mask
    outside: int = 0  # regions not entirely inside the slide
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # normal / mixed / tumor


def region_colour(region: Region) -> str:
    """'normal' (no tumor cell), 'tumor' (every cell tumor) or 'mixed'."""
    cells = [v for row in region.labels for v in row]
    if not any(cells):
        return "normal"
    return "tumor" if all(cells) else "mixed"


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` that touch a non-mask pixel (8-neighbourhood)."""
    inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
    edge: np.ndarray = mask & ~inner
    return edge


def _box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
    """PIL box of the half-open [x0, x1) x [y0, y1) (PIL includes x1; keep it >= x0)."""
    return x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)


def draw_qc(
    rgb: np.ndarray,
    downsample: tuple[float, float],
    regions: Sequence[Region],
    region_size: int,
    tissue: np.ndarray | None = None,
) -> Image.Image:
    """The thumbnail ``rgb`` (pixel = ``downsample`` level-0 px) with regions and tissue drawn."""
    h, w = rgb.shape[:2]
    base = Image.fromarray(rgb).convert("RGBA")
    if tissue is not None and tissue.any():
        # the mask at thumbnail resolution (nearest), then its outline
        up = (
            np.asarray(
                Image.fromarray(tissue.astype(np.uint8) * 255).resize(
                    (w, h), Image.Resampling.NEAREST
                )
            )
            > 0
        )
        edge = _outline(up)
        px = np.asarray(base).copy()
        px[edge] = (*COLOURS["tissue"], 255)
        base = Image.fromarray(px, "RGBA")
    overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    dsx, dsy = downsample
    for r in regions:
        x0, y0 = r.x - region_size // 2, r.y - region_size // 2  # as region_box at level 0
        g = r.grid
        cell = region_size / g
        colour = COLOURS[region_colour(r)]
        for row in range(g):
            for col in range(g):
                box = _box(
                    (x0 + col * cell) / dsx,
                    (y0 + row * cell) / dsy,
                    (x0 + (col + 1) * cell) / dsx,
                    (y0 + (row + 1) * cell) / dsy,
                )
                fill = (*COLOURS["tumor"], 70) if r.labels[row][col] else None
                if g > 1:
                    draw.rectangle(box, fill=fill, outline=(*colour, 110))
                elif fill:
                    draw.rectangle(box, fill=fill)
        draw.rectangle(
            _box(x0 / dsx, y0 / dsy, (x0 + region_size) / dsx, (y0 + region_size) / dsy),
            outline=(*colour, 255),
            width=max(1, round(min(w, h) / 400)),
        )
    image = Image.alpha_composite(base, overlay).convert("RGB")
    # a legend strip under the picture
    canvas = Image.new("RGB", (w, h + LEGEND_PX), (255, 255, 255))
    canvas.paste(image, (0, 0))
    legend = ImageDraw.Draw(canvas)
    x = 4
    for name in ("normal", "mixed", "tumor", "tissue"):
        legend.rectangle((x, h + 4, x + 10, h + 14), fill=COLOURS[name])
        label = name if name != "tissue" else "tissue outline"
        legend.text((x + 14, h + 3), label, fill=(0, 0, 0))
        x += 14 + 7 * len(label) + 12
    return canvas


def qc_slide(
    slide: Path,
    regions: Sequence[Region],
    out_png: Path,
    *,
    region_size: int = 768,
    max_side: int = 2048,
    tissue_downsample: float = 32.0,
    slide_backend: str = "auto",
) -> QcResult:
    """Draw one slide's regions; raises :class:`SlideError` if the slide cannot be read."""
    with open_slide(slide, backend=cast("Backend", slide_backend)) as reader:
        thumb = thumbnail(reader, max_side)
        tissue = tissue_mask(reader, downsample=tissue_downsample)
        width, height = reader.dimensions
    image = draw_qc(thumb.rgb, thumb.downsample, regions, region_size, tissue.mask)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        image.save(tmp, format="PNG")
    xs = np.array([r.x for r in regions], dtype=np.float64)
    ys = np.array([r.y for r in regions], dtype=np.float64)
    half = region_size // 2
    outside = int(
        np.sum(
            (xs - half < 0)
            | (ys - half < 0)
            | (xs - half + region_size > width)
            | (ys - half + region_size > height)
        )
    )
    counts = {k: sum(region_colour(r) == k for r in regions) for k in ("normal", "mixed", "tumor")}
    return QcResult(
        slide=slide,
        png=out_png,
        regions=len(regions),
        off_tissue=int(np.sum(~tissue.at(xs, ys))),
        outside=outside,
        counts=counts,
    )


def qc_table(
    table: RegionTable,
    out: str | Path,
    *,
    region_size: int = 768,
    max_side: int = 2048,
    tissue_downsample: float = 32.0,
    slide_backend: str = "auto",
) -> list[QcResult]:
    """One thumbnail per slide of ``table``; a slide that cannot be read gets ``error`` set."""
    by_slide: dict[Path, list[Region]] = {}
    for r in table.regions:
        by_slide.setdefault(r.slide, []).append(r)
    results = []
    for slide, regions in by_slide.items():
        png = Path(out) / f"{key_stem(slide.name)}.qc.png"
        try:
            results.append(
                qc_slide(
                    slide,
                    regions,
                    png,
                    region_size=region_size,
                    max_side=max_side,
                    tissue_downsample=tissue_downsample,
                    slide_backend=slide_backend,
                )
            )
        except SlideError as exc:
            results.append(QcResult(slide=slide, png=None, regions=len(regions), error=str(exc)))
    return results
