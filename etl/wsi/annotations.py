"""Ground-truth annotations: ASAP (Camelyon16) XML and QuPath GeoJSON polygons, checked, read
into one structure, and point-in-polygon tests.

Polygons are float ``(N, 2)`` arrays of ``(x, y)`` level-0 pixel coordinates (x = column,
y = row). :class:`Annotations` holds a slide's polygons by role: tumor is inside ANY ``tumor``
polygon and inside no ``holes`` polygon; an exclusion area (never sampled) is inside any
``exclude`` polygon and no ``exclude_holes`` polygon. Inside one polygon the even-odd rule
decides.

- ASAP XML (Camelyon16): groups ``_0`` and ``_1`` (and any other group, e.g. ``Tumor``) are
  tumor, ``_2`` (``Exclusion`` in some exports) are non-tumor holes inside lesions (the
  challenge's own mask conversion paints ``_2`` last with 0). Vertices are sorted by ``Order``.
- QuPath GeoJSON: a FeatureCollection, a Feature, or a list of Features; Polygon and
  MultiPolygon geometries; the class in ``properties.classification.name``. Classes matching
  ``tumor_classes`` (glob patterns, default ``Tumor``) are tumor, those matching
  ``exclude_classes`` (default ``Ignore*``, QuPath's own class) are exclusions; interior rings
  become holes of their role (subtracted from all of it, as Camelyon16's ``_2``). Other classes,
  unclassified objects and other geometries are ignored and counted. The closing vertex of a
  ring is dropped, so the same polygon in XML and GeoJSON gives the same array.

Every polygon is checked: coordinates must be finite numbers, a ring needs 3 distinct vertices
and a non-zero area (errors). A ring that crosses or touches itself is a warning, not an error:
hand-drawn ground truth (Camelyon16's XMLs among it) has such polygons, and the challenge's mask
conversion fills them; here they are filled by the even-odd rule of ``points_in_polygons``
(consecutive duplicate vertices are allowed). :func:`check_annotations` collects every problem
of a file (each names the file, the annotation and the fix) without raising;
:func:`read_annotations` raises them together as one :class:`AnnotationError` (warnings too
with ``strict=True``).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from etl.errors import PatchetlError

__all__ = [
    "ANNOTATION_SUFFIXES",
    "EXCLUDE_CLASSES",
    "EXCLUSION_GROUPS",
    "TUMOR_CLASSES",
    "AnnotationError",
    "AnnotationProblem",
    "Annotations",
    "check_annotations",
    "points_in_polygons",
    "read_annotations",
    "read_asap_xml",
    "ring_crossing",
    "ring_problem",
    "write_asap_xml",
]

# Camelyon16: groups "_2" (and "Exclusion" in some exports) mark non-tumor holes inside lesions.
EXCLUSION_GROUPS = ("_2", "Exclusion")
TUMOR_CLASSES = ("Tumor",)
EXCLUDE_CLASSES = ("Ignore*",)
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")
MAX_LISTED = 50  # problems listed in one AnnotationError message before "... and N more"


@dataclass(frozen=True)
class AnnotationProblem:
    """One error (or warning) in an annotation file: where, what, and how to fix it."""

    path: Path
    entry: str  # which annotation, e.g. "annotation 'Annotation 3' (#3, group _0)"; "" = file
    message: str
    fix: str = ""
    warning: bool = False

    def __str__(self) -> str:
        where = f"{self.path}: {self.entry}: " if self.entry else f"{self.path}: "
        return where + self.message + (f"; {self.fix}" if self.fix else "")


class AnnotationError(PatchetlError, ValueError):
    """Annotation file(s) cannot be used; the message names the file, the annotation and the fix.
    ``problems`` lists every one found (empty when raised with a message only)."""

    def __init__(self, message: str, problems: Sequence[AnnotationProblem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)

    @classmethod
    def of(cls, problems: Sequence[AnnotationProblem]) -> AnnotationError:
        """One error listing ``problems`` (one per line, the first ``MAX_LISTED``)."""
        lines = [str(p) if not p.warning else f"(warning) {p}" for p in problems[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:
            lines.append(f"... and {len(problems) - MAX_LISTED} more")
        head = lines[0] if len(problems) == 1 else f"{len(problems)} annotation problem(s):"
        body = "" if len(problems) == 1 else "\n  " + "\n  ".join(lines)
        return cls(head + body, problems)


@dataclass(frozen=True)
class Annotations:
    """The polygons of one slide by role (see the module docstring), what was ignored (count per
    class or geometry) and the warnings found while reading."""

    tumor: list[np.ndarray]
    holes: list[np.ndarray]
    exclude: list[np.ndarray] = field(default_factory=list)
    exclude_holes: list[np.ndarray] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    warnings: list[AnnotationProblem] = field(default_factory=list)

    def is_tumor(self, xy: np.ndarray) -> np.ndarray:
        """Bool per (x, y) point: inside tumor (any tumor polygon, no hole)."""
        return _inside(xy, self.tumor, self.holes)

    def is_excluded(self, xy: np.ndarray) -> np.ndarray:
        """Bool per (x, y) point: inside an exclusion area."""
        return _inside(xy, self.exclude, self.exclude_holes)


def _inside(
    xy: np.ndarray, polygons: Sequence[np.ndarray], holes: Sequence[np.ndarray]
) -> np.ndarray:
    inside = points_in_polygons(xy, polygons)
    if holes and inside.any():
        inside[inside] &= ~points_in_polygons(np.asarray(xy).reshape(-1, 2)[inside], holes)
    return inside


# --------------------------------------------------------------------------- polygon checks
def _distinct_ring(ring: np.ndarray) -> np.ndarray:
    """The ring without consecutive duplicate vertices (the closing vertex included)."""
    if len(ring) == 0:
        return ring
    keep = np.any(ring != np.roll(ring, 1, axis=0), axis=1)
    if not keep.any():  # every vertex the same point
        return ring[:1]
    return ring[keep]


def _orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Sign of the cross product (b - a) x (c - a), per row."""
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    sign: np.ndarray = np.sign(cross)
    return sign


