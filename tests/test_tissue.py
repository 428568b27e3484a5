"""The tissue mask against scan artefacts: pen marks, black borders, dust, air bubbles.

Slides from `synth --artefacts` record each artefact's level-0 outline in synth.json and the
scene's tissue is known (``SlideScene.tissue_distance``), so the mask is checked against both:
no artefact pixel is tissue, tissue away from artefacts (and tumor) stays tissue, and on
slides without artefacts the mask is NCRF's (Otsu on saturation) as before.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from etl.synth.cohort import synth_cohort
from etl.synth.scene import make_scene
from etl.wsi.annotations import points_in_polygons
from etl.wsi.masks import tumor_mask
from etl.wsi.reader import open_slide
from etl.wsi.tissue import (
    INK_HUES,
    hue,
    otsu_threshold,
    read_low_res,
    saturation,
    tissue_from_rgb,
    tissue_mask,
)

W, H, MPP, SEED, DS = 2048, 1536, 1.0, 0, 16
# The slides are 2 x 1.5 mm: the default min_area (256 x 256 level-0 px, a quarter millimetre
# square here) would drop whole tissue pieces. Dust specks stay well below this one.
MIN_AREA = 64 * 64
SQUARE = np.ones((3, 3), bool)
OPTS: dict[str, Any] = dict(n_slides=2, width=W, height=H, mpp=MPP, seed=SEED, regions_per_slide=8)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """A tumor and a normal slide with artefacts, their masks at DS and synth.json facts."""
    cohort = synth_cohort(tmp_path_factory.mktemp("dirty"), artefacts=True, **OPTS)
    facts = json.loads((cohort.root / "synth.json").read_text())["slides"]
    masks = []
    for slide in cohort.slides:
        with open_slide(slide.path) as reader:
            masks.append(tissue_mask(reader, downsample=DS, min_area=MIN_AREA).mask)
    return cohort, facts, masks


def _raster(polygon: list[list[float]]) -> np.ndarray:
    """Mask pixels (at DS) whose centre lies inside ``polygon``."""
    return tumor_mask([np.asarray(polygon)], W, H, DS).astype(bool)


def _scene(index: int, has_tumor: bool):
    return make_scene(W, H, mpp=MPP, has_tumor=has_tumor, seed=(SEED, index), artefacts=True)


def test_no_artefact_pixel_is_tissue(dirty):
    _, facts, masks = dirty
    kinds: dict[str, int] = {}
    for slide_facts, mask in zip(facts, masks, strict=True):
        for art in slide_facts["artefacts"]:
            area = _raster(art["polygon"])
            if art["kind"] in ("pen", "border"):  # their fringe mixes with tissue: 1 px off
                area = ndimage.binary_erosion(area, SQUARE, border_value=1)
            else:  # dust and bubbles lie on glass: their whole neighbourhood is not tissue
                area = ndimage.binary_dilation(area, SQUARE)
            name = f"{art['kind']} {art['detail']}".strip()
            kinds[name] = kinds.get(name, 0) + int(area.sum())
            assert not (mask & area).any(), (slide_facts["name"], name, int((mask & area).sum()))
    for name in ("pen blue", "pen green", "pen black", "dust", "bubble"):
        assert kinds.get(name, 0) > 0, kinds  # each kind is there and covers mask pixels
    assert sum(v for k, v in kinds.items() if k.startswith("border")) > 0, kinds


def test_tissue_and_tumor_away_from_artefacts_stay_tissue(dirty):
    cohort, facts, masks = dirty
    for i, (slide, slide_facts, mask) in enumerate(zip(cohort.slides, facts, masks, strict=True)):
        scene = _scene(i, slide.has_tumor)
        rows, cols = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
        x, y = (cols + 0.5) * DS, (rows + 0.5) * DS
        artefacts = np.zeros(mask.shape, bool)
        for art in slide_facts["artefacts"]:
            artefacts |= _raster(art["polygon"])
        away = ~ndimage.binary_dilation(artefacts, SQUARE, iterations=2)
        tissue = (scene.tissue_distance(x, y) > DS) & away  # a mask pixel inside the border
        recall = mask[tissue].mean()
        assert recall >= 0.95, (slide.name, recall)
        if scene.polygons:
            pts = np.stack([x.ravel(), y.ravel()], 1)
            tumor = points_in_polygons(pts, scene.polygons).reshape(mask.shape) & away
            assert tumor.sum() > 50 and mask[tumor].mean() >= 0.97, mask[tumor].mean()


def _ncrf_mask(rgb: np.ndarray, rgb_min: int = 50, min_pixels: float = 0.0) -> np.ndarray:
    """NCRF's rules as the mask had them before artefacts: Otsu on saturation (at least 0.05)
    over every pixel, not background in all of R, G, B, every channel above rgb_min."""
    sat = saturation(rgb)
    tissue = sat > max(otsu_threshold(sat), 0.05)
    background = np.ones(rgb.shape[:2], bool)
    for c in range(3):
        background &= rgb[..., c] > otsu_threshold(rgb[..., c], value_range=(0, 256))
    tissue &= ~background & (rgb > rgb_min).all(axis=-1)
    labels, n = ndimage.label(tissue)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    out: np.ndarray = keep[labels]
    return out


def test_without_artefacts_the_mask_is_ncrfs(tmp_path):
    cohort = synth_cohort(tmp_path, **OPTS)
    for slide in cohort.slides:
        with open_slide(slide.path) as reader:
            new = tissue_mask(reader, downsample=DS).mask
            low = read_low_res(reader, DS)
        old = _ncrf_mask(low.rgb, min_pixels=256 * 256 / DS**2)
        iou = (new & old).sum() / (new | old).sum()
        assert iou >= 0.99, (slide.name, iou)  # measured: 1.0 on both slides


def test_hue_of_stains_and_inks():
    rgb = np.array(
        [
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [128, 128, 128],
            [230, 150, 200],  # eosin pink
            [120, 60, 170],  # hematoxylin purple
            [140, 130, 200],  # hematoxylin-dominated (R >= G): lymph node cortex
            [73, 121, 207],  # blue ink on glass
            [85, 165, 102],  # green ink on glass
        ],
        np.uint8,
    )[None]
    h = hue(rgb)[0]
    np.testing.assert_allclose(h[:4], [0, 120, 240, 0], atol=1e-3)
    lo, hi = INK_HUES
    ink = (h >= lo) & (h < hi)
    assert ink.tolist() == [False, True, False, False, False, False, False, True, True], h


def _glass(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([243.0, 241.0, 245.0]) + rng.normal(0, 2, (*shape, 3))


def test_a_large_ink_area_does_not_hide_pale_tissue():
    """Saturated ink in the Otsu histogram used to push the threshold above pale tissue."""
    rgb = _glass((200, 300))
    rgb[40:160, 60:140] = (226, 190, 214)  # pale tissue, saturation 0.16
    rgb[:, 200:] = (70, 110, 200)  # blue ink over a third of the view
    rgb = np.clip(rgb + np.random.default_rng(1).normal(0, 2, rgb.shape), 0, 255).astype(np.uint8)
    assert _ncrf_mask(rgb)[:, 200:].all() and not _ncrf_mask(rgb)[40:160, 60:140].any()
    mask, thr = tissue_from_rgb(rgb)
    assert mask[42:158, 62:138].all() and not mask[:, 199:].any() and thr < 0.16


def test_thin_rims_go_and_thin_tissue_edges_stay():
    """A pink ring one or two pixels thick (a bubble's rim, a hair) is no tissue piece; a thin
    strand attached to a thick piece is kept."""
    yy, xx = np.mgrid[0:200, 0:300]
    rgb = _glass((200, 300))
    ring = np.abs(np.hypot(yy - 100, xx - 70) - 50) < 1.0
    rgb[ring] = (200, 120, 190)
    rgb[60:140, 180:260] = (200, 120, 190)  # a solid piece
    rgb[98:100, 260:295] = (200, 120, 190)  # with a 2-pixel strand
    rgb = rgb.clip(0, 255).astype(np.uint8)
    mask, _ = tissue_from_rgb(rgb)
    assert not mask[ring].any()
    assert mask[60:140, 180:260].all() and mask[98:100, 260:295].all()
    assert _ncrf_mask(rgb)[ring].all()  # NCRF's rules kept the ring
