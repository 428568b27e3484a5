"""Scan artefacts on synthetic slides: pen marks, black scan borders, dust on glass, air bubbles.

Real scans carry them and tissue detection must ignore them (``etl.wsi.tissue``). Each
``Artefact`` is painted as optical density added to the rendered tile (Beer-Lambert, like the
stains), so ink over tissue darkens it as on a real slide, and records its outline: a level-0
polygon (x, y) that ``synth.json`` lists, so tests can check what the tissue mask excludes.

- pen: blue, green or black ink strokes, a few percent of the slide's short side wide, each
  crossing a tissue edge;
- border: a near-black band along one or two slide edges (the scanner saw past the glass);
- dust: small grey or brownish specks on blank glass;
- bubble: a faint grey rim around a slightly grey disc, on glass.

Sizes scale with the slide's short side (synthetic slides are small). Every artefact keeps a
margin from every tumor polygon; dust and bubbles lie on glass. Drawn after the lesions from
the scene's own generator, so a scene without artefacts is unchanged.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from etl.wsi.annotations import points_in_polygons

if TYPE_CHECKING:
    from etl.synth.scene import SlideScene

__all__ = ["INKS", "Artefact", "Mark", "artefact_distance", "make_artefacts", "paint_artefacts"]

# Transmission (R, G, B) of a full stroke of ink: blue and green ink are strongly saturated.
INKS = {
    "blue": (0.30, 0.50, 0.85),
    "green": (0.35, 0.68, 0.42),
    "black": (0.09, 0.09, 0.11),
}


@dataclass(frozen=True)
class Mark:
    """Optical density ``od`` (R, G, B) over the pixels within ``half_width`` of ``line`` (a
    polyline; one point is a disc), or, when ``ring`` > 0, within ``half_width`` of the circle
    of radius ``ring`` around ``line[0]``."""

    line: np.ndarray  # (n, 2) float level-0 x, y
    half_width: float
    od: np.ndarray  # (3,) float32
    ring: float = 0.0

    def distance(self, x: np.ndarray, y: np.ndarray, limit: float = np.inf) -> np.ndarray:
        """Signed distance (px) of level-0 points to the mark's edge: < 0 inside (exact up to
        ``limit``; farther points may get any larger value)."""
        d = _line_distance(x, y, self.line, limit + self.half_width)
        if self.ring > 0:
            d = np.abs(d - self.ring)
        out: np.ndarray = d - self.half_width
        return out


@dataclass(frozen=True)
class Artefact:
    """One artefact: its kind, a detail (the ink, the slide edge), marks and outline."""

    kind: str  # pen | border | dust | bubble
    detail: str
    marks: tuple[Mark, ...]
    outline: np.ndarray  # (n, 2) level-0 polygon (x, y), rounded to 2 decimals

    def facts(self) -> dict[str, Any]:
        """What ``synth.json`` records."""
        return {"kind": self.kind, "detail": self.detail, "polygon": self.outline.tolist()}


def _line_distance(
    x: np.ndarray, y: np.ndarray, line: np.ndarray, limit: float = np.inf
) -> np.ndarray:
    """Distance of points (x, y) (broadcastable arrays) to the polyline ``line``; segments
    farther than ``limit`` from the points' bounding box are skipped (inf where none is near)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if len(line) == 1:
        out: np.ndarray = np.hypot(x - line[0, 0], y - line[0, 1])
        return out
    best = np.full(np.broadcast_shapes(x.shape, y.shape), np.inf)
    lo_x, hi_x, lo_y, hi_y = x.min() - limit, x.max() + limit, y.min() - limit, y.max() + limit
    for (ax, ay), (bx, by) in itertools.pairwise(line):
        if max(ax, bx) < lo_x or min(ax, bx) > hi_x or max(ay, by) < lo_y or min(ay, by) > hi_y:
            continue
        dx, dy = bx - ax, by - ay
        t = np.clip(((x - ax) * dx + (y - ay) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
        np.minimum(best, np.hypot(x - ax - t * dx, y - ay - t * dy), out=best)
    return best


def artefact_distance(artefacts: list[Artefact], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (px) of level-0 points to the nearest artefact (< 0 on one; inf: none)."""
    best = np.full(np.broadcast_shapes(np.shape(x), np.shape(y)), np.inf)
    for art in artefacts:
        for mark in art.marks:
            np.minimum(best, mark.distance(x, y), out=best)
    return best


def paint_artefacts(
    artefacts: list[Artefact],
    od: list[np.ndarray],
    x0: int,
    y0: int,
    grain: np.ndarray,
    soft: float,
) -> list[np.ndarray]:
    """Add the artefacts' optical density to ``od`` (planar R, G, B densities of the (h, w)
    tile at (x0, y0)), in place; returns it.

    Coverage ramps over ``soft`` px at each edge; ``grain`` (the tile's unit noise) makes ink
    streaky and dust uneven. Each mark is computed on the part of the tile it can reach only.
    """
    h, w = grain.shape
    for art in artefacts:
        for mark in art.marks:
            reach = mark.half_width + mark.ring + soft
            (xmin, ymin), (xmax, ymax) = mark.line.min(axis=0), mark.line.max(axis=0)
            j0, j1 = max(0, math.floor(xmin - reach) - x0), min(w, math.ceil(xmax + reach) - x0)
            i0, i1 = max(0, math.floor(ymin - reach) - y0), min(h, math.ceil(ymax + reach) - y0)
            if j0 >= j1 or i0 >= i1:
                continue
            px = np.arange(x0 + j0, x0 + j1, dtype=np.float64)[None, :] + 0.5
            py = np.arange(y0 + i0, y0 + i1, dtype=np.float64)[:, None] + 0.5
            d = mark.distance(px, py, limit=soft)
            cover = np.clip(0.5 - d / soft, 0.0, 1.0).astype(np.float32)
            if not cover.any():
                continue
            cover *= 1.0 + 0.12 * grain[i0:i1, j0:j1]
            for c in range(3):
                od[c][i0:i1, j0:j1] += cover * mark.od[c]
    return od


def _od(transmission: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    out: np.ndarray = (-np.log(np.asarray(transmission, np.float64))).astype(np.float32)
    return out


def _circle(centre: np.ndarray, r: float, n: int = 24) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([centre[0] + r * np.cos(a), centre[1] + r * np.sin(a)], axis=1)


def _capsule(line: np.ndarray, r: float) -> np.ndarray:
    """Outline of the pixels within ``r`` of a smooth polyline: both sides and round caps."""
    d = np.gradient(line, axis=0)
    d /= np.hypot(d[:, 0], d[:, 1])[:, None]
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1)
    a0 = math.atan2(normal[0, 1], normal[0, 0])
    a1 = math.atan2(-normal[-1, 1], -normal[-1, 0])
    caps = np.linspace(0, np.pi, 9)[1:-1]
    end = line[-1] + r * np.stack([np.cos(a1 + caps), np.sin(a1 + caps)], axis=1)
    start = line[0] + r * np.stack([np.cos(a0 + caps), np.sin(a0 + caps)], axis=1)
    left, right = line + r * normal, line - r * normal
    return np.concatenate([right, end, left[::-1], start])


class _Placer:
    """Shared checks while placing: inside the slide, clear of lesions, on glass."""

    def __init__(self, scene: SlideScene) -> None:
        self.scene = scene
        self.short = float(min(scene.width, scene.height))
        self.lesion_margin = 0.03 * self.short
        self.glass_margin = 4.0 * scene._ragged_px + scene._soft_px + 0.01 * self.short

    def clear_of_lesions(self, line: np.ndarray, r: float) -> bool:
        polys = self.scene.polygons
        if not polys:
            return True
        if points_in_polygons(line, polys).any():
            return False
        verts = np.concatenate(polys)
        near = _line_distance(verts[:, 0], verts[:, 1], line)
        return bool(near.min() > r + self.lesion_margin)

    def inside(self, line: np.ndarray, r: float) -> bool:
        s = self.scene
        return bool(
            (line[:, 0] >= r).all()
            and (line[:, 0] <= s.width - r).all()
            and (line[:, 1] >= r).all()
            and (line[:, 1] <= s.height - r).all()
        )

    def on_glass(self, line: np.ndarray, r: float) -> bool:
        """Is every point within ``r`` of ``line`` on glass, a margin away from tissue?"""
        a = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        ring = np.stack([np.cos(a), np.sin(a)], axis=1)
        pts = np.concatenate([line] + [p + f * r * ring for p in line for f in (0.5, 1.0)])
        dist = self.scene.tissue_distance(pts[:, 0], pts[:, 1])
        return bool(dist.max() < -self.glass_margin)


def _pens(rng: np.random.Generator, place: _Placer) -> list[Artefact]:
    """2-3 ink strokes, each crossing a tissue edge (anchored on it), clear of lesions."""
    s = place.scene
    inks = [str(k) for k in rng.permutation(list(INKS))[: int(rng.integers(2, 4))]]
    cand = rng.uniform((0, 0), (s.width, s.height), size=(4000, 2))
    edge = cand[np.abs(s.tissue_distance(cand[:, 0], cand[:, 1])) < 0.01 * place.short]
    out: list[Artefact] = []
    for ink in inks:
        for _ in range(30 if len(edge) else 0):
            anchor = edge[rng.integers(len(edge))]
            r = rng.uniform(0.012, 0.022) * place.short
            length = rng.uniform(0.25, 0.5) * place.short
            th = rng.uniform(0, 2 * np.pi)
            u = np.linspace(0.0, 1.0, 24)
            along = (u - rng.uniform(0.3, 0.7)) * length
            bend = rng.uniform(-0.12, 0.12) * length * np.sin(np.pi * u)
            line = anchor + np.stack(
                [
                    along * math.cos(th) - bend * math.sin(th),
                    along * math.sin(th) + bend * math.cos(th),
                ],
                axis=1,
            )
            if place.inside(line, r) and place.clear_of_lesions(line, r):
                mark = Mark(line, r, _od(INKS[ink]))
                out.append(Artefact("pen", ink, (mark,), np.round(_capsule(line, r), 2)))
                break
    return out


def _borders(rng: np.random.Generator, place: _Placer) -> list[Artefact]:
    """A near-black band along one or two slide edges, narrowed to clear every lesion."""
    s = place.scene
    w_, h_ = float(s.width), float(s.height)
    verts = np.concatenate(s.polygons) if s.polygons else np.empty((0, 2))
    sides = {  # edge line (beyond the slide's ends) and the lesions' distance to it
        "left": (np.array([[0.0, -h_], [0.0, 2 * h_]]), verts[:, 0]),
        "right": (np.array([[w_, -h_], [w_, 2 * h_]]), w_ - verts[:, 0]),
        "top": (np.array([[-w_, 0.0], [2 * w_, 0.0]]), verts[:, 1]),
        "bottom": (np.array([[-w_, h_], [2 * w_, h_]]), h_ - verts[:, 1]),
    }
    out: list[Artefact] = []
    for side in rng.permutation(list(sides))[: int(rng.integers(1, 3))]:
        line, lesion_dist = sides[str(side)]
        width = rng.uniform(0.015, 0.035) * place.short
        if len(lesion_dist):
            width = min(width, float(lesion_dist.min()) - place.lesion_margin)
        grey = rng.uniform(0.03, 0.07)
        od = _od(grey * np.array([1.0, rng.uniform(0.95, 1.05), rng.uniform(0.95, 1.1)]))
        if width < 0.005 * place.short:
            continue
        x0, y0, x1, y1 = {
            "left": (0.0, 0.0, width, h_),
            "right": (w_ - width, 0.0, w_, h_),
            "top": (0.0, 0.0, w_, width),
            "bottom": (0.0, h_ - width, w_, h_),
        }[str(side)]
        box = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        out.append(Artefact("border", str(side), (Mark(line, width, od),), np.round(box, 2)))
    return out


def _dust(rng: np.random.Generator, place: _Placer) -> list[Artefact]:
    """15-40 small specks on blank glass: grey, some brownish, some elongated."""
    s = place.scene
    out: list[Artefact] = []
    for _ in range(int(rng.integers(15, 41))):
        r = max(1.5, rng.uniform(0.002, 0.007) * place.short)
        for _ in range(20):
            c = rng.uniform((0, 0), (s.width, s.height))
            stretch = rng.uniform(0.0, 1.5) * r
            th = rng.uniform(0, np.pi)
            line = np.array([c, c + stretch * np.array([math.cos(th), math.sin(th)])])
            if place.inside(line, r) and place.on_glass(line, r):
                grey = rng.uniform(0.35, 0.8)
                tint = (1.0, 0.93, 0.85) if rng.random() < 0.4 else (1.0, 1.0, 1.02)
                mark = Mark(line, r, _od(np.minimum(grey * np.array(tint), 1.0)))
                outline = _capsule(line, r) if stretch > 0.5 else _circle(c, r + stretch, 12)
                out.append(Artefact("dust", "", (mark,), np.round(outline, 2)))
                break
    return out


def _bubbles(rng: np.random.Generator, place: _Placer) -> list[Artefact]:
    """1-2 air bubbles on glass: a grey rim around a slightly grey disc."""
    s = place.scene
    out: list[Artefact] = []
    for _ in range(int(rng.integers(1, 3))):
        radius = rng.uniform(0.04, 0.08) * place.short
        rim = max(1.5, rng.uniform(0.003, 0.006) * place.short)
        for _ in range(40):
            c = rng.uniform((0, 0), (s.width, s.height))
            centre = c[None, :]
            if place.inside(centre, radius + rim) and place.on_glass(centre, radius + rim):
                marks = (
                    Mark(centre, rim, _od((rng.uniform(0.65, 0.8),) * 3), ring=radius),
                    Mark(centre, radius, _od((rng.uniform(0.95, 0.98),) * 3)),
                )
                out.append(Artefact("bubble", "", marks, np.round(_circle(c, radius + rim), 2)))
                break
    return out


def make_artefacts(rng: np.random.Generator, scene: SlideScene) -> list[Artefact]:
    """The scene's artefacts (pens, borders, dust, bubbles, in this order)."""
    place = _Placer(scene)
    return _pens(rng, place) + _borders(rng, place) + _dust(rng, place) + _bubbles(rng, place)
