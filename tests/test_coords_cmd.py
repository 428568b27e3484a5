"""`patchetl coords` (etl/cohort): coordinate files from slides and their annotations, on
synthetic slides whose polygons are known (etl.synth writes slides + ASAP XML; the tests write
QuPath GeoJSON of the same polygons)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import etl.cohort.slide
from etl.cli import app
from etl.cohort.geometry import Footprint
from etl.cohort.labels import FRACTION_SAMPLES, tumor_shares
from etl.cohort.run import make_coords
from etl.cohort.splits import assign_splits
from etl.cohort.truth import PolygonTruth
from etl.config import CohortOptions, SamplingOptions
from etl.synth.cohort import synth_cohort
from etl.synth.regions import region_labels
from etl.wsi.annotations import Annotations, points_in_polygons, read_asap_xml
from etl.wsi.masks import write_mask
from etl.wsi.reader import open_slide
from etl.wsi.tissue import tissue_mask

REPO = Path(__file__).resolve().parents[1]
SIZE, REGION, DS = 2048, 384, 16
EXCLUDE_BOX = (700.0, 700.0, 1300.0, 1300.0)  # an Ignore* rectangle, in the middle of tissue


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """3 synthetic slides of 2048 x 2048 at 1 um/px (2 with tumor), ASAP XML of their lesions,
    and QuPath GeoJSON of the same polygons (+ an Ignore* rectangle) in another folder."""
    root = tmp_path_factory.mktemp("cohort")
    synth = synth_cohort(
        root,
        n_slides=3,
        width=SIZE,
        height=SIZE,
        mpp=1.0,
        tumor_fraction=0.67,
        regions_per_slide=1,
        seed=5,
    )
    polys = {s.name: read_asap_xml(s.xml) if s.xml else [] for s in synth.slides}
    geo, geo_excl = root / "geojson", root / "geojson_exclusions"
    for folder, with_excl in ((geo, False), (geo_excl, True)):
        folder.mkdir()
        for name, p in polys.items():
            if p or with_excl:
                write_geojson(folder / f"{name}.geojson", p, with_excl, multi=name == "tumor_002")
    return {
        "root": root,
        "images": root / "training" / "images",
        "xml": root / "training" / "annotations",
        "masks": root / "training" / "masks",
        "geojson": geo,
        "geojson_excl": geo_excl,
        "polys": polys,
    }


def ring(poly) -> list[list[float]]:
    pts = [[float(x), float(y)] for x, y in poly]
    return [*pts, pts[0]]


def write_geojson(path: Path, tumor, exclusion: bool, multi: bool) -> None:
    """QuPath-style GeoJSON: a FeatureCollection of Tumor polygons (one MultiPolygon when
    ``multi``), plus an Ignore* rectangle when ``exclusion``."""

    def feature(cls: str, geometry: dict) -> dict:
        props = {"objectType": "annotation", "classification": {"name": cls, "color": [1, 2, 3]}}
        return {"type": "Feature", "id": cls, "geometry": geometry, "properties": props}

    if multi:
        feats = [
            feature("Tumor", {"type": "MultiPolygon", "coordinates": [[ring(p)] for p in tumor]})
        ]
    else:
        feats = [feature("Tumor", {"type": "Polygon", "coordinates": [ring(p)]}) for p in tumor]
    if exclusion:
        x0, y0, x1, y1 = EXCLUDE_BOX
        box = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        feats.append(feature("Ignore*", {"type": "Polygon", "coordinates": [ring(box)]}))
    feats.append(
        feature("Stroma", {"type": "Polygon", "coordinates": [ring([(1, 1), (9, 1), (9, 9)])]})
    )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def run(cohort, tmp_path, annotations="xml", out="d.json", **sampling):
    opts = dict(
        region_size=REGION,
        tumor_per_slide=12,
        normal_per_slide=12,
        margin=64,
        min_spacing=64,
        tissue_downsample=DS,
    )
    opts.update(sampling)
    cohort_kw = {
        k: opts.pop(k)
        for k in (
            "workers",
            "seed",
            "unannotated",
            "patients",
            "val_fraction",
            "test_fraction",
            "strict",
        )
        if k in opts
    }
    return make_coords(
        CohortOptions(
            slides=cohort["images"],
            annotations=cohort[annotations] if annotations else None,
            out=tmp_path / out,
            workers=cohort_kw.pop("workers", 1),
            progress=False,
            **cohort_kw,
        ),
        SamplingOptions(**opts),
    )


def entries(path: Path) -> list[tuple[str, int, int, list[int]]]:
    data = json.loads(path.read_text())
    return [
        (e["image"], e["location"][1], e["location"][0], e["label"])
        for split in data.values()
        for e in split
    ]


def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


# --------------------------------------------------------------------------- sampling
def test_every_sampled_centre_lies_in_the_class_it_claims(cohort, tmp_path):
    result = run(cohort, tmp_path)
    assert sum(len(o.centres) for o in result.outcomes) == 12 * 2 + 12 * 3
    for o in result.outcomes:
        polys = cohort["polys"][o.name]
        x, y = o.centres[:, 0], o.centres[:, 1]
        assert np.array_equal(points_in_polygons(o.centres, polys), o.tumor)
        with open_slide(cohort["images"] / o.image) as reader:
            tissue = tissue_mask(reader, downsample=DS)
        normal = ~o.tumor
        assert tissue.at(x[normal], y[normal]).all()  # normal centres on tissue
        for cx, cy in o.centres[normal]:  # at least --margin from every lesion edge
            for p in polys:
                a, b = p, np.roll(p, -1, axis=0)
                t = np.clip(
                    ((cx - a[:, 0]) * (b[:, 0] - a[:, 0]) + (cy - a[:, 1]) * (b[:, 1] - a[:, 1]))
                    / ((b - a) ** 2).sum(1),
                    0,
                    1,
                )
                d = np.hypot(
                    a[:, 0] + t * (b[:, 0] - a[:, 0]) - cx, a[:, 1] + t * (b[:, 1] - a[:, 1]) - cy
                )
                assert d.min() >= 64
        half = REGION // 2  # regions inside the slide, centres at least min_spacing apart
        assert (x >= half).all() and (x + REGION - half <= SIZE).all()
        assert (y >= half).all() and (y + REGION - half <= SIZE).all()
        gaps = np.hypot(*(o.centres[:, None, :] - o.centres[None, :, :]).transpose(2, 0, 1))
        assert gaps[~np.eye(len(gaps), dtype=bool)].min() >= 64


def test_centre_rule_labels_equal_the_exact_polygon_test(cohort, tmp_path):
    result = run(cohort, tmp_path, mode="grid", min_tissue=0.0)
    rows = entries(result.paths.datalist)
    assert any(0 < sum(r[3]) < 9 for r in rows)  # mixed regions exist: the test can tell
    for image, x, y, label in rows:
        polys = cohort["polys"][image.removesuffix(".tif")]
        expected = region_labels(np.array([[x, y]]), polys, REGION, 3)[0]  # column by column
        assert label == expected.tolist()


def exact_area(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> float:
    """Area of a polygon clipped to a rectangle (Sutherland-Hodgman, exact for a convex clip)."""
    pts = [tuple(p) for p in poly]
    for axis, bound, keep_above in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        out = []
        for i in range(len(pts)):
            p, q = pts[i - 1], pts[i]
            p_in = p[axis] >= bound if keep_above else p[axis] <= bound
            q_in = q[axis] >= bound if keep_above else q[axis] <= bound
            if p_in != q_in:
                t = (bound - p[axis]) / (q[axis] - p[axis])
                out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
            if q_in:
                out.append(q)
        pts = out
        if not pts:
            return 0.0
    xs, ys = np.array(pts).T
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def test_fraction_rule_labels_follow_the_exact_tumor_area_within_the_stated_tolerance(
    cohort, tmp_path
):
    """Tolerance: 1/16 (two border crossings per sample column at 1/32 each, labels.py)."""
    tol = 2 / (2 * FRACTION_SAMPLES)
    result = run(
        cohort, tmp_path, mode="grid", min_tissue=0.0, label_rule="fraction", label_threshold=0.5
    )
    cs = REGION // 3
    mixed = 0
    for o in result.outcomes:
        polys = cohort["polys"][o.name]
        measured = tumor_shares(
            PolygonTruth(Annotations(polys, [])),
            o.centres,
            Footprint.of(REGION),
            3,
            FRACTION_SAMPLES,
        )
        for (x, y), label, share in zip(o.centres, o.labels, measured, strict=True):
            x0, y0 = x - REGION // 2, y - REGION // 2
            for row in range(3):
                for col in range(3):
                    box = (x0 + col * cs, y0 + row * cs, x0 + (col + 1) * cs, y0 + (row + 1) * cs)
                    exact = sum(exact_area(p, *box) for p in polys) / cs**2  # lesions never overlap
                    assert abs(share[row, col] - exact) <= tol
                    mixed += 0.1 < exact < 0.9
                    if abs(exact - 0.5) > tol:
                        assert label[3 * col + row] == (exact >= 0.5)
    assert mixed >= 5


def test_exclusion_areas_are_never_sampled(cohort, tmp_path):
    x0, y0, x1, y1 = EXCLUDE_BOX
    box = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    for mode in ("grid", "sample"):
        plain = run(
            cohort,
            tmp_path,
            "geojson",
            f"plain_{mode}.json",
            mode=mode,
            min_tissue=0.0,
            normal_per_slide=60,
            min_spacing=32,
        )
        excl = run(
            cohort,
            tmp_path,
            "geojson_excl",
            f"excl_{mode}.json",
            mode=mode,
            min_tissue=0.0,
            normal_per_slide=60,
            min_spacing=32,
        )
        inside = [points_in_polygons(o.centres, [np.array(box)]).sum() for o in plain.outcomes]
        assert sum(inside) > 0  # without the exclusion, centres do fall in the box
        for o in excl.outcomes:
            assert not points_in_polygons(o.centres, [np.array(box)]).any()
            assert any("centre in an exclusion area" in c for c in o.left_out.values())
            assert o.ignored == {"class Stroma": 1}


def test_grid_mode_covers_the_tissue(cohort, tmp_path):
    result = run(cohort, tmp_path, annotations=None, mode="grid", min_tissue=0.0)
    for o in result.outcomes:
        with open_slide(cohort["images"] / o.image) as reader:
            tissue = tissue_mask(reader, downsample=DS)
        r, c = np.nonzero(tissue.mask)
        px, py = (c + 0.5) * DS, (r + 0.5) * DS
        lo = o.centres - REGION // 2
        covered = (
            (px[:, None] >= lo[None, :, 0])
            & (px[:, None] < lo[None, :, 0] + REGION)
            & (py[:, None] >= lo[None, :, 1])
            & (py[:, None] < lo[None, :, 1] + REGION)
        )
        assert len(px) > 100 and covered.any(axis=1).all()
        assert (lo >= 0).all() and (lo + REGION <= SIZE).all()
        assert len(np.unique(o.centres, axis=0)) == len(o.centres)


def test_geojson_and_xml_of_the_same_polygons_give_the_same_coordinates(cohort, tmp_path):
    xml = run(cohort, tmp_path, "xml", "xml.json")
    geo = run(cohort, tmp_path, "geojson", "geo.json")
    assert xml.paths.datalist.read_bytes() == geo.paths.datalist.read_bytes()
    for split in xml.paths.csvs:
        assert xml.paths.csvs[split].read_bytes() == geo.paths.csvs[split].read_bytes()
    kinds = {s["slide"]: s["annotation_kind"] for s in geo.summary["slides"]}
    assert kinds == {"normal_001": "none", "tumor_001": "geojson", "tumor_002": "geojson"}


def test_same_seed_gives_byte_identical_output_whatever_the_workers(cohort, tmp_path):
    first = run(cohort, tmp_path, seed=3)
    files = [first.paths.datalist, first.paths.summary, *first.paths.csvs.values()]
    before = [p.read_bytes() for p in files]
    again = run(cohort, tmp_path, seed=3, workers=2)
    assert [p.read_bytes() for p in files] == before
    assert again.paths.datalist == first.paths.datalist
    run(cohort, tmp_path, seed=4)
    assert first.paths.datalist.read_bytes() != before[0]


def test_mask_tiffs_give_labels_close_to_the_polygons(cohort, tmp_path):
    result = run(cohort, tmp_path, "masks", mode="grid", min_tissue=0.0)
    cells = agree = 0
    for image, x, y, label in entries(result.paths.datalist):
        exact = region_labels(np.array([[x, y]]), cohort["polys"][image[:-4]], REGION, 3)[0]
        cells += 9
        agree += int((np.array(label) == exact).sum())
    assert agree / cells > 0.97 and {s["annotation_kind"] for s in result.summary["slides"]} == {
        "mask",
        "none",
    }


def test_only_low_resolution_levels_are_read(cohort, tmp_path, monkeypatch):
    levels: list[int] = []

    def recording_open(path, **kw):
        reader = open_slide(path, **kw)
        read = reader.read_region

        def read_region(x0, y0, level, w, h):
            levels.append(level)
            return read(x0, y0, level, w, h)

        reader.read_region = read_region
        return reader

    monkeypatch.setattr(etl.cohort.slide, "open_slide", recording_open)
    run(cohort, tmp_path)
    assert levels and 0 not in levels


# --------------------------------------------------------------------------- options
def test_tumor_share_and_max_regions_balance_the_cohort(cohort, tmp_path):
    plain = run(cohort, tmp_path).summary["totals"]
    assert (plain["tumor_regions"], plain["regions"]) == (24, 60)  # 2 tumor slides x 12, 3 x 12
    share = run(cohort, tmp_path, tumor_share=0.25).summary["totals"]
    assert (share["tumor_regions"], share["regions"], share["dropped_for_balance"]) == (12, 48, 12)
    capped = run(cohort, tmp_path, max_regions=20).summary["totals"]
    assert (capped["tumor_regions"], capped["regions"]) == (8, 20)  # the 24 : 36 share kept


def test_unannotated_slides_are_tumor_free_or_skipped(cohort, tmp_path):
    kept = run(cohort, tmp_path)
    normal = next(s for s in kept.summary["slides"] if s["slide"] == "normal_001")
    assert normal["regions"] == {"tumor": 0, "normal": 12} and normal["annotation"] is None
    skipped = run(cohort, tmp_path, "xml", "skip.json", unannotated="skip")
    assert [s["slide"] for s in skipped.summary["skipped_slides"]] == ["normal_001"]
    assert all(not e[0].startswith("normal") for e in entries(skipped.paths.datalist))


def test_splits_are_by_slide_stratified_and_keep_patients_together():
    has_tumor = {f"t{i}": True for i in range(5)} | {f"n{i}": False for i in range(7)}
    split_of, warnings = assign_splits(has_tumor, None, 0.25, 0.25, seed=0)
    assert not warnings
    for split in ("training", "validation", "testing"):
        members = [n for n, s in split_of.items() if s == split]
        assert {has_tumor[n] for n in members} == {True, False}
    patients = {n: ("p0" if n in ("t0", "t1", "n0") else n) for n in has_tumor}
    for seed in range(5):
        split_of, _ = assign_splits(has_tumor, patients, 0.25, 0.0, seed=seed)
        assert len({split_of[n] for n in ("t0", "t1", "n0")}) == 1
        assert set(split_of.values()) == {"training", "validation"}
    _, warnings = assign_splits({"t0": True, "n0": False}, None, 0.5, 0.0, seed=0)
    assert any("validation has no" in w for w in warnings)


# --------------------------------------------------------------------------- CLI and bad input
def test_inspect_extract_and_qc_work_on_the_output_unchanged(cohort, tmp_path):
    out = tmp_path / "c" / "dataset_0.json"
    res = invoke(
        [
            "coords",
            "--slides",
            cohort["images"],
            "--annotations",
            cohort["geojson"],
            "--out",
            out,
            "--region-size",
            REGION,
            "--tumor-per-slide",
            3,
            "--normal-per-slide",
            2,
            "--workers",
            1,
            "--no-progress",
            "--val-fraction",
            0.34,
        ]
    )
    assert res.exit_code == 0, res.output
    assert "tumor_001" in res.output and "wrote" in res.output
    root = ["--data-root", cohort["images"]]
    res = invoke(["inspect", "--json", out, *root])
    assert res.exit_code == 0 and "no problems found" in res.output, res.output
    res = invoke(["inspect", "--csv", out.with_name("dataset_0_validation.csv"), *root])
    assert res.exit_code == 0, res.output
    res = invoke(
        [
            "extract",
            "--json",
            out,
            *root,
            "--out",
            tmp_path / "shards",
            "--workers",
            1,
            "--region-size",
            REGION,
            "--no-progress",
        ]
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "shards" / "training" / "manifest.json").read_text())
    n = len(json.loads(out.read_text())["training"])
    assert sum(s["count"] for s in manifest["shards"]) == n
    res = invoke(["qc", "--json", out, *root, "--out", tmp_path / "qc", "--region-size", REGION])
    assert res.exit_code == 0 and "0 not inside the slide" in res.output, res.output


def test_every_bad_input_is_listed_together_exit_2_and_nothing_written(cohort, tmp_path):
    slides, ann = tmp_path / "slides", tmp_path / "ann"
    slides.mkdir()
    ann.mkdir()
    for name in ("tumor_001", "tumor_002", "normal_001"):
        (slides / f"{name}.tif").symlink_to(cohort["images"] / f"{name}.tif")
    square = '<Coordinate Order="{}" X="{}" Y="{}" />'
    pair = "".join(square.format(k, x, y) for k, (x, y) in enumerate([(0, 0), (50, 50), (0, 0)]))
    far = "".join(
        square.format(k, x, y) for k, (x, y) in enumerate([(5000, 10), (5100, 10), (5100, 90)])
    )
    (ann / "tumor_001.xml").write_text(
        f'<ASAP_Annotations><Annotations><Annotation Name="knot" PartOfGroup="_0"><Coordinates>'
        f'{pair}</Coordinates></Annotation><Annotation Name="away" PartOfGroup="_1"><Coordinates>'
        f"{far}</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )
    (ann / "tumor_002.geojson").write_text("")
    write_mask(
        ann / "normal_001_mask.tif",
        np.zeros((10, 10), np.uint8),
        downsample=16,
        width=160,
        height=160,
    )
    (ann / "tumor_003.xml").write_text((cohort["xml"] / "tumor_001.xml").read_text())
    (ann / "notes.txt").write_text("hello")
    out = tmp_path / "out" / "d.json"
    res = invoke(
        [
            "coords",
            "--slides",
            slides,
            "--annotations",
            ann,
            "--out",
            out,
            "--no-progress",
            "--workers",
            1,
        ]
    )
    assert res.exit_code == 2, res.output
    text = res.output
    for expected in (
        "tumor_001.xml: annotation 'knot' (#0, group _0): polygon has 2 distinct vertex(es)",
        "tumor_001.xml: annotation 'away' (#1, group _1): polygon (x 5000..5100, y 10..90) lies "
        "outside its slide (2048 x 2048 px)",
        "tumor_002.geojson: the file is empty",
        "normal_001_mask.tif: mask is 160 x 160 px at level 0 but its slide is 2048 x 2048",
        "tumor_003.xml: annotation file without a slide",
        "notes.txt: unknown annotation file type",
        "6 error(s)",
    ):
        assert expected in text, expected
    assert "Traceback" not in text and not out.parent.exists()


def test_too_little_tissue_is_a_warning_and_strict_makes_it_an_error(cohort, tmp_path):
    out = tmp_path / "d.json"
    args = [
        "coords",
        "--slides",
        cohort["images"],
        "--annotations",
        cohort["xml"],
        "--out",
        out,
        "--normal-per-slide",
        300,
        "--min-spacing",
        96,
        "--region-size",
        REGION,
        "--no-progress",
        "--workers",
        1,
    ]
    res = invoke([*args, "--strict"])
    assert res.exit_code == 2 and "of 300 normal region(s)" in res.output, res.output
    assert "--strict" in res.output and not out.exists()
    res = invoke(args)
    assert res.exit_code == 0 and "warning:" in res.output and out.exists(), res.output
    summary = json.loads(out.with_name("d.summary.json").read_text())
    assert all(any("of 300 normal" in w for w in s["warnings"]) for s in summary["slides"])


def test_a_write_cut_short_by_the_file_size_limit_leaves_the_previous_outputs_whole(
    cohort, tmp_path
):
    """RLIMIT_FSIZE in the child: the summary cannot be written; the datalist and CSVs of the
    previous run stay as they were (they would be half new if files were renamed one by one)."""
    first = run(cohort, tmp_path, out="d.json", seed=1)
    files = sorted(tmp_path.glob("d*"))
    before = {p: p.read_bytes() for p in files}
    limit = max(len(b) for p, b in before.items() if p.suffix == ".csv") + 200
    assert limit < len(before[first.paths.summary])

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = "import sys; from etl.cli import app; sys.argv[0] = 'patchetl'; app()"
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "coords",
            "--slides",
            str(cohort["images"]),
            "--annotations",
            str(cohort["xml"]),
            "--out",
            str(tmp_path / "d.json"),
            "--seed",
            "2",
            "--region-size",
            str(REGION),
            "--tumor-per-slide",
            "12",
            "--normal-per-slide",
            "12",
            "--margin",
            "64",
            "--min-spacing",
            "64",
            "--tissue-downsample",
            str(DS),
            "--workers",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        preexec_fn=cap,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert res.returncode == 2, res.stderr
    assert "cannot write it" in res.stderr and "Traceback" not in res.stderr
    assert sorted(tmp_path.glob("d*")) == files
    assert {p: p.read_bytes() for p in files} == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_slides_and_annotations_may_share_a_folder(cohort, tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    for name in ("tumor_001.tif", "tumor_002.tif", "normal_001.tif"):
        (both / name).symlink_to(cohort["images"] / name)
    (both / "tumor_001.xml").symlink_to(cohort["xml"] / "tumor_001.xml")
    (both / "tumor_002_mask.tif").symlink_to(cohort["masks"] / "tumor_002_mask.tif")
    result = make_coords(
        CohortOptions(
            slides=both, annotations=both, out=tmp_path / "d.json", workers=1, progress=False
        ),
        SamplingOptions(
            region_size=REGION, tumor_per_slide=4, normal_per_slide=4, tissue_downsample=DS
        ),
    )
    kinds = {s["slide"]: s["annotation_kind"] for s in result.summary["slides"]}
    assert kinds == {"normal_001": "none", "tumor_001": "xml", "tumor_002": "mask"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stride", "100"], "--stride applies to --mode grid only"),
        (["--mode", "grid", "--tumor-share", "0.5"], "apply to --mode sample only"),
        (["--region-size", "100"], "not a positive multiple of --grid"),
        (["--unannotated", "maybe"], "use normal or skip"),
        (["--val-fraction", "0.6", "--test-fraction", "0.5"], "leave no training slides"),
    ],
)
def test_bad_options_exit_2_before_any_work(tmp_path, args, message):
    res = invoke(["coords", "--slides", tmp_path, "--out", tmp_path / "d.json", *args])
    assert res.exit_code == 2 and message in res.output, res.output
