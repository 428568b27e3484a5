"""The evaluation report: typed, written as ``evaluation.json`` + ``froc.png``, summarised.

``EvaluationReport.to_dict()`` is the JSON (field names are its keys, in order:
``settings``, ``froc``, ``slide_auc``, ``patch``, ``slides``, ``warnings``,
``missing_predictions``); numbers that are undefined (NaN) are null. ``patch`` holds the
patch-level metrics that the training side adds (``training.patch_eval``), or null.
``missing_predictions`` lists the slides of the ground truth (or of ``--slides``) that had no
predictions and were not scored (only with ``--allow-missing``; otherwise evaluation refuses).

``write_report`` writes into a folder that ``etl.atomic.output_folder`` created and proved
writable, and still turns any failure to write into an ``EvaluationError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from etl.atomic import atomic_file, output_folder
from etl.evaluate.froc import EvaluationError
from etl.evaluate.plot import plot_froc

__all__ = [
    "EvaluationReport",
    "FrocCurve",
    "FrocSummary",
    "MissingSlide",
    "Settings",
    "SlideAuc",
    "SlideRow",
    "json_number",
    "summary_lines",
    "write_report",
]


def json_number(v: float | None) -> float | None:
    """JSON-safe float (NaN and infinities -> None)."""
    return None if v is None or not math.isfinite(float(v)) else float(v)


@dataclass
class Settings:
    """What was evaluated and by which rules."""

    pred: str
    truth: list[str]
    slides: str | None
    mpp_override: float | None
    level: int
    downsample: int
    dilation_um: float
    itc_major_axis_um: float
    froc_method: str
    fp_rates: list[float]
    allow_missing: bool = False


@dataclass
class FrocCurve:
    """Points in increasing-threshold order, then (0, 0) (whose threshold is None)."""

    fps_per_slide: list[float]
    sensitivity: list[float | None]
    threshold: list[float | None]


@dataclass
class FrocSummary:
    """The FROC score, its six sensitivities (keys ``"0.25"`` ... ``"8"``) and counts."""

    score: float | None
    sensitivity_at: dict[str, float | None]
    slides: int
    tumor_slides: int
    lesions: int
    lesions_hit: int
    itc: int
    false_positives: int
    curve: FrocCurve


@dataclass
class SlideAuc:
    """Tumor vs normal slides, each scored by its highest probability."""

    auc: float | None
    tumor_slides: int
    normal_slides: int
    score: str = "max probability of the slide's map (or candidates)"


@dataclass
class SlideRow:
    """One evaluated slide: its truth, scale, FROC bookkeeping and slide score."""

    name: str
    tumor: bool
    truth: str | None
    note: str | None
    dims: list[int] | None
    mpp: float | None
    mpp_source: str
    detections: int
    lesions: int
    itc: int
    hits: int
    false_positives: int
    ignored_in_itc: int
    max_prob: float
    max_prob_from: str
    lesion_table: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class MissingSlide:
    """A slide with ground truth (``truth``) or in ``--slides`` (``slide``) but no predictions."""

    name: str
    truth: str | None
    slide: str | None

    def describe(self) -> str:
        return f"{self.name} ({self.truth or self.slide})"


@dataclass
class EvaluationReport:
    """Everything ``evaluate`` found; ``patch`` is filled in by the patch-level evaluation."""

    settings: Settings
    froc: FrocSummary
    slide_auc: SlideAuc
    patch: dict[str, Any] | None
    slides: list[SlideRow]
    warnings: list[str]
    missing_predictions: list[MissingSlide] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as ``evaluation.json`` holds it."""
        return dataclasses.asdict(self)


def write_report(report: EvaluationReport, out: str | PathLike[str]) -> tuple[Path, Path]:
    """Write ``<out>/evaluation.json`` and ``<out>/froc.png`` (atomically); return their paths."""
    out = output_folder(Path(out))
    try:
        return _write(report, out)
    except OSError as exc:
        where = exc.filename or out
        raise EvaluationError(
            f"{where}: cannot write the evaluation report ({exc.strerror or exc}); pass --out "
            "with a folder you can write to"
        ) from None


def _write(report: EvaluationReport, out: Path) -> tuple[Path, Path]:
    froc = report.froc

    def nan(v: float | None) -> float:
        return math.nan if v is None else v

    png = plot_froc(
        froc.curve.fps_per_slide,
        [nan(v) for v in froc.curve.sensitivity],
        out / "froc.png",
        at=[nan(v) for v in froc.sensitivity_at.values()],
        score=nan(froc.score),
    )
    path = out / "evaluation.json"
    with atomic_file(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(report.to_dict(), indent=1) + "\n")
    return path, png


def summary_lines(report: EvaluationReport) -> list[str]:
    """A short plain-text table of the report (per slide, then the scores)."""

    def f(v: float | None) -> str:
        return "-" if v is None else format(v, ".3f")

    lines = [
        f"{'slide':<24} {'truth':<7} {'lesions':>7} {'ITC':>4} {'hits':>5} {'FPs':>5} "
        f"{'max prob':>8}"
    ]
    for r in report.slides:
        lines.append(
            f"{r.name[:24]:<24} {'tumor' if r.tumor else 'normal':<7} "
            f"{r.lesions:>7} {r.itc:>4} {r.hits:>5} {r.false_positives:>5} "
            f"{r.max_prob:>8.3f}"
        )
    fr = report.froc
    lines.append(
        "sensitivity at " + ", ".join(f"{k} FP: {f(v)}" for k, v in fr.sensitivity_at.items())
    )
    lines.append(
        f"FROC {f(fr.score)}  ({fr.lesions} lesions, {fr.itc} ITC excluded, "
        f"{fr.slides} slides, method {report.settings.froc_method})"
    )
    sa = report.slide_auc
    lines.append(
        f"slide AUC {f(sa.auc)}  ({sa.tumor_slides} tumor / {sa.normal_slides} normal slides)"
    )
    if report.patch:
        p = report.patch
        lines.append(
            f"patch AUC {f(p.get('auc'))}  accuracy {f(p.get('accuracy'))}  "
            f"({p.get('patches')} patches)"
        )
    return lines
