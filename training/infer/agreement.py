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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from etl.atomic import write_json_atomic
from training.config import InferConfig
from training.infer.predictor import Predictor
from training.infer.run import infer_slide


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
    results: list[SlideAgreement],
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
            for s in results
        ],
    }
    write_json_atomic(path, doc)
    return Path(path)
