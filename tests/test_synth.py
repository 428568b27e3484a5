"""Synthetic slides: OpenSlide opens them as pyramids, pixels, ground truth and coordinate files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage
from typer.testing import CliRunner

from etl.cli import app
from etl.synth.cohort import MASK_DOWNSAMPLE, synth_cohort
from etl.synth.scene import make_scene, render_slide
from etl.synth.slide import write_slide
from etl.wsi.annotations import points_in_polygons, read_asap_xml, write_asap_xml
from etl.wsi.downsample import block_mean
from etl.wsi.masks import read_mask, tumor_mask

W, H, MPP, SEED = 2048, 1536, 0.243, 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """2 tumor slides + 1 normal, generic TIFF; validation gets one slide."""
    out = tmp_path_factory.mktemp("synth")
    return synth_cohort(
        out,
        n_slides=3,
        width=W,
        height=H,
        tumor_fraction=0.67,
        seed=SEED,
        mpp=MPP,
        regions_per_slide=16,
        val_fraction=0.34,
    )


def _winding_inside(x: float, y: float, poly: np.ndarray) -> bool:
    """Independent point-in-polygon (winding number) for checking labels and masks."""
    wn = 0
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        cross = (x1 - x0) * (y - y0) - (x - x0) * (y1 - y0)
        if y0 <= y < y1 and cross > 0:
            wn += 1
        elif y1 <= y < y0 and cross < 0:
            wn -= 1
    return wn != 0


def _assert_jpeg_close(got: np.ndarray, want: np.ndarray, level: int = 1) -> None:
    """``got`` equals the top-left of ``want`` within JPEG error (q90, 2x2 chroma subsampling).

    Sharp purple-on-pink nuclei edges cost 1-3 levels on average at level 0 and up to ~4 at
    the sharper level 1; a one-pixel misalignment costs about three times as much.
    """
    h, w = got.shape[:2]
    want = want.astype(float)
    err = np.abs(got - want[:h, :w]).mean()
    shifted = np.abs(got - want[1 : h + 1, 1 : w + 1]).mean()
    assert err < (3.5 if level == 0 else 5.0), err
    assert err < 0.6 * shifted, (err, shifted)


def _entries(cohort) -> list[tuple[str, dict]]:
    data = json.loads(cohort.dataset_json.read_text())
    assert set(data) == {"training", "validation"}
    return [(split, e) for split in ("training", "validation") for e in data[split]]


def test_generic_slides_open_as_pyramids(cohort):
    assert [s.name for s in cohort.slides] == ["tumor_001", "tumor_002", "normal_001"]
    for s in cohort.slides:
        assert s.path.parent == cohort.root / "training" / "images" and s.path.suffix == ".tif"
        with openslide.OpenSlide(str(s.path)) as osr:
            assert osr.properties["openslide.vendor"] == "generic-tiff"
            assert osr.level_count == 2
            assert osr.level_dimensions == ((W, H), (W // 2, H // 2))
            assert osr.level_downsamples == pytest.approx((1.0, 2.0))
            assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(MPP, rel=1e-6)
            assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(MPP, rel=1e-6)
        with tifffile.TiffFile(s.path) as tf:  # each level its own top-level, tiled JPEG page
            assert len(tf.pages) == 2
            assert all(p.is_tiled and p.tilewidth == 256 and p.compression == 7 for p in tf.pages)
            assert all(p.subifds is None for p in tf.pages)


def test_aperio_layout_opens_with_vendor_aperio(tmp_path):
    scene = make_scene(1536, 1024, mpp=0.5, has_tumor=False, seed=5)
    path = tmp_path / "slide.svs"
    dims = write_slide(path, scene, downsample=4, vendor="aperio", jpeg_quality=95)
    assert dims == [(1536, 1024), (384, 256)]
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.properties["openslide.vendor"] == "aperio"
        assert osr.level_count == 2
        assert osr.level_dimensions == ((1536, 1024), (384, 256))
        assert osr.level_downsamples == pytest.approx((1.0, 4.0))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert osr.properties["openslide.objective-power"] == "20"
        assert "thumbnail" in osr.associated_images
        level1 = np.asarray(osr.read_region((0, 0), 1, (384, 256)).convert("RGB"), dtype=float)
    expected = block_mean(scene.render(), 4, "drop")
    _assert_jpeg_close(level1[:-1, :-1], expected)
    with tifffile.TiffFile(path) as tf:  # tifffile's SVS reader sees baseline + 1 level
        assert tf.is_svs and len(tf.series[0].levels) == 2


def test_pixels_read_back_match_the_render(cohort):
    slide = cohort.slides[0]  # tumor_001 uses seed (SEED, 0)
    rgb, polygons = render_slide(W, H, mpp=MPP, has_tumor=True, seed=(SEED, 0))
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    xml_polys = read_asap_xml(slide.xml)
    assert len(xml_polys) == len(polygons) > 0
    for a, b in zip(xml_polys, polygons, strict=True):
        np.testing.assert_array_equal(a, b)  # the XML reproduces the polygons exactly
    cx, cy = polygons[0].mean(axis=0).astype(int)
    spots = [(0, 0), (W - 300, H - 200), (cx - 150, cy - 150), (W // 2, H // 3)]
    with openslide.OpenSlide(str(slide.path)) as osr:
        for x, y in spots:
            x, y = min(max(x, 0), W - 301), min(max(y, 0), H - 301)
            got = np.asarray(osr.read_region((x, y), 0, (300, 300)).convert("RGB"), dtype=float)
            _assert_jpeg_close(got, rgb[y : y + 301, x : x + 301], level=0)
        level1 = block_mean(rgb, 2, "drop")
        got = np.asarray(osr.read_region((512, 256), 1, (400, 300)).convert("RGB"), dtype=float)
        _assert_jpeg_close(got, level1[128:429, 256:657])
    # A plausible picture: glass is bright, tissue is pink/purple, lesions darker than tissue.
    assert rgb[:8, :8].mean() > 225
    lesion = rgb[cy - 20 : cy + 20, cx - 20 : cx + 20].astype(float)
    assert lesion.mean() < 200 and lesion[..., 1].mean() < lesion[..., 2].mean()


def test_labels_agree_with_the_xml_polygons(cohort):
    rs, g = 768, 3
    polys = {s.path.name: (read_asap_xml(s.xml) if s.xml else []) for s in cohort.slides}
    seen, kinds = set(), set()
    for _, e in _entries(cohort):
        y, x = e["location"]
        assert rs // 2 <= x <= W - rs // 2 and rs // 2 <= y <= H - rs // 2  # region inside
        assert (e["image"], x, y) not in seen
        seen.add((e["image"], x, y))
        x0, y0 = x - rs // 2, y - rs // 2
        want = [
            int(
                any(
                    _winding_inside(x0 + (col + 0.5) * rs / g, y0 + (row + 0.5) * rs / g, p)
                    for p in polys[e["image"]]
                )
            )
            for col in range(g)
            for row in range(g)
        ]  # column by column: k = 3*col + row
        assert e["label"] == want, e
        kinds.add("mixed" if 0 < sum(want) < 9 else "tumor" if sum(want) == 9 else "normal")
        if not polys[e["image"]]:
            assert sum(want) == 0
    assert {"mixed", "normal"} <= kinds
    assert sum(1 for _, e in _entries(cohort) if any(e["label"])) >= 8


def test_region_centres_are_on_tissue(cohort):
    with openslide.OpenSlide(str(cohort.slides[2].path)) as osr:  # the normal slide
        bright = 0
        entries = [e for _, e in _entries(cohort) if e["image"] == cohort.slides[2].path.name]
        for e in entries:
            y, x = e["location"]
            patch = np.asarray(osr.read_region((x - 16, y - 16), 0, (32, 32)).convert("RGB"))
            bright += patch.mean() > 228
    assert len(entries) == 16 and bright <= 2


def test_mask_is_the_polygon_interiors(cohort):
    slide = cohort.slides[1]
    mask, ds = read_mask(slide.mask)
    assert ds == MASK_DOWNSAMPLE and mask.dtype == np.uint8
    assert mask.shape == (math.ceil(H / ds), math.ceil(W / ds))
    assert set(np.unique(mask)) == {0, 1}
    polys = read_asap_xml(slide.xml)
    ii, jj = np.nonzero(np.ones_like(mask))
    sample = np.random.default_rng(0).choice(len(ii), 1500, replace=False)
    ones = np.flatnonzero(mask.ravel())
    for k in np.concatenate([sample, ones[:: max(1, len(ones) // 500)]]):
        i, j = ii[k], jj[k]
        inside = any(_winding_inside((j + 0.5) * ds, (i + 0.5) * ds, p) for p in polys)
        assert mask[i, j] == inside, (i, j)
    # and at the centre of tumor cells in the coordinate file (away from the border)
    hits = []
    for _, e in _entries(cohort):
        if e["image"] != slide.path.name:
            continue
        y, x = e["location"]
        for k, v in enumerate(e["label"]):
            col, row = divmod(k, 3)
            px, py = x - 384 + 128 + 256 * col, y - 384 + 128 + 256 * row
            if v:
                hits.append(mask[int(py // ds), int(px // ds)])
    assert hits and np.mean(hits) > 0.9


def test_csv_rows_equal_json_entries(cohort):
    entries = _entries(cohort)
    header = ["image", "x", "y"] + [f"label{k}" for k in range(9)]

    def rows(path: Path) -> list[list[str]]:
        with path.open(newline="") as fh:
            got = list(csv.reader(fh))
        assert got[0] == header
        return got[1:]

    def as_row(e: dict) -> list[str]:
        y, x = e["location"]
        return [e["image"], str(x), str(y)] + [str(v) for v in e["label"]]

    assert rows(cohort.csv_paths["all"]) == [as_row(e) for _, e in entries]
    for split in ("training", "validation"):
        assert rows(cohort.csv_paths[split]) == [as_row(e) for s, e in entries if s == split]


def test_split_is_by_slide_and_synth_json(cohort):
    by_split: dict[str, set[str]] = {"training": set(), "validation": set()}
    for split, e in _entries(cohort):
        by_split[split].add(e["image"])
    assert by_split["validation"] == {"tumor_002.tif"}
    assert by_split["training"] == {"tumor_001.tif", "normal_001.tif"}
    meta = json.loads((cohort.root / "synth.json").read_text())
    assert meta["params"]["seed"] == SEED and meta["mask_downsample"] == MASK_DOWNSAMPLE
    facts = {f["name"]: f for f in meta["slides"]}
    assert facts["tumor_002"]["split"] == "validation"
    assert facts["normal_001"]["has_tumor"] is False and facts["normal_001"]["xml"] is None
    assert facts["tumor_001"]["polygons"] == len(read_asap_xml(cohort.slides[0].xml))
    assert facts["tumor_001"]["width"] == W and facts["tumor_001"]["mpp"] == MPP


def test_same_seed_gives_identical_files(tmp_path):
    opts: dict[str, Any] = dict(
        n_slides=1,
        width=1024,
        height=768,
        tumor_fraction=1.0,
        mpp=1.0,
        regions_per_slide=6,
        region_size=256,
        grid=2,
    )
    a = synth_cohort(tmp_path / "a", seed=7, **opts)
    b = synth_cohort(tmp_path / "b", seed=7, **opts)
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    # slide, xml, mask, dataset JSON, 2 CSVs (all + training: the empty validation split of a
    # one-slide cohort is left out), synth.json
    assert len(files) == 7
    assert list(json.loads(a.dataset_json.read_text())) == ["training"]
    for rel in files:
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    c = synth_cohort(tmp_path / "c", seed=8, **opts)
    assert c.slides[0].path.read_bytes() != a.slides[0].path.read_bytes()


def test_bad_options_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="region_size=768"):
        synth_cohort(tmp_path, width=500, height=3000)
    with pytest.raises(ValueError, match="vendor='leica'"):
        synth_cohort(tmp_path, vendor="leica")
    with pytest.raises(ValueError, match="multiple of grid=3"):
        synth_cohort(tmp_path, region_size=256)
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_synth(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(
        app,
        [
            "synth",
            "--out",
            str(out),
            "--slides",
            "2",
            "--width",
            "512",
            "--height",
            "512",
            "--mpp",
            "2.0",
            "--region-size",
            "256",
            "--grid",
            "2",
            "--regions-per-slide",
            "3",
            "--vendor",
            "aperio",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "dataset_0.json" in res.output
    data = json.loads((out / "dataset_0.json").read_text())
    assert len(data["training"]) + len(data["validation"]) == 6
    assert (out / "training" / "images" / "tumor_001.svs").exists()
    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "bad"), "--downsample", "3"])
    assert bad.exit_code != 0 and "downsample=3" in bad.output


def test_asap_xml_roundtrip_and_points_in_polygons(tmp_path):
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    notch = np.array([[20, 0], [30, 0], [30, 10], [25, 2], [20, 10]], float)  # concave
    path = tmp_path / "a.xml"
    write_asap_xml(path, [square, notch])
    text = path.read_text()
    assert '<Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="Tumor"' in text
    back = read_asap_xml(path)
    assert len(back) == 2 and np.array_equal(back[1], notch)
    pts = np.array([[5, 5], [15, 5], [25, 1], [25, 6], [21, 5], [-1, 5]])
    assert points_in_polygons(pts, back).tolist() == [True, False, True, False, True, False]
    # exclusion groups ("_2") are not tumor
    path.write_text(
        text.replace(
            'PartOfGroup="Tumor" Color="#F4FA58">\n\t\t\t<Coordinates>\n'
            '\t\t\t\t<Coordinate Order="0" X="20.00"',
            'PartOfGroup="_2" Color="#F4FA58">\n\t\t\t<Coordinates>\n'
            '\t\t\t\t<Coordinate Order="0" X="20.00"',
        )
    )
    assert len(read_asap_xml(path)) == 1
    with pytest.raises(ValueError, match="not found"):
        read_asap_xml(tmp_path / "missing.xml")


# --------------------------------------------------------------------------- artefacts
def _edge_distance(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Distance of each (x, y) point to the outline of ``polygon`` (independent of etl)."""
    a, b = polygon, np.roll(polygon, -1, axis=0)
    d = b - a
    rel = points[:, None, :] - a[None]
    t = np.clip((rel * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0, 1)
    return np.hypot(*(rel - t[..., None] * d).transpose(2, 0, 1)).min(axis=1)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """Two slides (tumor, normal) with artefacts; regions of 384 px."""
    out = tmp_path_factory.mktemp("dirty")
    opts: dict[str, Any] = dict(
        n_slides=2, width=1536, height=1024, mpp=1.0, seed=1, regions_per_slide=12
    )
    return synth_cohort(out, region_size=384, artefacts=True, **opts), opts


def test_artefacts_are_listed_and_no_region_is_centred_on_one(dirty):
    cohort, _ = dirty
    meta = json.loads((cohort.root / "synth.json").read_text())
    assert meta["params"]["artefacts"] is True
    kinds = set()
    for slide, facts in zip(cohort.slides, meta["slides"], strict=True):
        arts = [np.asarray(a["polygon"]) for a in facts["artefacts"]]
        kinds |= {a["kind"] for a in facts["artefacts"]}
        centres = np.array(
            [e["location"][::-1] for _, e in _entries(cohort) if e["image"] == slide.path.name],
            float,
        )
        assert len(centres) == 12
        for poly in arts:
            assert not points_in_polygons(centres, [poly]).any()
            assert _edge_distance(centres, poly).min() >= 0.25 * 384 - 1  # ARTEFACT_CLEARANCE
        for lesion in read_asap_xml(slide.xml) if slide.xml else []:
            assert not points_in_polygons(lesion, arts).any()  # lesions stay clear of them
            assert not any(points_in_polygons(a, [lesion]).any() for a in arts)
    assert kinds == {"pen", "border", "dust", "bubble"}


def test_artefacts_are_painted_over_an_unchanged_scene(dirty):
    cohort, opts = dirty
    facts = json.loads((cohort.root / "synth.json").read_text())["slides"][0]
    w, h, seed = opts["width"], opts["height"], (opts["seed"], 0)
    clean = make_scene(w, h, mpp=1.0, has_tumor=True, seed=seed)
    dirty_scene = make_scene(w, h, mpp=1.0, has_tumor=True, seed=seed, artefacts=True)
    assert len(clean.polygons) == len(dirty_scene.polygons) > 0
    assert all(
        np.array_equal(a, b) for a, b in zip(clean.polygons, dirty_scene.polygons, strict=True)
    )
    a, b = clean.render(), dirty_scene.render()
    touched = tumor_mask([np.asarray(art["polygon"]) for art in facts["artefacts"]], w, h, 1)
    touched = touched.astype(bool)
    near = ndimage.binary_dilation(touched, iterations=4)  # soft edges: a pixel or two
    np.testing.assert_array_equal(a[~near], b[~near])
    assert (a[touched] != b[touched]).any(axis=-1).mean() > 0.9


def test_written_slides_show_the_artefacts(dirty):
    cohort, opts = dirty
    meta = json.loads((cohort.root / "synth.json").read_text())
    w, h, ds = opts["width"], opts["height"], 4
    seen = set()
    for slide, facts in zip(cohort.slides, meta["slides"], strict=True):
        with openslide.OpenSlide(str(slide.path)) as osr:
            low = np.asarray(osr.get_thumbnail((w // ds, h // ds)).convert("RGB"), float)
        for art in facts["artefacts"]:
            core = tumor_mask([np.asarray(art["polygon"])], w, h, ds).astype(bool)
            core = ndimage.binary_erosion(core, iterations=2, border_value=1)
            if not core.any() or art["kind"] == "dust":
                continue
            seen.add(f"{art['kind']} {art['detail']}")
            r, g, b = low[core].mean(axis=0)
            if art["detail"] == "blue":
                assert b > r + 60 and b > g + 30, (r, g, b)
            elif art["detail"] == "green":
                assert g > r + 30 and g > b + 20, (r, g, b)
            elif art["kind"] == "bubble":  # a faint grey disc
                assert min(r, g, b) > 180 and max(r, g, b) - min(r, g, b) < 15, (r, g, b)
            else:  # black ink, the scan border
                assert max(r, g, b) < 60, (art["kind"], r, g, b)
    assert {"pen blue", "pen green", "pen black", "bubble "} <= seen, seen


def test_artefacts_are_deterministic_and_optional(dirty, cohort, tmp_path):
    first, opts = dirty
    again = synth_cohort(tmp_path, region_size=384, artefacts=True, **opts)
    files = sorted(p.relative_to(first.root) for p in first.root.rglob("*") if p.is_file())
    assert len(files) == 9  # 2 slides, 1 XML, 1 mask, dataset JSON, 3 CSVs, synth.json
    for rel in files:
        assert (first.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel
    meta = json.loads((cohort.root / "synth.json").read_text())  # made without artefacts
    assert "artefacts" not in meta["params"]
    assert not any("artefacts" in facts for facts in meta["slides"])


def test_cli_synth_artefacts(tmp_path):
    args = [
        "synth",
        "--out",
        str(tmp_path),
        "--slides",
        "1",
        "--width",
        "768",
        "--height",
        "768",
        "--mpp",
        "0.5",
        "--region-size",
        "192",
        "--regions-per-slide",
        "3",
        "--artefacts",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "synth.json").read_text())
    assert meta["params"]["artefacts"] is True and meta["slides"][0]["artefacts"]
