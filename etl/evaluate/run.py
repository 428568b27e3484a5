"""Evaluation of inference outputs: lesion-level FROC (Camelyon16 rules) and slide-level AUC.

For every slide of the prediction folder (``etl.evaluate.predictions``): its ground truth at
the evaluation level (``etl.evaluate.truth``; no truth file = a normal slide), its detections
split into hits, ITC-ignored and false positives (``etl.evaluate.froc``), and its score for the
slide AUC (the maximum of its probability map, else of its candidates). Then the cohort's FROC
curve and score, and the AUC of tumor vs normal slides. The result is an
``EvaluationReport`` (``etl.evaluate.report``). numpy / scipy / PIL only (no torch).

The cohort is every slide with a ground-truth file and, with ``slides``, every slide of that
folder. A slide of the cohort without predictions is refused (the FROC and AUC of a subset are
not the cohort's), listing them all, unless ``allow_missing``: then they are listed in the
report's warnings and ``missing_predictions``. Truth files that cannot be used are all listed
in one error; nothing is scored from a partial truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from etl.evaluate.auc import binary_auc
from etl.evaluate.froc import (
    DEFAULT_METHOD,
    DILATION_UM,
    EVAL_LEVEL,
    FP_RATES,
    ITC_UM,
    METHODS,
    EvaluationError,
    Method,
    SlideScore,
    evaluation_mask,
    froc_curve,
    froc_score,
    score_slide,
)
from etl.evaluate.predictions import (
    candidate_files,
    read_candidates,
    slide_facts,
    slide_index,
    slide_max_prob,
)
from etl.evaluate.report import (
    EvaluationReport,
    FrocCurve,
    FrocSummary,
    MissingSlide,
    Settings,
    SlideAuc,
    SlideRow,
    json_number,
)
from etl.evaluate.truth import load_truth, truth_files

__all__ = ["evaluate"]

LISTED = 20  # names an error or warning lists before "and N more"


def _check_inputs(
    pred: Path, folders: list[Path], slides: Path | None, mpp: float | None, method: str
) -> None:
    if not pred.is_dir():
        raise EvaluationError(
            f"{pred}: prediction folder not found; run `patchetl infer --out "
            f"{pred} ...` first or pass --pred with the folder it wrote"
        )
    for folder in folders:
        if not folder.is_dir():
            raise EvaluationError(
                f"{folder}: ground-truth folder not found (--truth takes a "
                "folder of <name>.xml ASAP annotations or <name>_mask.tif "
                "masks)"
            )
    if slides is not None and not slides.is_dir():
        raise EvaluationError(f"{slides}: slide folder not found (--slides)")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise EvaluationError(f"--mpp {mpp}: use a positive micrometres-per-pixel value")
    if method not in METHODS:
        raise EvaluationError(f"--froc-method {method!r}: use one of {', '.join(METHODS)}")


def _listing(items: Sequence[str]) -> str:
    more = f"\n  ... and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return "".join(f"\n  {item}" for item in items[:LISTED]) + more


def _missing(
    names: set[str], folders: list[Path], index: dict[str, list[Path]]
) -> list[MissingSlide]:
    """The cohort's slides (truth files, the slide folder) that have no predictions."""
    truths = truth_files(folders)
    absent = (set(truths) | set(index)) - names
    return [
        MissingSlide(
            name,
            str(truths[name]) if name in truths else None,
            str(index[name][0]) if name in index else None,
        )
        for name in sorted(absent)
    ]


def _check_missing(
    pred: Path, missing: list[MissingSlide], allow: bool, warnings: list[str]
) -> None:
    if not missing:
        return
    listing = _listing([m.describe() for m in missing])
    if not allow:
        raise EvaluationError(
            f"{len(missing)} slide(s) of the ground truth or --slides have no predictions in "
            f"{pred} (no <name>.candidates.csv):{listing}\nrun `patchetl infer` on them with "
            "--out pointing there, or pass --allow-missing to score only the slides that have "
            "predictions"
        )
    warnings.append(
        f"{len(missing)} slide(s) have no predictions and are not scored (--allow-missing):"
        f"{listing}"
    )


def _score_one(
    name: str,
    path: Path,
    pred: Path,
    folders: list[Path],
    index: dict[str, list[Path]],
    mpp: float | None,
    level: int,
    mask_tumor_value: int | None,
    warnings: list[str],
) -> tuple[SlideScore, SlideRow]:
    """One slide's FROC bookkeeping and report row."""
    det = read_candidates(path)
    facts = slide_facts(name, pred, index)
    truth = load_truth(
        name,
        folders,
        facts.size0,
        2**level,
        mask_tumor_value,
        hint=f"pass --slides with the slide folder, or keep {name}.prob.json "
        f"from `patchetl infer` in {pred}",
    )
    use_mpp = mpp if mpp is not None else facts.mpp
    mask = None
    if truth.tumor is not None:
        if use_mpp is None:
            raise EvaluationError(
                f"{name}: no mpp known (not in {facts.source}); pass --mpp "
                "(e.g. --mpp 0.243 for Camelyon16 at 40x)"
            )
        mask = evaluation_mask(truth.tumor, use_mpp, level)
        if not truth.has_tumor:
            warnings.append(f"{name}: {truth.path} holds no tumor; scored as a normal slide")
    warnings.extend(truth.notes)
    score = score_slide(name, det, mask, source=str(path))
    if not truth.has_tumor:
        score.tumor = False
    max_prob, max_from = slide_max_prob(pred, name, det)
    row = SlideRow(
        name=name,
        tumor=truth.has_tumor,
        truth=str(truth.path) if truth.path else None,
        note=None if truth.path else "no ground-truth file: normal slide",
        dims=list(truth.size0) if truth.size0 else None,
        mpp=use_mpp,
        mpp_source="--mpp" if mpp is not None else facts.source,
        detections=score.detections,
        lesions=len(score.tp_probs),
        itc=score.itc,
        hits=score.hits,
        false_positives=len(score.fp_probs),
        ignored_in_itc=score.ignored,
        max_prob=max_prob,
        max_prob_from=max_from,
        lesion_table=score.lesions,
    )
    return score, row


