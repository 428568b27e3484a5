"""Coordinate parsing and validation (etl/coords.py) and the `patchetl inspect` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import Result
from typer.testing import CliRunner

from etl.cli import app
from etl.extract.coords import (
    DATA_ROOT_ENV,
    CoordsError,
    Problem,
    RegionTable,
    default_data_root,
    inspect_report,
    load_regions,
    parse_coordinates,
)

# An asymmetric 3x3 pattern, column by column (k = 3*col + row): cells (0,0), (1,0), (2,2).
FLAT9 = [1, 1, 0, 0, 0, 0, 0, 0, 1]
GRID9 = ((1, 0, 0), (1, 0, 0), (0, 0, 1))
# 2x2, column by column: k=1 is (row 1, col 0).
FLAT4 = [0, 1, 0, 0]
GRID4 = ((0, 0), (1, 0))


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def entry(
    image: object = "tumor_001.tif", location: object = (100, 200), label: object = None
) -> dict:
    return {
        "image": image,
        "location": list(location) if isinstance(location, tuple) else location,
        "label": FLAT9 if label is None else label,
    }


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def tiny_slide(path: Path) -> Path:
    """A 512 x 512 tiled TIFF that opens as a slide (as extract's preflight opens it)."""
    glass = np.full((512, 512, 3), 240, np.uint8)
    tifffile.imwrite(path, glass, tile=(256, 256), photometric="rgb")
    return path


def invoke(args: list[str]) -> Result:
    """Run `patchetl ARGS` in-process."""
    return CliRunner().invoke(app, args)


# --- labels ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label, grid",
    [
        (FLAT9, GRID9),
        (FLAT4, GRID4),
        ([[0, 1, 0], [0, 0, 0], [1, 0, 0]], ((0, 1, 0), (0, 0, 0), (1, 0, 0))),  # nested: row-major
        ([[1, 0], [0, 0]], ((1, 0), (0, 0))),
        ([1], ((1,),)),
        (0, ((0,),)),  # a bare number labels the whole region
        ([True, 0.0, 1.0, False], ((1, 1), (0, 0))),  # bools and 0.0/1.0 floats are accepted
    ],
)
def test_labels_become_row_major(tmp_path: Path, label: object, grid: tuple) -> None:
    path = write_json(tmp_path / "d.json", {"training": [entry(label=label)]})
    (region,) = load_regions(path, data_root=tmp_path).regions
    assert region.labels == grid
    assert region.grid == len(grid)
    assert all(type(v) is int for row in region.labels for v in row)


# --- location order and anchor ------------------------------------------------------------