def _on_segment(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    """For collinear p: is p within the bounding box of segment ab? (per row)"""
    within: np.ndarray = (
        (np.minimum(a[:, 0], b[:, 0]) <= p[:, 0])
        & (p[:, 0] <= np.maximum(a[:, 0], b[:, 0]))
        & (np.minimum(a[:, 1], b[:, 1]) <= p[:, 1])
        & (p[:, 1] <= np.maximum(a[:, 1], b[:, 1]))
    )
    return within


def _segments_meet(p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, p4: np.ndarray) -> np.ndarray:
    """Do segments p1p2 and p3p4 intersect or touch? (per row, exact orientation tests)"""
    d1, d2 = _orient(p3, p4, p1), _orient(p3, p4, p2)
    d3, d4 = _orient(p1, p2, p3), _orient(p1, p2, p4)
    meet: np.ndarray = (d1 * d2 < 0) & (d3 * d4 < 0)
    meet |= (d1 == 0) & _on_segment(p3, p4, p1)
    meet |= (d2 == 0) & _on_segment(p3, p4, p2)
    meet |= (d3 == 0) & _on_segment(p1, p2, p3)
    meet |= (d4 == 0) & _on_segment(p1, p2, p4)
    return meet


def _candidate_pairs(
    lo: np.ndarray, hi: np.ndarray, chunk: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs (i, j), i != j, of intervals [lo, hi] that overlap, in chunks of about ``chunk``
    pairs: a sweep over the intervals sorted by ``lo``."""
    order = np.argsort(lo, kind="stable")
    start = lo[order]
    end = np.searchsorted(start, hi[order], side="right")  # intervals k+1..end-1 overlap k
    counts = np.maximum(end - np.arange(len(order)) - 1, 0)
    k = 0
    while k < len(order):
        stop = k + 1 + int(np.searchsorted(np.cumsum(counts[k:]), chunk))
        stop = min(stop, len(order))
        c = counts[k:stop]
        first = np.repeat(np.arange(k, stop), c)
        offset = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        yield order[first], order[first + 1 + offset]
        k = stop


def _self_crossing(ring: np.ndarray) -> tuple[int, int] | None:
    """The first pair of edges (i, j) of a ring (edge i runs from vertex i to i+1) that cross,
    touch or overlap, else None; adjacent edges count when they fold back on each other."""
    n = len(ring)
    a, b = ring, np.roll(ring, -1, axis=0)
    ea, eb = b - a, np.roll(b - a, -1, axis=0)  # edge i and edge i+1
    cross = ea[:, 0] * eb[:, 1] - ea[:, 1] * eb[:, 0]
    fold = np.flatnonzero((cross == 0) & ((ea * eb).sum(axis=1) < 0))
    if fold.size:
        i = int(fold[0])
        return i, (i + 1) % n
    lo, hi = np.minimum(a[:, 0], b[:, 0]), np.maximum(a[:, 0], b[:, 0])
    ylo, yhi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    for ei, ej in _candidate_pairs(lo, hi, 1 << 20):
        adjacent = (ej == (ei + 1) % n) | (ei == (ej + 1) % n)
        keep = ~adjacent & (ylo[ei] <= yhi[ej]) & (ylo[ej] <= yhi[ei])
        ei, ej = ei[keep], ej[keep]
        hit = np.flatnonzero(_segments_meet(a[ei], b[ei], a[ej], b[ej]))
        if hit.size:
            pairs = np.sort(np.stack([ei[hit], ej[hit]], axis=1), axis=1)
            first = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))[0]]
            return int(first[0]), int(first[1])
    return None


def ring_problem(ring: np.ndarray) -> tuple[str, str] | None:
    """(what is wrong, the fix) for a polygon ring that cannot be used, else None:
    non-finite coordinates, fewer than 3 distinct vertices, zero area."""
    ring = np.asarray(ring, dtype=np.float64)
    if not np.isfinite(ring).all():
        return "has NaN or infinite coordinates", "fix or remove those vertices"
    distinct = _distinct_ring(ring)
    if len(distinct) < 3:
        return (
            f"has {len(distinct)} distinct vertex(es); a polygon needs at least 3",
            "remove the annotation or add its vertices",
        )
    rel = distinct - distinct[0]
    far = rel[np.argmax(np.abs(rel).sum(axis=1))]
    if np.all(rel[:, 0] * far[1] - rel[:, 1] * far[0] == 0):
        return "has zero area (its vertices lie on one line)", "remove it or redraw it"
    return None


def ring_crossing(ring: np.ndarray) -> tuple[str, str] | None:
    """(what is odd, the fix) for a usable ring that crosses or touches itself, else None."""
    distinct = _distinct_ring(np.asarray(ring, dtype=np.float64))
    crossing = _self_crossing(distinct)
    if crossing is None:
        return None
    i, j = crossing
    px, py = distinct[i]
    return (
        f"crosses itself (edges {i} and {j} meet; edge {i} starts at x={px:g}, y={py:g}); "
        "it is filled by the even-odd rule",
        "redraw it, or split it into polygons that do not cross themselves",
    )


# --------------------------------------------------------------------------- reading
class _Reader:
    """Collects the problems and the polygons (by role) of one annotation file."""

    def __init__(self, path: Path, slide_size: tuple[int, int] | None) -> None:
        self.path, self.slide_size = path, slide_size
        self.problems: list[AnnotationProblem] = []
        self.roles: dict[str, list[np.ndarray]] = {
            "tumor": [],
            "holes": [],
            "exclude": [],
            "exclude_holes": [],
        }
        self.ignored: Counter[str] = Counter()

    def error(self, entry: str, message: str, fix: str = "") -> None:
        self.problems.append(AnnotationProblem(self.path, entry, message, fix))

    def warn(self, entry: str, message: str, fix: str = "") -> None:
        self.problems.append(AnnotationProblem(self.path, entry, message, fix, warning=True))

    def add(self, role: str, ring: np.ndarray, entry: str) -> None:
        """Check a ring and keep it under ``role`` when it is a usable polygon."""
        problem = ring_problem(ring)
        if problem is not None:
            self.error(entry, f"polygon {problem[0]}", problem[1])
            return
        crossing = ring_crossing(ring)
        if crossing is not None:
            self.warn(entry, f"polygon {crossing[0]}", crossing[1])
        if self.slide_size is not None and not self._inside_slide(ring, entry):
            return
        self.roles[role].append(ring)

    def _inside_slide(self, ring: np.ndarray, entry: str) -> bool:
        w, h = self.slide_size or (0, 0)
        (x0, y0), (x1, y1) = ring.min(axis=0), ring.max(axis=0)
        box = f"x {x0:g}..{x1:g}, y {y0:g}..{y1:g}"
        if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
            self.error(
                entry,
                f"polygon ({box}) lies outside its slide ({w} x {h} px)",
                "the file belongs to another slide, or its coordinates are not level-0 pixels",
            )
            return False
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            self.warn(
                entry,
                f"polygon ({box}) reaches outside its slide ({w} x {h} px); the part outside "
                "is ignored",
                "check that the file belongs to this slide",
            )
        return True

    def result(self) -> Annotations:
        return Annotations(
            tumor=self.roles["tumor"],
            holes=self.roles["holes"],
            exclude=self.roles["exclude"],
            exclude_holes=self.roles["exclude_holes"],
            ignored=dict(sorted(self.ignored.items())),
            warnings=[p for p in self.problems if p.warning],
        )


def _asap_vertices(ann: ET.Element, entry: str, reader: _Reader) -> np.ndarray | None:
    points: list[tuple[float, float, float]] = []
    bad = []
    for k, coord in enumerate(ann.iter("Coordinate")):
        try:
            order = float(coord.get("Order", len(points)))
            points.append((order, float(coord.attrib["X"]), float(coord.attrib["Y"])))
        except (KeyError, ValueError):
            bad.append(f"#{k} {dict(coord.attrib)}")
    if bad:
        reader.error(
            entry,
            f"{len(bad)} Coordinate(s) without numeric X and Y: {', '.join(bad[:3])}",
            "fix or remove those coordinates",
        )
        return None
    points.sort(key=lambda p: p[0])
    return np.array([(x, y) for _, x, y in points], dtype=np.float64).reshape(-1, 2)


def _read_asap(path: Path, reader: _Reader) -> list[tuple[str, str, np.ndarray]]:
    """(group, entry, ring) of every annotation, in file order, problems collected."""
    try:
        root = ET.fromstring(path.read_bytes())
    except ET.ParseError as exc:
        reader.error(
            "",
            f"not a valid XML file ({exc}); it may be truncated",
            "export the ASAP annotations again",
        )
        return []
    found: list[tuple[str, str, np.ndarray]] = []
    annotations = list(root.iter("Annotation"))
    if not annotations and root.tag != "ASAP_Annotations":
        reader.error("", f"XML root <{root.tag}> holds no <Annotation>", "give ASAP XML files")
    for i, ann in enumerate(annotations):
        group = ann.get("PartOfGroup", "")
        entry = f"annotation {ann.get('Name', '')!r} (#{i}, group {group or 'none'})"
        ring = _asap_vertices(ann, entry, reader)
        if ring is not None:
            found.append((group, entry, ring))
    return found


def _geojson_features(data: Any, reader: _Reader) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if isinstance(features, list):
            return features
    elif isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    reader.error(
        "",
        "not a GeoJSON Feature, FeatureCollection or list of Features",
        "export the annotations from QuPath as GeoJSON",
    )
    return []


def _class_name(feature: dict[str, Any]) -> str | None:
    props = feature.get("properties")
    cls = props.get("classification") if isinstance(props, dict) else None
    name = cls.get("name") if isinstance(cls, dict) else None
    return name if isinstance(name, str) else None


def _rings(coords: Any, entry: str, reader: _Reader) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """(exterior, holes) of GeoJSON Polygon coordinates, closing vertices dropped."""
    rings: list[np.ndarray] = []
    for r, ring in enumerate(coords if isinstance(coords, list) else [None]):
        try:
            arr = np.array([(float(p[0]), float(p[1])) for p in ring], dtype=np.float64)
        except (TypeError, ValueError, IndexError):
            reader.error(
                entry, f"ring {r} has positions that are not [x, y] numbers", "fix the geometry"
            )
            return None
        if len(arr) > 1 and np.array_equal(arr[0], arr[-1]):
            arr = arr[:-1]
        rings.append(arr.reshape(-1, 2))
    if not rings:
        reader.error(entry, "polygon without coordinates", "remove the object or redraw it")
        return None
    return rings[0], rings[1:]


def _read_geojson(
    path: Path, reader: _Reader, tumor: Sequence[str], exclude: Sequence[str]
) -> None:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        reader.error(
            "",
            f"not a valid JSON file ({exc}); it may be truncated",
            "export the annotations from QuPath as GeoJSON again",
        )
        return
    for i, feature in enumerate(_geojson_features(data, reader)):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        name = _class_name(feature) if isinstance(feature, dict) else None
        entry = f"feature #{i} (class {name or 'none'})"
        if name is not None and any(fnmatchcase(name, p) for p in tumor):
            role = "tumor"
        elif name is not None and any(fnmatchcase(name, p) for p in exclude):
            role = "exclude"
        else:
            reader.ignored[f"class {name}" if name else "unclassified"] += 1
            continue
        if kind not in ("Polygon", "MultiPolygon") or not isinstance(geometry, dict):
            reader.ignored[f"{kind or 'no'} geometry"] += 1
            continue
        coords = geometry.get("coordinates")
        polygons = [coords] if kind == "Polygon" else coords if isinstance(coords, list) else [None]
        for k, poly in enumerate(polygons):
            where = entry if kind == "Polygon" else f"{entry}, polygon {k} of the MultiPolygon"
            rings = _rings(poly, where, reader)
            if rings is None:
                continue
            reader.add(role, rings[0], where)
            for h, hole in enumerate(rings[1]):
                reader.add(
                    "holes" if role == "tumor" else "exclude_holes", hole, f"{where}, hole {h}"
                )


def check_annotations(
    path: str | PathLike[str],
    *,
    tumor_classes: Sequence[str] = TUMOR_CLASSES,
    exclude_classes: Sequence[str] = EXCLUDE_CLASSES,
    slide_size: tuple[int, int] | None = None,
) -> tuple[Annotations, list[AnnotationProblem]]:
    """Read an ASAP XML (``.xml``) or QuPath GeoJSON (``.geojson``, ``.json``) file without
    raising: the usable polygons, and every problem found (errors and warnings).

    ``slide_size`` (level-0 width, height): a polygon entirely outside the slide is an error,
    one reaching outside it a warning. A file without any polygon is a warning (tumor-free).
    """
    path = Path(path)
    reader = _Reader(path, slide_size)
    suffix = path.suffix.lower()
    if suffix not in ANNOTATION_SUFFIXES:
        reader.error(
            "",
            f"unknown annotation file type {suffix or '(no suffix)'!r}",
            "use ASAP .xml or QuPath .geojson files",
        )
    elif not path.is_file():
        reader.error("", "annotation file not found", "check the path")
    elif path.stat().st_size == 0:
        reader.error("", "the file is empty", "export the annotations again or remove the file")
    elif suffix == ".xml":
        for group, entry, ring in _read_asap(path, reader):
            reader.add("holes" if group in EXCLUSION_GROUPS else "tumor", ring, entry)
    else:
        _read_geojson(path, reader, tumor_classes, exclude_classes)
    result = reader.result()
    if not reader.problems and not any(reader.roles.values()):
        reader.warn(
            "",
            "no usable annotation in the file; the slide counts as tumor-free",
            f"check the class names (tumor: {', '.join(tumor_classes)})"
            if suffix != ".xml"
            else "add the tumor polygons or remove the file",
        )
        result = reader.result()
    return result, reader.problems


def read_annotations(
    path: str | PathLike[str],
    *,
    tumor_classes: Sequence[str] = TUMOR_CLASSES,
    exclude_classes: Sequence[str] = EXCLUDE_CLASSES,
    slide_size: tuple[int, int] | None = None,
    strict: bool = False,
) -> Annotations:
    """The polygons of an annotation file read once, by role (see :func:`check_annotations`).

    Raises :class:`AnnotationError` listing every error of the file (and every warning with
    ``strict``); warnings otherwise stay in ``Annotations.warnings``.
    """
    result, problems = check_annotations(
        path, tumor_classes=tumor_classes, exclude_classes=exclude_classes, slide_size=slide_size
    )
    fatal = [p for p in problems if strict or not p.warning]
    if fatal:
        raise AnnotationError.of(fatal)
    return result


def read_asap_xml(
    path: str | PathLike[str], *, groups: Iterable[str] | None = None
) -> list[np.ndarray]:
    """Read the polygons of an ASAP (Camelyon16) XML file as float (N, 2) arrays of (x, y).

    ``groups``: keep only annotations whose ``PartOfGroup`` is listed; by default every
    annotation except the exclusion groups (``_2``, ``Exclusion``). Coordinates are sorted
    by their ``Order`` attribute. Raises :class:`AnnotationError` listing every problem.
    """
    path = Path(path)
    reader = _Reader(path, None)
    if not path.is_file():
        reader.error("", "annotation file not found", "check the path")
        found = []
    else:
        found = _read_asap(path, reader)
    for _, entry, ring in found:
        problem = ring_problem(ring)
        if problem is not None:
            reader.error(entry, f"polygon {problem[0]}", problem[1])
    if reader.problems:
        raise AnnotationError.of(reader.problems)
    wanted = None if groups is None else set(groups)
    return [
        ring
        for group, _, ring in found
        if (group not in EXCLUSION_GROUPS if wanted is None else group in wanted)
    ]


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

    Even-odd (crossing number) rule per polygon: a point is inside when an odd number of the
    polygon's edges cross its row to its right (``px < x_cross``; an edge counts for rows
    ``min(y) <= py < max(y)``, horizontal edges never). Points are pre-filtered by each polygon's
    bounding box. Scanline evaluation: crossings are computed once per edge and distinct point
    row, then points and crossings of a row are merged by one sort (comparisons only), so a
    polygon costs about (points + crossings) log, not vertices x points. Points exactly on an
    edge may go either way.
    """
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    inside = np.zeros(len(pts), dtype=bool)
    for poly in polygons:
        poly = np.asarray(poly, dtype=np.float64)
        (xmin, ymin), (xmax, ymax) = poly.min(axis=0), poly.max(axis=0)
        sel = np.flatnonzero(
            (pts[:, 0] >= xmin) & (pts[:, 0] <= xmax) & (pts[:, 1] >= ymin) & (pts[:, 1] <= ymax)
        )
        if sel.size:
            inside[sel] |= _odd_crossings(pts[sel, 0], pts[sel, 1], poly)
    return inside


def _odd_crossings(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Per point: does an odd number of the polygon's edges cross its row right of it?"""
    rows, point_row = np.unique(py, return_inverse=True)
    xi, yi = poly[:, 0], poly[:, 1]  # edge k runs from vertex k-1 to vertex k
    xj, yj = np.roll(xi, 1), np.roll(yi, 1)
    e = np.flatnonzero(yi != yj)
    first = np.searchsorted(rows, np.minimum(yi[e], yj[e]), "left")  # rows lo <= y < hi
    n = np.maximum(np.searchsorted(rows, np.maximum(yi[e], yj[e]), "left") - first, 0)
    edge = np.repeat(e, n)
    row = np.repeat(first, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    y = rows[row]
    x_cross = xi[edge] + (y - yi[edge]) * (xj[edge] - xi[edge]) / (yj[edge] - yi[edge])
    # one sort of crossings and points by (row, x); at equal x a crossing comes first
    is_point = np.r_[np.zeros(len(row), dtype=bool), np.ones(len(px), dtype=bool)]
    order = np.lexsort((is_point, np.r_[x_cross, px], np.r_[row, point_row]))
    crossings_so_far = np.cumsum(~is_point[order])
    per_row = np.bincount(row, minlength=len(rows))
    before_row = np.cumsum(per_row) - per_row
    at = np.flatnonzero(is_point[order])
    point = order[at] - len(row)
    left_or_at = crossings_so_far[at] - before_row[point_row[point]]
    odd = np.zeros(len(px), dtype=bool)
    odd[point] = (per_row[point_row[point]] - left_or_at) % 2 == 1
    return odd
