"""Whole-slide inference: map geometry, dense vs patch, seams, NMS, outputs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from etl.evaluate.nms import nms
from etl.synth.scene import make_scene
from etl.synth.slide import write_slide
from etl.wsi.annotations import points_in_polygons
from training.cli import app
from training.config import InferConfig
from training.infer.geometry import MapGeometry
from training.infer.outputs import write_heatmap_tiff
from training.infer.predictor import Predictor
from training.infer.run import find_candidates, infer_slide
from training.infer.tiling import predict_map
from training.model import build_model, load_model

P = 64  # test patch size: the model is fully convolutional, 64 px keeps CPU runs short
MPP = 2.0
W, H = 768, 512
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ArraySlide:
    """An in-memory level-0 'slide' with the reader interface (white outside, as OpenSlide)."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, np.uint8)
        ih, iw = self.rgb.shape[:2]
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, iw), min(y0 + h, ih)
        if xa < xb and ya < yb:
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = self.rgb[ya:yb, xa:xb]
        return out

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 768 x 512 synthetic tumor slide at 2 um/px and its scene (ground-truth polygons)."""
    scene = make_scene(W, H, mpp=MPP, has_tumor=True, seed=(7, 3))
    path = tmp_path_factory.mktemp("slides") / "tumor_test.tif"
    write_slide(path, scene)
    return path, scene


def _calibrate_bn(model: torch.nn.Module, pred: Predictor, pixels: np.ndarray) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the calibration batch
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model.features(pred._input(pixels))
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained detector (64 px patches) in the trainer's checkpoint format.

    A real ResNet18 training run is out of reach on 2 busy CPU cores (one 64 px step takes
    seconds), so the trunk stays random (BatchNorm calibrated on tissue) and the 1x1 head is
    fitted by logistic regression on a separate synthetic slide, on pooled features of
    patches seen alone AND of the same windows inside the slide (as a trained network that
    transfers to dense inference must handle both). Labels: window centre inside a lesion.
    """
    scene = make_scene(W, H, mpp=MPP, has_tumor=True, seed=(8, 0))
    img = scene.render()
    margin = 96
    torch.manual_seed(0)
    model = build_model()
    pred = Predictor(model, P, 32, CPU, channels_last=False)
    ii, jj = np.mgrid[0 : (H - P) // 32 + 1, 0 : (W - P) // 32 + 1]
    cx, cy = (jj * 32 + P // 2).ravel(), (ii * 32 + P // 2).ravel()
    tissue = np.flatnonzero(scene.tissue_distance(cx, cy) > 0)
    labels = points_in_polygons(np.c_[cx, cy], scene.polygons)[tissue]
    assert 20 < labels.sum() < len(labels) - 20, "the training slide needs tumor and normal"
    patches = np.stack(
        [img[cy[k] - P // 2 : cy[k] + P // 2, cx[k] - P // 2 : cx[k] + P // 2] for k in tissue]
    )
    _calibrate_bn(model, pred, patches)
    padded = np.pad(img, ((margin, margin), (margin, margin), (0, 0)), constant_values=255)
    k = margin // 32
    with torch.no_grad():
        alone = F.avg_pool2d(model.features(pred._input(patches)), P // 32).flatten(1)
        inside = model.features(pred._input(padded[None]))[:, :, k:-k, k:-k]
        inside = F.avg_pool2d(inside, P // 32, stride=1)[0].flatten(1).T[tissue]
    feats = torch.cat([alone, inside])
    y = torch.tensor(np.r_[labels, labels], dtype=torch.float32)
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    z = (feats - mu) / sd
    w = torch.zeros(512, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + (w**2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the 1x1 conv
        model.fc.weight.copy_((w / sd).view(1, 512, 1, 1))
        model.fc.bias.copy_(b - (w * mu / sd).sum())
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save(
        {
            "format": 1,
            "model": model.state_dict(),
            "patch_size": P,
            "grid": 3,
            "epoch": 1,
            "arch": "FCResNet18",
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def dense_run(slide, trained, tmp_path_factory):
    """`patchetl infer` (dense, through the CLI) on the test slide."""
    out = tmp_path_factory.mktemp("dense")
    res = CliRunner().invoke(
        app,
        [
            "infer",
            str(slide[0]),
            "--ckpt",
            str(trained),
            "--out",
            str(out),
            "--no-progress",
            "--tile-size",
            "256",
            "--nms-radius",
            "96",
            "--workers",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def patch_map(slide, trained):
    model, _ = load_model(trained)
    cfg = InferConfig(
        checkpoint=str(trained), mode="patch", patch_size=P, workers=2, progress=False
    )
    return infer_slide(slide[0], Predictor(model, P, 32, CPU), cfg).prob


def truth_cells(scene, geometry: MapGeometry) -> np.ndarray:
    """Map pixels whose centre lies in a lesion."""
    i, j = np.mgrid[0 : geometry.rows, 0 : geometry.cols]
    x, y = geometry.centre(i, j)
    return points_in_polygons(np.c_[x.ravel(), y.ravel()], scene.polygons).reshape(i.shape)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


# --------------------------------------------------------------------------- geometry
def test_map_shape_scale_and_sidecar(dense_run):
    meta = json.loads((dense_run / "tumor_test.prob.json").read_text())
    prob = np.load(dense_run / "tumor_test.prob.npy")
    assert prob.dtype == np.float32 and prob.shape == (H // 32, W // 32) == (16, 24)
    assert (meta["stride"], meta["x_start"], meta["y_start"]) == (32, 16, 16)
    assert (meta["width"], meta["height"], meta["mpp"]) == (W, H, [MPP, MPP])
    assert (meta["map_width"], meta["map_height"]) == (24, 16)
    assert meta["patch_size"] == P and meta["mode"] == "dense" and meta["margin"] == 224
    assert 0.2 < meta["tissue_fraction"] < 0.8
    assert ((prob >= 0) & (prob <= 1)).all() and prob.max() > 0.5
    assert meta["checkpoint"].endswith("best.pt")
    # a 1000 x 700 slide at level 1 (downsample 2), stride 64: level-0 stride 128, ceil'd map
    g = MapGeometry.for_level((500, 350), 1, 2.0, 64, 224)
    assert (g.rows, g.cols, g.stride, g.x_start) == (6, 8, 128.0, 64.0)
    assert g.patch_origin(1, 2) == (2 * 64 + 32 - 112, 64 + 32 - 112)


class PositionProbe:
    """Stands in for the model: 'classifies' a patch as the position of its centre pixel."""

    device = CPU

    def __init__(self, patch: int) -> None:
        self.patch = patch

    def patches(self, crops: np.ndarray) -> np.ndarray:
        c = crops[:, self.patch // 2, self.patch // 2].astype(np.float32)
        return c[:, 0] + 256 * c[:, 1]  # x in R, y in G


@pytest.mark.parametrize("stride, patch", [(32, 64), (64, 224), (96, 32)])
def test_map_pixel_is_the_patch_centred_at_the_documented_point(stride, patch):
    h, w = 200, 250
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)
    g = MapGeometry.for_level((w, h), 0, 1.0, stride, patch)
    cells = np.ones(g.shape, bool)
    prob = predict_map(
        lambda: ArraySlide(rgb),
        g,
        cells,
        PositionProbe(patch),
        mode="patch",
        tile_size=2 * stride,
        batch_size=3,
        workers=2,
    )  # batches span tiles
    i, j = np.mgrid[0 : g.rows, 0 : g.cols]
    cx, cy = g.centre(i, j)
    inside = (cx < w) & (cy < h)  # centres past the edge read white
    assert inside.sum() >= 6 and not inside.all()
    assert np.array_equal(prob[inside], (cx + 256 * cy)[inside].astype(np.float32))


# --------------------------------------------------------------------------- the model
def test_trained_model_scores_tumor_above_normal(dense_run, slide, patch_map):
    meta = json.loads((dense_run / "tumor_test.prob.json").read_text())
    prob = np.load(dense_run / "tumor_test.prob.npy")
    g = MapGeometry.for_level((W, H), 0, 1.0, 32, P)
    tumor = truth_cells(slide[1], g)
    tissue = prob > 0
    assert meta["tissue_map_pixels"] >= tissue.sum() and (tumor & tissue).sum() > 20
    for p in (prob, patch_map):
        pos, neg = p[tumor & tissue], p[~tumor & tissue]
        assert pos.mean() > neg.mean() + 0.3
        assert auc(pos, neg) > 0.9


def test_dense_without_context_is_exactly_patch_mode(slide, trained, patch_map):
    """One-patch tiles and no margin: the dense path computes what patch mode computes."""
    model, _ = load_model(trained)
    cfg = InferConfig(
        checkpoint=str(trained),
        mode="dense",
        patch_size=P,
        tile_size=32,
        margin=0,
        tiles_per_batch=256,
        workers=2,
        progress=False,
    )
    dense = infer_slide(slide[0], Predictor(model, P, 32, CPU), cfg).prob
    np.testing.assert_allclose(dense, patch_map, atol=1e-4)


def test_dense_and_patch_maps_agree_inside_tissue(dense_run, patch_map):
    dense = np.load(dense_run / "tumor_test.prob.npy")
    tissue = patch_map > 0
    assert np.array_equal(tissue, dense > 0)
    r = np.corrcoef(dense[tissue], patch_map[tissue])[0, 1]
    # Context (the dense tiles see beyond each patch; patches see zero padding) is all that
    # differs; with this random-trunk probe at 64 px it costs some agreement. The issue's
    # r >= 0.95 on a really trained 224 px model is test_infer_trained.py (CUDA only).
    assert r >= 0.6, r


def test_agreement_metrics_on_hand_made_maps():
    from training.infer.agreement import Agreement

    d = np.array([0.1, 0.2, 0.6, 0.9])
    a = Agreement.of(d, d * 0.5 + 0.1)  # a linear map of d: r = 1
    assert a.cells == 4 and a.pearson == pytest.approx(1.0)
    assert a.max_abs == pytest.approx(0.35) and a.mean_abs == pytest.approx(
        np.mean(np.abs(d - (d * 0.5 + 0.1)))
    )
    assert a.same_call == 0.75  # 0.6 -> 0.4 changes side
    assert (a.positive_dense, a.positive_patch) == (0.5, 0.25)
    assert Agreement.of(d, d[::-1]).pearson < -0.9
    assert np.isnan(Agreement.of(d, np.full(4, 0.3)).pearson)  # a constant map: undefined
    with pytest.raises(ValueError):
        Agreement.of(d, d[:3])


def test_check_dense_command(slide, trained, tmp_path):
    """`patchetl check-dense`: both modes, the numbers in a report, exit 1 below --min-r."""
    report = tmp_path / "agreement.json"
    args = [
        "check-dense",
        str(slide[0]),
        "--ckpt",
        str(trained),
        "--workers",
        "2",
        "--tile-size",
        "256",
        "--report",
        str(report),
    ]
    res = CliRunner().invoke(app, [*args, "--min-r", "0.6"])
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    (row,) = doc["slides"]
    assert row["slide"] == "tumor_test" and doc["patch_size"] == P and doc["amp"] is False
    assert 0.6 <= doc["pooled"]["pearson"] < 1 and row["cells"] == doc["pooled"]["cells"] > 50
    assert "pooled" in res.output and f"{doc['pooled']['pearson']:.4f}" in res.output
    res = CliRunner().invoke(app, [*args, "--min-r", "0.9999"])
    assert res.exit_code == 1 and "below --min-r 0.9999" in res.output
    res = CliRunner().invoke(
        app, ["check-dense", str(slide[0]), "--ckpt", str(tmp_path / "missing.pt")]
    )
    assert res.exit_code == 2 and "no such file" in res.output


def test_tile_margin_removes_seams(slide):
    """Two tiles with a 224 px margin equal one pass over the area; without, the seam shows."""
    rgb = slide[1].render()[128:256, 256:512]  # 256 x 128 px, tissue
    torch.manual_seed(1)
    model = build_model()
    pred = Predictor(model, P, 32, CPU)
    _calibrate_bn(model, pred, rgb[None, :, :, :])
    g = MapGeometry.for_level((256, 128), 0, 1.0, 32, P)
    cells = np.ones(g.shape, bool)

    def run(tile: int, margin: int) -> np.ndarray:
        return predict_map(
            lambda: ArraySlide(rgb), g, cells, pred, tile_size=tile, margin=margin, workers=2
        )

    whole = run(1024, 224)  # one tile
    assert whole.std() > 0.02 and 0.02 < np.median(whole) < 0.98  # not saturated
    np.testing.assert_allclose(run(128, 224), whole, atol=1e-4)  # tiles of 4 x 4 map pixels
    seams = np.abs(run(128, 0) - whole)
    assert seams[:, 3:5].max() > 1e-2  # either side of the tile border (column 4)


# --------------------------------------------------------------------------- candidates
def test_nms_on_a_hand_made_map():
    prob = np.zeros((20, 20), np.float32)
    prob[5, 5], prob[7, 7] = 0.9, 0.8  # distance 2.8 <= 3: suppressed by (5, 5)
    prob[8, 8] = 0.75  # distance 4.2 > 3: kept (a square of side 7 would suppress it)
    prob[15, 15] = 0.7
    prob[10, 2] = prob[10, 3] = 0.6  # a tie: the first in row-major order wins
    prob[2, 17] = 0.4  # below the threshold
    assert nms(prob, radius=3, threshold=0.5) == [
        (pytest.approx(0.9), 5, 5),
        (pytest.approx(0.75), 8, 8),
        (pytest.approx(0.7), 15, 15),
        (pytest.approx(0.6), 10, 2),
    ]
    g = MapGeometry.for_level((640, 640), 0, 1.0, 32, 224)
    cands = find_candidates(prob, g, radius=96, threshold=0.5)  # 96 level-0 px = 3 map px
    assert [(c.x, c.y) for c in cands] == [(176, 176), (272, 272), (496, 496), (80, 336)]
    assert nms(np.zeros((4, 4)), radius=2) == []


def test_candidates_csv_and_geojson(dense_run):
    lines = (dense_run / "tumor_test.candidates.csv").read_text().splitlines()
    assert lines[0] == "prob,x,y"
    rows = [tuple(float(v) for v in line.split(",")) for line in lines[1:]]
    assert len(rows) >= 2
    assert all(0.5 <= p <= 1 and 0 <= x < W and 0 <= y < H for p, x, y in rows)
    assert [p for p, _, _ in rows] == sorted((p for p, _, _ in rows), reverse=True)
    gj = json.loads((dense_run / "tumor_test.candidates.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(rows)
    for feat, (p, x, y) in zip(gj["features"], rows, strict=True):
        assert feat["type"] == "Feature"
        assert feat["geometry"] == {"type": "Point", "coordinates": [int(x), int(y)]}
        props = feat["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": "Tumor"}
        assert props["prob"] == pytest.approx(p, abs=1e-5)
    prob = np.load(dense_run / "tumor_test.prob.npy")
    p, x, y = rows[0]
    assert p == pytest.approx(prob.max(), abs=1e-5)
    assert prob[int(y) // 32, int(x) // 32] == prob.max()  # the best candidate is the map max


# --------------------------------------------------------------------------- outputs
def test_outputs_are_complete_heatmap_tiff_opens(dense_run):
    names = sorted(p.name for p in dense_run.iterdir())
    assert names == sorted(
        f"tumor_test.{k}"
        for k in (
            "prob.npy",
            "prob.json",
            "heatmap.png",
            "heatmap.tif",
            "candidates.csv",
            "candidates.geojson",
        )
    )  # and no temporary file left behind
    prob = np.load(dense_run / "tumor_test.prob.npy")
    with tifffile.TiffFile(dense_run / "tumor_test.heatmap.tif") as tif:
        assert np.array_equal(tif.pages[0].asarray(), np.rint(prob * 255).astype(np.uint8))
    with openslide.OpenSlide(dense_run / "tumor_test.heatmap.tif") as osr:
        assert osr.level_dimensions == ((24, 16),)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(MPP * 32)
    from PIL import Image

    with Image.open(dense_run / "tumor_test.heatmap.png") as png:
        assert png.size == (W, H) and png.mode == "RGB"


def test_heatmap_tiff_pyramid_levels(tmp_path):
    prob = np.random.default_rng(0).random((400, 600)).astype(np.float32)
    g = MapGeometry.for_level((600 * 32, 400 * 32), 0, 1.0, 32, 224)
    path = tmp_path / "h.tif"
    levels = write_heatmap_tiff(path, prob, g, (0.25, 0.25))
    assert levels == [(600, 400), (300, 200), (150, 100)]
    with tifffile.TiffFile(path) as tif:
        assert [p.shape for p in tif.pages] == [(400, 600), (200, 300), (100, 150)]
        assert all(p.is_tiled for p in tif.pages)
        assert [p.subfiletype for p in tif.pages] == [0, 1, 1]
    with openslide.OpenSlide(path) as osr:
        assert osr.level_dimensions == ((600, 400), (300, 200), (150, 100))
        assert osr.level_downsamples == pytest.approx((1, 2, 4))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25 * 32)


# --------------------------------------------------------------------------- bad input
def _blank_slide(path: Path) -> Path:
    rng = np.random.default_rng(0)
    glass = np.clip(np.array([243, 241, 245]) + rng.normal(0, 2, (512, 512, 3)), 0, 255)
    tifffile.imwrite(
        path, glass.astype(np.uint8), tile=(256, 256), photometric="rgb", compression="zlib"
    )
    return path


def test_slide_without_tissue_gives_an_empty_map_and_a_warning(trained, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    _blank_slide(folder / "blank.tif")
    res = CliRunner().invoke(
        app,
        [
            "infer",
            str(folder),
            "--ckpt",
            str(trained),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "warning" in res.output and "no tissue" in res.output
    assert not np.load(tmp_path / "out" / "blank.prob.npy").any()
    assert (tmp_path / "out" / "blank.candidates.csv").read_text() == "prob,x,y\n"


@pytest.mark.parametrize(
    "case",
    ["missing slide", "unreadable slide", "other checkpoint", "missing checkpoint", "bad stride"],
)
def test_bad_input_exits_with_a_message(case, trained, slide, tmp_path):
    args = [str(slide[0]), "--ckpt", str(trained)]
    if case == "missing slide":
        args[0] = str(tmp_path / "nope.tif")
        expect = (2, "not found")
    elif case == "unreadable slide":
        (tmp_path / "junk.tif").write_bytes(b"not a tiff at all" * 100)
        args[0] = str(tmp_path / "junk.tif")
        expect = (1, "junk.tif")
    elif case == "other checkpoint":
        state = build_model().state_dict()
        state["fc.weight"] = torch.zeros(2, 512, 1, 1)
        state["fc.bias"] = torch.zeros(2)
        torch.save({"format": 1, "model": state}, tmp_path / "two.pt")
        args[2] = str(tmp_path / "two.pt")
        expect = (2, "shape mismatch")
    elif case == "missing checkpoint":
        args[2] = str(tmp_path / "none.pt")
        expect = (2, "no such file")
    else:
        args += ["--stride", "48"]
        expect = (2, "multiple of 32")
    res = CliRunner().invoke(app, ["infer", *args, "--out", str(tmp_path / "out"), "--no-progress"])
    assert (res.exit_code, expect[1] in res.output) == (expect[0], True), res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
