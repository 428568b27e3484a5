"""`extract --mpp` and `coords --mpp`: the same scene scanned at 0.25 and 0.5 um/px.

Slide A is a synthetic scene at 0.25 um/px (levels 0.25 and 1.0), slide B its level-0 pixels
block-meaned by 2 at 0.5 um/px (levels 0.5 and 1.0), both JPEG tiles as scanners write them
(tests/scale_helpers.py). A level-0 point (x, y) on A is (x / 2, y / 2) on B. Shards are PNG
(`--format png`) so that only the slides' JPEG and the resampling separate A from B.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import openslide
import pytest
from scale_helpers import psnr, scene_pair, write_pair
from typer.testing import CliRunner

from etl.cli import app
from etl.cohort.geometry import distance_to_polygons
from etl.cohort.run import make_coords
from etl.cohort.slide import SlideOutcome
from etl.config import CohortOptions, SamplingOptions
from etl.extract.encode import decode_image
from etl.extract.plan import ExtractParams
from etl.extract.run import PreflightError, extract_split, plan_extraction
from etl.extract.shards import iter_samples, verify_folder
from etl.wsi.pyramid import pyramid_levels, write_pyramid
from etl.wsi.reader import read_region_openslide_rgb
from etl.wsi.scale import region_box

SIDE = 2048  # slide A's side (level 0, 0.25 um/px); B is 1024
SIZE = 128  # output px per region side
PARSE = {"location_order": "yx", "anchor": "center"}
# The parameters an extraction recorded before --mpp existed (.params.json, manifest.json).
PARAMS_BEFORE_MPP = {"region_size", "level", "fmt", "quality", "shard_size", "seed", "outside"}
SAMPLE_KEYS_BEFORE_MPP = {
    "key", "slide", "split", "index", "x", "y", "x0", "y0", "level", "downsample",
    "region_size", "grid", "cell_size", "labels", "mpp", "padded",
}  # fmt: skip
SCALE_KEYS = {"slide_mpp", "target_mpp", "level_mpp", "scale", "box"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Slides a.tif (0.25 um/px), b.tif (0.5), a_lossless.tif / b_lossless.tif (zlib tiles),
    nompp.tif (A's JPEG tiles, no pixel size), aniso.tif (pixels 0.25 x 0.3 um); the scene's
    tumor polygons (A's level 0)."""
    root = tmp_path_factory.mktemp("pair")
    scene, exact, half = scene_pair(SIDE, seed=3)
    write_pair(root, exact, half, "jpeg", ("a", "b"))
    write_pair(root, exact, half, "zlib", ("a_lossless", "b_lossless"))
    write_pyramid(root / "nompp.tif", pyramid_levels(exact, 4, max_side=256), mpp=None)
    write_pyramid(root / "aniso.tif", [exact[:512, :512]], mpp=(0.25, 0.3))
    return root, scene.polygons


