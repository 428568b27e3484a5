"""Ground-truth annotations: Camelyon16 / ASAP XML polygons and point-in-polygon tests.

Polygons are float ``(N, 2)`` arrays of ``(x, y)`` level-0 pixel coordinates
(x = column, y = row), the convention of the Camelyon16 XML files. A point is tumor
when it lies inside ANY tumor polygon and inside no hole; inside one polygon the even-odd
rule decides. Camelyon16's groups: ``_0`` and ``_1`` (and any other group, e.g. ``Tumor``)
are tumor, ``_2`` (``Exclusion`` in some exports) are non-tumor holes inside lesions (the
challenge's own mask conversion paints ``_2`` last with 0).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from etl.errors import PatchetlError

__all__ = [
    "EXCLUSION_GROUPS",
    "AnnotationError",
    "Annotations",
    "points_in_polygons",
    "read_annotations",
    "read_asap_xml",
    "write_asap_xml",
]

# Camelyon16: groups "_2" (and "Exclusion" in some exports) mark non-tumor holes inside lesions.
EXCLUSION_GROUPS = ("_2", "Exclusion")


class AnnotationError(PatchetlError, ValueError):
    """An annotation file cannot be read; the message names the file, the entry and the fix."""


@dataclass(frozen=True)
class Annotations:
    """The polygons of one slide: tumor = inside any ``tumor`` polygon and outside ``holes``."""

    tumor: list[np.ndarray]
    holes: list[np.ndarray]


def _read_groups(path: Path) -> list[tuple[str, np.ndarray]]:
    """(group, polygon) of every annotation, in file order; vertices sorted by ``Order``."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    except ET.ParseError as exc:
        raise AnnotationError(
            f"{path}: not a valid XML file ({exc}); expected ASAP annotations"
        ) from None
    polygons: list[tuple[str, np.ndarray]] = []
    for i, ann in enumerate(root.iter("Annotation")):
        name = ann.get("Name", f"#{i}")
        points: list[tuple[float, float, float]] = []
        for coord in ann.iter("Coordinate"):
            try:
                points.append(
                    (
                        float(coord.get("Order", len(points))),
                        float(coord.attrib["X"]),
                        float(coord.attrib["Y"]),
                    )
                )
            except (KeyError, ValueError):
                raise AnnotationError(
                    f"{path}: annotation {name!r} has a Coordinate without numeric X/Y "
                    f"({coord.attrib}); fix or remove that coordinate"
                ) from None
        if len(points) < 3:
            raise AnnotationError(
                f"{path}: annotation {name!r} has {len(points)} coordinate(s); a polygon needs "
                "at least 3 (remove the annotation or add its vertices)"
            )
        points.sort(key=lambda p: p[0])
        polygons.append(
            (ann.get("PartOfGroup", ""), np.array([(x, y) for _, x, y in points], dtype=np.float64))
        )
    return polygons


def read_asap_xml(
    path: str | PathLike[str], *, groups: Iterable[str] | None = None
) -> list[np.ndarray]:
    """Read the polygons of an ASAP (Camelyon16) XML file as float (N, 2) arrays of (x, y).

    ``groups``: keep only annotations whose ``PartOfGroup`` is listed; by default every
    annotation except the exclusion groups (``_2``, ``Exclusion``). Coordinates are sorted
    by their ``Order`` attribute.
    """
    wanted = None if groups is None else set(groups)
    return [
        poly
        for group, poly in _read_groups(Path(path))
        if (group not in EXCLUSION_GROUPS if wanted is None else group in wanted)
    ]


def read_annotations(path: str | PathLike[str]) -> Annotations:
    """Tumor polygons and holes (the exclusion groups) of an ASAP XML file, read once."""
    groups = _read_groups(Path(path))
    return Annotations(
        tumor=[p for g, p in groups if g not in EXCLUSION_GROUPS],
        holes=[p for g, p in groups if g in EXCLUSION_GROUPS],
    )


def write_asap_xml(
    path: str | PathLike[str],
    polygons: Sequence[np.ndarray],
    *,
    group: str = "Tumor",
    color: str = "#F4FA58",
) -> None:
    """Write polygons ((N, 2) arrays of level-0 (x, y)) as a Camelyon16-style ASAP XML file.

    Coordinates are written with 2 decimals; round polygons to 2 decimals first if the
    file must reproduce them exactly.
    """
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    for i, poly in enumerate(polygons):
        lines.append(
            f'\t\t<Annotation Name="Annotation {i}" Type="Polygon" '
            f'PartOfGroup="{group}" Color="{color}">'
        )
        lines.append("\t\t\t<Coordinates>")
        for j, (x, y) in enumerate(np.asarray(poly, dtype=np.float64)):
            lines.append(f'\t\t\t\t<Coordinate Order="{j}" X="{x:.2f}" Y="{y:.2f}" />')
        lines.append("\t\t\t</Coordinates>")
        lines.append("\t\t</Annotation>")
    lines += [
        "\t</Annotations>",
        "\t<AnnotationGroups>",
        f'\t\t<Group Name="{group}" PartOfGroup="None" Color="#00ff00">',
        "\t\t\t<Attributes />",
        "\t\t</Group>",
        "\t</AnnotationGroups>",
        "</ASAP_Annotations>",
        "",
    ]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def points_in_polygons(xy: np.ndarray, polygons: Iterable[np.ndarray]) -> np.ndarray:
    """Return a bool array: is each (x, y) point of ``xy`` (shape (N, 2)) inside any polygon?

    Even-odd (crossing number) rule per polygon, vectorised over points; points are
    pre-filtered by each polygon's bounding box. Points exactly on an edge may go
    either way.
    """
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    inside = np.zeros(len(pts), dtype=bool)
    for poly in polygons:
        poly = np.asarray(poly, dtype=np.float64)
        (xmin, ymin), (xmax, ymax) = poly.min(axis=0), poly.max(axis=0)
        sel = np.flatnonzero(
            (pts[:, 0] >= xmin) & (pts[:, 0] <= xmax) & (pts[:, 1] >= ymin) & (pts[:, 1] <= ymax)
        )
        if sel.size == 0:
            continue
        px, py = pts[sel, 0], pts[sel, 1]
        odd = np.zeros(sel.size, dtype=bool)
        xj, yj = poly[-1]
        for xi, yi in poly:
            if yi != yj:  # horizontal edges never cross a horizontal ray
                crosses = (yi > py) != (yj > py)
                x_cross = xi + (py - yi) * (xj - xi) / (yj - yi)
                odd ^= crosses & (px < x_cross)
            xj, yj = xi, yi
        inside[sel] |= odd
    return inside
