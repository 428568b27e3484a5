"""Lesion candidates from a probability map: non-maximum suppression as in NCRF, and writers.

NCRF's ``nms.py`` repeats: take the map's maximum, record it, zero its neighbourhood, until
the maximum falls below the threshold. Here the neighbourhood is the disc of ``radius`` map
pixels (distance <= radius), and the loop is run as the equivalent greedy pass: the pixels
at or above ``threshold`` in decreasing order (ties: row-major order, as ``argmax``), each
kept unless it lies in the disc of one kept before. A kd-tree finds the discs, so a big map
costs what its hot pixels cost. No torch here.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["Candidate", "candidates_csv", "candidates_geojson", "nms"]


@dataclass(frozen=True)
class Candidate:
    """A lesion candidate: probability and level-0 position (x = column, y = row)."""

    prob: float
    x: int
    y: int


def nms(prob: np.ndarray, *, radius: float, threshold: float = 0.5) -> list[tuple[float, int, int]]:
    """Greedy NMS of a 2-D map: ``[(prob, row, col), ...]`` in decreasing probability.

    ``radius`` in map pixels (a kept maximum suppresses every pixel within that distance,
    itself included); pixels below ``threshold`` (> 0) are never kept.
    """
    if prob.ndim != 2:
        raise ValueError(f"nms expects a 2-D map, got shape {prob.shape}")
    if not threshold > 0:
        raise ValueError(f"NMS threshold must be > 0, got {threshold}")
    if radius < 0:
        raise ValueError(f"NMS radius must be >= 0, got {radius}")
    flat = np.flatnonzero(prob >= threshold)  # row-major, so a stable sort keeps argmax's ties
    if flat.size == 0:
        return []
    values = prob.ravel()[flat]
    order = np.argsort(-values, kind="stable")
    flat, values = flat[order], values[order]
    rows, cols = np.divmod(flat, prob.shape[1])
    points = np.column_stack([rows, cols]).astype(np.float64)
    tree = cKDTree(points)
    suppressed = np.zeros(len(flat), dtype=bool)
    kept = []
    for k in range(len(flat)):
        if suppressed[k]:
            continue
        kept.append((float(values[k]), int(rows[k]), int(cols[k])))
        suppressed[tree.query_ball_point(points[k], r=radius)] = True
    return kept


def candidates_csv(cands: Sequence[Candidate]) -> str:
    """CSV text with the header ``prob,x,y`` (level-0 pixels), one candidate per line."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["prob", "x", "y"])
    for c in cands:
        writer.writerow([f"{c.prob:.5f}", c.x, c.y])
    return buf.getvalue()


def candidates_geojson(cands: Sequence[Candidate], name: str = "Tumor") -> str:
    """GeoJSON FeatureCollection of Point features at level-0 [x, y], as QuPath imports them."""
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [c.x, c.y]},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": name},
                "prob": round(c.prob, 5),
            },
        }
        for c in cands
    ]
    return json.dumps({"type": "FeatureCollection", "features": features}, indent=1) + "\n"