def centres(n: int = 8, seed: int = 0) -> list[tuple[int, int]]:
    """Even level-0 centres on A, inside for every region here (A's box at 1.0 um/px is 512)."""
    rng = np.random.default_rng(seed)
    return [(2 * int(x), 2 * int(y)) for x, y in rng.integers(140, SIDE // 2 - 140, (n, 2))]


def datalist(root: Path, slides: dict[str, int], n: int = 8, name: str = "d.json") -> Path:
    """Entries at the same physical centres on each slide (level-0 centre = A's // divisor),
    with the same 2 x 2 labels (column by column) on every slide."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (n, 4)).tolist()
    split = [
        {"image": image, "location": [y // div, x // div], "label": lab}
        for image, div in slides.items()
        for (x, y), lab in zip(centres(n), labels, strict=True)
    ]
    path = root / name
    path.write_text(json.dumps({"training": split}))
    return path


def extract(coords: Path, root: Path, out: Path, **params) -> dict[str, tuple[dict, np.ndarray]]:
    """Extract the training split with PNG shards; key -> (sample metadata, pixels)."""
    params = ExtractParams(region_size=SIZE, fmt="png", shard_size=5, part_size=3, **params)
    table, (plan,) = plan_extraction(coords, params, data_root=root)
    extract_split(table, plan, out / "training", params, PARSE)
    samples = {}
    for shard in sorted((out / "training").glob("*.tar")):
        for key, sample in iter_samples(shard):
            samples[key] = (json.loads(sample["json"]), decode_image(sample["png"]))
    return samples


def by_slide(samples: dict, image: str) -> list[tuple[dict, np.ndarray]]:
    """The samples of one slide, in entry order."""
    return sorted(
        (s for s in samples.values() if s[0]["slide"] == image), key=lambda s: s[0]["index"]
    )


def stack(samples: list[tuple[dict, np.ndarray]]) -> np.ndarray:
    return np.stack([pixels for _, pixels in samples])


# --------------------------------------------------------------------------- extract --mpp
def test_mpp_shards_of_the_two_scanners_agree_and_without_mpp_they_differ(pair, tmp_path):
    root, _ = pair
    coords = datalist(tmp_path, {"a.tif": 1, "b.tif": 2, "a_lossless.tif": 1, "b_lossless.tif": 2})
    scaled = extract(coords, root, tmp_path / "mpp", mpp=0.5)
    plain = extract(coords, root, tmp_path / "plain")
    jpeg = psnr(stack(by_slide(scaled, "a.tif")), stack(by_slide(scaled, "b.tif")))
    lossless = psnr(
        stack(by_slide(scaled, "a_lossless.tif")), stack(by_slide(scaled, "b_lossless.tif"))
    )
    level0 = psnr(stack(by_slide(plain, "a.tif")), stack(by_slide(plain, "b.tif")))
    print(f"A vs B at --mpp 0.5: {jpeg:.1f} dB (JPEG slides), {lossless} (lossless slides); "
          f"without --mpp: {level0:.1f} dB")  # fmt: skip
    assert jpeg >= 35.0  # measured 37.3 dB
    assert lossless == math.inf  # A's area average by 2 is B's block mean, bit for bit
    assert level0 < 25.0  # 128 px cover 32 um on A and 64 um on B; measured 17.7 dB


def test_a_levels_own_scale_is_openslides_read_at_that_level(pair, tmp_path):
    """--mpp 1.0 is level 1 of both slides (A: downsample 4, B: 2) and 0.5 is B's level 0:
    the shards hold OpenSlide's read_region at that level, placed as --level places it."""
    root, _ = pair
    coords = datalist(tmp_path, {"a.tif": 1, "b.tif": 2})
    checked = 0
    for target, levels in ((1.0, {"a.tif": 1, "b.tif": 1}), (0.5, {"b.tif": 0})):
        samples = extract(coords, root, tmp_path / str(target), mpp=target)
        for image, level in levels.items():
            ref = openslide.OpenSlide(str(root / image))
            ds = ref.level_downsamples[level]
            for meta, pixels in by_slide(samples, image):
                left, top, extent = region_box(meta["x"], meta["y"], SIZE, ds)
                assert (meta["level"], meta["scale"], meta["downsample"]) == (level, 1.0, ds)
                assert meta["box"] == [left, top, extent] and [meta["x0"], meta["y0"]] == [
                    left,
                    top,
                ]
                want = read_region_openslide_rgb(ref, left, top, level, SIZE, SIZE)
                assert np.array_equal(pixels, want)
                checked += 1
            ref.close()
    assert checked == 3 * 8


def test_centres_keys_and_labels_are_those_without_mpp_and_metadata_records_the_scale(
    pair, tmp_path
):
    root, _ = pair
    coords = datalist(tmp_path, {"a.tif": 1, "b.tif": 2})
    scaled = extract(coords, root, tmp_path / "mpp", mpp=0.6)
    plain = extract(coords, root, tmp_path / "plain")
    assert scaled.keys() == plain.keys()
    facts = {"a.tif": (0.25, 0, 0.25, 2.4), "b.tif": (0.5, 0, 0.5, 1.2)}  # between levels
    for key, (meta, pixels) in scaled.items():
        before = plain[key][0]
        assert {k: meta[k] for k in ("x", "y", "labels", "grid", "slide")} == {
            k: before[k] for k in ("x", "y", "labels", "grid", "slide")
        }
        assert set(meta) == SAMPLE_KEYS_BEFORE_MPP | SCALE_KEYS
        slide_mpp, level, level_mpp, scale = facts[meta["slide"]]
        side = SIZE * 0.6 / slide_mpp
        assert (meta["slide_mpp"], meta["target_mpp"], meta["level"]) == (slide_mpp, 0.6, level)
        assert (meta["level_mpp"], meta["scale"]) == (level_mpp, pytest.approx(scale))
        assert meta["box"] == pytest.approx([meta["x"] - side / 2, meta["y"] - side / 2, side])
        assert meta["mpp"] == [slide_mpp, slide_mpp] and pixels.shape == (SIZE, SIZE, 3)
    # A point at (x, y) on A is (x / 2, y / 2) on B: the same physical box on both
    a, b = by_slide(scaled, "a.tif"), by_slide(scaled, "b.tif")
    for (ma, _), (mb, _) in zip(a, b, strict=True):
        assert [v * 0.25 for v in ma["box"]] == pytest.approx([v * 0.5 for v in mb["box"]])
    manifest = json.loads((tmp_path / "mpp" / "training" / "manifest.json").read_text())
    assert manifest["params"]["mpp"] == 0.6 and "assume_mpp" not in manifest["params"]
    assert manifest["slides"]["a.tif"]["scale"] == {
        "slide_mpp": 0.25, "target_mpp": 0.6, "level": 0, "level_mpp": 0.25,
        "scale": pytest.approx(2.4), "side": pytest.approx(307.2),
    }  # fmt: skip
    assert manifest["slides"]["b.tif"]["scale"]["side"] == pytest.approx(153.6)
    assert verify_folder(tmp_path / "mpp" / "training") == []


def test_without_mpp_shards_and_records_are_as_before(pair, tmp_path):
    """Without --mpp nothing new is recorded (an extraction made before --mpp resumes as the
    same one); at a slide's own level-0 mpp the image members are byte for byte those of a
    plain level-0 extraction."""
    root, _ = pair
    coords = datalist(tmp_path, {"b.tif": 2})
    plain = extract(coords, root, tmp_path / "plain")
    folder = tmp_path / "plain" / "training"
    assert set(json.loads((folder / ".params.json").read_text())["params"]) == PARAMS_BEFORE_MPP
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["params"]) == PARAMS_BEFORE_MPP | {"part_size"}
    assert all(set(s) == {"count", "failed", "fingerprint"} for s in manifest["slides"].values())
    assert all(set(meta) == SAMPLE_KEYS_BEFORE_MPP for meta, _ in plain.values())
    scaled = extract(coords, root, tmp_path / "own", mpp=0.5)  # B's own level-0 scale

    def png_sha256(folder: Path) -> dict[str, str]:
        return {
            key: hashlib.sha256(sample["png"]).hexdigest()
            for shard in sorted(folder.glob("*.tar"))
            for key, sample in iter_samples(shard)
        }

    assert png_sha256(tmp_path / "own" / "training") == png_sha256(folder)
    for key, (meta, _) in scaled.items():
        assert {k: meta[k] for k in SAMPLE_KEYS_BEFORE_MPP} == plain[key][0]
    out = str(tmp_path / "plain")
    res = CliRunner().invoke(
        app,
        ["extract", "--json", str(coords), "--data-root", str(root), "--out", out,
         "--region-size", str(SIZE), "--format", "png", "--shard-size", "5", "--mpp", "0.5",
         "--workers", "1", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 2 and "params.mpp" in res.output, res.output


def test_a_slide_without_mpp_is_one_preflight_problem_and_assume_mpp_reads_it(pair, tmp_path):
    root, _ = pair
    coords = datalist(tmp_path, {"nompp.tif": 1, "a.tif": 1, "aniso.tif": 4})
    with pytest.raises(PreflightError) as err:
        plan_extraction(coords, ExtractParams(region_size=SIZE, mpp=0.5), data_root=root)
    # one per slide, not one per region; a.tif has its own mpp
    nompp, aniso = sorted(err.value.problems, key=lambda p: p.slide, reverse=True)
    assert nompp.slide == "nompp.tif" and nompp.index is None
    assert "records no pixel size" in nompp.reason and "--assume-mpp" in nompp.reason
    assert aniso.slide == "aniso.tif" and "pixels are not square" in aniso.reason
    coords = datalist(tmp_path, {"nompp.tif": 1, "a.tif": 1})
    out = tmp_path / "shards"
    args = ["extract", "--json", str(coords), "--data-root", str(root), "--out", str(out),
            "--region-size", str(SIZE), "--format", "png", "--mpp", "0.5", "--workers", "1",
            "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and not out.exists(), res.output
    assert "error: preflight found 1 problem(s)" in res.output
    assert "slide nompp.tif: the slide records no pixel size" in res.output
    res = CliRunner().invoke(app, [*args, "--assume-mpp", "0.25"])
    assert res.exit_code == 0, res.output
    samples = {}
    for shard in sorted((out / "training").glob("*.tar")):
        for key, sample in iter_samples(shard):
            samples[key] = (json.loads(sample["json"]), decode_image(sample["png"]))
    assumed, own = by_slide(samples, "nompp.tif"), by_slide(samples, "a.tif")
    assert [m["slide_mpp"] for m, _ in assumed] == [0.25] * 8 and assumed[0][0]["mpp"] is None
    assert np.array_equal(stack(assumed), stack(own))  # the same tiles, the same scale
    params = json.loads((out / "training" / "manifest.json").read_text())["params"]
    assert (params["mpp"], params["assume_mpp"]) == (0.5, 0.25)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mpp", "0.5", "--level", "1"], "--mpp 0.5 and --level 1 both choose the scale"),
        (["--assume-mpp", "0.25"], "--assume-mpp applies only with --mpp"),
        (["--mpp", "0"], "--mpp 0.0: give a pixel size in um/px"),
        (["--mpp", "0.5", "--assume-mpp", "-1"], "--assume-mpp -1.0: give a pixel size"),
        (["--mpp", "0.5", "--anchor", "corner"], "--anchor corner is only supported"),
        (["--mpp", "0.2"], "level 0 is 0.25 um/px, coarser than --mpp 0.2"),
    ],
)
def test_bad_scale_options_exit_2_before_any_work(pair, tmp_path, args, message):
    root, _ = pair
    coords = datalist(tmp_path, {"a.tif": 1}, n=2)
    out = tmp_path / "shards"
    res = CliRunner().invoke(
        app,
        ["extract", "--json", str(coords), "--data-root", str(root), "--out", str(out), *args],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 2 and message in res.output and not out.exists(), res.output


def test_the_box_at_the_target_scale_decides_inside_the_slide(pair, tmp_path):
    """A centre 100 px from A's left edge: its 128 px level-0 box is inside, its box at
    0.5 um/px (256 level-0 px) is not: refused, skipped or padded with white by --outside."""
    root, _ = pair
    coords = tmp_path / "edge.json"
    entry = {"image": "a.tif", "location": [500, 100], "label": [0]}
    coords.write_text(json.dumps({"training": [entry, {**entry, "location": [500, 600]}]}))
    extract(coords, root, tmp_path / "plain")  # inside without --mpp
    with pytest.raises(PreflightError, match=r"region \[-28, 228\) x \[372, 628\)"):
        plan_extraction(coords, ExtractParams(region_size=SIZE, mpp=0.5), data_root=root)
    _, (plan,) = plan_extraction(
        coords, ExtractParams(region_size=SIZE, mpp=0.5, outside="skip"), data_root=root
    )
    assert plan.n_regions == 1 and plan.skipped[0]["x"] == 100
    padded = extract(coords, root, tmp_path / "pad", mpp=0.5, outside="pad")
    meta, pixels = next(s for s in padded.values() if s[0]["x"] == 100)
    assert meta["padded"] and meta["box"] == [-28.0, 372.0, 256.0]
    assert (pixels[:, :14] == 255).all() and not (pixels[:, 15:] == 255).all()


# --------------------------------------------------------------------------- coords --mpp
@pytest.fixture(scope="module")
def pair_cohort(pair, tmp_path_factory):
    """A and B (JPEG) in one slides folder, with QuPath GeoJSON of the scene's lesion on each
    (B's polygon is A's halved)."""
    root, polygons = pair
    folder = tmp_path_factory.mktemp("cohort")
    slides, ann = folder / "slides", folder / "annotations"
    slides.mkdir()
    ann.mkdir()
    for name, div in (("a", 1), ("b", 2)):
        (slides / f"{name}.tif").symlink_to(root / f"{name}.tif")
        features = [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[*(p / div).tolist(), (p[0] / div).tolist()]],
                },
                "properties": {"classification": {"name": "Tumor"}},
            }
            for p in polygons
        ]
        (ann / f"{name}.geojson").write_text(
            json.dumps({"type": "FeatureCollection", "features": features})
        )
    return slides, ann


