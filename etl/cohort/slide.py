"""One slide of a cohort, start to end: open it, read its truth, find tissue, place and label
its regions. Runs in a worker process; only low-resolution levels are read, never level 0
(unless the slide has no coarser level).

With ``--mpp`` a region spans ``region_size * mpp / slide mpp`` level-0 px (its ``Footprint``,
the box extract reads at ``--mpp``), and the tissue mask is made at the target scale too; a
slide without an mpp (and no ``--assume-mpp``), with non-square pixels, or coarser than the
target is an error naming it.

The random stream of a slide is seeded by ``(seed, crc32(slide name))``: a slide's regions do
not change when other slides join or leave the cohort.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from etl.cohort.geometry import Footprint, TissueShares
from etl.cohort.inputs import Problem, SlideInput
from etl.cohort.labels import cell_labels
from etl.cohort.sampling import Sampled, grid_regions, sample_regions
from etl.cohort.truth import SlideTruth, load_truth
from etl.config import CohortOptions, SamplingOptions
from etl.wsi.reader import Backend, SlideError, SlideReader, open_slide
from etl.wsi.scale import ScaleError, slide_mpp
from etl.wsi.tissue import MIN_AREA, TissueMask, tissue_mask

__all__ = ["SlideOutcome", "process_slide", "slide_rng"]


@dataclass
class SlideOutcome:
    """What one slide gave: its facts, regions (centres (x, y), centre-in-tumor flags, labels
    column by column), what was asked and left out, and its problems. ``keep`` marks the regions
    that survive the cohort-wide balance."""

    name: str
    image: str
    width: int = 0
    height: int = 0
    mpp: float | None = None
    annotation: str | None = None
    kind: str = "none"
    tissue_px: float = 0.0
    tumor_px: float = 0.0
    has_tumor: bool = False
    centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    tumor: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    asked: dict[str, int] = field(default_factory=dict)
    left_out: dict[str, dict[str, int]] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    keep: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    scale: dict[str, float] | None = None  # with --mpp: slide and target mpp, region side

    @property
    def failed(self) -> bool:
        return any(not p.warning for p in self.problems)


def slide_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def _shortfall(out: SlideOutcome, sampled: Sampled, path: SlideInput) -> None:
    """Warn when a class got fewer regions than asked (too little tissue or tumor for them)."""
    for cls in ("tumor", "normal"):
        got = int((sampled.tumor == (cls == "tumor")).sum())
        asked = sampled.asked.get(cls, 0)
        reasons = sorted(sampled.left_out.get(cls, {}).items(), key=lambda kv: -kv[1])[:3]
        why = ", ".join(f"{reason}: {n}" for reason, n in reasons) or "no candidate area"
        if got < asked:
            out.problems.append(
                Problem(
                    path.path,
                    "",
                    f"{got} of {asked} {cls} region(s): too little "
                    f"{'tumor' if cls == 'tumor' else 'tissue outside tumor'} for the counts "
                    f"asked (candidates left out: {why})",
                    f"lower --{cls}-per-slide, --min-tissue, --min-spacing or --margin",
                    warning=True,
                )
            )


def _place(
    out: SlideOutcome,
    item: SlideInput,
    truth: SlideTruth,
    tissue: TissueMask,
    cohort: CohortOptions,
    sampling: SamplingOptions,
    fp: Footprint,
) -> None:
    shares = TissueShares(tissue)
    if sampling.mode == "grid":
        sampled = grid_regions(truth, shares, out.width, out.height, sampling, fp)
    else:
        rng = slide_rng(cohort.seed, out.name)
        sampled = sample_regions(truth, shares, out.width, out.height, sampling, rng, fp)
        _shortfall(out, sampled, item)
    out.centres, out.tumor = sampled.centres, sampled.tumor
    out.asked, out.left_out = sampled.asked, sampled.left_out
    out.labels = cell_labels(
        truth,
        sampled.centres,
        fp,
        sampling.grid,
        sampling.label_rule,
        sampling.label_threshold,
    )
    out.keep = np.ones(len(sampled.centres), dtype=bool)


def footprint(
    reader: SlideReader, sampling: SamplingOptions
) -> tuple[Footprint, dict[str, float] | None]:
    """The slide's region box, and with ``--mpp`` its scale facts for the summary; raises
    ``ScaleError`` (naming the slide) when it cannot be read at the target."""
    if sampling.mpp is None:
        return Footprint.of(sampling.region_size), None
    mpp = slide_mpp(reader.mpp, reader.path, sampling.assume_mpp)
    fp = Footprint.at_mpp(sampling.region_size, mpp, sampling.mpp, reader.level_downsamples)
    return fp, {"slide_mpp": mpp, "target_mpp": sampling.mpp, "region_side_px": fp.side}


def _tissue(reader: SlideReader, sampling: SamplingOptions, fp: Footprint) -> TissueMask:
    """The tissue mask; with ``--mpp`` its resolution (``--tissue-downsample``) and least
    piece (``MIN_AREA``) are at the target scale, so scans of one glass at different mpp
    give the same mask."""
    if fp.scale == 1:
        return tissue_mask(reader, downsample=sampling.tissue_downsample)
    ds, area = fp.length(sampling.tissue_downsample), MIN_AREA * fp.scale**2
    return tissue_mask(reader, downsample=ds, min_area=area)


def process_slide(
    item: SlideInput, cohort: CohortOptions, sampling: SamplingOptions
) -> SlideOutcome:
    """Regions and labels of one slide; problems are recorded in the outcome, never raised."""
    start = time.perf_counter()
    out = SlideOutcome(item.name, item.path.name, kind=item.kind)
    out.annotation = str(item.annotation) if item.annotation else None
    try:
        with open_slide(item.path, backend=cast("Backend", cohort.slide_backend)) as reader:
            out.width, out.height = reader.dimensions
            out.mpp = reader.mpp[0] if reader.mpp else None
            fp, out.scale = footprint(reader, sampling)
            truth, problems = load_truth(
                item, (out.width, out.height), cohort.tumor_class, cohort.exclude_class
            )
            out.problems += problems
            if truth is None:
                return out
            tissue = _tissue(reader, sampling, fp)
    except SlideError as exc:
        message = str(exc).removeprefix(f"{item.path}: ")
        out.problems.append(Problem(item.path, "", message, "check or replace the slide file"))
        return out
    except ScaleError as exc:  # the message says what to do
        out.problems.append(Problem(item.path, "", str(exc).removeprefix(f"{item.path}: ")))
        return out
    out.ignored, out.has_tumor = truth.ignored, truth.has_tumor
    ds = sampling.tissue_downsample
    out.tumor_px = float(truth.raster(out.width, out.height, ds).sum()) * ds * ds
    out.tissue_px = float(tissue.mask.sum()) * tissue.downsample[0] * tissue.downsample[1]
    if not tissue.mask.any():
        out.problems.append(
            Problem(
                item.path,
                "",
                "no tissue found",
                "check the slide; it gives no region",
                warning=True,
            )
        )
    if min(out.width, out.height) < fp.side:
        out.problems.append(
            Problem(
                item.path,
                "",
                f"slide ({out.width} x {out.height}) is smaller than a region ({fp.side:.0f})",
                "use a smaller --region-size",
                warning=True,
            )
        )
    _place(out, item, truth, tissue, cohort, sampling, fp)
    out.seconds = time.perf_counter() - start
    return out
