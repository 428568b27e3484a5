"""Dense vs patch-by-patch maps of one checkpoint: do they agree inside tissue?

Dense inference (fully convolutional tiles) is fast but not the computation the model was
trained on: near a patch border the trunk sees neighbouring tissue where a patch seen alone
sees zero padding. `patchetl check-dense` runs both modes at the same stride on the user's
own slides and checkpoint and reports, over the map pixels inside tissue:

- Pearson r of the two maps (per slide, and pooled over all slides: the number the
  `--min-r` gate applies to; a normal slide's map is ~0 everywhere, so its own r measures
  noise and is shown for information only);
- mean and largest absolute difference;
- "same call": the share of map pixels on the same side of 0.5 in both modes, and the share
  called tumor (>= 0.5) in each.

`compare_slides` runs the batch: a slide without tissue has nothing to compare and is skipped
with a note; a slide that cannot be read is a failure of that slide only, and the rest still run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from etl.atomic import write_json_atomic
from training.config import InferConfig
from training.infer.predictor import Predictor
from training.infer.run import SLIDE_FAILURES, failure, infer_slide


@dataclass(frozen=True)
class Agreement:
    """How two probability maps agree on the same map pixels."""

    cells: int
    pearson: float  # nan when either map is constant there
    mean_abs: float
    max_abs: float
    same_call: float  # share of pixels on the same side of 0.5
    positive_dense: float  # share of pixels >= 0.5 in each map
    positive_patch: float

    @classmethod
    def of(cls, dense: np.ndarray, patch: np.ndarray) -> Agreement:
        d, p = np.asarray(dense, np.float64).ravel(), np.asarray(patch, np.float64).ravel()
        if d.shape != p.shape:
            raise ValueError(f"maps differ in size: {d.shape} vs {p.shape}")
        if d.size == 0:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
        diff = np.abs(d - p)
        r = float(np.corrcoef(d, p)[0, 1]) if d.std() > 0 and p.std() > 0 else math.nan
        return cls(
            int(d.size),
            r,
            float(diff.mean()),
            float(diff.max()),
            float(np.mean((d >= 0.5) == (p >= 0.5))),
            float(np.mean(d >= 0.5)),
            float(np.mean(p >= 0.5)),
        )


@dataclass(frozen=True)
class SlideAgreement:
    slide: str
    agreement: Agreement
    dense_seconds: float
    patch_seconds: float
    dense: np.ndarray  # map values inside tissue, row-major
    patch: np.ndarray


def compare_slide(path: str | Path, predictor: Predictor, cfg: InferConfig) -> SlideAgreement:
    """Both modes on one slide with the same predictor, stride and tissue mask."""
    dense = infer_slide(path, predictor, replace(cfg, mode="dense"))
    patch = infer_slide(path, predictor, replace(cfg, mode="patch"))
    cells = dense.cells
    if not np.array_equal(cells, patch.cells):  # same slide, same options: cannot happen
        raise RuntimeError(f"{path}: the two runs found different tissue")
    d, p = dense.prob[cells], patch.prob[cells]
    return SlideAgreement(
        dense.name, Agreement.of(d, p), dense.seconds["model"], patch.seconds["model"], d, p
    )


@dataclass
class AgreementRun:
    """A batch of slides compared: the slides with tissue, those without, those that failed."""

    results: list[SlideAgreement] = field(default_factory=list)
    no_tissue: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def problems(self, total: Agreement, min_r: float) -> list[str]:
        """Why the check fails (empty: it passes): slides that failed, no slide with tissue,
        or a pooled r below ``min_r`` (an undefined r fails too)."""
        out = []
        if self.failed:
            out.append(
                f"{len(self.failed)} slide(s) could not be read (listed above; the others were "
                "compared): " + "; ".join(self.failed)
            )
        if not self.results:
            out.append(
                f"no slide has tissue to compare ({len(self.no_tissue)} without tissue, "
                f"{len(self.failed)} failed): give slides with tissue"
            )
        elif not total.pearson >= min_r:
            out.append(
                f"dense and patch maps agree with r = {total.pearson:.4f} inside tissue, below "
                f"--min-r {min_r}: dense inference does not reproduce this checkpoint's "
                "patch predictions here (a model trained on small patches leans on context "
                "that a patch alone lacks); use --mode patch for this checkpoint, or train "
                "with --patch-size 224"
            )
        return out


def compare_slides(
    paths: Sequence[Path],
    predictor: Predictor,
    cfg: InferConfig,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> AgreementRun:
    """`compare_slide` on each slide; a slide without tissue is skipped with a note, one that
    cannot be read is recorded as failed, and the others still run."""
    run = AgreementRun()
    for path in paths:
        try:
            result = compare_slide(path, predictor, cfg)
        except SLIDE_FAILURES as exc:
            run.failed.append(failure(path, exc))
            warn(f"error: {run.failed[-1]}")
            continue
        if result.agreement.cells == 0:
            run.no_tissue.append(Path(path))
            echo(f"note: {path}: no tissue found, nothing to compare; skipped")
            continue
        run.results.append(result)
        echo(f"{Path(path).name}: compared {result.agreement.cells} tissue map pixels")
    return run


def pooled(results: list[SlideAgreement]) -> Agreement:
    if not results:
        return Agreement.of(np.zeros(0), np.zeros(0))
    return Agreement.of(
        np.concatenate([r.dense for r in results]), np.concatenate([r.patch for r in results])
    )


def report_lines(results: list[SlideAgreement], total: Agreement) -> list[str]:
    def fmt(name: str, a: Agreement, extra: str = "") -> str:
        r = "n/a" if math.isnan(a.pearson) else f"{a.pearson:.4f}"
        return (
            f"{name:<28} {a.cells:>8} {r:>8} {a.mean_abs:>9.4f} {a.max_abs:>8.4f} "
            f"{a.same_call:>9.2%} {a.positive_dense:>7.2%} {a.positive_patch:>7.2%}{extra}"
        )

    lines = [
        f"{'slide':<28} {'cells':>8} {'r':>8} {'mean |d|':>9} {'max |d|':>8} "
        f"{'same call':>9} {'tumor d':>7} {'tumor p':>7}  seconds dense / patch"
    ]
    lines += [
        fmt(s.slide, s.agreement, f"  {s.dense_seconds:.1f} / {s.patch_seconds:.1f}")
        for s in results
    ]
    lines.append(fmt("pooled", total))
    return lines


def _json_safe(row: dict) -> dict:
    """NaN is not JSON: an undefined correlation is written as null."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def write_report(
    path: str | Path,
    run: AgreementRun,
    total: Agreement,
    cfg: InferConfig,
    min_r: float,
) -> Path:
    doc = {
        "checkpoint": cfg.checkpoint,
        "stride": cfg.stride,
        "patch_size": cfg.patch_size,
        "amp": bool(cfg.amp),
        "min_r": min_r,
        "pooled": _json_safe(asdict(total)),
        "slides": [
            _json_safe(
                {
                    "slide": s.slide,
                    **asdict(s.agreement),
                    "dense_seconds": s.dense_seconds,
                    "patch_seconds": s.patch_seconds,
                }
            )
            for s in run.results
        ],
        "no_tissue": [str(p) for p in run.no_tissue],
        "failed": run.failed,
    }
    write_json_atomic(path, doc)
    return Path(path)
