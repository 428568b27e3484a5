"""Evaluation: Camelyon16 FROC rules on hand-made cases, slide AUC, report, CLI, patch AUC."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from etl.evaluate.auc import binary_auc
from etl.evaluate.froc import (
    EvaluationError,
    evaluation_mask,
    froc_curve,
    froc_score,
    major_axis_lengths,
    score_slide,
)
from etl.evaluate.run import evaluate
from etl.evaluate.truth import rasterize_polygons, read_mask_tiff
from etl.wsi.annotations import write_asap_xml
from etl.wsi.masks import tumor_mask, write_mask

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

# mpp 1.0: a level-5 pixel is 32 um; dilation threshold 75 / 64 = 1.17 px (4-neighbours only);
# ITC below 275 / 32 = 8.6 px of major axis.
MPP = 1.0
W, H = 4096, 2048


def square(x0: float, y0: float, side: float) -> np.ndarray:
    return np.array([(x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side)], float)


def write_case(
    root: Path,
    name: str,
    polygons: list[np.ndarray] | None,
    detections: list[tuple[float, float, float]],
    *,
    mpp: float = MPP,
) -> None:
    """Truth XML (None: normal slide), candidates CSV and a sidecar with size and mpp."""
    (root / "pred").mkdir(parents=True, exist_ok=True)
    (root / "truth").mkdir(parents=True, exist_ok=True)
    if polygons is not None:
        write_asap_xml(root / "truth" / f"{name}.xml", polygons)
    lines = ["prob,x,y"] + [f"{p},{x},{y}" for p, x, y in detections]
    (root / "pred" / f"{name}.candidates.csv").write_text("\n".join(lines) + "\n")
    (root / "pred" / f"{name}.prob.json").write_text(
        json.dumps({"slide": str(root / "missing" / f"{name}.tif"), "dims": [W, H], "mpp": mpp})
    )


# --------------------------------------------------------------------------- geometry


def test_major_axis_of_a_rotated_ellipse_matches_regionprops_definition():
    a, b, theta = 40.0, 15.0, math.radians(30)
    yy, xx = np.mgrid[0:160, 0:160] - 80.0
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    labels = ((u / a) ** 2 + (v / b) ** 2 <= 1).astype(np.int32)
    labels[5:9, 5:25] = 2  # a 4 x 20 bar: covariance eigenvalue (20^2 - 1) / 12
    major = major_axis_lengths(labels, 2)
    # A filled ellipse has variance a^2 / 4 along its major axis: 4 * sqrt(a^2 / 4) = 2a.
    assert major[0] == pytest.approx(2 * a, rel=0.01)
    assert major[1] == pytest.approx(4 * math.sqrt((20**2 - 1) / 12))


def test_dilation_merges_lesions_closer_than_75_um_only():
    # Level-5 columns: A covers 31..50; B 53..72 (a 2-pixel = 64 um gap: merged);
    # B' 54..73 (a 3-pixel = 96 um gap: still two lesions).
    a = square(1000, 1000, 640)
    for b, expected in ((square(1700, 1000, 640), 1), (square(1740, 1000, 640), 2)):
        tumor = rasterize_polygons_from(a, b)
        mask = evaluation_mask(tumor, MPP)
        assert mask.count == expected
        assert not mask.itc.any()


def rasterize_polygons_from(*polys: np.ndarray) -> np.ndarray:
    return tumor_mask(list(polys), W, H, 32).astype(bool)


def test_small_lesion_is_an_itc_and_a_large_one_is_not():
    tumor = rasterize_polygons_from(square(300, 300, 160), square(2000, 1000, 400))
    mask = evaluation_mask(tumor, MPP)
    assert mask.count == 2
    # 160 um square (5 px) dilated by one pixel: 7 px wide, major axis ~8 px < 8.6: ITC.
    assert mask.itc.tolist() == [True, False]


# --------------------------------------------------------------------------- FROC cases


def test_froc_interpolation_at_the_six_rates_on_a_known_curve():
    # 2 slides, 3 lesions (one missed), 4 false positives.
    fps, sens, thr = froc_curve(
        np.array([0.9, 0.7, 0.5, 0.3]), np.array([0.8, 0.6, 0.0]), 3, 2, method="interp"
    )
    assert thr.tolist() == [0.3, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert fps.tolist() == [2.0, 1.5, 1.0, 1.0, 0.5, 0.5, 0.0]
    assert sens == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 0, 0])
    score, at = froc_score(fps, sens, method="interp")
    assert at == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])  # np.interp on the curve
    assert score == pytest.approx(0.5)
    score, at = froc_score(fps, sens, method="step")  # the later official bisect lookup
    assert at == pytest.approx([0, 0, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert score == pytest.approx(7 / 18)


def test_perfect_detector_scores_one(tmp_path):
    lesions = [square(500, 500, 800), square(2500, 900, 600)]
    write_case(tmp_path, "tumor_001", lesions, [(0.9, 900, 900), (0.8, 2800, 1200)])
    write_case(tmp_path, "tumor_002", [square(1500, 300, 900)], [(0.7, 1900, 700)])
    write_case(tmp_path, "normal_001", None, [])
    report = evaluate(tmp_path / "pred", [tmp_path / "truth"], method="interp").to_dict()
    assert report["froc"]["score"] == pytest.approx(1.0)
    assert report["froc"]["lesions"] == 3 and report["froc"]["lesions_hit"] == 3
    # The challenge's script (the default) never counts the lowest pooled probability: with
    # nothing lower (no miss, no ITC, no FP) the hit at 0.7 is lost, sensitivity 2/3.
    official = evaluate(tmp_path / "pred", [tmp_path / "truth"]).to_dict()
    assert official["froc"]["score"] == 2 / 3
    assert official["settings"]["froc_method"] == "camelyon16"
    assert report["froc"]["false_positives"] == 0
    assert report["slide_auc"]["auc"] == pytest.approx(1.0)
    normal = next(r for r in report["slides"] if r["name"] == "normal_001")
    assert normal["truth"] is None and "normal" in normal["note"]


def test_detections_only_on_normal_slides_score_zero(tmp_path):
    write_case(tmp_path, "tumor_001", [square(500, 500, 800)], [])
    write_case(tmp_path, "normal_001", None, [(0.9, 100, 100), (0.6, 3000, 1500)])
    report = evaluate(tmp_path / "pred", [tmp_path / "truth"]).to_dict()
    assert report["froc"]["score"] == 0.0
    assert report["froc"]["false_positives"] == 2
    assert report["froc"]["curve"]["fps_per_slide"] == [1.0, 0.5, 0.0]  # 2 FPs over 2 slides


def test_itc_only_slide_contributes_nothing(tmp_path):
    write_case(tmp_path, "tumor_001", [square(500, 500, 800)], [(0.9, 900, 900)])
    write_case(tmp_path, "tumor_002", [square(2010, 1010, 160)], [(0.95, 2080, 1080)])
    report = evaluate(tmp_path / "pred", [tmp_path / "truth"]).to_dict()
    itc_slide = next(r for r in report["slides"] if r["name"] == "tumor_002")
    assert (itc_slide["lesions"], itc_slide["itc"], itc_slide["hits"]) == (0, 1, 0)
    assert (itc_slide["false_positives"], itc_slide["ignored_in_itc"]) == (0, 1)
    assert itc_slide["tumor"] is True
    assert report["froc"]["score"] == pytest.approx(1.0)
    assert report["froc"]["lesions"] == 1 and report["froc"]["false_positives"] == 0


def test_hit_keeps_the_best_probability_and_outside_detections_are_fps():
    tumor = rasterize_polygons_from(square(1000, 1000, 640))
    mask = evaluation_mask(tumor, MPP)
    dets = np.array([[0.4, 1100, 1100], [0.8, 1500, 1500], [0.6, 3000, 300]])
    s = score_slide("t", dets, mask)
    assert s.tp_probs.tolist() == [pytest.approx(0.8)] and s.fp_probs.tolist() == [0.6]
    assert s.lesions[0]["hit_xy"] == [1500, 1500]
    with pytest.raises(EvaluationError, match="outside the slide"):
        score_slide("t", np.array([[0.5, W + 100, 10]]), mask)


def test_slide_auc_on_a_known_case():
    labels = [1, 1, 0, 0, 0]
    scores = [0.9, 0.4, 0.5, 0.4, 0.1]
    # pairs (pos > neg): 0.9 beats all 3; 0.4 beats 0.1, ties 0.4, loses to 0.5 -> (3 + 1.5) / 6
    assert binary_auc(labels, scores) == pytest.approx(4.5 / 6)
    assert math.isnan(binary_auc([1, 1], [0.2, 0.3]))


# --------------------------------------------------------------------------- truth sources


def test_mask_tiffs_give_the_same_lesions_as_the_xml(tmp_path):
    polys = [square(500, 500, 800), square(2500, 900, 600)]
    xml = tmp_path / "t.xml"
    write_asap_xml(xml, polys)
    from_xml = rasterize_polygons(xml, W, H)
    # synthetic mask (downsample 16, JSON description)
    synth = tmp_path / "t_mask.tif"
    write_mask(synth, tumor_mask(polys, W, H, 16), downsample=16, width=W, height=H)
    from_synth, size0, any_tumor = read_mask_tiff(synth)
    assert size0 == (W, H) and any_tumor
    # Camelyon-style: 0/255, level 0 at full size plus reduced levels as pages
    full = (tumor_mask(polys, W, H, 1) * 255).astype(np.uint8)
    cam = tmp_path / "t_Mask.tif"
    with tifffile.TiffWriter(cam) as tw:
        for ds in (1, 4, 16, 64):
            tw.write(
                full[ds // 2 :: ds, ds // 2 :: ds],
                tile=(256, 256),
                compression="zlib",
                subfiletype=0 if ds == 1 else 1,
            )
    from_cam, size0, _ = read_mask_tiff(cam)
    assert size0 == (W, H)
    for other in (from_synth, from_cam):
        assert other.shape == from_xml.shape
        iou = (other & from_xml).sum() / (other | from_xml).sum()
        assert iou > 0.9
        assert evaluation_mask(other, MPP).count == 2


def test_label_mask_needs_the_tumor_value(tmp_path):
    path = tmp_path / "x_mask.tif"
    arr = np.zeros((64, 64), np.uint8)
    arr[:10, :10], arr[20:40, 20:40] = 1, 2
    tifffile.imwrite(path, arr)
    with pytest.raises(EvaluationError, match="--mask-tumor-value"):
        read_mask_tiff(path)
    mask, size0, _ = read_mask_tiff(path, downsample=2, tumor_value=2)
    assert size0 == (64, 64) and mask.sum() == 100


# --------------------------------------------------------------------------- CLI


def test_cli_writes_json_and_png_and_exits_zero(tmp_path):
    from training.cli import app

    write_case(tmp_path, "tumor_001", [square(500, 500, 800)], [(0.9, 900, 900), (0.3, 3500, 200)])
    write_case(tmp_path, "normal_001", None, [(0.5, 100, 100)])
    np.save(tmp_path / "pred" / "normal_001.prob.npy", np.full((4, 4), 0.2, np.float32))
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--pred",
            str(tmp_path / "pred"),
            "--truth",
            str(tmp_path / "truth"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "evaluation.json").read_text())
    # camelyon16 (the default) drops the lowest pooled value, 0.3: thresholds 0.5, float32(0.9)
    # give FPs/slide 0.5, 0 with sensitivity 1 throughout, then (0, 0)
    assert report["froc"]["curve"]["fps_per_slide"] == [0.5, 0.0, 0.0]
    assert report["froc"]["score"] == pytest.approx(1.0)
    normal = next(r for r in report["slides"] if r["name"] == "normal_001")
    assert normal["max_prob_from"] == "prob.npy" and normal["max_prob"] == pytest.approx(0.2)
    assert report["slide_auc"]["auc"] == 1.0
    from PIL import Image

    with Image.open(out / "froc.png") as im:
        assert im.size == (720, 520)
        assert (np.asarray(im.convert("RGB")) == [200, 40, 40]).all(-1).any()  # rate markers
    assert "FROC 1.000" in result.output


def test_cli_missing_prediction_folder_is_a_clear_error(tmp_path):
    from training.cli import app

    (tmp_path / "truth").mkdir()
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--pred",
            str(tmp_path / "nope"),
            "--truth",
            str(tmp_path / "truth"),
            "--out",
            str(tmp_path / "eval"),
        ],
    )
    assert result.exit_code != 0
    assert "prediction folder not found" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "eval").exists()


def test_cli_checkpoint_without_shards_is_refused(tmp_path):
    from training.cli import app

    write_case(tmp_path, "normal_001", None, [])
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--pred",
            str(tmp_path / "pred"),
            "--truth",
            str(tmp_path / "truth"),
            "--checkpoint",
            "x.pt",
        ],
    )
    assert result.exit_code != 0 and "--shards" in result.output


# --------------------------------------------------------------------------- patch level


def test_patch_eval_matches_a_manual_pass_over_the_shards(tmp_path):
    torch = pytest.importorskip("torch")
    from test_train_data import write_region_shards  # tests/ is on sys.path under pytest

    from training.data.augment import Augment, make_patches
    from training.data.stream import RegionStream, make_loader, open_shards, to_device
    from training.model import build_model
    from training.patch_eval import evaluate_patches

    metas = write_region_shards(
        tmp_path / "validation", 5, region=96, shard_size=3, seed=3, split="validation"
    )
    torch.manual_seed(0)
    model = build_model().eval()
    ckpt = tmp_path / "best.pt"
    torch.save(
        {"format": 1, "model": model.state_dict(), "grid": 3, "patch_size": 28, "epoch": 2}, ckpt
    )
    result = evaluate_patches(ckpt, tmp_path / "validation", device="cpu", batch_regions=2)

    data = open_shards(tmp_path / "validation")
    probs, labels = [], []
    with torch.no_grad():
        for b in make_loader(
            RegionStream(data, epoch=0, seed=0, train=False, regions_per_batch=4, grid=3)
        ):
            batch = to_device(b, torch.device("cpu"), 96)
            x, y = make_patches(
                batch.regions, batch.labels, grid=3, patch=28, train=False, aug=Augment.off()
            )
            probs.append(torch.sigmoid(model(x).flatten()).double())
            labels.append(y)
    p, t = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    assert result["patches"] == 5 * 9 and result["tumor_patches"] == int(
        sum(np.sum(m["labels"]) for m in metas)
    )
    assert result["auc"] == pytest.approx(binary_auc(t, p), abs=1e-9)
    assert result["accuracy"] == pytest.approx(np.mean((p >= 0.5) == (t >= 0.5)))
    assert result["checkpoint_epoch"] == 2


# --------------------------------------------------------------------------- bad inputs


def cli(tmp_path: Path, *extra: str):
    from training.cli import app

    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]
    return CliRunner().invoke(app, [*args, *extra])


def test_truth_slides_without_predictions_are_refused_unless_allowed(tmp_path):
    write_case(tmp_path, "tumor_001", [square(500, 500, 800)], [(0.9, 900, 900)])
    write_asap_xml(tmp_path / "truth" / "tumor_002.xml", [square(1500, 300, 900)])  # no preds
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "normal_009.tif").write_bytes(b"")  # a slide without predictions
    out = tmp_path / "eval"
    base = ["--slides", str(tmp_path / "slides"), "--out", str(out)]
    result = cli(tmp_path, *base)
    assert result.exit_code == 2, result.output
    assert "2 slide(s) of the ground truth or --slides have no predictions" in result.output
    assert f"tumor_002 ({tmp_path / 'truth' / 'tumor_002.xml'})" in result.output
    assert f"normal_009 ({tmp_path / 'slides' / 'normal_009.tif'})" in result.output
    assert "--allow-missing" in result.output and "Traceback" not in result.output
    assert not out.exists()

    result = cli(tmp_path, *base, "--allow-missing")
    assert result.exit_code == 0, result.output
    assert "warning: 2 slide(s) have no predictions and are not scored" in result.output
    report = json.loads((out / "evaluation.json").read_text())
    assert report["missing_predictions"] == [
        {"name": "normal_009", "truth": None, "slide": str(tmp_path / "slides" / "normal_009.tif")},
        {"name": "tumor_002", "truth": str(tmp_path / "truth" / "tumor_002.xml"), "slide": None},
    ]
    assert report["settings"]["allow_missing"] is True
    assert [r["name"] for r in report["slides"]] == ["tumor_001"]
    assert any("not scored" in w for w in report["warnings"])
    assert list(report)[:6] == ["settings", "froc", "slide_auc", "patch", "slides", "warnings"]


def asap(coords: str) -> str:
    return (
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        '<Annotation Name="Lesion 7" PartOfGroup="_0"><Coordinates>'
        f"{coords}</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )


def vertices(*xy: tuple[object, object]) -> str:
    return "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(xy))


SQUARE = ((500, 500), (1300, 500), (1300, 1300), (500, 1300))
MALFORMED = {
    "truncated": (asap(vertices(*SQUARE))[:150], "not a valid XML file"),
    "not xml": ("Tumor: 500,500 1300,500 1300,1300", "not a valid XML file"),
    "nan": (asap(vertices((500, 500), ("NaN", 500), *SQUARE[2:])), "NaN or infinite"),
    "non-numeric": (asap(vertices((500, 500), ("12a", 500), *SQUARE[2:])), "without numeric X"),
    "2-point": (asap(vertices(*SQUARE[:2])), "needs at least 3"),
    "off the slide": (asap(vertices((-900, -900), (-100, -900), (-100, -100))), "outside"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_asap_xml_is_a_clear_error_naming_file_and_annotation(tmp_path, case):
    text, expected = MALFORMED[case]
    write_case(tmp_path, "tumor_001", None, [(0.9, 900, 900)])
    write_case(tmp_path, "tumor_002", [square(500, 500, 800)], [(0.9, 900, 900)])
    (tmp_path / "truth" / "tumor_001.xml").write_text(text)
    result = cli(tmp_path, "--out", str(tmp_path / "eval"))
    assert result.exit_code == 2, result.output
    assert str(tmp_path / "truth" / "tumor_001.xml") in result.output
    assert expected in result.output and "Traceback" not in result.output
    if "XML" not in expected:
        assert "'Lesion 7' (#0, group _0)" in result.output  # the annotation: name, index, group
    assert not (tmp_path / "eval").exists()


def test_every_unusable_truth_file_is_listed_in_one_error(tmp_path):
    for name in ("tumor_001", "tumor_002", "tumor_003"):
        write_case(tmp_path, name, [square(500, 500, 800)], [(0.9, 900, 900)])
    (tmp_path / "truth" / "tumor_001.xml").write_text(MALFORMED["truncated"][0])
    (tmp_path / "truth" / "tumor_003.xml").write_text(MALFORMED["nan"][0])
    with pytest.raises(EvaluationError) as info:
        evaluate(tmp_path / "pred", [tmp_path / "truth"])
    message = str(info.value)
    assert message.startswith("2 slides cannot be evaluated (nothing was scored):")
    assert "tumor_001.xml: not a valid XML file" in message
    assert "tumor_003.xml: annotation 'Lesion 7'" in message and "tumor_002" not in message


def test_out_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
    write_case(tmp_path, "tumor_001", [square(500, 500, 800)], [(0.9, 900, 900)])
    (tmp_path / "taken").write_text("not a folder")
    for out in (tmp_path / "taken", tmp_path / "taken" / "eval"):
        result = cli(tmp_path, "--out", str(out))
        assert result.exit_code == 2, result.output
        assert f"{tmp_path / 'taken'}" in result.output and "Traceback" not in result.output
        assert "folder" in result.output
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_out_that_cannot_be_written_is_refused(tmp_path):
    write_case(tmp_path, "tumor_001", [square(500, 500, 800)], [(0.9, 900, 900)])
    if os.geteuid() != 0:
        out = tmp_path / "locked" / "eval"
        out.parent.mkdir()
        out.parent.chmod(0o555)  # a read-only folder
    elif Path("/sys").is_dir():
        out = Path("/sys/patchetl-evaluate-test")  # the kernel refuses files here, even to root
    else:
        pytest.skip("running as root without /sys: no folder this process cannot write")
    result = cli(tmp_path, "--out", str(out))
    assert result.exit_code == 2, result.output
    assert str(out) in result.output and "cannot be written" in result.output
    assert "Traceback" not in result.output and not out.exists()
