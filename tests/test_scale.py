"""Physical scale (etl/wsi/scale.py): the same scene scanned at 0.25 and 0.5 um/px.

Slide A is a synthetic scene at 0.25 um/px (pyramid downsample 4: levels at 0.25 and 1.0
um/px); slide B is A's exact level-0 pixels block-meaned by 2, written at 0.5 um/px
(downsample 2: levels at 0.5 and 1.0). Both are JPEG (quality 90, as synth writes slides) and, for
the exact checks, lossless (zlib). A point at level-0 (x, y) on A is (x / 2, y / 2) on B.
"""

from __future__ import annotations

import math

import numpy as np
import openslide
import pytest
from scale_helpers import psnr, scene_pair, write_pair

from etl.errors import OptionError, PatchetlError
from etl.synth.scene import make_scene
from etl.synth.slide import write_slide
from etl.wsi.downsample import area_resize, block_mean
from etl.wsi.pyramid import PyramidWriter, pyramid_levels, write_pyramid
from etl.wsi.reader import (
    TiffTileReader,
    _mpp_from_properties,
    open_slide,
    read_region_openslide_rgb,
)
from etl.wsi.scale import (
    ScaleError,
    choose_level,
    plan_region,
    read_region_at_mpp,
    region_box,
    slide_mpp,
)

SIDE = 1024  # slide A's side (level 0, 0.25 um/px)
SIZE = 128  # output pixels per region side


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """{compression: (path of A, path of B)} and the scene's exact level-0 pixels."""
    folder = tmp_path_factory.mktemp("scale")
    _, exact, half = scene_pair(SIDE, seed=3)
    paths = {
        comp: write_pair(folder, exact, half, comp, (f"a_{comp}", f"b_{comp}"))
        for comp in ("jpeg", "zlib")
    }
    return paths, exact