def test_location_order_yx_and_xy(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", {"training": [entry(location=(10, 20))]})
    yx = load_regions(path, data_root=tmp_path).regions[0]
    xy = load_regions(path, data_root=tmp_path, location_order="xy").regions[0]
    assert (yx.x, yx.y) == (20, 10)
    assert (xy.x, xy.y) == (10, 20)


@pytest.mark.parametrize("size, shift", [(768, 384), (256, 128), (5, 2)])
def test_corner_anchor_moves_to_centre(tmp_path: Path, size: int, shift: int) -> None:
    path = write_json(tmp_path / "d.json", {"training": [entry(location=(100, 200))]})
    r = load_regions(path, data_root=tmp_path, anchor="corner", region_size=size).regions[0]
    assert (r.x, r.y) == (200 + shift, 100 + shift)
    csv = tmp_path / "c.csv"
    csv.write_text("tumor_001,200,100," + ",".join(map(str, FLAT9)) + "\n")
    c = load_regions(csv, data_root=tmp_path, anchor="corner", region_size=size).regions[0]
    assert (c.x, c.y) == (r.x, r.y)


@pytest.mark.parametrize(
    "option", [{"location_order": "zz"}, {"anchor": "middle"}, {"region_size": 0}, {"fmt": "xml"}]
)
def test_bad_options_raise_value_error(tmp_path: Path, option: dict) -> None:
    path = write_json(tmp_path / "d.json", {"training": [entry()]})
    with pytest.raises(ValueError, match=next(iter(option))):
        parse_coordinates(path, **option)


# --- JSON and CSV agree -------------------------------------------------------------------


@pytest.mark.parametrize("header", ["", "name,x,y,l0,l1,l2,l3,l4,l5,l6,l7,l8\n"])
def test_json_and_csv_give_the_same_table(tmp_path: Path, header: str) -> None:
    touch(tmp_path / "tumor_001.tif")
    touch(tmp_path / "training" / "images" / "normal_002.tif")
    regions = [
        ("tumor_001", 200, 100, FLAT9),
        ("normal_002", 5, 7, [0] * 9),
        ("tumor_001", 300, 400, [0, 0, 0, 1, 1, 1, 0, 0, 0]),
    ]
    js = write_json(
        tmp_path / "d.json",
        {
            "training": [
                {"image": f"{n}.tif", "location": [y, x], "label": lab} for n, x, y, lab in regions
            ]
        },
    )
    csv = tmp_path / "pathology_train.csv"
    csv.write_text(
        header + "".join(f"{n},{x},{y},{','.join(map(str, lab))}\n" for n, x, y, lab in regions)
    )
    a, b = load_regions(js, data_root=tmp_path), load_regions(csv, data_root=tmp_path)

    def key(t: RegionTable) -> list:
        return [
            (r.split, r.index, r.image, r.slide, r.x, r.y, r.labels, r.exists) for r in t.regions
        ]

    assert key(a) == key(b)
    assert [r.slide for r in a.regions][:2] == [
        tmp_path / "tumor_001.tif",
        tmp_path / "training" / "images" / "normal_002.tif",
    ]
    assert a.regions[2].labels == ((0, 1, 0), (0, 1, 0), (0, 1, 0))


def test_csv_split_name(tmp_path: Path) -> None:
    row = "t,1,2,0\n"
    for name, split in [
        ("pathology_valid.csv", "validation"),
        ("coords_test.csv", "testing"),
        ("pathology_train.csv", "training"),
        ("coords.csv", "training"),
    ]:
        (tmp_path / name).write_text(row)
        assert list(load_regions(tmp_path / name, data_root=tmp_path).splits()) == [split]
    table = load_regions(tmp_path / "coords.csv", data_root=tmp_path, split="validation")
    assert table.regions[0].split == "validation"
    assert table.regions[0].image == "t.tif"  # default_ext appended to a bare name
    table = load_regions(tmp_path / "coords.csv", data_root=tmp_path, default_ext=".svs")
    assert table.regions[0].slide == tmp_path / "t.svs"


def test_json_split_filter(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "d.json",
        {"training": [entry()], "validation": [entry("v.tif")], "testing": [entry("t.tif")]},
    )
    table = load_regions(path, data_root=tmp_path, split=["validation", "testing"])
    assert list(table.splits()) == ["validation", "testing"]
    errors = parse_coordinates(path, data_root=tmp_path, split="nope").errors
    assert "split 'nope' not in the file" in str(errors[0])


def test_decathlon_style_metadata_keys_are_skipped_with_a_warning(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "d.json",
        {
            "name": "Camelyon16 regions",
            "description": "tumor detection",
            "numTraining": 1,
            "labels": {"0": "normal", "1": "tumor"},
            "training": [entry()],
        },
    )
    table = load_regions(path, data_root=tmp_path)
    assert list(table.splits()) == ["training"] and len(table.regions) == 1
    skipped = [str(w) for w in table.warnings]
    assert len(skipped) == 4 and all("skipped as metadata" in w for w in skipped)
    assert any("'labels' (an object)" in w for w in skipped)
    # asked for by name, a metadata key is checked as a split (and is an error)
    errors = parse_coordinates(path, data_root=tmp_path, split="labels").errors
    assert "split 'labels' is an object, not a list" in str(errors[0])


# --- slide resolution ---------------------------------------------------------------------


def test_data_root_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    direct = touch(root / "a.tif")
    touch(root / "training" / "images" / "a.tif")  # shadowed by the direct candidate
    fallback = touch(root / "training" / "images" / "b.tif")
    absolute = touch(tmp_path / "elsewhere" / "c.tif")
    path = write_json(
        tmp_path / "d.json",
        {"training": [entry("a.tif"), entry("b.tif"), entry(str(absolute)), entry("missing.tif")]},
    )
    table = load_regions(path, data_root=root)
    assert [r.slide for r in table.regions] == [direct, fallback, absolute, root / "missing.tif"]
    assert [r.exists for r in table.regions] == [True, True, True, False]
    assert table.slides_missing() == [root / "missing.tif"]

    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    assert default_data_root() == root
    assert load_regions(path).regions[1].slide == fallback
    monkeypatch.delenv(DATA_ROOT_ENV)
    assert default_data_root() == Path("/workspace/data/medical/pathology")


# --- bad input: every error names file, entry and field -----------------------------------

OK = entry()
BAD_JSON = [
    # (id, file content, expected "where", expected message fragment)
    ("syntax", '{"training": [\n  {"image": "a.tif",, }]}', "", "invalid JSON at line 2, column"),
    ("top-level", [OK], "", "top level is a list, not an object"),
    ("no-splits", {}, "", "no splits at all"),
    ("split-not-list", {"training": OK}, "", "split 'training' is an object, not a list"),
    (
        "only-metadata",
        {"name": "x", "labels": {"0": "normal"}},
        "",
        "no splits: no top-level key holds a list of entries (keys: 'name', 'labels')",
    ),
    ("empty-split", {"training": [OK], "validation": []}, "", "split 'validation' is empty"),
    ("entry-not-object", {"training": [OK, "a.tif"]}, "training[1]: ", "entry is a string"),
    (
        "missing-image",
        {"training": [OK, {"location": [1, 2], "label": [0]}]},
        "training[1].image: ",
        "missing key 'image'",
    ),
    (
        "missing-location",
        {"training": [OK, {"image": "a.tif", "label": [0]}]},
        "training[1].location: ",
        "missing key 'location'",
    ),
    (
        "missing-label",
        {"training": [OK, {"image": "a.tif", "location": [1, 2]}]},
        "training[1].label: ",
        "missing key 'label'",
    ),
    (
        "image-not-string",
        {"training": [OK, entry(image=7)]},
        "training[1].image: ",
        "not a non-empty",
    ),
    (
        "location-3",
        {"training": [OK, entry(location=[1, 2, 3])]},
        "training[1].location: ",
        "list of 2 numbers, got 3 values",
    ),
    (
        "location-scalar",
        {"training": [OK, entry(location=5)]},
        "training[1].location: ",
        "list of 2 numbers, got a number",
    ),
    (
        "location-text",
        {"training": [OK, entry(location=["12", 4])]},
        "training[1].location: ",
        "y is not a number: '12'",
    ),
    (
        "location-float",
        {"training": [OK, entry(location=[1.5, 4])]},
        "training[1].location: ",
        "y is not an integer: 1.5",
    ),
    (
        "location-negative",
        {"training": [OK, entry(location=[5, -3])]},
        "training[1].location: ",
        "negative value -3 for x",
    ),
    (
        "label-length",
        {"training": [OK, entry(label=[0, 1, 0])]},
        "training[1].label: ",
        "3 values, not 1 or a square",
    ),
    ("label-empty", {"training": [OK, entry(label=[])]}, "training[1].label: ", "empty label"),
    (
        "label-nested-shape",
        {"training": [OK, entry(label=[[0, 1], [0]])]},
        "training[1].label: ",
        "nested label must be 2 rows of 2 values",
    ),
    (
        "label-nested-mixed",
        {"training": [OK, entry(label=[[0, 1], 0])]},
        "training[1].label: ",
        "nested label must be 2 rows",
    ),
    (
        "label-value",
        {"training": [OK, entry(label=[0, 2, 0, 0.5])]},
        "training[1].label: ",
        "label[1] = 2 is not 0 or 1; label[3] = 0.5 is not 0 or 1",
    ),
    (
        "label-text",
        {"training": [OK, entry(label=["1"])]},
        "training[1].label: ",
        "label[0] = '1' is not 0 or 1",
    ),
    (
        "label-nested-value",
        {"training": [OK, entry(label=[[0, 0], [None, 0]])]},
        "training[1].label: ",
        "label[1][0] = None",
    ),
    (
        "conflicting-duplicate",
        {"training": [OK], "validation": [entry(label=[1] * 9)]},
        "validation[0].label: ",
        "conflicting duplicate: same slide tumor_001.tif and centre x=200, y=100 as training[0]",
    ),
]
BAD_CSV = [
    ("x-text", "t1,10,20,1\nt2,abc,20,1\n", "line 2, x: ", "x is not a number: 'abc'"),
    ("y-negative", "t1,10,20,1\n\nt2,10,-4,1\n", "line 3, y: ", "negative value -4 for y"),
    ("no-labels", "name,x,y\nt1,10,20\n", "line 2, label: ", "3 column(s); no labels"),
    ("label-count", "t1,10,20,1,0\n", "line 1, label: ", "2 values, not 1 or a square"),
    (
        "label-value",
        "t1,10,20,0,0,0,0,0,0,0,0,x\n",
        "line 1, label: ",
        "label[8] is not a number: 'x'",
    ),
    ("empty-name", ",10,20,1\n", "line 1, name: ", "empty slide name"),
    ("header-yx", "name,y,x,label\nt1,10,20,1\n", "line 1: ", "header names columns 'y,x'"),
    ("empty", "name,x,y,l0\n", "", "split 'training' is empty"),
    ("conflict", "t1,10,20,1\nt1,10,20,0\n", "line 2, label: ", "as line 1 but different"),
]
CASES = [(f"json-{i}", "bad.json", c, w, m) for i, c, w, m in BAD_JSON] + [
    (f"csv-{i}", "bad.csv", c, w, m) for i, c, w, m in BAD_CSV
]


def write_case(tmp_path: Path, name: str, content: object) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize(
    "name, content, where, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_reported(
    tmp_path: Path, name: str, content: object, where: str, message: str
) -> None:
    path = write_case(tmp_path, name, content)
    table = parse_coordinates(path, data_root=tmp_path)
    texts = [str(p) for p in table.errors]
    assert any(t.startswith(f"{path}: {where}") and message in t for t in texts), texts
    assert all(p.hint for p in table.errors), "every error carries a hint how to fix it"
    with pytest.raises(CoordsError) as info:
        load_regions(path, data_root=tmp_path)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "name, content, where, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_cli_inspect_fails_with_the_message(
    tmp_path: Path, name: str, content: object, where: str, message: str
) -> None:
    touch(tmp_path / "tumor_001.tif")
    path = write_case(tmp_path, name, content)
    flag = "--csv" if name.endswith(".csv") else "--json"
    result = invoke(["inspect", flag, str(path), "--data-root", str(tmp_path)])
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert any(f"{path}: {where}" in line and message in line for line in lines), result.output


