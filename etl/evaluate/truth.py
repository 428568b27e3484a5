"""Ground truth of one slide at the evaluation level: which file, and its tumor mask.

A slide ``<name>``'s truth is looked up in the truth folders: ``<name>.xml`` (ASAP polygons,
tumor minus the ``_2`` holes, rasterised at the pixel centres), ``<name>.geojson`` (QuPath,
class ``Tumor``, read alike) or a mask TIFF
(``<name>_mask.tif``, ``<name>_Mask.tif``, ``<name>_mask.tiff``; sampled at the pixel centres);
a slide without one is a normal slide. A mask's tumor value is 1 or 255 when that is its only
non-zero value; label masks need it given.

A truth file that cannot be used is an ``EvaluationError`` naming the file and the fix; for an
XML, ``etl.wsi.annotations`` checks every polygon against the slide's size and lists each
problem with its annotation (name, index, group): not XML or truncated, coordinates that are
not finite numbers, fewer than 3 distinct vertices, a polygon wholly outside the slide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from etl.evaluate.froc import EVAL_LEVEL, EvaluationError
from etl.wsi.annotations import AnnotationError, Annotations, read_annotations
from etl.wsi.masks import MaskError, read_mask_level, tumor_mask

__all__ = [
    "TRUTH_SUFFIXES",
    "SlideTruth",
    "find_truth",
    "load_truth",
    "rasterize_polygons",
    "read_mask_tiff",
    "truth_files",
]

# <name><suffix>, in the order of preference
TRUTH_SUFFIXES = (".xml", ".geojson", "_mask.tif", "_Mask.tif", "_mask.tiff")


def find_truth(name: str, folders: Sequence[Path]) -> Path | None:
    """The ground-truth file of slide ``name``: ``<name>.xml``, else a mask TIFF, else None."""
    for suffix in TRUTH_SUFFIXES:
        for folder in folders:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def truth_files(folders: Sequence[Path]) -> dict[str, Path]:
    """Every slide with a ground-truth file in ``folders``: name -> its file (``find_truth``)."""
    names = {
        path.name[: -len(suffix)]
        for folder in folders
        for suffix in TRUTH_SUFFIXES
        for path in folder.glob(f"*{suffix}")
        if path.is_file() and len(path.name) > len(suffix)
    }
    return {name: path for name in sorted(names) if (path := find_truth(name, folders))}


def _annotations(path: str | PathLike[str], size0: tuple[int, int]) -> Annotations:
    """The checked polygons of an ASAP file (``etl.wsi.annotations``: every problem of the file,
    each naming the annotation and the fix, raised together) for a slide of ``size0``."""
    try:
        return read_annotations(path, slide_size=size0)
    except AnnotationError as exc:
        raise EvaluationError(str(exc)) from None
    except OSError as exc:
        raise EvaluationError(
            f"{path}: cannot read the ground truth ({exc.strerror or exc}); make the file readable"
        ) from None


def _rasterize(ann: Annotations, width: int, height: int, downsample: int) -> np.ndarray:
    mask: np.ndarray = tumor_mask(ann.tumor, width, height, downsample, holes=ann.holes) > 0
    return mask


def rasterize_polygons(
    path: str | PathLike[str], width: int, height: int, downsample: int = 2**EVAL_LEVEL
) -> np.ndarray:
    """Bool tumor mask of an ASAP XML at ``downsample``: pixel centres inside tumor polygons
    and outside the exclusion (``_2``) polygons. Shape ``(ceil(H/ds), ceil(W/ds))``."""
    return _rasterize(_annotations(path, (width, height)), width, height, downsample)


def _tumor_value(path: Path, values: np.ndarray, tumor_value: int | None) -> int | None:
    if tumor_value is not None:
        return tumor_value
    present = set(values.tolist()) - {0}
    if not present:
        return None
    if present <= {1} or present <= {255}:
        return int(present.pop())
    raise EvaluationError(
        f"{path}: mask values {sorted(present | {0})}: cannot tell which one "
        "is tumor (0/1 and 0/255 masks are understood); pass "
        "--mask-tumor-value (e.g. 2 for label masks where 2 is tumor)"
    )


def read_mask_tiff(
    path: str | PathLike[str], downsample: int = 2**EVAL_LEVEL, tumor_value: int | None = None
) -> tuple[np.ndarray, tuple[int, int], bool]:
    """A mask TIFF (``etl.wsi.masks``) sampled at the centres of the pixels of ``downsample``.

    Returns (bool mask, level-0 (width, height), whether any pixel at the resolution read is
    tumor).
    """
    path = Path(path)
    try:
        level = read_mask_level(path, downsample)
    except MaskError as exc:
        raise EvaluationError(str(exc)) from None
    value = _tumor_value(path, np.unique(level.pixels), tumor_value)
    if value is None:
        w, h = (-(-side // downsample) for side in level.size0)
        return np.zeros((h, w), bool), level.size0, False
    return level.sample(downsample) == value, level.size0, bool((level.pixels == value).any())


@dataclass(frozen=True)
class SlideTruth:
    """A slide's truth at the evaluation level: ``tumor`` mask (None: no truth file),
    whether the file holds any tumor, the level-0 size it gave (masks know it), and the
    warnings reading it gave (e.g. a polygon reaching outside the slide)."""

    path: Path | None
    tumor: np.ndarray | None
    has_tumor: bool
    size0: tuple[int, int] | None
    notes: tuple[str, ...] = ()


def load_truth(
    name: str,
    folders: Sequence[Path],
    size0: tuple[int, int] | None,
    downsample: int,
    tumor_value: int | None,
    hint: str,
) -> SlideTruth:
    """The truth of slide ``name`` at ``downsample``; ``size0``: the slide's level-0 size if
    known (an XML needs it; ``hint`` says where it could come from)."""
    path = find_truth(name, folders)
    if path is None:
        return SlideTruth(None, None, False, size0)
    if path.suffix.lower() in (".xml", ".geojson"):  # polygons (etl.wsi.annotations)
        if size0 is None:
            raise EvaluationError(
                f"{name}: the level-0 size of the slide is unknown (needed to rasterise "
                f"{path}); {hint}"
            )
        ann = _annotations(path, size0)
        tumor = _rasterize(ann, *size0, downsample)
        notes = tuple(str(w) for w in ann.warnings)
        return SlideTruth(path, tumor, bool(ann.tumor), size0, notes)
    tumor, mask_size0, has_tumor = read_mask_tiff(path, downsample, tumor_value)
    return SlideTruth(path, tumor, has_tumor, size0 or mask_size0)
