"""The torch-free WSI core: slide names, block means, the pyramid writer, masks, annotations."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile

from etl.errors import PatchetlError
from etl.wsi.annotations import read_annotations
from etl.wsi.downsample import block_mean
from etl.wsi.formats import SLIDE_SUFFIXES, find_slides, key_stem, slide_stem
from etl.wsi.masks import read_mask, read_mask_level, tumor_mask, write_mask
from etl.wsi.pyramid import PyramidWriter, pyramid_dims, pyramid_levels, write_pyramid


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("name", "stem", "key"),
    [
        ("tumor_001.tif", "tumor_001", "tumor_001"),
        ("dir/Case 7.SVS", "Case 7", "Case_7"),
        ("a.b.ndpi", "a.b", "a_b"),
        ("scan.vmu", "scan", "scan"),
        ("big.btf", "big", "big"),
        ("notes.txt", "notes.txt", "notes_txt"),
        (".tif", "", "slide"),
    ],
)
def test_slide_stem_drops_a_slide_suffix_and_key_stem_is_key_safe(name, stem, key):
    assert slide_stem(name) == stem
    assert key_stem(name) == key


def test_find_slides_takes_files_and_sorted_slides_of_folders(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("b.svs", "a.tif", "c.TIFF", "readme.md", "d.vmu"):
        (folder / name).write_bytes(b"")
    single = tmp_path / "x.dat"
    single.write_bytes(b"")
    assert [p.name for p in find_slides([single, folder])] == [
        "x.dat",
        "a.tif",
        "b.svs",
        "c.TIFF",
        "d.vmu",
    ]
    assert all(s == s.lower() and s.startswith(".") for s in SLIDE_SUFFIXES)


def test_find_slides_names_the_missing_path_and_the_empty_folder(tmp_path):
    with pytest.raises(PatchetlError, match=r"nope\.tif: slide not found"):
        find_slides([tmp_path / "nope.tif"])
    with pytest.raises(PatchetlError, match="folder holds no slide files"):
        find_slides([tmp_path])


# --------------------------------------------------------------------------- block means
def test_block_mean_rounds_half_up_and_applies_the_edge_rule():
    img = np.array([[0, 1, 2], [1, 1, 200]], np.uint8)
    assert block_mean(img, 2, "drop").tolist() == [[1]]  # (0+1+1+1)/4 = 0.75 -> 1
    assert block_mean(img, 2, "white").tolist() == [[1, 178]]  # (2+200+255+255)/4 = 178
    assert block_mean(img, 2, "replicate").tolist() == [[1, 101]]  # (2+2+200+200)/4 = 101


def test_block_mean_white_edge_is_exact_for_large_factors():
    img = np.random.default_rng(0).integers(0, 256, (70, 45, 3), dtype=np.uint8)
    got = block_mean(img, 32, "white")
    padded = np.full((96, 64, 3), 255, np.int64)
    padded[:70, :45] = img
    sums = padded.reshape(3, 32, 2, 32, 3).sum(axis=(1, 3))
    assert np.array_equal(got, (sums + 512) // 1024)


def test_pyramid_dims_and_levels_follow_the_edge_rule():
    assert pyramid_dims(5000, 3000, 2) == [(5000, 3000), (2500, 1500), (1250, 750), (625, 375)]
    assert pyramid_dims(601, 3, 2, max_side=256, edge="replicate") == [(601, 3), (301, 2), (151, 1)]
    levels = pyramid_levels(np.zeros((3, 601), np.uint8), 2, max_side=256, edge="replicate")
    assert [lv.shape for lv in levels] == [(3, 601), (2, 301), (1, 151)]


# --------------------------------------------------------------------------- pyramid writer
def test_written_pyramid_opens_in_openslide_with_levels_and_mpp(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (700, 1100, 3), dtype=np.uint8)
    levels = pyramid_levels(base, 2, max_side=300)
    path = tmp_path / "p.tif"
    dims = write_pyramid(path, levels, description="hello", compression="zlib", mpp=(0.5, 0.5))
    assert dims == [(1100, 700), (550, 350), (275, 175)]
    with tifffile.TiffFile(path) as tf:
        assert [p.subfiletype for p in tf.pages] == [0, 1, 1]
        assert all(p.is_tiled and p.tilewidth == 256 for p in tf.pages)
        assert tf.pages[0].description == "hello"
        assert np.array_equal(tf.pages[1].asarray(), levels[1])
    with openslide.OpenSlide(path) as osr:
        assert osr.level_dimensions == tuple(dims)
        assert osr.level_downsamples == pytest.approx((1, 2, 4))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)


def test_pre_encoded_tiles_give_the_same_pixels_as_arrays(tmp_path):
    rng = np.random.default_rng(2)
    tiles = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(2)]
    image = np.concatenate([np.concatenate([tiles[0], tiles[1]], 1)] * 2, 0)
    with PyramidWriter(tmp_path / "a.tif", 512, 512, quality=80) as writer:
        writer.level(image)
    with PyramidWriter(tmp_path / "b.tif", 512, 512, quality=80) as writer:
        coded = writer.encode_tiles(tiles)
        writer.level(iter(coded * 2), size=(512, 512))
    a, b = tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif")
    assert np.array_equal(a, b)


# --------------------------------------------------------------------------- masks
def square(x0: float, y0: float, side: float) -> np.ndarray:
    return np.array([(x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side)], float)


def test_tumor_mask_samples_pixel_centres_and_cuts_holes():
    mask = tumor_mask([square(0, 0, 64)], 128, 64, 16, holes=[square(16, 16, 16)])
    assert mask.shape == (4, 8) and mask.dtype == np.uint8
    expected = np.zeros((4, 8), np.uint8)
    expected[:4, :4] = 1
    expected[1, 1] = 0
    assert np.array_equal(mask, expected)


def test_annotations_split_tumor_groups_from_camelyon_holes(tmp_path):
    def annotation(name: str, group: str, x0: int) -> str:
        coords = "".join(
            f'<Coordinate Order="{k}" X="{x}" Y="{y}" />'
            for k, (x, y) in enumerate([(x0, 0), (x0 + 9, 0), (x0 + 9, 9)])
        )
        return (
            f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}">'
            f"<Coordinates>{coords}</Coordinates></Annotation>"
        )

    path = tmp_path / "a.xml"
    path.write_text(
        "<ASAP_Annotations><Annotations>"
        + annotation("t0", "_0", 0)
        + annotation("t1", "_1", 20)
        + annotation("hole", "_2", 2)
        + "</Annotations></ASAP_Annotations>"
    )
    ann = read_annotations(path)
    assert [p[0, 0] for p in ann.tumor] == [0, 20] and [p[0, 0] for p in ann.holes] == [2]


def test_described_and_pyramid_masks_read_back(tmp_path):
    mask = tumor_mask([square(100, 50, 300)], 1000, 600, 16)
    write_mask(tmp_path / "m.tif", mask, downsample=16, width=1000, height=600)
    back, ds = read_mask(tmp_path / "m.tif")
    assert ds == 16 and np.array_equal(back, mask)
    full = tumor_mask([square(100, 50, 300)], 1000, 600, 1) * 255
    write_pyramid(
        tmp_path / "p.tif",
        pyramid_levels(full, 2, max_side=200),
        photometric="minisblack",
        compression="zlib",
    )
    level = read_mask_level(tmp_path / "p.tif", downsample=5)
    assert level.size0 == (1000, 600) and level.downsample == (4.0, 4.0)
    assert np.array_equal(level.sample(16) > 0, mask > 0)
    with pytest.raises(PatchetlError, match="without a JSON description"):
        read_mask(tmp_path / "p.tif")