def test_all_problems_are_collected(tmp_path: Path) -> None:
    bad = [entry(location=[i, -1]) for i in range(60)]
    path = write_json(
        tmp_path / "d.json", {"training": [entry(label=[0, 1, 0]), *bad], "validation": []}
    )
    table = parse_coordinates(path, data_root=tmp_path)
    assert len(table.errors) == 62 and table.regions == []
    text = str(CoordsError(table.errors))
    assert text.startswith("62 error(s):") and "... and 12 more" in text
    assert "training[0].label" in text


def test_unreadable_file_is_a_problem(tmp_path: Path) -> None:
    table = parse_coordinates(tmp_path / "nope.json")
    assert "cannot read the file" in str(table.errors[0])
    other = write_case(tmp_path, "coords.txt", "t1,1,2,0\n")  # unknown suffix: tried as JSON
    assert "rename the file if it is a CSV" in str(parse_coordinates(other).errors[0])
    assert load_regions(other, data_root=tmp_path, fmt="csv").regions[0].x == 1


# --- duplicates and the report ------------------------------------------------------------


def test_duplicates_warn_are_counted_and_first_kept(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "d.json",
        {
            "training": [entry(), entry("b.tif"), entry()],
            "validation": [entry(str(tmp_path / "tumor_001.tif"))],  # same resolved slide
        },
    )
    table = load_regions(path, data_root=tmp_path)
    assert [(r.split, r.index) for r in table.regions] == [("training", 0), ("training", 1)]
    assert table.duplicates == 2 and not table.errors
    texts = [str(w) for w in table.warnings]
    assert "training[2]: duplicate" in texts[0] and "as training[0]" in texts[0]
    assert "validation[0]: duplicate" in texts[1]
    assert "2 duplicate(s) dropped" in inspect_report(table)