def coords_of(pair_cohort, out: Path, **sampling) -> dict[str, SlideOutcome]:
    """``patchetl coords`` on A and B (grid 2 x 2, 128 px regions); slide name -> outcome."""
    slides, ann = pair_cohort
    opts = {"region_size": SIZE, "grid": 2, "tissue_downsample": 8, "min_tissue": 0.25}
    cohort = CohortOptions(
        slides=slides, annotations=ann, out=out, workers=1, progress=False, val_fraction=0
    )
    result = make_coords(cohort, SamplingOptions(**{**opts, **sampling}))
    return {o.name: o for o in result.outcomes}


def regions_of(outcome: SlideOutcome, factor: int = 1) -> dict[tuple[int, int], list[int]]:
    """Centre (x, y) times ``factor`` -> labels."""
    return {
        (factor * int(x), factor * int(y)): labels.tolist()
        for (x, y), labels in zip(outcome.centres, outcome.labels, strict=True)
    }


def test_coords_mpp_gives_the_same_physical_centres_and_labels_on_both_scanners(
    pair_cohort, tmp_path
):
    """Grid mode at 0.5 um/px: A's centres are B's doubled. Tolerance: the tissue masks of the
    two scans (both at 8 px of 0.5 um per mask pixel) may decide a region at the --min-tissue
    border differently, so at least 90 % of the centres are shared (measured: all 27); shared
    centres have equal labels (the cell centres are the same physical points). In level-0 px
    (without --mpp) the two grids have little in common (measured: none of 100 and 27)."""
    outcomes = coords_of(pair_cohort, tmp_path / "d.json", mode="grid", mpp=0.5)
    a, b = regions_of(outcomes["a"]), regions_of(outcomes["b"], 2)
    shared = a.keys() & b.keys()
    print(f"coords --mpp 0.5: {len(a)} regions on A, {len(b)} on B, {len(shared)} shared")
    assert len(shared) >= 0.9 * max(len(a), len(b)) and len(shared) >= 4
    assert all(a[c] == b[c] for c in shared)
    assert any(sum(a[c]) > 0 for c in shared)  # the lesion is in some
    summary = json.loads((tmp_path / "d.summary.json").read_text())
    scale = {s["slide"]: s["scale"] for s in summary["slides"]}
    assert scale == {
        "a": {"slide_mpp": 0.25, "target_mpp": 0.5, "region_side_px": 256.0},
        "b": {"slide_mpp": 0.5, "target_mpp": 0.5, "region_side_px": 128.0},
    }
    plain = coords_of(pair_cohort, tmp_path / "plain.json", mode="grid")  # level-0 px
    a, b = regions_of(plain["a"]), regions_of(plain["b"], 2)
    print(f"without --mpp: {len(a)} regions on A, {len(b)} on B, {len(a.keys() & b.keys())} shared")
    assert len(a.keys() & b.keys()) < len(shared) / 2


