"""A slide's inference outputs, each written atomically (`etl.atomic`), the sidecar last.

In `out`, named after the slide: `<name>.prob.npy` (float32 map), `.prob.json` (sidecar: the
map geometry, tissue, NMS and run settings; its presence means the others are complete),
`.heatmap.png` (the map over the thumbnail), `.heatmap.tif`, `.candidates.csv` and
`.candidates.geojson`.

The heatmap TIFF has the map's own size (one pixel per `stride` level-0 px) and resolution
tags of `mpp * stride` um per pixel, so it covers the slide's physical extent from the same
top-left corner (rounded up to whole cells); viewers that honour the pixel size (QuPath,
ASAP) overlay it on the slide. Level 0 holds `round(255 * prob)` as 8-bit grey; each further
level halves it (mean) down to 256 px, each level its own tiled page (`etl.wsi.pyramid`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from etl.atomic import atomic_file, atomic_path
from etl.evaluate.nms import candidates_csv, candidates_geojson
from etl.wsi.formats import HEATMAP_SUFFIX
from etl.wsi.pyramid import pyramid_levels, write_pyramid
from etl.wsi.tissue import LowRes
from training.config import InferConfig
from training.infer.geometry import MapGeometry

if TYPE_CHECKING:
    from training.infer.run import SlideResult

TIFF_TILE = 256  # heatmap TIFF tile side; the pyramid halves down to one tile
_TURBO = np.array(
    [  # a short version of the "turbo" colour map: (position, r, g, b)
        (0.00, 48, 18, 59),
        (0.15, 70, 107, 227),
        (0.35, 27, 208, 213),
        (0.50, 97, 252, 108),
        (0.65, 210, 233, 53),
        (0.80, 254, 155, 45),
        (0.92, 218, 56, 7),
        (1.00, 122, 4, 3),
    ],
    dtype=np.float32,
)


def colorize(prob: np.ndarray) -> np.ndarray:
    """(h, w) probabilities -> (h, w, 3) uint8 colours (a turbo-like map)."""
    p = np.clip(prob, 0.0, 1.0)
    return (
        np.stack([np.interp(p, _TURBO[:, 0], _TURBO[:, c]) for c in (1, 2, 3)], axis=-1)
        .round()
        .astype(np.uint8)
    )


def heatmap_overlay(
    thumb: LowRes, prob: np.ndarray, geometry: MapGeometry, alpha: float = 0.7
) -> np.ndarray:
    """The thumbnail with the map blended over it (opacity ``alpha * prob``), RGB uint8."""
    h, w = thumb.rgb.shape[:2]
    sx, sy = geometry.stride / thumb.downsample[0], geometry.stride / thumb.downsample[1]
    size = (max(1, round(geometry.cols * sx)), max(1, round(geometry.rows * sy)))
    up = np.asarray(
        Image.fromarray(prob.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    )
    scaled = np.zeros((h, w), dtype=np.float32)
    hh, ww = min(h, up.shape[0]), min(w, up.shape[1])
    scaled[:hh, :ww] = np.clip(up[:hh, :ww], 0.0, 1.0)
    a = (alpha * scaled)[..., None]
    return (thumb.rgb * (1 - a) + colorize(scaled) * a).round().astype(np.uint8)


def write_heatmap_tiff(
    path: Path,
    prob: np.ndarray,
    geometry: MapGeometry,
    mpp: tuple[float, float] | None,
    description: str = "",
) -> list[tuple]:
    """Pyramidal tiled TIFF of ``round(255 * prob)``; returns the (width, height) of each level.

    One map pixel per ``stride`` level-0 px; the resolution tags give ``mpp * stride`` um per
    pixel (scaled per level) when the slide's mpp is known. Each level is the 2 x 2 mean of the
    one above (edge replicated) down to one tile.
    """
    image = np.rint(np.clip(prob, 0, 1) * 255).astype(np.uint8)
    levels = pyramid_levels(image, 2, max_side=TIFF_TILE, edge="replicate")
    pixel_um = None if mpp is None else (mpp[0] * geometry.stride, mpp[1] * geometry.stride)
    with atomic_path(path) as tmp:
        dims = write_pyramid(
            tmp,
            levels,
            description=description or None,
            photometric="minisblack",
            compression="zlib",
            tile=TIFF_TILE,
            mpp=pixel_um,
        )
    return dims


def sidecar(
    result: SlideResult, cfg: InferConfig, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `.prob.json` content: the map's geometry and how it was made."""
    g = result.geometry
    return {
        "slide": str(result.path.resolve()),
        "name": result.name,
        "width": result.dimensions[0],
        "height": result.dimensions[1],
        "mpp": list(result.mpp) if result.mpp else None,
        **g.as_dict(),
        "physical_scale": result.scale.as_dict(g.stride),
        "mode": cfg.mode,
        "margin": cfg.margin if cfg.mode == "dense" else 0,
        "tile_size": cfg.tile_size,
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "tissue_fraction": result.tissue.fraction,
        "tissue_map_pixels": int(result.cells.sum()),
        "tissue_pixels_level0": result.tissue_pixels,
        "tissue": {
            "downsample": list(result.tissue.downsample),
            "level": result.tissue.level,
            "threshold": result.tissue.threshold,
            "min_area": cfg.tissue_min_area,
        },
        "nms": {
            "radius_level0": cfg.nms_radius,
            "radius_map": cfg.nms_radius / g.stride,
            "threshold": cfg.nms_threshold,
        },
        "candidates": len(result.candidates),
        "seconds": result.seconds,
        "warnings": result.warnings,
        **(extra or {}),
    }


def write_outputs(
    result: SlideResult, out: str | Path, cfg: InferConfig, extra: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write the six outputs of a slide under `out`; returns {kind: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = result.geometry
    meta = sidecar(result, cfg, extra)
    paths = {
        k: out / f"{result.name}.{k}"
        for k in (
            "prob.npy",
            "prob.json",
            "heatmap.png",
            HEATMAP_SUFFIX[1:],  # "heatmap.tif": a folder listing of slides skips these
            "candidates.csv",
            "candidates.geojson",
        )
    }
    with atomic_file(paths["prob.npy"]) as fh:
        np.save(fh, result.prob.astype(np.float32, copy=False))
    with atomic_path(paths["heatmap.png"]) as tmp:
        Image.fromarray(heatmap_overlay(result.thumb, result.prob, g)).save(tmp, format="PNG")
    desc = json.dumps(
        {
            "source": meta["slide"],
            "value": "round(255 * tumor probability)",
            **{k: v for k, v in g.as_dict().items() if k != "definition"},
        }
    )
    write_heatmap_tiff(paths["heatmap.tif"], result.prob, g, result.mpp, desc)
    texts = {
        "candidates.csv": candidates_csv(result.candidates),
        "candidates.geojson": candidates_geojson(result.candidates),
        # the sidecar last: its presence means the slide's outputs are all there
        "prob.json": json.dumps(meta, indent=1) + "\n",
    }
    for kind, text in texts.items():
        with atomic_file(paths[kind], "w", encoding="utf-8") as fh:
            fh.write(text)
    return paths