def test_inspect_report_and_cli_counts(tmp_path: Path) -> None:
    tiny_slide(tmp_path / "tumor_001.tif")
    tiny_slide(tmp_path / "normal_001.tif")
    path = write_json(
        tmp_path / "d.json",
        {
            "training": [
                entry(),
                entry(location=[1, 1], label=[0]),
                entry("normal_001.tif", label=[0]),
            ],
            "validation": [
                entry("normal_001.tif", location=[9, 9], label=[[0, 1], [0, 0]]),
                entry("normal_001.tif", location=[9, 9], label=[[0, 1], [0, 0]]),
            ],
        },
    )
    report = inspect_report(load_regions(path, data_root=tmp_path))
    lines = [line.split() for line in report.splitlines()]
    assert ["training", "3", "2", "1", "2"] in lines  # regions, slides, tumor, normal
    assert ["validation", "1", "1", "1", "0"] in lines
    assert ["tumor_001.tif", "2", "1", "1", "yes"] in lines
    assert ["normal_001.tif", "2", "1", "1", "yes"] in lines
    assert "regions: 2 with tumor (any cell 1), 2 all normal" in report
    assert "cells: 4 tumor (1), 11 normal (0)" in report
    assert "validation[1]: duplicate" in report

    result = invoke(["inspect", "--json", str(path), "--data-root", str(tmp_path)])
    assert result.exit_code == 0, result.output  # warnings alone pass
    assert "tumor_001.tif" in result.output and "warnings (1)" in result.output

    (tmp_path / "normal_001.tif").unlink()
    result = invoke(["inspect", "--json", str(path), "--data-root", str(tmp_path)])
    assert result.exit_code == 2
    assert "MISSING" in result.output and "1 missing slide(s)" in result.output