def test_coords_mpp_spacing_margin_and_inside_are_at_the_target_scale(pair, pair_cohort, tmp_path):
    """Sample mode at 0.5 um/px on A (0.25): centres at least 2 x --min-spacing level-0 px
    apart, normal centres 2 x --margin from tumor, every 256 px box inside the slide."""
    _, polygons = pair
    outcome = coords_of(
        pair_cohort, tmp_path / "d.json", mpp=0.5, min_spacing=30, margin=40,
        tumor_per_slide=20, normal_per_slide=80,
    )["a"]  # fmt: skip
    xy = outcome.centres.astype(np.float64)
    d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1)) + np.eye(len(xy)) * 1e9
    assert outcome.tumor.sum() >= 5 and (~outcome.tumor).sum() >= 10
    assert d.min() >= 60
    assert distance_to_polygons(xy[~outcome.tumor], polygons).min() >= 80
    assert xy.min() >= 128 and xy.max() <= SIDE - 128


def test_coords_without_mpp_on_a_slide_gives_the_error_and_assume_mpp_reads_it(pair, tmp_path):
    root, _ = pair
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "nompp.tif").symlink_to(root / "nompp.tif")
    args = ["coords", "--slides", str(slides), "--out", str(tmp_path / "d.json"), "--region-size",
            str(SIZE), "--grid", "2", "--mode", "grid", "--val-fraction", "0", "--workers", "1",
            "--no-progress", "--mpp", "0.5"]  # fmt: skip
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 2 and not (tmp_path / "d.json").exists(), res.output
    assert "nompp.tif: the slide records no pixel size" in res.output
    assert "--assume-mpp" in res.output
    res = CliRunner().invoke(app, [*args, "--assume-mpp", "0.25"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "d.summary.json").read_text())
    assert summary["slides"][0]["scale"]["region_side_px"] == 256.0
    assert summary["options"]["assume_mpp"] == 0.25