def centres(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Even level-0 centres on A, far enough inside for every target here."""
    rng = np.random.default_rng(seed)
    return [(2 * int(x), 2 * int(y)) for x, y in rng.integers(150, SIDE // 2 - 150, (n, 2))]


def pair_psnr(paths, target: float, n: int = 8) -> tuple[float, list]:
    """PSNR of A's and B's regions at ``target`` around the same physical centres."""
    a_pix, b_pix, regions = [], [], []
    with open_slide(paths[0]) as a, open_slide(paths[1]) as b:
        for x, y in centres(n):
            pa, ra = read_region_at_mpp(a, x, y, SIZE, target)
            pb, rb = read_region_at_mpp(b, x // 2, y // 2, SIZE, target)
            a_pix.append(pa)
            b_pix.append(pb)
            regions.append((ra, rb))
    return psnr(np.stack(a_pix), np.stack(b_pix)), regions


# --------------------------------------------------------------------------- scanners agree
# measured PSNR: 36.7, 37.7, 38.0, 45.2 dB; with whole-pixel boxes 0.6 gave 33.9 dB, and with
# PIL's BOX filter (a pixel counts wholly or not by its centre) 0.75 gave 34.4 dB
@pytest.mark.parametrize(
    ("target", "levels", "min_db"),
    [
        (0.5, ((0, 2.0), (0, 1.0)), 35.0),  # A resampled by 2, B read as is
        (0.6, ((0, 2.4), (0, 1.2)), 35.0),  # both resampled, between levels
        (0.75, ((0, 3.0), (0, 1.5)), 35.0),
        (1.0, ((1, 1.0), (1, 1.0)), 40.0),  # both at a level's own scale
    ],
)
def test_regions_at_a_target_mpp_agree_across_scanners(slides, target, levels, min_db):
    paths, _ = slides
    value, regions = pair_psnr(paths["jpeg"], target)
    print(f"target {target}: PSNR A vs B {value:.1f} dB")
    (level_a, factor_a), (level_b, factor_b) = levels
    for ra, rb in regions:
        assert (ra.level, rb.level) == (level_a, level_b)
        assert ra.factor == pytest.approx(factor_a) and rb.factor == pytest.approx(factor_b)
        assert ra.side * 0.25 == pytest.approx(rb.side * 0.5) == pytest.approx(SIZE * target)
    assert value >= min_db


def test_lossless_slides_agree_exactly_where_the_filter_is_the_same(slides):
    """Without JPEG, A at 0.5 (area average by 2) is B's level 0 bit for bit; between levels
    only the rounding of B's block mean and the sub-pixel split of its pixels differ."""
    paths, _ = slides
    assert pair_psnr(paths["zlib"], 0.5)[0] == math.inf
    for target, min_db in ((0.6, 40.0), (0.75, 40.0)):  # measured 44.4 and 44.0 dB
        value = pair_psnr(paths["zlib"], target)[0]
        print(f"lossless, target {target}: PSNR A vs B {value:.1f} dB")
        assert value >= min_db


def test_without_a_target_mpp_the_scanners_differ_in_scale(slides):
    """The same level-0 read on both (the behaviour without --mpp) covers 32 um on A and
    64 um on B: far apart; A's region at 0.5 matches B's central half at its own scale."""
    paths, _ = slides
    with open_slide(paths["jpeg"][0]) as a, open_slide(paths["jpeg"][1]) as b:
        same_px, scaled = [], []
        for x, y in centres(8):
            pa = a.read_region(x - SIZE // 2, y - SIZE // 2, 0, SIZE, SIZE)
            pb = b.read_region(x // 2 - SIZE // 2, y // 2 - SIZE // 2, 0, SIZE, SIZE)
            same_px.append(psnr(pa, pb))
            scaled.append(psnr(read_region_at_mpp(a, x, y, SIZE, 0.5)[0], pb))
    print(
        f"level-0 reads A vs B: {np.median(same_px):.1f} dB; at 0.5 um/px {np.median(scaled):.1f}"
    )
    assert max(same_px) < 25.0  # measured 13-18 dB
    assert min(scaled) >= 33.0


# --------------------------------------------------------------------------- own scale
@pytest.fixture(scope="module")
def synth_slides(tmp_path_factory):
    """The same scene written by synth as generic TIFF and as Aperio SVS (downsample 2)."""
    folder = tmp_path_factory.mktemp("synth")
    scene = make_scene(1100, 500, mpp=0.25, seed=5)
    paths = (folder / "s.tif", folder / "s.svs")
    for path, vendor in zip(paths, ("generic", "aperio"), strict=True):
        write_slide(path, scene, downsample=2, vendor=vendor)
    return paths


@pytest.mark.parametrize("backend", ["tiff", "openslide"])
def test_a_levels_own_scale_is_openslides_read_at_that_level(slides, synth_slides, backend):
    """At a level's own mpp nothing is resampled: the pixels are OpenSlide's read_region at
    that level, on both backends, at centres on and off the level's pixel grid."""
    paths, _ = slides
    checked = 0
    for path in (*paths["jpeg"], *synth_slides):
        ref = openslide.OpenSlide(str(path))
        with open_slide(path, backend=backend) as reader:
            assert reader.backend == backend
            mpp = slide_mpp(reader.mpp, path)
            for level, ds in enumerate(reader.level_downsamples):
                for x, y in ((400, 300), (401, 333), (8 * 51, 8 * 37)):
                    pixels, region = read_region_at_mpp(reader, x, y, 96, mpp * ds)
                    assert not region.resampled and region.level == level
                    want = read_region_openslide_rgb(
                        ref, int(region.left), int(region.top), level, 96, 96
                    )
                    assert np.array_equal(pixels, want)
                    checked += 1
        ref.close()
    assert checked == 8 * 3  # 2 levels on each of 4 slides, 3 centres


def test_resampled_reads_use_the_direct_tile_reader_and_match_openslides(slides):
    """Reads between levels start on the level's pixel grid: the direct reader decodes
    tiles itself (no OpenSlide fallback) and gives what the OpenSlide backend gives."""
    paths, _ = slides
    path = paths["jpeg"][1]  # levels at 0.5 and 1.0 um/px
    with open_slide(path, backend="tiff") as fast, open_slide(path, backend="openslide") as ref:
        for target in (0.7, 1.37, 2.5):  # level 0, then level 1, resampled
            for x, y in ((251, 263), (256, 256), (301, 199)):
                got, region = read_region_at_mpp(fast, x, y, 48, target)
                assert region.resampled
                assert np.array_equal(got, read_region_at_mpp(ref, x, y, 48, target)[0])
        assert isinstance(fast, TiffTileReader)
        assert fast.fallback_reads == 0 and fast.tiles_decoded > 0


# --------------------------------------------------------------------------- geometry
def test_centres_stay_and_boxes_follow_the_extract_convention():
    downsamples = (1.0, 4.0, 16.0)
    for x, y in ((1000, 2001), (37, 5), (99999, 12345)):
        for size in (768, 224, 97):
            for target in (0.25, 0.3, 0.61, 1.0, 1.7, 4.0):
                r = plan_region(x, y, size, mpp=0.25, target_mpp=target, downsamples=downsamples)
                if r.resampled:  # the exact box: centred on (x, y), physical side size * target
                    assert (r.left + r.side / 2, r.top + r.side / 2) == pytest.approx((x, y))
                    assert r.side * 0.25 == pytest.approx(size * target)
                else:  # the level's own pixels, placed as extract places them at --level
                    want = region_box(x, y, size, downsamples[r.level])
                    assert (
                        (r.left, r.top, r.side)
                        == want
                        == region_box(x, y, size, r.level_mpp / 0.25)
                    )
                    assert abs(r.left + r.side / 2 - x) <= 0.5
                assert r.metadata()["box"] == [r.left, r.top, r.side]


def test_the_level_read_is_the_coarsest_at_least_as_fine_as_the_target():
    ds = (1.0, 4.0, 16.0)
    cases = {
        0.25: (0, 1.0),
        0.2525: (0, 1.0),  # 1 % coarser than level 0: that level, read as is
        0.2476: (0, 1.0),  # 1 % finer: the same
        0.26: (0, 1.04),
        0.991: (1, 1.0),  # level 1 (1.0 um/px) is within 1 %
        0.98: (0, 3.92),  # 2 % finer than level 1: level 0, shrunk
        1.5: (1, 1.5),
        100.0: (2, 25.0),
    }
    for target, (level, factor) in cases.items():
        choice = choose_level(0.25, target, ds)
        assert (choice.level, choice.factor) == (level, pytest.approx(factor)), target
    with pytest.raises(
        ScaleError, match=r"b\.svs: level 0 is 0\.25 um/px, coarser than --mpp 0\.2"
    ):
        choose_level(0.25, 0.2, ds, "b.svs")
    with pytest.raises(OptionError, match="--mpp -1"):
        choose_level(0.25, -1, ds)


def test_area_resize_is_the_exact_area_average_and_block_mean_for_whole_factors():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    for f in (2, 3, 4):
        w, h = 120 // f, 90 // f
        got = area_resize(img, (w, h), (0, 0, w * f, h * f))
        assert np.array_equal(got, block_mean(img, f, "drop"))
    # a fractional box against 10x supersampling: boxes and steps on a 0.1 px grid
    got = area_resize(img, (24, 18), (0.3, 0.7, 60.3, 45.7)).astype(np.float64)
    fine = img.repeat(10, axis=0).repeat(10, axis=1)[7:457, 3:603].astype(np.float64)
    want = fine.reshape(18, 25, 24, 25, 3).mean(axis=(1, 3))
    assert np.abs(got - want).max() <= 0.5 + 1e-3
    assert np.array_equal(
        area_resize(np.full((50, 50), 77, np.uint8), (7, 9), (0.2, 1, 31, 40)), np.full((9, 7), 77)
    )
    with pytest.raises(ValueError, match="only shrinks"):
        area_resize(img, (200, 90))


# --------------------------------------------------------------------------- slide mpp
def test_a_slide_without_mpp_names_the_slide_and_assume_mpp_reads_it(tmp_path, slides):
    _, exact = slides
    path = tmp_path / "no_mpp.tif"
    write_pyramid(path, pyramid_levels(exact, 4, max_side=256), mpp=None)
    with open_slide(path) as reader:
        assert reader.mpp is None
        with pytest.raises(
            PatchetlError, match=r"no_mpp\.tif: the slide records no pixel size.*--assume-mpp"
        ):
            read_region_at_mpp(reader, 500, 500, SIZE, 0.5)
        pixels, region = read_region_at_mpp(reader, 500, 500, SIZE, 0.5, assume_mpp=0.25)
        assert region.slide_mpp == 0.25 and region.factor == 2.0
        assert np.array_equal(
            pixels, area_resize(reader.read_region(372, 372, 0, 256, 256), (SIZE, SIZE))
        )
    for bad in (0.0, -0.25, math.nan):
        with pytest.raises(OptionError, match="--assume-mpp"):
            slide_mpp((0.5, 0.5), path, bad)  # checked even where the slide has its own
    assert slide_mpp((0.5, 0.5), path, assume=0.25) == 0.5  # only for slides without one


def test_non_square_pixels_are_refused_and_near_square_ones_averaged(tmp_path):
    img = np.full((512, 512, 3), 200, np.uint8)
    path = tmp_path / "aniso.tif"
    write_pyramid(path, [img], mpp=(0.25, 0.3))
    with open_slide(path) as reader:
        assert reader.mpp == pytest.approx((0.25, 0.3))
        with pytest.raises(
            ScaleError, match=r"aniso\.tif: pixels are not square \(mpp x 0\.25, y 0\.3"
        ):
            read_region_at_mpp(reader, 256, 256, 64, 0.5)
    assert slide_mpp((0.25, 0.2512), path) == pytest.approx(0.2506)


def test_mpp_comes_from_tiff_resolution_tags_when_openslide_gives_none(tmp_path):
    """An Aperio file whose description has no MPP: OpenSlide lists only its TIFF tags."""
    img = np.full((1024, 1024, 3), 200, np.uint8)
    path = tmp_path / "no_mpp_field.svs"
    head = "Aperio Image Library v12.0.16 \r\n"
    with PyramidWriter(path, 1024, 1024, mpp=(0.5, 0.5), reduced=0) as w:
        w.level(img, description=f"{head}1024x1024 [0,0 1024x1024] (256x256) JPEG/RGB|AppMag = 20")
        w.page(img[::8, ::8], description=f"{head}thumbnail")
        w.level(img[::2, ::2], description=f"{head}512x512")
    assert openslide.PROPERTY_NAME_MPP_X not in openslide.OpenSlide(str(path)).properties
    for backend in ("tiff", "openslide"):
        with open_slide(path, backend=backend) as reader:
            assert reader.mpp == pytest.approx((0.5, 0.5))
    tags = {"tiff.XResolution": "101600", "tiff.YResolution": "101600"}
    assert _mpp_from_properties({**tags, "tiff.ResolutionUnit": "inch"}) == pytest.approx(
        (0.25, 0.25)
    )
    assert _mpp_from_properties({**tags, "tiff.ResolutionUnit": "none"}) is None
    assert _mpp_from_properties({"openslide.mpp-x": "0", "openslide.mpp-y": "0"}) is None
    assert _mpp_from_properties({"openslide.mpp-x": "nan", "openslide.mpp-y": "0.5"}) is None