def test_inspect_opens_every_slide_as_preflight_does(tmp_path: Path) -> None:
    """A file that exists but is no slide (/etc/passwd, an empty file) is reported, exit 2."""
    tiny_slide(tmp_path / "tumor_001.tif")
    touch(tmp_path / "empty.tif")
    path = write_json(
        tmp_path / "d.json",
        {"training": [entry(), entry("/etc/passwd"), entry(str(tmp_path / "empty.tif"))]},
    )
    result = invoke(["inspect", "--json", str(path), "--data-root", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "2 unreadable slide(s)" in result.output and "no problems found" not in result.output
    lines = [line.split() for line in result.output.splitlines()]
    assert ["/etc/passwd", "1", "1", "0", "UNREADABLE"] in lines
    assert ["tumor_001.tif", "1", "1", "0", "yes"] in lines
    assert "/etc/passwd: cannot be opened" in result.output


def test_cli_usage_errors(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", {"training": [entry()]})
    assert "exactly one of --json" in invoke(["inspect"]).output
    both = invoke(["inspect", "--json", str(path), "--csv", str(path)])
    assert both.exit_code == 2 and "exactly one of --json" in both.output
    bad = invoke(["inspect", "--json", str(path), "--anchor", "middle"])
    assert bad.exit_code == 2 and "anchor must be one of" in bad.output


def test_problem_str_format() -> None:
    p = Problem(
        Path("dataset_0.json"),
        "training",
        12,
        "location",
        "negative value -3",
        "locations are level-0 pixels >= 0",
    )
    assert str(p) == (
        "dataset_0.json: training[12].location: negative value -3 "
        "(locations are level-0 pixels >= 0)"
    )
