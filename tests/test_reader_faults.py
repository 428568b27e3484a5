"""Damaged tiles: the direct reader fails exactly where OpenSlide fails (issue 13, item 2).

Every fault is injected into a real file: a tile's last bytes zeroed, its TileByteCounts
entry shortened, the file cut inside the tile, a block of the tile zeroed or overwritten
with random bytes, the tile cut and closed with a JPEG end marker, an end marker written a
few bytes early. For every codec the direct reader handles, each read is compared with a
fresh OpenSlide handle on the same file: where OpenSlide raises, the direct reader raises a
SlideError naming the file, the level and the tile (and OpenSlide's reason); where
OpenSlide returns pixels, the direct reader returns the identical pixels.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from test_slide import DIRECT_KINDS, TILE, _image, write_pyramid  # tests/ is on sys.path
from typer.testing import CliRunner

from etl.cli import app
from etl.extract.shards import iter_samples, verify_folder
from etl.synth.cohort import synth_cohort
from etl.wsi.reader import (
    OpenSlideReader,
    SlideError,
    TiffTileReader,
    open_slide,
    read_region_openslide_rgb,
)

FW, FH = 768, 512  # 3 x 2 tiles at level 0, 2 x 1 at level 1
DAMAGED = 1  # level-0 tile (column 1, row 0)
JPEG_KINDS = [
    k for k, kw in DIRECT_KINDS.items() if kw.get("compression") == "jpeg" or "tables" in kw
]


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """Slowly varying colour with little grain: small JPEG tiles, as of stained tissue."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 250, (h // 64 + 2, w // 64 + 2, 3)).astype(np.float32)
    ys = np.linspace(0, coarse.shape[0] - 1.001, h)
    xs = np.linspace(0, coarse.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    img = top * (1 - fy) + bottom * fy + rng.normal(0, 2, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# --- injecting faults into a real file -------------------------------------------------


def _tile_tags(path: Path, page: int) -> tuple[tifffile.TiffTag, tifffile.TiffTag]:
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[page].tags
        return tags["TileOffsets"], tags["TileByteCounts"]


def _tile_extent(path: Path, index: int, page: int = 0) -> tuple[int, int]:
    offsets, counts = _tile_tags(path, page)
    return int(offsets.value[index]), int(counts.value[index])


def _patch_entry(path: Path, tag: tifffile.TiffTag, index: int, value: int) -> None:
    """Rewrite one entry of a classic-TIFF LONG array tag (little-endian)."""
    assert tag.dtype == 4 and tag.count > 1, "the test slides store these as LONG arrays"
    with open(path, "r+b") as fh:
        fh.seek(tag.valueoffset + 4 * index)
        fh.write(struct.pack("<I", value))


def zero_tail(path: Path, index: int, page: int = 0) -> None:
    """The tile loses its last 4 KB (half of it if smaller): bytes zeroed in place."""
    offset, count = _tile_extent(path, index, page)
    n = min(4096, count // 2)
    with open(path, "r+b") as fh:
        fh.seek(offset + count - n)
        fh.write(bytes(n))


def overwrite_middle(path: Path, index: int, page: int = 0, *, random: bool = False) -> None:
    """A block in the middle of the tile zeroed (a lost disk block) or overwritten."""
    offset, count = _tile_extent(path, index, page)
    n = min(4096, count // 3)
    data = np.random.default_rng(index).bytes(n) if random else bytes(n)
    with open(path, "r+b") as fh:
        fh.seek(offset + count // 3)
        fh.write(data)


def write_into_tile(path: Path, index: int, at: int, data: bytes, page: int = 0) -> None:
    """Overwrite bytes of the tile; `at` < 0 counts from its end."""
    offset, count = _tile_extent(path, index, page)
    with open(path, "r+b") as fh:
        fh.seek(offset + (at if at >= 0 else count + at))
        fh.write(data)


def cut_and_terminate(path: Path, index: int, page: int = 0) -> None:
    """The tile's data cut to half and closed with a JPEG end marker, as a writer
    interrupted mid-tile may leave it: the decoder runs out of data long before the end."""
    _, counts = _tile_tags(path, page)
    half = int(counts.value[index]) // 2
    write_into_tile(path, index, half, b"\xff\xd9", page)
    _patch_entry(path, counts, index, half + 2)


def shorten_bytecount(path: Path, index: int, by: int, page: int = 0) -> None:
    """The tile's TileByteCounts entry says `by` bytes fewer (by=0: half the tile)."""
    _, counts = _tile_tags(path, page)
    count = int(counts.value[index])
    _patch_entry(path, counts, index, count - (by or count // 2))


def cut_file_in_tile(path: Path, index: int, missing: int, page: int = 0) -> None:
    """The file ends `missing` bytes (0: half) before the tile does.

    The tile's data is moved to the end of the file first, as if written last: a file cut
    inside a slide's smallest level stops OpenSlide from opening it at all (see
    test_cut_file_is_not_opened_by_any_backend).
    """
    offsets, _ = _tile_tags(path, page)
    offset, count = _tile_extent(path, index, page)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(count)
        end = fh.seek(0, 2)
        fh.write(data)
    _patch_entry(path, offsets, index, end)
    with open(path, "r+b") as fh:
        fh.truncate(end + count - (missing or count // 2))


FAULTS: dict[str, Callable[[Path, int], None]] = {
    "zeroed tail": zero_tail,
    "bytecount half": lambda p, i: shorten_bytecount(p, i, 0),
    "bytecount -2": lambda p, i: shorten_bytecount(p, i, 2),
    "bytecount -1": lambda p, i: shorten_bytecount(p, i, 1),
    "file cut in tile": lambda p, i: cut_file_in_tile(p, i, 0),
    "file cut 1 byte short": lambda p, i: cut_file_in_tile(p, i, 1),
    "zeroed block": overwrite_middle,
    "random block": lambda p, i: overwrite_middle(p, i, random=True),
    "cut and end marker": cut_and_terminate,
    # a JPEG decoder stops at the marker a few bytes early, inside the tile's last block
    "end marker 8 bytes early": lambda p, i: write_into_tile(p, i, -8, b"\xff\xd9"),
}


# --- comparing with OpenSlide ----------------------------------------------------------


def _openslide_read(path: Path, region: tuple[int, int, int, int, int]) -> object:
    """Pixels, or the error, of a fresh OpenSlide handle (its errors are sticky)."""
    x0, y0, level, w, h = region
    try:
        with openslide.OpenSlide(str(path)) as slide:
            return read_region_openslide_rgb(slide, x0, y0, level, w, h)
    except openslide.OpenSlideError as exc:
        return exc


def assert_fails_where_openslide_fails(
    reader, path: Path, regions: list[tuple[int, int, int, int, int]], tile: str
) -> list[str]:
    """Read each region with `reader` and OpenSlide; return the outcomes ("pixels"/"error")."""
    outcomes = []
    for region in regions:
        want = _openslide_read(path, region)
        if isinstance(want, Exception):
            with pytest.raises(SlideError) as info:
                reader.read_region(*region)
            message = str(info.value)
            assert str(path) in message and tile in message and str(want) in message, message
            outcomes.append("error")
        else:
            got = reader.read_region(*region)
            assert np.array_equal(got, want), f"{path.name} {region}: pixels differ"
            outcomes.append("pixels")
    return outcomes


def _regions_around(col: int, row: int, level: int = 0, ds: int = 1) -> list[tuple]:
    """The damaged tile, a read across its left edge, a read elsewhere, the tile again."""
    tx, ty = col * TILE, row * TILE
    return [
        (tx * ds, ty * ds, level, TILE, TILE),
        ((tx - 100) * ds, (ty + 50) * ds, level, 200, 100),
        (0, (TILE + 10) * ds, level, 120, 90),  # row 1: never touches the damaged tile
        (tx * ds, ty * ds, level, TILE, TILE),  # not cached after a failure
    ]


@pytest.fixture(scope="module")
def base_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Good small pyramids: every direct kind on a grainy image, JPEG kinds also smooth."""
    root = tmp_path_factory.mktemp("fault_bases")
    images = {"grainy": _image(FH, FW, seed=7), "smooth": _smooth_image(FH, FW, seed=7)}
    out = {}
    for content, img in images.items():
        for name in DIRECT_KINDS if content == "grainy" else JPEG_KINDS:
            suffix = "svs" if name == "svs" else "tif"
            path = root / f"{name}_{content}.{suffix}"
            out[(name, content)] = write_pyramid(path, levels=2, image=img, **DIRECT_KINDS[name])
    return out


CASES = [(k, "grainy") for k in DIRECT_KINDS] + [(k, "smooth") for k in JPEG_KINDS]


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize(("kind", "content"), CASES, ids=[f"{k}-{c}" for k, c in CASES])
def test_damaged_tile_fails_exactly_where_openslide_fails(
    base_slides, tmp_path, kind, content, fault
):
    path = tmp_path / base_slides[(kind, content)].name
    shutil.copy(base_slides[(kind, content)], path)
    FAULTS[fault](path, DAMAGED)
    with open_slide(path, backend="tiff") as reader:
        assert isinstance(reader, TiffTileReader)
        outcomes = assert_fails_where_openslide_fails(
            reader, path, _regions_around(DAMAGED, 0), f"level 0 tile {DAMAGED} "
        )
    assert outcomes[2] == "pixels"  # the rest of the slide stays readable
    assert outcomes[0] == outcomes[1] == outcomes[3]


@pytest.mark.parametrize("kind", ["lzw", "lzw_predictor"])
def test_lzw_tiles_a_few_bytes_short_match_libtiff(base_slides, tmp_path, kind):
    # libtiff needs every code up to a full tile (the end code may be cut); imagecodecs
    # misreads a last code cut short, or followed by fewer than 3 bytes
    path = tmp_path / "lzw.tif"
    outcomes = []
    for by in (1, 2, 3):
        for index in range(6):
            shutil.copy(base_slides[(kind, "grainy")], path)
            shorten_bytecount(path, index, by)
            col, row = index % 3, index // 3
            with open_slide(path, backend="tiff") as reader:
                region = [(col * TILE, row * TILE, 0, TILE, TILE)]
                outcomes += assert_fails_where_openslide_fails(
                    reader, path, region, f"level 0 tile {index} "
                )
    assert set(outcomes) == {"pixels", "error"}


def test_zeroed_jpeg_tail_is_an_error_naming_file_level_and_tile(base_slides, tmp_path):
    # the case: decoded with a flat grey block before, exit 0
    path = tmp_path / "smooth.tif"
    shutil.copy(base_slides[("jpeg_tables_ycbcr", "smooth")], path)
    zero_tail(path, DAMAGED)
    assert "Premature end of JPEG file" in str(_openslide_read(path, (TILE, 0, 0, TILE, TILE)))
    with open_slide(path) as reader:
        assert isinstance(reader, TiffTileReader)
        with pytest.raises(SlideError) as info:
            reader.read_region(TILE + 10, 20, 0, 100, 100)
        message = str(info.value)
        assert message.startswith(f"{path}: level 0 tile {DAMAGED} (column 1, row 0;")
        assert "end-of-image marker" in message and "Premature end of JPEG file" in message
        assert reader.tiles_doubted == 1
        good = reader.read_region(0, 0, 0, TILE, 2 * TILE)  # column 0: untouched
        with openslide.OpenSlide(str(path)) as slide:
            assert np.array_equal(good, read_region_openslide_rgb(slide, 0, 0, 0, TILE, 2 * TILE))


@pytest.mark.parametrize("kind", ["svs", "lzw"])
def test_damaged_level1_tile_fails_for_direct_and_delegated_reads(base_slides, tmp_path, kind):
    path = tmp_path / base_slides[(kind, "grainy")].name
    shutil.copy(base_slides[(kind, "grainy")], path)
    page = 2 if kind == "svs" else 1  # SVS: the stripped thumbnail is page 1
    shorten_bytecount(path, 1, 0, page=page)
    with open_slide(path, backend="tiff") as reader:
        aligned = [(TILE * 2, 0, 1, 64, 64)]  # level-1 tile 1, read directly
        outcomes = assert_fails_where_openslide_fails(reader, path, aligned, "level 1 tile 1 ")
        assert outcomes == ["error"]
        unaligned = [(TILE * 2 + 1, 0, 1, 64, 64)]  # sub-pixel offset: OpenSlide reads it
        outcomes = assert_fails_where_openslide_fails(reader, path, unaligned, "level 1 at (")
        assert outcomes == ["error"] and reader.fallback_reads == 1
        assert assert_fails_where_openslide_fails(reader, path, [(0, 0, 1, 99, 99)], "") == [
            "pixels"
        ]


def test_openslide_backend_fails_only_the_reads_on_a_damaged_tile(base_slides, tmp_path):
    # an OpenSlide handle fails every call after one failed read; the reader reopens it
    path = tmp_path / "lzw.tif"
    shutil.copy(base_slides[("lzw", "grainy")], path)
    zero_tail(path, DAMAGED)
    with open_slide(path, backend="openslide") as reader:
        assert isinstance(reader, OpenSlideReader)
        outcomes = assert_fails_where_openslide_fails(
            reader, path, _regions_around(DAMAGED, 0), "level 0 at ("
        )
    assert outcomes == ["error", "error", "pixels", "error"]


def test_cut_file_is_not_opened_by_any_backend(base_slides, tmp_path):
    # tifffile writes the smallest level last; OpenSlide hashes it when it opens a slide
    path = tmp_path / "cut.tif"
    shutil.copy(base_slides[("jpeg_tables_ycbcr", "grainy")], path)
    with open(path, "r+b") as fh:
        fh.truncate(fh.seek(0, 2) - 100)
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(path))
    for backend in ("auto", "tiff", "openslide"):
        with pytest.raises(SlideError, match=r"cut\.tif"):
            open_slide(path, backend=backend)


# --- synthetic H&E slides, and through the CLI ----------------------------------------

REGION = 192


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory):
    """One synthetic H&E slide (48 JPEG tiles at level 0) with 12 regions to extract."""
    cohort = synth_cohort(
        tmp_path_factory.mktemp("synth") / "cohort",
        n_slides=1,
        width=2048,
        height=1536,
        tumor_fraction=1.0,
        seed=3,
        mpp=1.0,
        regions_per_slide=12,
        region_size=REGION,
        val_fraction=0.0,
    )
    with TiffTileReader(cohort.slides[0].path) as reader:  # good tiles never need OpenSlide
        for level, lv in enumerate(reader._levels):
            for index in range(len(lv.offsets)):
                reader._tile(lv, level, index)
        assert reader.tiles_doubted == 0 and reader.tiles_decoded > 48
    return cohort


@pytest.mark.parametrize("fault", ["zeroed tail", "zeroed block"])
def test_every_damaged_tile_of_a_synthetic_slide_fails_where_openslide_fails(
    synth, tmp_path, fault
):
    # realistic content: zeroed tails and blocks are sometimes still decoded by OpenSlide
    # (the zeros cover the remaining blocks), sometimes not; the direct reader agrees on each
    path = tmp_path / "slide.tif"
    outcomes = []
    for index in range(48):
        shutil.copy(synth.slides[0].path, path)
        FAULTS[fault](path, index)
        col, row = index % 8, index // 8
        with open_slide(path, backend="tiff") as reader:
            region = [(col * TILE, row * TILE, 0, TILE, TILE)]
            outcomes += assert_fails_where_openslide_fails(
                reader, path, region, f"level 0 tile {index} "
            )
    assert set(outcomes) == {"pixels", "error"}


@pytest.mark.parametrize("backend", ["auto", "openslide"])
def test_extract_records_regions_on_a_damaged_tile_as_failed(synth, tmp_path, backend):
    cohort_root = tmp_path / "cohort"
    shutil.copytree(synth.root, cohort_root)
    slide = cohort_root / synth.slides[0].path.relative_to(synth.root)
    dataset_json = cohort_root / synth.dataset_json.name
    centres = [
        (e["location"][1], e["location"][0])
        for e in json.loads(dataset_json.read_text())["training"]
    ]
    region_reads = {c: (c[0] - REGION // 2, c[1] - REGION // 2, 0, REGION, REGION) for c in centres}
    for x, y in centres:  # zero tile tails until OpenSlide fails on a region (some still decode)
        zero_tail(slide, (y // TILE) * 8 + x // TILE)
        if isinstance(_openslide_read(slide, region_reads[(x, y)]), Exception):
            break
    expected = {
        c for c, r in region_reads.items() if isinstance(_openslide_read(slide, r), Exception)
    }
    assert (x, y) in expected and len(expected) < len(centres)

    out = tmp_path / "out"
    args = ["extract", "--json", str(dataset_json), "--data-root", str(cohort_root)]
    args += ["--out", str(out), "--region-size", str(REGION), "--part-size", "3"]
    args += ["--workers", "1", "--no-progress", "--slide-backend", backend]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert f"{len(expected)} region(s) could not be read" in res.output

    folder = out / "training"
    manifest = json.loads((folder / "manifest.json").read_text())
    failed = {(f["x"], f["y"]): f["reason"] for f in manifest["failed"]}
    assert set(failed) == expected
    assert all("SlideError" in r and str(slide) in r for r in failed.values())
    if backend == "auto":
        assert all("level 0 tile" in r for r in failed.values())
    written = [
        json.loads(s["json"])
        for shard in sorted(folder.glob("*.tar"))
        for _, s in iter_samples(shard)
    ]
    assert {(m["x"], m["y"]) for m in written} == set(centres) - expected
    assert verify_folder(folder) == []
