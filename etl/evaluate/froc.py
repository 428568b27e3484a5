"""Evaluation of inference outputs: lesion-level FROC (Camelyon16 rules) and slide-level AUC.

Inputs, per slide ``<name>`` in the prediction folder (``patchetl infer`` writes them):
``<name>.candidates.csv`` (header ``prob,x,y``, level-0 pixels) and, optionally,
``<name>.prob.npy`` + ``<name>.prob.json`` (probability map and its sidecar: slide path,
level-0 size, mpp). The slides evaluated are those with a candidates file. Ground truth is
looked up in the truth folders: ``<name>.xml`` (ASAP polygons) or ``<name>_mask.tif`` /
``<name>_Mask.tif`` (a mask TIFF); a slide without one is a normal slide.

The FROC follows Camelyon16's ``Evaluation_FROC.py`` (Bejnordi 2016, and the later Radboud
version of the same script):

- Evaluation mask at level 5: downsample ``2**5 = 32`` of level 0, computed from the level-0
  size (``ceil(W / 32) x ceil(H / 32)`` pixels), whatever levels the slide has. Polygons are
  rasterised there: a pixel is tumor when the level-0 point at its centre is inside a tumor
  polygon and outside the exclusion polygons (``_2``). Mask TIFFs are sampled at the same centres.
- Dilation: ``distance_transform_edt`` of the non-tumor pixels, ``distance < 75 / (mpp * 32 * 2)``
  (the original's ``Threshold = 75/(resolution*pow(2,level)*2)``): every lesion grows by
  37.5 um, so lesions less than 75 um apart merge. Holes are filled, regions are labelled with
  8-connectivity (``measure.label(connectivity=2)``).
- Isolated tumor cells (ITC): regions whose major axis, as ``skimage.measure.regionprops``
  computes it (``4 * sqrt(largest eigenvalue of the pixel-coordinate covariance)``), is below
  ``275 / (mpp * 32)`` level-5 pixels (275 um = 200 um + the 75 um of dilation).
- A detection (prob, x, y) falls on mask pixel ``(y // 32, x // 32)``: on a non-ITC region it
  is a hit of that lesion (the lesion keeps its highest probability), on an ITC region it is
  ignored (neither hit nor false positive), elsewhere it is a false positive. Every detection
  on a normal slide is a false positive.
- Curve: for every distinct non-zero probability t (the later script's ``set(...) - {0.0}``),
  FPs per slide = #FP with prob >= t / #slides and sensitivity = #lesions hit with prob >= t /
  #non-ITC lesions; then the point (0, 0). (The 2016 script skipped the lowest threshold,
  ``all_probs[1:]``, which drops the lowest-scored detection; the later script fixed that.)
- Score: the mean sensitivity at 0.25, 0.5, 1, 2, 4 and 8 FPs per slide. ``method="interp"``
  (default): ``np.interp`` on the curve in increasing-FP order, as NCRF's and MONAI's
  ``compute_froc_score`` do (the numbers they publish); ``method="step"``: the later Radboud
  script's ``bisect_left`` lookup (the first curve point with at least that many FPs).

Slide-level AUC: tumor slide (the truth has tumor) vs normal slide, scored by the maximum of the
probability map (``.prob.npy``) or, without one, the highest candidate probability.
numpy / scipy / PIL only (no torch).
"""
from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from etl.errors import PatchetlError
from etl.wsi.annotations import EXCLUSION_GROUPS, read_asap_xml
from etl.wsi.masks import tumor_mask

__all__ = [
    "DILATION_UM", "EVAL_LEVEL", "FP_RATES", "ITC_UM", "EvaluationError", "LesionMask",
    "SlideScore", "binary_auc", "evaluate", "evaluation_mask", "find_truth", "froc_curve",
    "froc_score", "major_axis_lengths", "plot_froc", "rasterize_polygons", "read_candidates",
    "read_mask_tiff", "score_slide", "write_report",
]

