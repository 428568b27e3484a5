"""Slide reader tests: the direct TIFF reader must be pixel-identical to OpenSlide.

Small pyramidal TIFFs (1500 x 1100 at level 0, 256 tiles, 3 levels, each its own
top-level page) are written here with tifffile; every region read by the direct reader is
compared with np.array_equal against OpenSlide's read_region composited over white.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from etl.wsi.reader import (
    OpenSlideReader,
    SlideError,
    TiffTileReader,
    UnsupportedSlide,
    composite_over_white,
    open_slide,
    read_region_openslide_rgb,
)

W, H, TILE, LEVELS = 1500, 1100, 256, 3
SVS_DESC = (
    "Aperio Image Library v12.0.0 \n1500x1100 [0,0 1500x1100] (256x256) JPEG Q=90"
    "|AppMag = 40|MPP = 0.2430"
)


# --- writing test slides ---------------------------------------------------------------


def _image(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Smoothed colour noise plus fine grain: realistic enough for JPEG."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    ys, xs = np.linspace(0, coarse.shape[0] - 1.001, h), np.linspace(0, coarse.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    img = top * (1 - fy) + bottom * fy + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _tiles(img: np.ndarray) -> list[np.ndarray]:
    """Row-major 256 x 256 tiles, edge tiles zero-padded."""
    out = []
    for y in range(0, img.shape[0], TILE):
        for x in range(0, img.shape[1], TILE):
            tile = np.zeros((TILE, TILE, 3), np.uint8)
            part = img[y : y + TILE, x : x + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            out.append(tile)
    return out


def _split_jpeg(stream: bytes) -> tuple[bytes, bytes]:
    """Full JPEG -> (tables-only stream, abbreviated stream), as libtiff and Aperio store them."""
    i, tables, rest = 2, b"", b""
    while stream[i + 1] != 0xDA:  # up to start of scan
        n = struct.unpack(">H", stream[i + 2 : i + 4])[0]
        seg = stream[i : i + 2 + n]
        if stream[i + 1] in (0xDB, 0xC4):  # DQT, DHT
            tables += seg
        elif not 0xE0 <= stream[i + 1] <= 0xEF:  # drop APPn (JFIF/Adobe) markers
            rest += seg
        i += 2 + n
    return b"\xff\xd8" + tables + b"\xff\xd9", b"\xff\xd8" + rest + stream[i:]


def _write_tables_jpeg(tw: tifffile.TiffWriter, img: np.ndarray, tables: str, **kw) -> None:
    """One page of abbreviated JPEG tiles sharing a JPEGTables tag.

    tables: "ycbcr" (4:2:0), "rgb" (Aperio style), or "rgb_tag_ycbcr_data": tagged RGB but
    YCbCr-coded, where OpenSlide follows the tag (no colour conversion) and a decoder
    that guesses from the stream would convert.
    """
    ycbcr_data = tables != "rgb"
    streams = [
        imagecodecs.jpeg8_encode(
            t,
            level=90,
            colorspace="RGB",
            outcolorspace="YCBCR" if ycbcr_data else "RGB",
            subsampling="420" if tables == "ycbcr" else "444",
        )
        for t in _tiles(img)
    ]
    parts = [_split_jpeg(s) for s in streams]
    assert len({p[0] for p in parts}) == 1  # same quality -> same tables
    tw.write(
        iter([p[1] for p in parts]),
        shape=img.shape,
        dtype=np.uint8,
        tile=(TILE, TILE),
        compression="jpeg",
        photometric="rgb",
        jpegtables=parts[0][0],
        subsampling=(2, 2) if tables == "ycbcr" else (1, 1),
        compressionargs={"outcolorspace": "ycbcr" if tables == "ycbcr" else "rgb"},
        metadata=None,
        **kw,
    )


# name -> writer options; every one must be read directly and identically
DIRECT_KINDS: dict[str, dict] = {
    "jpeg_ycbcr": dict(compression="jpeg"),  # tifffile default: YCbCr 4:2:0, full streams
    "jpeg_rgb": dict(
        compression="jpeg", subsampling=(1, 1), compressionargs={"outcolorspace": "rgb"}
    ),
    "jpeg_tables_ycbcr": dict(tables="ycbcr"),  # like libtiff-written Camelyon16 TIFFs
    "jpeg_tables_rgb": dict(tables="rgb"),
    "jpeg_rgb_tag_ycbcr_data": dict(tables="rgb_tag_ycbcr_data"),
    "lzw": dict(compression="lzw"),
    "lzw_predictor": dict(compression="lzw", predictor=True),
    "adobe_deflate": dict(compression="adobe_deflate"),
    "deflate": dict(compression="deflate"),
    "none": dict(compression=None),
    "zstd": dict(compression="zstd"),
    "svs": dict(tables="rgb", svs=True),  # Aperio: RGB JPEG + tables, stripped thumbnail
}


def write_pyramid(
    path: Path,
    *,
    tables: str | None = None,
    svs: bool = False,
    levels: int = LEVELS,
    image: np.ndarray | None = None,
    **kw,
) -> Path:
    """Tiled pyramidal TIFF, each level its own top-level page (reduced-image flagged).

    image: level 0 (default: the 1500 x 1100 test image).
    """
    img = _image() if image is None else image
    with tifffile.TiffWriter(path) as tw:
        for i in range(levels):
            lv = img[:: 2**i, :: 2**i]
            page_kw: dict = dict(subfiletype=0 if i == 0 or svs else 1)
            if i == 0 and svs:
                page_kw["description"] = SVS_DESC.replace(
                    "1500x1100", f"{lv.shape[1]}x{lv.shape[0]}"
                )
            if i == 0 and not svs:
                page_kw["resolution"] = (1e4 / 0.243, 1e4 / 0.25)
                page_kw["resolutionunit"] = "centimeter"
            if tables is not None:
                _write_tables_jpeg(tw, lv, tables, **page_kw)
            else:
                tw.write(lv, tile=(TILE, TILE), photometric="rgb", metadata=None, **kw, **page_kw)
            if i == 0 and svs:  # real SVS: a stripped thumbnail right after level 0
                tw.write(
                    img[::8, ::8],
                    photometric="rgb",
                    metadata=None,
                    rowsperstrip=16,
                    compression="jpeg",
                )
        if svs:  # and a stripped label at the end
            tw.write(
                img[:200, :300],
                photometric="rgb",
                metadata=None,
                rowsperstrip=64,
                description="Aperio Image Library v12.0.0\nlabel 300x200",
            )
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slides")
    return {
        name: write_pyramid(root / f"{name}.{'svs' if name == 'svs' else 'tif'}", **kw)
        for name, kw in DIRECT_KINDS.items()
    }


def _regions(level_w: int, level_h: int, ds: int, n_random: int, seed: int) -> list[tuple]:
    """(x0, y0, w, h) with x0, y0 at level 0 (multiples of ds): edges, borders, outside."""
    lw, lh = level_w, level_h
    fixed = [  # in level pixels
        (0, 0, 256, 256),
        (0, 0, 1, 1),
        (255, 255, 2, 2),  # tile corner
        (200, 100, 300, 200),
        (100, 240, 50, 40),  # across tile borders
        (lw - 300, lh - 200, 300, 200),
        (lw - 1, lh - 1, 1, 1),  # touching right/bottom
        (lw - 100, 50, 250, 120),
        (30, lh - 60, 90, 150),  # beyond right / bottom
        (-40, -30, 200, 100),
        (-5, 100, 10, 10),
        (10, -7, 64, 64),  # negative x0 / y0
        (-300, -300, 100, 100),
        (lw + 10, 0, 50, 50),
        (0, lh, 40, 40),  # entirely outside
        (-20, -20, lw + 40, lh + 40),  # covers all, margins
        (0, 0, 0, 5),
        (3, 3, 5, 0),  # empty
    ]
    rng = np.random.default_rng(seed)
    for _ in range(n_random):
        w, h = (int(v) for v in rng.integers(1, 800, 2))
        fixed.append((int(rng.integers(-w // 2, lw)), int(rng.integers(-h // 2, lh)), w, h))
    return [(x * ds, y * ds, w, h) for x, y, w, h in fixed]


def _assert_same_as_openslide(reader, path: Path, level: int, regions: list[tuple]) -> None:
    ref = openslide.OpenSlide(str(path))
    try:
        for x0, y0, w, h in regions:
            got = reader.read_region(x0, y0, level, w, h)
            want = read_region_openslide_rgb(ref, x0, y0, level, w, h)
            assert got.shape == (h, w, 3) and got.dtype == np.uint8
            assert np.array_equal(got, want), f"{path.name} level {level} region {(x0, y0, w, h)}"
    finally:
        ref.close()


# --- the files are real pyramids to OpenSlide ------------------------------------------


@pytest.mark.parametrize("name", list(DIRECT_KINDS))
def test_openslide_sees_a_pyramid(slides, name):
    with openslide.OpenSlide(str(slides[name])) as s:
        assert s.level_count == LEVELS
        assert s.level_dimensions[0] == (W, H)
        assert s.properties["openslide.vendor"] == ("aperio" if name == "svs" else "generic-tiff")


# --- pixel identity --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DIRECT_KINDS))
def test_direct_reader_matches_openslide_level0(slides, name):
    with open_slide(slides[name], backend="tiff") as r:
        assert isinstance(r, TiffTileReader) and r.backend == "tiff"
        _assert_same_as_openslide(r, slides[name], 0, _regions(W, H, 1, 12, seed=1))
        assert r.fallback_reads == 0  # level 0 is always direct
        assert r.tiles_doubted == 0  # good tiles pass the damage checks: no OpenSlide reads


@pytest.mark.parametrize("name", ["jpeg_ycbcr", "jpeg_tables_ycbcr", "lzw", "svs"])
def test_direct_reader_matches_openslide_level1_aligned(slides, name):
    with open_slide(slides[name], backend="tiff") as r:
        assert r.level_downsamples[1] == 2.0
        lw, lh = r.level_dimensions[1]
        _assert_same_as_openslide(r, slides[name], 1, _regions(lw, lh, 2, 6, seed=2))
        _assert_same_as_openslide(r, slides[name], 2, _regions(*r.level_dimensions[2], 4, 2, 3))
        assert r.fallback_reads == 0  # level-0 coordinates on the level grid: direct
        assert r.tiles_doubted == 0


def test_unaligned_level1_reads_fall_back_to_openslide(slides):
    # OpenSlide samples level 1 at x0 / 2 = 150.5: interpolated, so the reader delegates
    path = slides["jpeg_ycbcr"]
    with open_slide(path, backend="tiff") as r:
        _assert_same_as_openslide(r, path, 1, [(301, 200, 64, 64), (-3, 7, 40, 30)])
        assert r.fallback_reads == 2
        before = r.tiles_decoded
        r.read_region(302, 200, 1, 64, 64)
        assert r.fallback_reads == 2 and r.tiles_decoded > before


def test_svs_skips_thumbnail_and_label_pages(slides):
    with open_slide(slides["svs"], backend="tiff") as r:
        assert r.vendor == "aperio"
        assert [lv.page_index for lv in r._levels] == [0, 2, 3]
        assert r.level_dimensions == ((W, H), (750, 550), (375, 275))


def test_generic_tiff_levels_are_reduced_pages_widest_first(tmp_path):
    # OpenSlide's generic-tiff rule: page 0 plus tiled pages flagged reduced-resolution,
    # sorted by width; an unflagged tiled page (a macro image, say) is not a level
    img = _image(600, 800, seed=5)
    path = tmp_path / "order.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(TILE, TILE), photometric="rgb", metadata=None, compression="lzw")
        tw.write(
            img[::4, ::4],
            tile=(TILE, TILE),
            photometric="rgb",
            metadata=None,
            subfiletype=1,
            compression="lzw",
        )
        tw.write(
            _image(300, 500, seed=6),
            tile=(TILE, TILE),
            photometric="rgb",
            metadata=None,
            compression="lzw",
        )  # not reduced: ignored
        tw.write(
            img[::2, ::2],
            tile=(TILE, TILE),
            photometric="rgb",
            metadata=None,
            subfiletype=1,
            compression="lzw",
        )
    with open_slide(path, backend="tiff") as r, openslide.OpenSlide(str(path)) as s:
        assert r.level_dimensions == s.level_dimensions == ((800, 600), (400, 300), (200, 150))
        assert [lv.page_index for lv in r._levels] == [0, 3, 1]
        _assert_same_as_openslide(r, path, 1, [(0, 0, 400, 300), (98, 2, 300, 300)])


# --- backend choice --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DIRECT_KINDS))
def test_auto_picks_the_direct_reader(slides, name):
    with open_slide(slides[name]) as r:
        assert isinstance(r, TiffTileReader)


@pytest.mark.parametrize("kind", ["gray", "rgba", "missing_tile"])
def test_auto_falls_back_to_openslide_identically(tmp_path, kind):
    img = _image(600, 700, seed=3)
    path = tmp_path / f"{kind}.tif"
    if kind == "gray":
        tifffile.imwrite(path, img[..., 1], tile=(TILE, TILE), compression="lzw", metadata=None)
    elif kind == "rgba":  # OpenSlide premultiplies alpha: not reproduced directly
        alpha = np.full(img.shape[:2], 200, np.uint8)
        tifffile.imwrite(
            path,
            np.dstack([img, alpha]),
            tile=(TILE, TILE),
            photometric="rgb",
            extrasamples=["unassalpha"],
            metadata=None,
        )
    else:  # Aperio with a zero-length tile (OpenSlide renders it transparent at level 0)
        data = [imagecodecs.jpeg8_encode(t, level=90) for t in _tiles(img)]
        data[4] = b""
        tifffile.imwrite(
            path,
            iter(data),
            shape=img.shape,
            dtype=np.uint8,
            tile=(TILE, TILE),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=SVS_DESC.replace("1500x1100", "700x600"),
        )
    with open_slide(path) as r:
        assert isinstance(r, OpenSlideReader) and r.backend == "openslide"
        _assert_same_as_openslide(r, path, 0, _regions(700, 600, 1, 4, seed=4))
    with pytest.raises(UnsupportedSlide, match=str(path)):
        open_slide(path, backend="tiff")


def test_stripped_tiff_is_not_a_slide_for_any_backend(tmp_path):
    # OpenSlide 4 reads no stripped TIFF, so there is nothing to fall back to
    path = tmp_path / "stripped.tif"
    tifffile.imwrite(path, _image(300, 400), photometric="rgb", metadata=None, rowsperstrip=32)
    for backend in ("auto", "openslide", "tiff"):
        with pytest.raises(SlideError, match=r"stripped.tif") as info:
            open_slide(path, backend=backend)
        assert "OpenSlide" in str(info.value)


def test_openslide_backend_is_forced(slides):
    with open_slide(slides["jpeg_ycbcr"], backend="openslide") as r:
        assert isinstance(r, OpenSlideReader)
        _assert_same_as_openslide(r, slides["jpeg_ycbcr"], 0, [(100, 100, 300, 300)])


# --- tile cache ------------------------------------------------------------------------


def _tiles_touched(x0, y0, w, h, lw=W, lh=H):
    xs = range(max(x0, 0) // TILE, (min(x0 + w, lw) - 1) // TILE + 1)
    ys = range(max(y0, 0) // TILE, (min(y0 + h, lh) - 1) // TILE + 1)
    return {(c, r) for c in xs for r in ys}


def test_cache_decodes_each_tile_once(slides):
    regions = [
        (100, 100, 768, 768),
        (300, 200, 768, 768),
        (0, 0, 256, 256),
        (700, 300, 768, 768),
        (-50, 900, 400, 400),
    ]
    with open_slide(slides["jpeg_tables_ycbcr"], backend="tiff") as r:
        seen: set = set()
        for x0, y0, w, h in regions:
            r.read_region(x0, y0, 0, w, h)
            seen |= _tiles_touched(x0, y0, w, h)
            assert r.tiles_decoded == len(seen)
        for x0, y0, w, h in regions:  # all cached now
            r.read_region(x0, y0, 0, w, h)
        assert r.tiles_decoded == len(seen)
        assert r.cache_bytes == len(seen) * TILE * TILE * 3


def test_small_cache_is_bounded_and_still_decodes_a_region_once(slides):
    tile_bytes = TILE * TILE * 3
    with open_slide(slides["jpeg_ycbcr"], backend="tiff", tile_cache_bytes=2 * tile_bytes) as r:
        want = r.read_region(0, 0, 0, 768, 768)  # 9 tiles, each decoded once
        assert r.tiles_decoded == 9 and r.cache_bytes <= 2 * tile_bytes
        assert np.array_equal(r.read_region(0, 0, 0, 768, 768), want)
        assert r.tiles_decoded == 18  # evicted, so decoded again
        with open_slide(slides["jpeg_ycbcr"], backend="tiff", tile_cache_bytes=0) as r0:
            assert np.array_equal(r0.read_region(0, 0, 0, 768, 768), want)
            assert r0.cache_bytes == 0


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiff"])
def test_missing_file_raises_slide_error(tmp_path, backend):
    path = tmp_path / "nope.svs"
    with pytest.raises(SlideError, match=r"nope.svs.*not found"):
        open_slide(path, backend=backend)
    with pytest.raises(OSError):  # SlideError is an OSError
        open_slide(path, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiff"])
def test_non_slide_file_raises_slide_error(tmp_path, backend):
    path = tmp_path / "notes.tif"
    path.write_text("not an image\n")
    with pytest.raises(SlideError, match=r"notes.tif"):
        open_slide(path, backend=backend)


def test_directory_and_bad_arguments(tmp_path, slides):
    with pytest.raises(SlideError, match="not a file"):
        open_slide(tmp_path)
    with pytest.raises(ValueError, match="unknown slide backend"):
        open_slide(slides["lzw"], backend="gdal")  # type: ignore[arg-type]
    for backend in ("tiff", "openslide"):
        with open_slide(slides["lzw"], backend=backend) as r:
            with pytest.raises(ValueError, match="level 3 out of range"):
                r.read_region(0, 0, 3, 10, 10)
            with pytest.raises(ValueError, match="non-negative"):
                r.read_region(0, 0, 0, -1, 10)
            with pytest.raises(TypeError, match="open_slide"):
                pickle.dumps(r)
        with pytest.raises(ValueError, match="closed"):
            r.read_region(0, 0, 0, 10, 10)
        r.close()  # idempotent


# --- metadata --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lzw", "jpeg_tables_ycbcr", "svs"])
@pytest.mark.parametrize("backend", ["tiff", "openslide"])
def test_metadata_agrees_with_openslide(slides, name, backend):
    path = slides[name]
    with open_slide(path, backend=backend) as r, openslide.OpenSlide(str(path)) as s:
        mpp_x, mpp_y = (float(s.properties[k]) for k in ("openslide.mpp-x", "openslide.mpp-y"))
        assert r.mpp == (mpp_x, mpp_y)
        assert r.mpp == ((0.243, 0.243) if name == "svs" else (0.243, 0.25))
        assert r.dimensions == s.dimensions == (W, H)
        assert r.level_count == s.level_count
        assert r.level_dimensions == s.level_dimensions
        assert r.level_downsamples == s.level_downsamples
        assert r.vendor == s.properties["openslide.vendor"]


def test_mpp_is_none_without_resolution(tmp_path):
    path = tmp_path / "nores.tif"
    tifffile.imwrite(path, _image(300, 300), tile=(TILE, TILE), photometric="rgb", metadata=None)
    for backend in ("tiff", "openslide"):
        with open_slide(path, backend=backend) as r:
            assert r.mpp is None and r.level_count == 1


def test_composite_over_white():
    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [200, 100, 0, 128]]], np.uint8)
    out = composite_over_white(rgba)
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [227, 177, 127]  # c*a/255 + 255*(1-a/255), rounded