def _froc(
    scores: list[SlideScore],
    tumor_slides: int,
    method: Method,
    folders: list[Path],
    warnings: list[str],
) -> FrocSummary:
    """The cohort's FROC curve and score (undefined, with a warning, without lesions)."""
    fp = np.concatenate([s.fp_probs for s in scores])
    tp = np.concatenate([s.tp_probs for s in scores])
    itc = sum(s.itc for s in scores)
    fps, sens, thresholds = froc_curve(fp, tp, len(tp), len(scores), method, itc=itc)
    if len(tp):
        froc, at = froc_score(fps, sens, FP_RATES, method)
    else:
        froc, at = math.nan, np.full(len(FP_RATES), np.nan)
        warnings.append(
            "no (non-ITC) lesion on any evaluated slide: FROC is undefined; check "
            f"--truth ({', '.join(map(str, folders))})"
        )
    curve = FrocCurve(
        fps_per_slide=fps.tolist(),
        sensitivity=[json_number(v) for v in sens],
        threshold=[*thresholds.tolist(), None],
    )
    return FrocSummary(
        score=json_number(froc),
        sensitivity_at={f"{r:g}": json_number(s) for r, s in zip(FP_RATES, at, strict=True)},
        slides=len(scores),
        tumor_slides=tumor_slides,
        lesions=len(tp),
        lesions_hit=int((tp > 0).sum()),
        itc=itc,
        false_positives=len(fp),
        curve=curve,
    )


def evaluate(
    pred: str | PathLike[str],
    truth: Sequence[str | PathLike[str]],
    *,
    slides: str | PathLike[str] | None = None,
    mpp: float | None = None,
    level: int = EVAL_LEVEL,
    method: Method = DEFAULT_METHOD,
    mask_tumor_value: int | None = None,
    allow_missing: bool = False,
) -> EvaluationReport:
    """Score every slide of ``pred`` that has ``<name>.candidates.csv``.

    ``truth``: folders of ground truth; ``slides``: folder of the slides (level-0 size and
    mpp; default: the maps' sidecars); ``mpp``: overrides every slide's mpp;
    ``allow_missing``: score without the cohort's slides that have no predictions.
    """
    pred = Path(pred)
    folders = [Path(t) for t in truth]
    slides_dir = Path(slides) if slides is not None else None
    _check_inputs(pred, folders, slides_dir, mpp, method)
    files = candidate_files(pred)
    index = slide_index(slides_dir)
    warnings: list[str] = []
    missing = _missing({name for name, _ in files}, folders, index)
    _check_missing(pred, missing, allow_missing, warnings)
    scores: list[SlideScore] = []
    rows: list[SlideRow] = []
    problems: list[str] = []
    for name, path in files:
        try:
            score, row = _score_one(
                name, path, pred, folders, index, mpp, level, mask_tumor_value, warnings
            )
        except EvaluationError as exc:
            problems.append(str(exc))
            continue
        scores.append(score)
        rows.append(row)
    if len(problems) == 1:
        raise EvaluationError(problems[0])
    if problems:
        raise EvaluationError(
            f"{len(problems)} slides cannot be evaluated (nothing was scored):{_listing(problems)}"
        )
    labels = np.array([r.tumor for r in rows], float)
    tumor_slides = int(labels.sum())
    froc = _froc(scores, tumor_slides, method, folders, warnings)
    auc = binary_auc(labels, np.array([r.max_prob for r in rows]))
    if math.isnan(auc):
        warnings.append("slide AUC needs both tumor and normal slides")
    settings = Settings(
        pred=str(pred),
        truth=[str(f) for f in folders],
        slides=str(slides_dir) if slides_dir else None,
        mpp_override=mpp,
        level=level,
        downsample=2**level,
        dilation_um=DILATION_UM,
        itc_major_axis_um=ITC_UM,
        froc_method=method,
        fp_rates=list(FP_RATES),
        allow_missing=allow_missing,
    )
    return EvaluationReport(
        settings=settings,
        froc=froc,
        slide_auc=SlideAuc(
            auc=json_number(auc), tumor_slides=tumor_slides, normal_slides=len(rows) - tumor_slides
        ),
        patch=None,
        slides=rows,
        warnings=warnings,
        missing_predictions=missing,
    )
