"""Camelyon16's lesion-level FROC rules (``Evaluation_FROC.py``, Bejnordi 2016, and the later
Radboud version of the same script), on numpy / scipy only.

- Evaluation mask at level 5: downsample ``2**5 = 32`` of level 0, computed from the level-0
  size (``ceil(W / 32) x ceil(H / 32)`` pixels), whatever levels the slide has (the truth is
  rasterised or sampled there, see ``etl.evaluate.truth``).
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
- Curve and score, by ``method``:

  - ``"camelyon16"`` (default): bit-identical to the challenge's ``Evaluation_FROC.py``
    (computationalpathologygroup/Camelyon16, ``computeFROC``) followed by the score NCRF's copy
    of it prints (``np.mean(np.interp([.25, .5, 1, 2, 4, 8], FPs[::-1], sens[::-1]))``), the
    script behind published Camelyon16 numbers (MONAI's ``compute_froc_curve_data`` copies it
    too). Two quirks are kept on purpose: hit
    probabilities are float32 (``TP_probs = np.zeros(..., np.float32)``) while false-positive
    ones stay float64, so a hit tied with false positives at a value float32 cannot hold
    (0.3) counts at a threshold above them; and the lowest pooled probability is dropped as a
    threshold (``all_probs[1:]``), so the lowest-scored detection never counts, unless a 0
    is pooled: a missed lesion, or an ITC (the script pools one entry per label, ITCs
    included, and an ITC's stays 0). Thresholds run in exact float64 order, as numpy 1.x
    (which the challenge and NCRF ran) sorts the script's mix of float and float32.
  - ``"interp"`` (this project's rule before ``"camelyon16"``, kept unchanged): thresholds
    are every distinct non-zero probability (the later script's ``set(...) - {0.0}``), all in
    float64, FPs per slide = #FP with prob >= t / #slides, sensitivity = #lesions hit with
    prob >= t / #non-ITC lesions, then the point (0, 0); the score is the same ``np.interp``
    at 0.25, 0.5, 1, 2, 4 and 8 FPs per slide, averaged.
  - ``"step"``: the ``"interp"`` curve, each rate read with the later Radboud script's
    ``bisect_left`` lookup (the first curve point with at least that many FPs).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from etl.errors import PatchetlError

__all__ = [
    "DEFAULT_METHOD",
    "DILATION_UM",
    "EVAL_LEVEL",
    "FP_RATES",
    "ITC_UM",
    "METHODS",
    "EvaluationError",
    "LesionMask",
    "Method",
    "SlideScore",
    "evaluation_mask",
    "froc_curve",
    "froc_score",
    "major_axis_lengths",
    "score_slide",
]

EVAL_LEVEL = 5
DILATION_UM = 75.0  # about 5 tumor cells
ITC_UM = 275.0  # 200 um + the 75 um dilation
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
Method = Literal["camelyon16", "interp", "step"]
METHODS: tuple[Method, ...] = ("camelyon16", "interp", "step")
DEFAULT_METHOD: Method = "camelyon16"


class EvaluationError(PatchetlError, ValueError):
    """Bad or missing evaluation input; the message names the file and the fix."""


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
    axes: np.ndarray = 4.0 * np.sqrt(largest)
    return axes


def evaluation_mask(tumor: np.ndarray, mpp: float, level: int = EVAL_LEVEL) -> LesionMask:
    """Dilate a level-``level`` tumor mask by 75 um (as Camelyon16), fill holes, label, flag
    ITCs."""
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
    lesions: list[dict[str, Any]] = field(default_factory=list)  # one row per lesion

    @property
    def hits(self) -> int:
        return int((self.tp_probs > 0).sum())


def score_slide(
    name: str, detections: np.ndarray, mask: LesionMask | None, source: str = ""
) -> SlideScore:
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
            "rounded up to the evaluation level); check that the candidates belong to this slide"
        )
    hit = mask.labels[rows, cols]
    itc_label = np.r_[False, mask.itc][hit]
    best = np.zeros(mask.count + 1)
    best_at = np.full(mask.count + 1, -1)
    for j in np.flatnonzero((hit > 0) & ~itc_label):  # max prob per lesion (first one on ties)
        if det[j, 0] > best[hit[j]]:
            best[hit[j]], best_at[hit[j]] = det[j, 0], j
    lesions: list[dict[str, Any]] = []
    size_um = mask.mpp * mask.downsample
    centres = (
        ndimage.center_of_mass(np.ones_like(mask.labels), mask.labels, range(1, mask.count + 1))
        if mask.count
        else []
    )
    for k in range(1, mask.count + 1):
        r, c = centres[k - 1]
        entry = {
            "label": k,
            "itc": bool(mask.itc[k - 1]),
            "major_axis_um": round(float(mask.major_axis_px[k - 1]) * size_um, 1),
            "centre_xy": [
                round((c + 0.5) * mask.downsample, 1),
                round((r + 0.5) * mask.downsample, 1),
            ],
            "hit_prob": float(best[k]) if best_at[k] >= 0 else None,
        }
        if best_at[k] >= 0:
            entry["hit_xy"] = det[best_at[k], 1:].tolist()
        lesions.append(entry)
    return SlideScore(
        name,
        True,
        len(det),
        det[hit == 0, 0].copy(),
        best[1:][~mask.itc],
        itc=int(mask.itc.sum()),
        ignored=int(((hit > 0) & itc_label).sum()),
        lesions=lesions,
    )


def froc_curve(
    fp_probs: np.ndarray,
    tp_probs: np.ndarray,
    n_lesions: int,
    n_slides: int,
    method: Method = DEFAULT_METHOD,
    *,
    itc: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPs per slide, sensitivity, thresholds) in increasing-threshold order, then (0, 0).

    ``tp_probs``: one entry per non-ITC lesion of every slide (its best hit, 0 if missed);
    ``fp_probs``: every false positive. ``thresholds`` has one entry fewer (the final point
    has none). Sensitivity is NaN when there is no lesion. ``method`` picks the thresholds
    (module docstring). ``itc``: the number of ITC lesions; ``"camelyon16"`` pools a 0 for
    them, as the script's ``TP_probs`` holds one entry per label, ITCs included.
    """
    fp = np.sort(np.asarray(fp_probs, np.float64).ravel())
    if method == "camelyon16":
        tp = np.sort(np.asarray(tp_probs, np.float64).ravel().astype(np.float32))
        zeros = np.zeros(1 if itc else 0)
        pooled = np.unique(np.concatenate([fp, tp.astype(np.float64), zeros]))  # sorted(set())
        thresholds = pooled[1:]  # all_probs[1:]
        # float32 hits meet a float64 threshold in float32 (numpy casts the Python float
        # scalar to the array's type); false positives always compare in float64.
        n_tp = len(tp) - np.searchsorted(tp, thresholds.astype(np.float32), side="left")
    else:
        tp = np.sort(np.asarray(tp_probs, np.float64).ravel())
        thresholds = np.unique(np.concatenate([fp, tp]))
        thresholds = thresholds[thresholds != 0.0]
        n_tp = len(tp) - np.searchsorted(tp, thresholds, side="left")
    n_fp = len(fp) - np.searchsorted(fp, thresholds, side="left")  # count of prob >= t
    fps = np.append(n_fp, 0) / float(max(n_slides, 1))
    if n_lesions:
        sens = np.append(n_tp, 0) / float(n_lesions)
    else:
        sens = np.full(len(thresholds) + 1, np.nan)
    return fps, sens, thresholds


def froc_score(
    fps: np.ndarray,
    sens: np.ndarray,
    rates: Sequence[float] = FP_RATES,
    method: Method = DEFAULT_METHOD,
) -> tuple[float, np.ndarray]:
    """(mean sensitivity at ``rates`` FPs per slide, the sensitivities) from a ``froc_curve``."""
    fps_r, sens_r = np.asarray(fps, np.float64)[::-1], np.asarray(sens, np.float64)[::-1]
    if method in ("camelyon16", "interp"):
        at = np.interp(rates, fps_r, sens_r)
    elif method == "step":
        at = np.array(
            [sens_r[min(bisect.bisect_left(fps_r.tolist(), r), len(sens_r) - 1)] for r in rates]
        )
    else:
        raise EvaluationError(f"FROC method {method!r}: use one of {', '.join(METHODS)}")
    return float(np.mean(at)), at
