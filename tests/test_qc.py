"""Tissue mask (Otsu on saturation) and `patchetl qc` thumbnails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from etl.cli import app
from etl.extract.coords import Region, load_regions
from etl.qc import COLOURS, draw_qc, qc_table, region_colour
from etl.synth.cohort import synth_cohort
from etl.synth.scene import make_scene
from etl.wsi.reader import open_slide
from etl.wsi.tissue import TissueMask, otsu_threshold, read_low_res, tissue_from_rgb, tissue_mask

REPO = Path(__file__).resolve().parents[1]
W, H, MPP = 768, 512, 2.0
REGION = 384


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return synth_cohort(
        root,
        n_slides=2,
        width=W,
        height=H,
        mpp=MPP,
        region_size=REGION,
        regions_per_slide=6,
        seed=3,
    )


class ArrayReader:
    """A one-level in-memory slide with the reader interface used by the tissue functions."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.dimensions = (rgb.shape[1], rgb.shape[0])
        self.level_dimensions = (self.dimensions,)
        self.level_downsamples = (1.0,)

    def read_region(self, x0, y0, level, w, h):
        return self.rgb[y0 : y0 + h, x0 : x0 + w]


# --------------------------------------------------------------------------- tissue
def test_otsu_splits_two_populations():
    rng = np.random.default_rng(0)
    values = np.r_[rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 2000)].clip(0, 1)
    thr = otsu_threshold(values)
    assert (values[:5000] <= thr).mean() > 0.99 and (values[5000:] > thr).all()

    def between(t: float) -> float:  # between-class variance, straight from the definition
        lo, hi = values[values <= t], values[values > t]
        return len(lo) * len(hi) * (lo.mean() - hi.mean()) ** 2 / len(values) ** 2

    best = max(between(t) for t in np.linspace(values.min(), values.max(), 200)[:-1])
    assert between(thr) >= 0.99 * best


