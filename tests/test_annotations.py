"""Annotation readers (etl/wsi/annotations.py): ASAP XML and QuPath GeoJSON into one structure,
and every malformed file refused with the file, the annotation and the fix named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from etl.wsi.annotations import (
    AnnotationError,
    check_annotations,
    points_in_polygons,
    read_annotations,
    read_asap_xml,
    ring_crossing,
    ring_problem,
    write_asap_xml,
)

SQUARE = [(100, 100), (400, 100), (400, 400), (100, 400)]
HOLE = [(200, 200), (300, 200), (300, 300), (200, 300)]
BOWTIE = [(0, 0), (50, 50), (50, 0), (0, 50)]


def asap(*annotations: tuple[str, str, list]) -> str:
    """ASAP XML text of (name, group, [(x, y), ...]) annotations; coordinates written as given."""
    body = ""
    for name, group, points in annotations:
        coords = "".join(
            f'<Coordinate Order="{k}" X="{x}" Y="{y}" />' for k, (x, y) in enumerate(points)
        )
        body += (
            f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}">'
            f"<Coordinates>{coords}</Coordinates></Annotation>"
        )
    return f"<ASAP_Annotations><Annotations>{body}</Annotations></ASAP_Annotations>"


def ring(points) -> list[list[float]]:
    """A closed GeoJSON ring."""
    pts = [[float(x), float(y)] for x, y in points]
    return [*pts, pts[0]]


def feature(cls: str | None, *rings, multi: list | None = None) -> dict:
    geometry = (
        {"type": "MultiPolygon", "coordinates": multi}
        if multi is not None
        else {"type": "Polygon", "coordinates": [ring(r) for r in rings]}
    )
    props: dict = {"objectType": "annotation"}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def test_geojson_reads_tumor_holes_exclusions_and_counts_what_it_ignores(tmp_path):
    fc = {
        "type": "FeatureCollection",
        "features": [
            feature("Tumor", SQUARE, HOLE),
            feature("Ignore*", [(500, 500), (600, 500), (600, 600)]),
            feature("Stroma", SQUARE),
            feature(None, SQUARE),
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [1, 2]},
                "properties": {"classification": {"name": "Tumor"}},
            },
            feature(
                "Tumor",
                multi=[
                    [ring([(700, 700), (800, 700), (800, 800)])],
                    [ring([(900, 900), (950, 900), (950, 950)])],
                ],
            ),
        ],
    }
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps(fc))
    ann = read_annotations(path)
    assert len(ann.tumor) == 3 and len(ann.holes) == 1 and len(ann.exclude) == 1
    assert np.array_equal(ann.tumor[0], np.array(SQUARE, float))  # closing vertex dropped
    assert ann.ignored == {"Point geometry": 1, "class Stroma": 1, "unclassified": 1}
    pts = np.array([[150, 150], [250, 250], [550, 520], [750, 710], [50, 50]])
    assert ann.is_tumor(pts).tolist() == [True, False, False, True, False]
    assert ann.is_excluded(pts).tolist() == [False, False, True, False, False]
    # class names are options (glob patterns); a single Feature and a list of Features also read
    path.write_text(json.dumps(feature("Tumor: Positive", SQUARE)))
    assert len(read_annotations(path, tumor_classes=["Tumor*"]).tumor) == 1
    path.write_text(json.dumps([feature("Lesion", SQUARE)]))
    assert len(read_annotations(path, tumor_classes=["Lesion"]).tumor) == 1


def test_xml_and_geojson_of_the_same_polygons_read_the_same(tmp_path):
    rng = np.random.default_rng(0)
    theta = np.sort(rng.uniform(0, 2 * np.pi, 40))
    star = np.round(
        np.c_[
            500 + (200 + 40 * rng.random(40)) * np.cos(theta),
            500 + (200 + 40 * rng.random(40)) * np.sin(theta),
        ],
        2,
    )
    write_asap_xml(tmp_path / "a.xml", [star, np.array(SQUARE, float)])
    (tmp_path / "a.geojson").write_text(
        json.dumps([feature("Tumor", star), feature("Tumor", SQUARE)])
    )
    xml, geo = read_annotations(tmp_path / "a.xml"), read_annotations(tmp_path / "a.geojson")
    assert all(np.array_equal(a, b) for a, b in zip(xml.tumor, geo.tumor, strict=True))


def test_camelyon_holes_and_read_asap_xml_keep_their_results(tmp_path):
    path = tmp_path / "c.xml"
    path.write_text(
        asap(("t", "_0", SQUARE), ("u", "_1", [(500, 0), (600, 0), (600, 90)]), ("h", "_2", HOLE))
    )
    ann = read_annotations(path)
    assert len(ann.tumor) == 2 and len(ann.holes) == 1 and not ann.exclude
    assert ann.is_tumor(np.array([[150, 150], [250, 250]])).tolist() == [True, False]
    assert len(read_asap_xml(path)) == 2 and len(read_asap_xml(path, groups=["_2"])) == 1


@pytest.mark.parametrize(
    ("name", "text", "entry", "message", "fix"),
    [
        ("cut.xml", asap(("A", "_0", SQUARE))[:90], "", "not a valid XML file", "export"),
        ("prose.xml", "these are not annotations", "", "not a valid XML file", "export"),
        (
            "nan.xml",
            asap(("Lesion 4", "_0", [(0, 0), ("nan", 5), (9, 9)])),
            "annotation 'Lesion 4' (#0, group _0)",
            "NaN or infinite",
            "fix or remove",
        ),
        (
            "text.xml",
            asap(("A", "_1", [(0, 0), ("ten", 5), (9, 9)])),
            "annotation 'A' (#0, group _1)",
            "without numeric X and Y",
            "fix or remove",
        ),
        (
            "two.xml",
            asap(("ok", "_0", SQUARE), ("B", "_0", [(0, 0), (9, 9)])),
            "annotation 'B' (#1, group _0)",
            "2 distinct vertex",
            "add its vertices",
        ),
        (
            "line.xml",
            asap(("C", "_0", [(0, 0), (5, 5), (9, 9)])),
            "annotation 'C' (#0, group _0)",
            "zero area",
            "redraw",
        ),
        (
            "cut.geojson",
            json.dumps([feature("Tumor", SQUARE)])[:40],
            "",
            "not a valid JSON file",
            "export",
        ),
        ("other.geojson", json.dumps({"type": "Topology"}), "", "not a GeoJSON Feature", "QuPath"),
        (
            "nan.geojson",
            json.dumps([feature("Ignore*", [(0, 0), (float("nan"), 1), (5, 5)])]),
            "feature #0 (class Ignore*)",
            "NaN",
            "fix",
        ),
        ("empty.xml", "", "", "the file is empty", "export"),
        ("notes.txt", "hello", "", "unknown annotation file type", ".geojson"),
    ],
)
def test_a_malformed_file_raises_naming_the_file_the_annotation_and_the_fix(
    tmp_path, name, text, entry, message, fix
):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AnnotationError) as info:
        read_annotations(path)
    text = str(info.value)
    assert str(path) in text and message in text and fix in text
    assert f"{path}: {entry}: " in text if entry else True
    if name.endswith(".xml"):  # the reader evaluation uses refuses it too
        with pytest.raises(AnnotationError):
            read_asap_xml(path)


def test_all_problems_of_a_file_are_listed_together_and_strict_adds_warnings(tmp_path):
    path = tmp_path / "many.xml"
    path.write_text(
        asap(
            ("a", "_0", [(0, 0), (float("nan"), 5), (9, 9)]),
            ("b", "_0", [(1, 1)]),
            ("c", "_0", SQUARE),
            ("far", "_0", [(9000, 9000), (9100, 9000), (9100, 9100)]),
            ("edge", "_0", [(900, 900), (1100, 900), (1100, 1100)]),
        )
    )
    ann, problems = check_annotations(path, slide_size=(1000, 1000))
    errors = [p for p in problems if not p.warning]
    assert [p.entry.split("'")[1] for p in errors] == ["a", "b", "far"]
    assert "lies outside its slide" in str(errors[2])
    assert [p.entry.split("'")[1] for p in problems if p.warning] == ["edge"]
    assert len(ann.tumor) == 2  # the usable ones: c and edge
    with pytest.raises(AnnotationError) as info:
        read_annotations(path, slide_size=(1000, 1000))
    assert str(info.value).startswith("3 annotation problem(s)")
    path.write_text(asap(("edge", "_0", [(900, 900), (1100, 900), (1100, 1100)])))
    assert len(read_annotations(path, slide_size=(1000, 1000)).warnings) == 1
    with pytest.raises(AnnotationError, match="reaches outside its slide"):
        read_annotations(path, slide_size=(1000, 1000), strict=True)


def test_self_crossing_check_finds_crossings_touches_and_folds_and_passes_simple_rings():
    t = np.linspace(0, 2 * np.pi, 5000, endpoint=False)
    wavy = np.c_[(1000 + 60 * np.sin(37 * t)) * np.cos(t), (1000 + 60 * np.sin(37 * t)) * np.sin(t)]
    assert ring_problem(wavy) is None and ring_crossing(wavy) is None
    swapped = wavy.copy()
    swapped[[10, 2000]] = swapped[[2000, 10]]
    assert "crosses itself" in ring_crossing(swapped)[0]
    touch = np.array([(0, 0), (10, 0), (5, 5), (10, 10), (0, 10), (5, 5)], float)  # figure 8
    fold = np.array([(0, 0), (10, 0), (10, 10), (10, 5), (10, 20), (0, 10)], float)
    assert "crosses itself" in ring_crossing(touch)[0]
    assert "crosses itself" in ring_crossing(fold)[0]
    for usable in (swapped, touch, fold):  # crossing is odd, not unusable
        assert ring_problem(usable) is None
    closed = np.array([*SQUARE, SQUARE[0], SQUARE[0]], float)  # repeated vertices are fine
    assert ring_problem(closed) is None and ring_crossing(closed) is None


@pytest.mark.parametrize(
    "name, text, entry",
    [
        ("bowtie.xml", asap(("D", "_0", BOWTIE)), "annotation 'D' (#0, group _0)"),
        (
            "bowtie.geojson",
            json.dumps(feature("Tumor", multi=[[ring(SQUARE)], [ring(BOWTIE)]])),
            "feature #0 (class Tumor), polygon 1 of the MultiPolygon",
        ),
    ],
)
def test_a_self_crossing_polygon_is_kept_with_a_warning_and_refused_when_strict(
    tmp_path, name, text, entry
):
    """Hand-drawn ground truth has self-crossing polygons: they are filled (even-odd), named in
    a warning, and only --strict refuses them."""
    path = tmp_path / name
    path.write_text(text)
    read = read_annotations(path)
    assert len(read.tumor) >= 1 and len(read.warnings) == 1
    warning = str(read.warnings[0])
    assert str(path) in warning and entry in warning and "crosses itself" in warning
    assert "redraw" in warning
    with pytest.raises(AnnotationError, match="crosses itself"):
        read_annotations(path, strict=True)


def test_a_missing_file_is_named(tmp_path: Path):
    with pytest.raises(AnnotationError, match="not found"):
        read_annotations(tmp_path / "missing.xml")


def test_evaluation_reads_qupath_geojson_truth_as_it_reads_the_same_xml(tmp_path):
    from etl.evaluate.truth import load_truth

    xml_dir, geo_dir = tmp_path / "xml", tmp_path / "geo"
    xml_dir.mkdir()
    geo_dir.mkdir()
    write_asap_xml(xml_dir / "s.xml", [np.array(SQUARE, float)])
    (geo_dir / "s.geojson").write_text(json.dumps([feature("Tumor", SQUARE)]))
    xml = load_truth("s", [xml_dir], (512, 512), 32, None, "")
    geo = load_truth("s", [geo_dir], (512, 512), 32, None, "")
    assert geo.path == geo_dir / "s.geojson" and geo.has_tumor
    assert geo.tumor.sum() > 0 and np.array_equal(geo.tumor, xml.tumor)


def reference_points_in_polygons(xy, polygons):
    """The former implementation (a loop over vertices, vectorised over points): the oracle."""
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    inside = np.zeros(len(pts), dtype=bool)
    for poly in polygons:
        poly = np.asarray(poly, dtype=np.float64)
        (xmin, ymin), (xmax, ymax) = poly.min(axis=0), poly.max(axis=0)
        sel = np.flatnonzero(
            (pts[:, 0] >= xmin) & (pts[:, 0] <= xmax) & (pts[:, 1] >= ymin) & (pts[:, 1] <= ymax)
        )
        px, py = pts[sel, 0], pts[sel, 1]
        odd = np.zeros(sel.size, dtype=bool)
        xj, yj = poly[-1]
        for xi, yi in poly:
            if yi != yj:
                crosses = (yi > py) != (yj > py)
                x_cross = xi + (py - yi) * (xj - xi) / (yj - yi)
                odd ^= crosses & (px < x_cross)
            xj, yj = xi, yi
        inside[sel] |= odd
    return inside


def test_points_in_polygons_gives_the_reference_answer_on_every_point():
    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.integers(3, 40))
        poly = (
            rng.integers(0, 50, (n, 2)).astype(float) if trial % 2 else rng.uniform(0, 50, (n, 2))
        )
        polys = [poly, rng.uniform(0, 50, (5, 2))]  # random: concave, crossing, repeated points
        grid = np.arange(-5, 55, 0.5)  # on vertices, on edges, outside
        pts = np.c_[rng.choice(grid, 600), rng.choice(grid, 600)]
        pts[::7] = rng.uniform(-5, 55, (len(pts[::7]), 2))
        assert np.array_equal(
            points_in_polygons(pts, polys), reference_points_in_polygons(pts, polys)
        )