EVAL_LEVEL = 5
DILATION_UM = 75.0  # about 5 tumor cells
ITC_UM = 275.0  # 200 um + the 75 um dilation
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SLIDE_EXTS = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif",
              ".svslide", ".btf")
Method = Literal["interp", "step"]


class EvaluationError(PatchetlError, ValueError):
    """Bad or missing evaluation input; the message names the file and the fix."""


# ----------------------------------------------------------------------------- inputs


def read_candidates(path: str | Path) -> np.ndarray:
    """``(n, 3)`` float64 array of (prob, x, y) from a ``prob,x,y`` CSV (header required)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise EvaluationError(f"{path}: cannot read the candidates file ({exc})") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if header[:3] != ["prob", "x", "y"]:
        raise EvaluationError(f"{path}: expected the header 'prob,x,y' (as `patchetl infer` "
                              f"writes), found {rows[0] if rows else 'an empty file'}")
    values = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue  # blank line
        try:
            if len(row) < 3:
                raise ValueError
            v = [float(c) for c in row[:3]]
        except ValueError:
            raise EvaluationError(f"{path}: line {line} {row} is not three numbers prob,x,y; "
                                  "fix or remove that line") from None
        if not (0.0 <= v[0] <= 1.0 and v[1] >= 0 and v[2] >= 0 and np.isfinite(v).all()):
            raise EvaluationError(f"{path}: line {line}: prob must be in [0, 1] and x, y >= 0 "
                                  f"(level-0 pixels), got {row}")
        values.append(v)
    out = np.array(values, np.float64).reshape(-1, 3)
    return out


def find_truth(name: str, folders: Sequence[Path]) -> Path | None:
    """The ground-truth file of slide ``name``: ``<name>.xml``, else a mask TIFF, else None."""
    patterns = (f"{name}.xml", f"{name}_mask.tif", f"{name}_Mask.tif", f"{name}_mask.tiff")
    for pattern in patterns:
        for folder in folders:
            if (folder / pattern).is_file():
                return folder / pattern
    return None


def rasterize_polygons(path: str | Path, width: int, height: int,
                       downsample: int = 2**EVAL_LEVEL) -> np.ndarray:
    """Bool tumor mask of an ASAP XML at ``downsample``: pixel centres inside tumor polygons
    and outside the exclusion (``_2``) polygons. Shape ``(ceil(H/ds), ceil(W/ds))``."""
    tumor = tumor_mask(read_asap_xml(path), width, height, downsample).astype(bool)
    holes = read_asap_xml(path, groups=EXCLUSION_GROUPS)
    if holes:
        tumor &= ~tumor_mask(holes, width, height, downsample).astype(bool)
    return tumor


def _tumor_value(path: Path, values: np.ndarray, tumor_value: int | None) -> int | None:
    if tumor_value is not None:
        return tumor_value
    present = set(values.tolist()) - {0}
    if not present:
        return None
    if present <= {1} or present <= {255}:
        return present.pop()
    raise EvaluationError(f"{path}: mask values {sorted(present | {0})}: cannot tell which one "
                          "is tumor (0/1 and 0/255 masks are understood); pass "
                          "--mask-tumor-value (e.g. 2 for label masks where 2 is tumor)")


def read_mask_tiff(path: str | Path, downsample: int = 2**EVAL_LEVEL,
                   tumor_value: int | None = None) -> tuple[np.ndarray, tuple[int, int], bool]:
    """A mask TIFF sampled at the centres of the pixels of ``downsample``.

    Accepts the synthetic masks (``etl.synth.cohort.write_mask``: one page whose JSON description
    gives the level-0 size and downsample) and Camelyon-style pyramidal masks (level 0 the
    slide's size; the coarsest level with downsample <= ``downsample`` is read). Returns
    (bool mask, level-0 (width, height), whether any pixel at the native resolution is tumor).
    """
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tf:
            meta = _json_description(tf.pages.first.description)
            if meta is not None and "downsample" in meta:
                arr = tf.pages.first.asarray()
                ds_native = float(meta["downsample"])
                size0 = (int(meta["level0_width"]), int(meta["level0_height"]))
                ds_xy = (ds_native, ds_native)
            else:
                arr, size0, ds_xy = _read_pyramid_level(tf, downsample)
    except (OSError, ValueError, KeyError, tifffile.TiffFileError) as exc:
        if isinstance(exc, EvaluationError):
            raise
        raise EvaluationError(f"{path}: cannot read the mask TIFF ({exc})") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    value = _tumor_value(path, np.unique(arr), tumor_value)
    w5, h5 = math.ceil(size0[0] / downsample), math.ceil(size0[1] / downsample)
    if value is None:
        return np.zeros((h5, w5), bool), size0, False
    rows = np.minimum(((np.arange(h5) + 0.5) * downsample / ds_xy[1]).astype(np.int64),
                      arr.shape[0] - 1)
    cols = np.minimum(((np.arange(w5) + 0.5) * downsample / ds_xy[0]).astype(np.int64),
                      arr.shape[1] - 1)
    return arr[np.ix_(rows, cols)] == value, size0, bool((arr == value).any())


def _json_description(desc: str) -> dict | None:
    try:
        meta = json.loads(desc)
    except (TypeError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _read_pyramid_level(tf: tifffile.TiffFile, downsample: int
                        ) -> tuple[np.ndarray, tuple[int, int], tuple[float, float]]:
    """The coarsest pyramid level with downsample <= ``downsample`` (any TIFF pyramid layout)."""
    levels = []
    for series in tf.series:
        for level in series.levels:
            axes = level.axes
            if "Y" in axes and "X" in axes:
                levels.append((level.shape[axes.index("X")], level.shape[axes.index("Y")], level))
    if not levels:
        raise EvaluationError(f"{tf.filehandle.path}: no 2-D image in the mask TIFF")
    w0, h0, _ = max(levels, key=lambda t: t[0] * t[1])
    best = None
    for w, h, level in levels:
        dx, dy = w0 / w, h0 / h
        if abs(dx - dy) > 0.05 * dx or dx > downsample * 1.01:  # thumbnails, labels, too coarse
            continue
        if best is None or dx > best[0]:
            best = (dx, dy, level)
    dx, dy, level = best  # level 0 always qualifies
    return np.asarray(level.asarray()), (w0, h0), (dx, dy)


# ----------------------------------------------------------------------------- Camelyon rules


@dataclass
class LesionMask:
    """Labelled, dilated evaluation mask of one tumor slide (labels 1..n; ITCs flagged)."""

    labels: np.ndarray  # int32 (h5, w5), 0 = no lesion
    major_axis_px: np.ndarray  # (n,) level-5 pixels
    itc: np.ndarray  # (n,) bool
    downsample: int
    mpp: float

    @property
    def count(self) -> int:
        return len(self.itc)


def major_axis_lengths(labels: np.ndarray, count: int) -> np.ndarray:
    """Major axis of regions 1..count as ``skimage.measure.regionprops`` defines it.

    ``4 * sqrt(l)``, with ``l`` the largest eigenvalue of the covariance of the region's
    pixel coordinates (the normalised central second moments; no 1/12 pixel-size term).
    """
    if count == 0:
        return np.zeros(0)
    rr, cc = np.nonzero(labels)
    lab = labels[rr, cc]
    n = np.bincount(lab, minlength=count + 1)[1:].astype(np.float64)

    def mean(v: np.ndarray) -> np.ndarray:
        return np.bincount(lab, v, minlength=count + 1)[1:] / n

    dr, dc = rr - mean(rr)[lab - 1], cc - mean(cc)[lab - 1]  # two passes: no cancellation
    vrr, vcc, vrc = mean(dr * dr), mean(dc * dc), mean(dr * dc)
    largest = (vrr + vcc) / 2 + np.sqrt(((vrr - vcc) / 2) ** 2 + vrc**2)
    return 4.0 * np.sqrt(largest)


def evaluation_mask(tumor: np.ndarray, mpp: float, level: int = EVAL_LEVEL) -> LesionMask:
    """Dilate a level-``level`` tumor mask by 75 um (as Camelyon16), fill holes, label, flag ITCs."""
    ds = 2**level
    if not tumor.any():
        empty = np.zeros(tumor.shape, np.int32)
        return LesionMask(empty, np.zeros(0), np.zeros(0, bool), ds, mpp)
    distance = ndimage.distance_transform_edt(~tumor)
    grown = ndimage.binary_fill_holes(distance < DILATION_UM / (mpp * ds * 2))
    labels, count = ndimage.label(grown, structure=np.ones((3, 3), bool))
    major = major_axis_lengths(labels, count)
    return LesionMask(labels.astype(np.int32), major, major < ITC_UM / (mpp * ds), ds, mpp)


@dataclass
class SlideScore:
    """Per-slide FROC bookkeeping; ``tp_probs`` has one entry per non-ITC lesion (0 = missed)."""

    name: str
    tumor: bool
    detections: int
    fp_probs: np.ndarray
    tp_probs: np.ndarray
    itc: int = 0
    ignored: int = 0  # detections inside an ITC
    lesions: list[dict] = field(default_factory=list)

    @property
    def hits(self) -> int:
        return int((self.tp_probs > 0).sum())


def score_slide(name: str, detections: np.ndarray, mask: LesionMask | None,
                source: str = "") -> SlideScore:
    """Split one slide's (prob, x, y) detections into hits, ignored (ITC) and false positives."""
    det = np.asarray(detections, np.float64).reshape(-1, 3)
    if mask is None:  # normal slide: every detection is a false positive
        return SlideScore(name, False, len(det), det[:, 0].copy(), np.zeros(0))
    h5, w5 = mask.labels.shape
    cols = np.floor(det[:, 1] / mask.downsample).astype(np.int64)
    rows = np.floor(det[:, 2] / mask.downsample).astype(np.int64)
    outside = (cols < 0) | (cols >= w5) | (rows < 0) | (rows >= h5)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise EvaluationError(
            f"{source or name}: detection {i + 1} at (x={det[i, 1]:g}, y={det[i, 2]:g}) lies "
            f"outside the slide ({w5 * mask.downsample}x{h5 * mask.downsample} px at level 0 "
            "rounded up to the evaluation level); check that the candidates belong to this slide")
    hit = mask.labels[rows, cols]
    itc_label = np.r_[False, mask.itc][hit]
    best = np.zeros(mask.count + 1)
    best_at = np.full(mask.count + 1, -1)
    for i in np.flatnonzero((hit > 0) & ~itc_label):  # max prob per lesion (first one on ties)
        if det[i, 0] > best[hit[i]]:
            best[hit[i]], best_at[hit[i]] = det[i, 0], i
    lesions = []
    size_um = mask.mpp * mask.downsample
    centres = ndimage.center_of_mass(np.ones_like(mask.labels), mask.labels,
                                     range(1, mask.count + 1)) if mask.count else []
    for k in range(1, mask.count + 1):
        r, c = centres[k - 1]
        entry = {"label": k, "itc": bool(mask.itc[k - 1]),
                 "major_axis_um": round(float(mask.major_axis_px[k - 1]) * size_um, 1),
                 "centre_xy": [round((c + 0.5) * mask.downsample, 1),
                               round((r + 0.5) * mask.downsample, 1)],
                 "hit_prob": float(best[k]) if best_at[k] >= 0 else None}
        if best_at[k] >= 0:
            entry["hit_xy"] = det[best_at[k], 1:].tolist()
        lesions.append(entry)
    return SlideScore(name, True, len(det), det[hit == 0, 0].copy(), best[1:][~mask.itc],
                      itc=int(mask.itc.sum()), ignored=int(((hit > 0) & itc_label).sum()),
                      lesions=lesions)


def froc_curve(fp_probs: np.ndarray, tp_probs: np.ndarray, n_lesions: int, n_slides: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPs per slide, sensitivity, thresholds) in increasing-threshold order, then (0, 0).

    ``tp_probs``: one entry per non-ITC lesion of every slide (its best hit, 0 if missed);
    ``fp_probs``: every false positive. ``thresholds`` has one entry fewer (the final point
    has none). Sensitivity is NaN when there is no lesion.
    """
    fp = np.sort(np.asarray(fp_probs, np.float64))
    tp = np.sort(np.asarray(tp_probs, np.float64))
    thresholds = np.unique(np.concatenate([fp, tp]))
    thresholds = thresholds[thresholds != 0.0]
    n_fp = len(fp) - np.searchsorted(fp, thresholds, side="left")  # count of prob >= t
    n_tp = len(tp) - np.searchsorted(tp, thresholds, side="left")
    fps = np.append(n_fp, 0) / max(n_slides, 1)
    sens = np.append(n_tp, 0) / n_lesions if n_lesions else np.full(len(thresholds) + 1, np.nan)
    return fps, sens, thresholds


def froc_score(fps: np.ndarray, sens: np.ndarray, rates: Sequence[float] = FP_RATES,
               method: Method = "interp") -> tuple[float, np.ndarray]:
    """(mean sensitivity at ``rates`` FPs per slide, the sensitivities) from a ``froc_curve``."""
    fps_r, sens_r = np.asarray(fps, np.float64)[::-1], np.asarray(sens, np.float64)[::-1]
    if method == "interp":
        at = np.interp(rates, fps_r, sens_r)
    elif method == "step":
        at = np.array([sens_r[min(bisect.bisect_left(fps_r.tolist(), r), len(sens_r) - 1)]
                       for r in rates])
    else:
        raise EvaluationError(f"FROC method {method!r}: use 'interp' or 'step'")
    return float(np.mean(at)), at


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC from ranks (Mann-Whitney U), ties averaged; NaN when one class is missing."""
    positive = np.asarray(labels).reshape(-1) >= 0.5
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(np.asarray(scores, np.float64).reshape(-1),
                                   return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = (ends - counts + 1 + ends) / 2.0  # 1-based average rank of each tie group
    rank_sum = mean_rank[inverse.reshape(-1)][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ----------------------------------------------------------------------------- one cohort


def _sidecar(pred: Path, name: str) -> dict:
    path = pred / f"{name}.prob.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EvaluationError(f"{path}: not valid JSON ({exc}); rerun `patchetl infer`") from None
    return meta if isinstance(meta, dict) else {}


def _sidecar_dims(meta: dict) -> tuple[int, int] | None:
    for key in ("dims", "dimensions", "level0_dims", "size"):
        if isinstance(meta.get(key), (list, tuple)) and len(meta[key]) == 2:
            return int(meta[key][0]), int(meta[key][1])
    for wk, hk in (("width", "height"), ("level0_width", "level0_height")):
        if wk in meta and hk in meta:
            return int(meta[wk]), int(meta[hk])
    return None


def _as_mpp(value: Any) -> float | None:
    if isinstance(value, (list, tuple)) and value:
        value = value[0]  # (mpp_x, mpp_y): Camelyon's single "resolution" is x
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if mpp > 0 and math.isfinite(mpp) else None


def _slide_facts(name: str, pred: Path, slides: Path | None
                 ) -> tuple[tuple[int, int] | None, float | None, str]:
    """(level-0 size, mpp, where they came from): the slide file, else the map's sidecar."""
    meta = _sidecar(pred, name)
    candidates = []
    if slides is not None:
        candidates += sorted(p for p in slides.glob(f"{name}.*") if p.suffix.lower() in SLIDE_EXTS)
    for key in ("slide", "slide_path", "path", "image"):
        if isinstance(meta.get(key), str):
            candidates.append(Path(meta[key]))
    for path in candidates:
        if path.is_file():
            from etl.wsi.reader import SlideError, open_slide

            try:
                with open_slide(path) as slide:
                    return slide.dimensions, _as_mpp(slide.mpp), str(path)
            except SlideError:
                continue
    if meta:
        return _sidecar_dims(meta), _as_mpp(meta.get("mpp")), str(pred / f"{name}.prob.json")
    return None, None, "unknown"


def _slide_max_prob(pred: Path, name: str, det: np.ndarray) -> tuple[float, str]:
    path = pred / f"{name}.prob.npy"
    if path.is_file():
        try:
            prob = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise EvaluationError(f"{path}: cannot read the probability map ({exc})") from None
        return (float(np.nanmax(prob)) if prob.size else 0.0), "prob.npy"
    return (float(det[:, 0].max()) if len(det) else 0.0), "candidates"


def evaluate(pred: str | Path, truth: Sequence[str | Path], *, slides: str | Path | None = None,
             mpp: float | None = None, level: int = EVAL_LEVEL, method: Method = "interp",
             mask_tumor_value: int | None = None) -> dict:
    """Score every slide of ``pred`` that has ``<name>.candidates.csv``; returns the report dict."""
    pred = Path(pred)
    if not pred.is_dir():
        raise EvaluationError(f"{pred}: prediction folder not found; run `patchetl infer --out "
                              f"{pred} ...` first or pass --pred with the folder it wrote")
    folders = [Path(t) for t in truth]
    for folder in folders:
        if not folder.is_dir():
            raise EvaluationError(f"{folder}: ground-truth folder not found (--truth takes a folder "
                                  "of <name>.xml ASAP annotations or <name>_mask.tif masks)")
    slides_dir = Path(slides) if slides is not None else None
    if slides_dir is not None and not slides_dir.is_dir():
        raise EvaluationError(f"{slides_dir}: slide folder not found (--slides)")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise EvaluationError(f"--mpp {mpp}: use a positive micrometres-per-pixel value")
    if method not in ("interp", "step"):
        raise EvaluationError(f"--froc-method {method!r}: use interp or step")
    files = sorted(pred.glob("*.candidates.csv"))
    if not files:
        raise EvaluationError(f"{pred}: no <name>.candidates.csv files; run `patchetl infer` "
                              "with --out pointing there first")
    ds = 2**level
    scores: list[SlideScore] = []
    rows, warnings = [], []
    for path in files:
        name = path.name[: -len(".candidates.csv")]
        det = read_candidates(path)
        truth_path = find_truth(name, folders)
        size0, slide_mpp, source = _slide_facts(name, pred, slides_dir)
        use_mpp = mpp if mpp is not None else slide_mpp
        mask, is_tumor = None, False
        if truth_path is not None:
            if truth_path.suffix.lower() == ".xml":
                if size0 is None:
                    raise EvaluationError(
                        f"{name}: the level-0 size of the slide is unknown (needed to rasterise "
                        f"{truth_path}); pass --slides with the slide folder, or keep "
                        f"{name}.prob.json from `patchetl infer` in {pred}")
                tumor = rasterize_polygons(truth_path, *size0, downsample=ds)
                is_tumor = bool(read_asap_xml(truth_path))
            else:
                tumor, mask_size0, is_tumor = read_mask_tiff(truth_path, ds, mask_tumor_value)
                size0 = size0 or mask_size0
            if use_mpp is None:
                raise EvaluationError(f"{name}: no mpp known (not in {source}); pass --mpp "
                                      "(e.g. --mpp 0.243 for Camelyon16 at 40x)")
            mask = evaluation_mask(tumor, use_mpp, level)
            if not is_tumor:
                warnings.append(f"{name}: {truth_path} holds no tumor; scored as a normal slide")
        score = score_slide(name, det, mask, source=str(path))
        if not is_tumor:
            score.tumor = False
        scores.append(score)
        max_prob, max_from = _slide_max_prob(pred, name, det)
        rows.append({
            "name": name, "tumor": is_tumor,
            "truth": str(truth_path) if truth_path else None,
            "note": None if truth_path else "no ground-truth file: normal slide",
            "dims": list(size0) if size0 else None, "mpp": use_mpp,
            "mpp_source": "--mpp" if mpp is not None else source,
            "detections": score.detections, "lesions": len(score.tp_probs), "itc": score.itc,
            "hits": score.hits, "false_positives": int(len(score.fp_probs)),
            "ignored_in_itc": score.ignored, "max_prob": max_prob, "max_prob_from": max_from,
            "lesion_table": score.lesions,
        })
    fp = np.concatenate([s.fp_probs for s in scores])
    tp = np.concatenate([s.tp_probs for s in scores])
    n_lesions = len(tp)
    fps, sens, thresholds = froc_curve(fp, tp, n_lesions, len(scores))
    if n_lesions:
        froc, at = froc_score(fps, sens, FP_RATES, method)
    else:
        froc, at = math.nan, np.full(len(FP_RATES), np.nan)
        warnings.append("no (non-ITC) lesion on any evaluated slide: FROC is undefined; check "
                        f"--truth ({', '.join(map(str, folders))})")
    labels = np.array([r["tumor"] for r in rows], float)
    auc = binary_auc(labels, np.array([r["max_prob"] for r in rows]))
    if math.isnan(auc):
        warnings.append("slide AUC needs both tumor and normal slides")
    return {
        "settings": {"pred": str(pred), "truth": [str(f) for f in folders],
                     "slides": str(slides_dir) if slides_dir else None, "mpp_override": mpp,
                     "level": level, "downsample": ds, "dilation_um": DILATION_UM,
                     "itc_major_axis_um": ITC_UM, "froc_method": method,
                     "fp_rates": list(FP_RATES)},
        "froc": {"score": _num(froc),
                 "sensitivity_at": {f"{r:g}": _num(s) for r, s in zip(FP_RATES, at)},
                 "slides": len(scores), "tumor_slides": int(labels.sum()),
                 "lesions": n_lesions, "lesions_hit": int((tp > 0).sum()),
                 "itc": int(sum(s.itc for s in scores)), "false_positives": int(len(fp)),
                 "curve": {"fps_per_slide": fps.tolist(),
                           "sensitivity": [_num(v) for v in sens],
                           "threshold": thresholds.tolist() + [None]}},
        "slide_auc": {"auc": _num(auc), "tumor_slides": int(labels.sum()),
                      "normal_slides": int(len(labels) - labels.sum()),
                      "score": "max probability of the slide's map (or candidates)"},
        "patch": None,
        "slides": rows,
        "warnings": warnings,
    }


def _num(v: float) -> float | None:
    """JSON-safe float (NaN -> null)."""
    return None if v is None or not math.isfinite(float(v)) else float(v)


# ----------------------------------------------------------------------------- report


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def plot_froc(fps: Sequence[float], sens: Sequence[float], path: str | Path, *,
              rates: Sequence[float] = FP_RATES, at: Sequence[float] | None = None,
              score: float | None = None, xmax: float = 8.0) -> Path:
    """Draw the FROC curve (FPs per slide in [0, xmax] vs sensitivity) as a PNG with PIL."""
    w, h, left, right, top, bottom = 720, 520, 80, 30, 50, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    small, big = _font(13), _font(16)
    pw, ph = w - left - right, h - top - bottom

    def px(x: float, y: float) -> tuple[float, float]:
        return left + pw * min(max(x, 0.0), xmax) / xmax, top + ph * (1.0 - y)

    for k in range(11):  # y grid and ticks every 0.1
        y = k / 10
        d.line([px(0, y), px(xmax, y)], fill=(225, 225, 225))
        d.text((left - 8, px(0, y)[1]), f"{y:.1f}", fill="black", font=small, anchor="rm")
    for k in range(int(xmax) + 1):
        d.line([px(k, 0), px(k, 1)], fill=(225, 225, 225))
        d.text((px(k, 0)[0], top + ph + 8), f"{k}", fill="black", font=small, anchor="mt")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    x = np.asarray(fps, np.float64)[::-1]
    y = np.asarray(sens, np.float64)[::-1]
    keep = np.isfinite(y) & (x <= xmax)
    pts = [px(a, b) for a, b in zip(x[keep], y[keep])]
    if len(x) and np.isfinite(y).all() and x[-1] > xmax:  # carry the line to the right edge
        pts.append(px(xmax, float(np.interp(xmax, x, y))))
    if len(pts) > 1:
        d.line(pts, fill=(20, 60, 160), width=3)
    if len(pts) and x[-1] < xmax:  # np.interp holds the last sensitivity beyond the curve
        d.line([pts[-1], px(xmax, y[-1])], fill=(150, 170, 215), width=2)
    if at is not None:
        for r, s in zip(rates, at):
            if s is not None and math.isfinite(s):
                cx, cy = px(r, s)
                d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=(200, 40, 40))
    title = "FROC" + (f" = {score:.3f}" if score is not None and math.isfinite(score) else
                      " (undefined: no lesion)")
    d.text((left + pw / 2, top / 2), title + "  (red: sensitivity at 1/4, 1/2, 1, 2, 4, 8 FP)",
           fill="black", font=big, anchor="mm")
    d.text((left + pw / 2, h - 22), "average number of false positives per slide",
           fill="black", font=big, anchor="mm")
    label = Image.new("RGB", (ph, 24), "white")
    ImageDraw.Draw(label).text((ph / 2, 12), "lesion detection sensitivity", fill="black",
                               font=big, anchor="mm")
    img.paste(label.rotate(90, expand=True), (8, top))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``<out>/evaluation.json`` and ``<out>/froc.png`` (atomically); return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    froc = report["froc"]
    at = [froc["sensitivity_at"][f"{r:g}"] for r in FP_RATES]
    png = plot_froc(froc["curve"]["fps_per_slide"],
                    [math.nan if v is None else v for v in froc["curve"]["sensitivity"]],
                    out / "froc.png", at=[math.nan if v is None else v for v in at],
                    score=froc["score"] if froc["score"] is not None else math.nan)
    path = out / "evaluation.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path, png


def summary_lines(report: dict) -> list[str]:
    """A short plain-text table of the report (per slide, then the scores)."""
    def f(v: Any, spec: str = ".3f") -> str:
        return "-" if v is None else format(v, spec)

    lines = [f"{'slide':<24} {'truth':<7} {'lesions':>7} {'ITC':>4} {'hits':>5} {'FPs':>5} "
             f"{'max prob':>8}"]
    for r in report["slides"]:
        lines.append(f"{r['name'][:24]:<24} {'tumor' if r['tumor'] else 'normal':<7} "
                     f"{r['lesions']:>7} {r['itc']:>4} {r['hits']:>5} {r['false_positives']:>5} "
                     f"{r['max_prob']:>8.3f}")
    fr = report["froc"]
    lines.append("sensitivity at " + ", ".join(f"{k} FP: {f(v)}"
                                               for k, v in fr["sensitivity_at"].items()))
    lines.append(f"FROC {f(fr['score'])}  ({fr['lesions']} lesions, {fr['itc']} ITC excluded, "
                 f"{fr['slides']} slides, method {report['settings']['froc_method']})")
    sa = report["slide_auc"]
    lines.append(f"slide AUC {f(sa['auc'])}  ({sa['tumor_slides']} tumor / "
                 f"{sa['normal_slides']} normal slides)")
    if report.get("patch"):
        p = report["patch"]
        lines.append(f"patch AUC {f(p.get('auc'))}  accuracy {f(p.get('accuracy'))}  "
                     f"({p.get('patches')} patches)")
    return lines
