"""`patchetl coords` for a whole cohort: match inputs, run the slides in parallel (joblib/loky,
as extract), balance, split, write.

Nothing is written unless the whole cohort is clean: every problem of every input (annotation
files, slides, the patients CSV, the split) is collected, and errors (warnings too with
``strict``) are raised together as one :class:`CohortError`. Output depends only on the
inputs, the options and the seed, never on the number of workers or their timing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from etl.cohort.inputs import CohortError, Problem, SlideInput, match_inputs, read_patients
from etl.cohort.slide import SlideOutcome, process_slide
from etl.cohort.splits import assign_splits
from etl.cohort.writers import (
    OutputPaths,
    datalist_entries,
    slide_summary,
    write_outputs,
)
from etl.config import CohortOptions, SamplingOptions
from etl.extract.executor import delayed, executor
from etl.extract.run import tool_version

__all__ = ["CohortResult", "make_coords"]


@dataclass
class CohortResult:
    """What `make_coords` wrote and found."""

    outcomes: list[SlideOutcome]
    skipped: list[SlideInput]
    split_of: dict[str, str]
    paths: OutputPaths
    summary: dict[str, Any]
    warnings: list[Problem]


def _run_slides(
    items: Sequence[SlideInput],
    cohort: CohortOptions,
    sampling: SamplingOptions,
    on_slide: Callable[[SlideOutcome], None] | None,
) -> list[SlideOutcome]:
    outcomes: list[SlideOutcome] = []
    if cohort.workers == 1 or len(items) <= 1:
        results: Any = (process_slide(item, cohort, sampling) for item in items)
        for outcome in results:
            outcomes.append(outcome)
            if on_slide:
                on_slide(outcome)
    else:
        with executor("loky", min(cohort.workers, len(items)), None) as run:
            for outcome in run([delayed(process_slide, i, cohort, sampling) for i in items]):
                outcomes.append(outcome)
                if on_slide:
                    on_slide(outcome)
    return sorted(outcomes, key=lambda o: o.name)


def _drop(rng: np.random.Generator, keep: np.ndarray, members: np.ndarray, n: int) -> None:
    """Unset ``keep`` for ``n`` of ``members`` (indices) chosen at random."""
    if n > 0:
        keep[rng.choice(members, size=n, replace=False)] = False


def _balance(outcomes: Sequence[SlideOutcome], sampling: SamplingOptions, seed: int) -> list[str]:
    """Apply --tumor-share and --max-regions across the cohort (regions dropped at random,
    seeded); returns warnings."""
    if not outcomes:
        return []
    tumor = np.concatenate([o.tumor for o in outcomes])
    keep = np.ones(len(tumor), dtype=bool)
    rng = np.random.default_rng([seed, 1])
    warnings = []
    share = sampling.tumor_share
    t, m = int(tumor.sum()), int((~tumor).sum())
    if share is not None and (t == 0 or m == 0):
        warnings.append(f"--tumor-share {share} not applied: {t} tumor and {m} normal regions")
    elif share is not None:
        want_t = min(t, math.floor(share / (1 - share) * m + 0.5))
        want_m = min(m, math.floor((1 - share) / share * t + 0.5))
        if want_t < t:
            _drop(rng, keep, np.flatnonzero(tumor), t - want_t)
        elif want_m < m:
            _drop(rng, keep, np.flatnonzero(~tumor), m - want_m)
    total = int(keep.sum())
    if sampling.max_regions and total > sampling.max_regions:
        kt = int((keep & tumor).sum())
        target_t = math.floor(sampling.max_regions * kt / total + 0.5)
        _drop(rng, keep, np.flatnonzero(keep & tumor), kt - target_t)
        target_m = sampling.max_regions - target_t
        _drop(rng, keep, np.flatnonzero(keep & ~tumor), (total - kt) - target_m)
    start = 0
    for o in outcomes:
        o.keep = keep[start : start + len(o.tumor)]
        start += len(o.tumor)
    return warnings


def _options(cohort: CohortOptions, sampling: SamplingOptions) -> dict[str, Any]:
    merged = {**dataclasses.asdict(cohort), **dataclasses.asdict(sampling)}
    for key in ("progress", "workers"):  # how it runs, never what it writes
        merged.pop(key)
    for key in ("mpp", "assume_mpp"):  # recorded when given: summaries without them unchanged
        if merged[key] is None:
            merged.pop(key)
    return {k: str(v) if isinstance(v, Path) else v for k, v in merged.items()}


def _summary(
    outcomes: list[SlideOutcome],
    skipped: list[SlideInput],
    split_of: dict[str, str],
    options: dict[str, Any],
    warnings: list[Problem],
) -> dict[str, Any]:
    slides = [slide_summary(o, split_of.get(o.name)) for o in outcomes]
    per_split: dict[str, dict[str, int]] = {}
    for s in slides:
        row = per_split.setdefault(
            s["split"], {"slides": 0, "tumor_slides": 0, "regions": 0, "tumor_regions": 0}
        )
        row["slides"] += 1
        row["tumor_slides"] += int(s["tumor_area_px"] > 0)
        row["regions"] += s["regions"]["tumor"] + s["regions"]["normal"]
        row["tumor_regions"] += s["regions"]["tumor"]
    return {
        "tool": "patchetl coords",
        "version": tool_version(),
        "options": options,
        "totals": {
            "slides": len(slides),
            "skipped_slides": len(skipped),
            "regions": sum(r["regions"] for r in per_split.values()),
            "tumor_regions": sum(r["tumor_regions"] for r in per_split.values()),
            "dropped_for_balance": sum(s["dropped_for_balance"] for s in slides),
            "splits": dict(sorted(per_split.items())),
        },
        "slides": slides,
        "skipped_slides": [
            {
                "slide": i.name,
                "image": i.path.name,
                "reason": "no annotation file (--unannotated skip)",
            }
            for i in skipped
        ],
        "warnings": [str(p) for p in warnings],
    }


def _raise_if_failed(problems: list[Problem], strict: bool) -> None:
    """Raise every problem together (errors first) when any is an error (any at all if strict)."""
    if any(strict or not p.warning for p in problems):
        raise CohortError(sorted(problems, key=lambda p: p.warning), strict=strict)


def make_coords(
    cohort: CohortOptions,
    sampling: SamplingOptions,
    on_slide: Callable[[SlideOutcome], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> CohortResult:
    """Coordinate files for the cohort of ``cohort.slides`` (see the module docstring);
    ``on_start`` gets the number of slides to run, ``on_slide`` each slide's outcome."""
    items, skipped, problems = match_inputs(cohort.slides, cohort.annotations, cohort.unannotated)
    if on_start:
        on_start(len(items))
    patients = None
    if cohort.patients is not None:
        patients, found = read_patients(cohort.patients, [i.name for i in items])
        problems += found
    outcomes = _run_slides(items, cohort, sampling, on_slide)
    for o in outcomes:
        problems += o.problems
    _raise_if_failed(problems, cohort.strict)
    usable = [o for o in outcomes if not o.failed]
    split_of, split_warnings = assign_splits(
        {o.name: o.has_tumor for o in usable},
        patients,
        cohort.val_fraction,
        cohort.test_fraction,
        cohort.seed,
    )
    notes = split_warnings + _balance(usable, sampling, cohort.seed)
    problems += [Problem(cohort.slides, "", note, warning=True) for note in notes]
    entries = datalist_entries(usable, split_of)
    if not entries and not any(not p.warning for p in problems):
        problems.append(
            Problem(
                cohort.slides,
                "",
                "no region was made for any slide",
                "check the slides and the sampling options (--min-tissue, counts)",
            )
        )
    _raise_if_failed(problems, cohort.strict)
    warnings = [p for p in problems if p.warning]
    summary = _summary(usable, skipped, split_of, _options(cohort, sampling), warnings)
    paths = write_outputs(cohort.out, entries, sampling.grid**2, summary)
    return CohortResult(usable, skipped, split_of, paths, summary, warnings)