def test_tissue_mask_matches_the_synthetic_ground_truth(cohort):
    slide = cohort.slides[0]
    scene = make_scene(W, H, mpp=MPP, has_tumor=slide.has_tumor, seed=(3, 0))
    with open_slide(slide.path) as reader:
        mask = tissue_mask(reader, downsample=16)
    assert mask.mask.shape == (H // 16, W // 16) and mask.downsample == (16.0, 16.0)
    r, c = np.mgrid[0 : H // 16, 0 : W // 16]
    truth = scene.tissue_distance((c + 0.5) * 16, (r + 0.5) * 16) > 0
    iou = (mask.mask & truth).sum() / (mask.mask | truth).sum()
    assert iou > 0.85, iou
    assert 0.2 < mask.fraction < 0.8


def test_blank_slide_has_no_tissue_and_threshold_override():
    rng = np.random.default_rng(1)
    glass = np.clip(np.array([243, 241, 245]) + rng.normal(0, 2, (256, 256, 3)), 0, 255)
    glass = glass.astype(np.uint8)
    assert not tissue_mask(ArrayReader(glass), downsample=4).mask.any()
    pink = glass.copy()
    pink[:, 128:] = (225, 150, 200)  # saturation 0.33
    mask, thr = tissue_from_rgb(pink)
    assert mask[:, 128:].all() and not mask[:, :128].any() and 0.05 <= thr < 0.33
    mask, thr = tissue_from_rgb(pink, threshold=0.5)  # above the pink: nothing left
    assert thr == 0.5 and not mask.any()


def test_small_pieces_are_dropped_and_low_res_covers_the_slide():
    rgb = np.full((300, 200, 3), 243, np.uint8)
    rgb[20:120, 20:120] = (200, 100, 180)  # 100 x 100 piece
    rgb[200:210, 150:160] = (200, 100, 180)  # 10 x 10 speck
    reader = ArrayReader(rgb)
    low = read_low_res(reader, 8)
    assert low.rgb.shape == (38, 25, 3) and low.downsample == (8.0, 8.0)  # ceil(300/8) rows
    big = tissue_mask(reader, downsample=2, min_area=50 * 50)
    assert big.mask[10:60, 10:60].all() and not big.mask[95:110, 70:85].any()
    keep = tissue_mask(reader, downsample=2, min_area=0)
    assert keep.mask[100:105, 75:80].all()


def test_tissue_in_cells_is_exact():
    mask = np.zeros((4, 4), bool)
    mask[1, 2] = True  # level-0 [64, 96) x [32, 64) at downsample 32
    tm = TissueMask(mask=mask, downsample=(32.0, 32.0), level=0, threshold=0.1)
    assert np.argwhere(tm.any_in_cells(64, (2, 2))).tolist() == [[0, 1]]
    assert np.argwhere(tm.any_in_cells(16, (8, 8))).tolist() == [[2, 4], [2, 5], [3, 4], [3, 5]]
    # cells of 48 px: [48, 96) x [0, 48) and [48, 96) x [48, 96) touch it; [96, 144) does not
    assert np.argwhere(tm.any_in_cells(48, (3, 3))).tolist() == [[0, 1], [1, 1]]
    assert tm.at(np.array([70, 10, 500]), np.array([40, 40, 40])).tolist() == [True, False, False]


# --------------------------------------------------------------------------- qc
def _region(x: int, y: int, labels) -> Region:
    return Region(
        split="training",
        index=0,
        image="s.tif",
        slide=Path("s.tif"),
        x=x,
        y=y,
        labels=tuple(tuple(row) for row in labels),
    )


def test_draw_qc_colours_regions_cells_and_tissue():
    rgb = np.full((300, 400, 3), 255, np.uint8)
    tissue = np.zeros((30, 40), bool)
    tissue[20:28, 2:10] = True  # level-0 [20, 100) x [200, 280) at downsample 10
    regions = [
        _region(80, 80, [[0] * 3] * 3),
        _region(250, 80, [[1] * 3] * 3),
        _region(320, 220, [[0, 0, 0], [0, 1, 0], [0, 0, 0]]),
        _region(200, 230, [[1]]),
    ]
    img = np.asarray(draw_qc(rgb, (1.0, 1.0), regions, 96, tissue))
    assert img.shape == (300 + 18, 400, 3)
    for region, kind in zip(regions, ("normal", "tumor", "mixed", "tumor"), strict=True):
        x0, y0 = region.x - 48, region.y - 48
        top, left = img[y0, x0 : x0 + 96], img[y0 : y0 + 96, x0]
        assert (top == COLOURS[kind]).all() and (left == COLOURS[kind]).all(), kind
        assert (img[y0 + 95, x0 : x0 + 96] == COLOURS[kind]).all()  # last row inside the square
    red_cell = img[220 - 5, 320 + 5]  # inside the tumor centre cell of the mixed region
    white_cell = img[220 - 5 - 32, 320 + 5 - 32]  # inside a normal cell
    assert red_cell[0] > red_cell[1] + 40 and (white_cell == 255).all()
    assert (img[200, 20:100] == COLOURS["tissue"]).all()  # top edge of the tissue outline
    assert (img[240, 50] == 255).all()  # inside the tissue: left as it is


def test_qc_table_writes_one_thumbnail_per_slide(cohort, tmp_path):
    table = load_regions(cohort.dataset_json, data_root=cohort.root)
    results = qc_table(table, tmp_path, region_size=REGION)
    assert sorted(r.png.name for r in results) == ["normal_001.qc.png", "tumor_001.qc.png"]
    kinds = set()
    for result in results:
        assert result.error is None and result.regions == 6 and result.outside == 0
        assert result.off_tissue <= 1  # synth centres are on tissue (the mask is coarser)
        img = np.asarray(Image.open(result.png).convert("RGB"))
        assert img.shape == (H + 18, W, 3)  # thumbnail at full size + legend strip
        assert (img[:H] == COLOURS["tissue"]).all(-1).sum() > 100  # tissue outline drawn
        for region in (r for r in table.regions if r.slide == result.slide):
            kinds.add(region_colour(region))
            x0, y0 = region.x - REGION // 2, region.y - REGION // 2
            # the square's corner is drawn in some region colour (squares overlap here)
            assert tuple(img[y0, x0]) in {COLOURS[k] for k in ("normal", "mixed", "tumor")}
        assert sum(result.counts.values()) == 6
    assert "normal" in kinds and kinds & {"mixed", "tumor"}


def test_qc_cli_writes_pngs_and_reports_missing_slides(cohort, tmp_path):
    out = tmp_path / "qc"
    res = CliRunner().invoke(
        app,
        [
            "qc",
            "--json",
            str(cohort.dataset_json),
            "--data-root",
            str(cohort.root),
            "--out",
            str(out),
            "--region-size",
            str(REGION),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "tumor_001.qc.png: 6 region(s)" in res.output
    assert len(list(out.glob("*.qc.png"))) == 2 and not list(out.glob(".*"))
    data = json.loads(cohort.dataset_json.read_text())
    data["training"][0]["image"] = "lost_slide.tif"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    res = CliRunner().invoke(
        app,
        [
            "qc",
            "--json",
            str(bad),
            "--data-root",
            str(cohort.root),
            "--out",
            str(out),
            "--region-size",
            str(REGION),
        ],
    )
    assert res.exit_code == 1 and "lost_slide.tif" in res.output and "not found" in res.output
    assert "Traceback" not in res.output


def test_qc_does_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from etl.cli import app; "
        "import etl.qc, etl.wsi.tissue; r = CliRunner().invoke(app, ['qc', '--help']); "
        "assert r.exit_code == 0; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_blank_tiff_slide_through_the_reader(tmp_path):
    glass = np.full((512, 512, 3), (243, 241, 245), np.uint8)
    tifffile.imwrite(tmp_path / "b.tif", glass, tile=(256, 256), photometric="rgb")
    with open_slide(tmp_path / "b.tif") as reader:
        assert tissue_mask(reader).fraction == 0.0
