"""Planning: geometry of a region, stable sample keys, preflight checks, and the grouping of
reads into per-slide parts ordered for locality.

Nothing here reads pixels; preflight only opens each slide once to learn its size, and
fingerprints it (size, mtime, the bytes at both ends) so that a slide replaced between a kill
and the resume is read again. A part's id is derived from its slide's fingerprint and its
planned keys: a resume with another `--part-size`, or after a slide changed, finds no stale
part under the id of a new one.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from etl.errors import OptionError
from etl.extract.coords import Region
from etl.options import opt
from etl.wsi.formats import unique_key_stem
from etl.wsi.reader import SlideReader
from etl.wsi.scale import (
    ScaledRegion,
    ScaleError,
    choose_level,
    plan_region,
    region_box,
    slide_mpp,
)

OUTSIDE_POLICIES = ("error", "skip", "pad")


@dataclass(frozen=True)
class ExtractParams:
    """Everything that decides the content of the shards (a rerun must match them exactly)."""

    region_size: Annotated[int, opt("Region side in pixels at --level (or at --mpp).")] = 768
    level: Annotated[int, opt("Pyramid level to read (region stays centred).")] = 0
    fmt: Annotated[str, opt("jpg, or png for lossless.", "--format")] = "jpg"
    quality: Annotated[int, opt("JPEG quality.")] = 95
    shard_size: Annotated[int, opt("Samples per shard (the last may be shorter).")] = 1000
    part_size: Annotated[int, opt("Regions per work unit (one slide each).")] = 32
    seed: Annotated[int, opt("Seed of the global shuffle that mixes shards.")] = 0
    outside: Annotated[str, opt("Region not inside its slide: error | skip | pad.")] = "error"
    mpp: Annotated[
        float | None,
        opt(
            "Read regions at this physical scale, um/px (e.g. 0.5): --region-size output px "
            "spanning region_size * mpp / slide mpp level-0 px, from the coarsest level at least "
            "as fine, area-averaged. Instead of --level."
        ),
    ] = None
    assume_mpp: Annotated[
        float | None,
        opt("With --mpp: level-0 um/px of the slides that record none (others keep their own)."),
    ] = None

    def validate(self) -> None:
        if self.region_size < 1:
            raise OptionError(f"--region-size must be >= 1, got {self.region_size}")
        if self.level < 0:
            raise OptionError(f"--level must be >= 0, got {self.level}")
        if self.fmt not in ("jpg", "png"):
            raise OptionError(f"--format must be 'jpg' or 'png', got {self.fmt!r}")
        if not 1 <= self.quality <= 100:
            raise OptionError(f"--quality must be in 1..100, got {self.quality}")
        if self.shard_size < 1 or self.part_size < 1:
            raise OptionError("--shard-size and --part-size must be >= 1")
        if self.outside not in OUTSIDE_POLICIES:
            raise OptionError(f"--outside must be one of {OUTSIDE_POLICIES}, got {self.outside!r}")
        self._validate_scale()

    def _validate_scale(self) -> None:
        for name, value in (("--mpp", self.mpp), ("--assume-mpp", self.assume_mpp)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise OptionError(f"{name} {value}: give a pixel size in um/px, > 0 (e.g. 0.5)")
        if self.mpp is not None and self.level != 0:
            raise OptionError(
                f"--mpp {self.mpp} and --level {self.level} both choose the scale: give one "
                "(--mpp picks the level itself)"
            )
        if self.assume_mpp is not None and self.mpp is None:
            raise OptionError(
                "--assume-mpp applies only with --mpp (it gives the slide mpp that --mpp "
                "scales from); add --mpp or drop --assume-mpp"
            )

    def as_dict(self) -> dict[str, Any]:
        """The parameters as recorded (`.params.json`, manifest); the scale options only when
        given, so an extraction made before they existed compares equal to one without them."""
        return {
            k: v for k, v in asdict(self).items() if not (k in ("mpp", "assume_mpp") and v is None)
        }


def sample_key(stem: str, x: int, y: int) -> str:
    """Stable key per (slide, centre x, centre y)."""
    return f"{stem}_x{x}_y{y}"


@dataclass(frozen=True)
class SlideInfo:
    path: Path
    dimensions: tuple[int, int] | None = None
    level_count: int = 0
    level_downsamples: tuple[float, ...] = ()
    mpp: tuple[float, float] | None = None
    error: str | None = None
    fingerprint: str = ""  # slide_fingerprint() when it opened


@dataclass(frozen=True)
class PlannedRegion:
    key: str
    region: Region
    x0: int  # level-0 top-left of the read (with --mpp: the pixel holding the box's corner)
    y0: int
    padded: bool  # part of the region lies outside the slide and reads as white
    scaled: ScaledRegion | None = None  # with --mpp: the level read, the scale and the box


@dataclass(frozen=True)
class Part:
    """A unit of work: consecutive reads from one slide, in locality order."""

    part_id: str
    slide: Path
    image: str
    regions: tuple[PlannedRegion, ...]
    fingerprint: str = ""  # of the slide, at preflight

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.regions]

    @property
    def scale(self) -> dict[str, Any] | None:
        """With --mpp, how the slide is read (the same for all its regions), as the manifest
        records it: slide and target mpp, level, its mpp, scale and the box's level-0 side."""
        scaled = self.regions[0].scaled
        if scaled is None:
            return None
        facts = {k: v for k, v in scaled.metadata().items() if k != "box"}
        return {**facts, "side": scaled.side}


def make_part(
    stem: str, k: int, slide: Path, fingerprint: str, regions: tuple[PlannedRegion, ...]
) -> Part:
    """A part whose id names its slide, its place and a digest of (slide fingerprint, keys)."""
    return Part(
        _part_id(f"{stem}-{k:05d}", fingerprint, regions),
        slide,
        regions[0].region.image,
        regions,
        fingerprint,
    )


def restrict_parts(parts: list[Part], keys: set[str], part_size: int) -> list[Part]:
    """The regions of `parts` whose keys are in `keys` (a repair reads only those), per slide
    in the same order, cut again into parts of at most `part_size` (ids of their own)."""
    by_slide: dict[Path, list[PlannedRegion]] = {}
    first: dict[Path, Part] = {}
    for part in parts:
        first.setdefault(part.slide, part)
        by_slide.setdefault(part.slide, []).extend(r for r in part.regions if r.key in keys)
    out = []
    for slide, todo in by_slide.items():
        stem, fingerprint = first[slide].part_id.rsplit("-", 2)[0], first[slide].fingerprint
        for k, chunk in enumerate(_chunks(todo, part_size)):
            out.append(make_part(f"{stem}-repair", k, slide, fingerprint, chunk))
    return out


def _part_id(prefix: str, fingerprint: str, regions: tuple[PlannedRegion, ...]) -> str:
    digest = hashlib.sha256("\n".join([fingerprint, *(r.key for r in regions)]).encode())
    return f"{prefix}-{digest.hexdigest()[:12]}"


FINGERPRINT_BYTES = 1 << 16


def slide_fingerprint(path: Path) -> str:
    """Size, mtime and a hash of the first and last 64 KiB of a slide file: cheap, and a
    rewritten or replaced slide (even one with the same size) gets another fingerprint."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        stat = os.fstat(fh.fileno())
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
        digest.update(fh.read(FINGERPRINT_BYTES))
        fh.seek(max(0, stat.st_size - FINGERPRINT_BYTES))
        digest.update(fh.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


@dataclass
class PreflightProblem:
    file: Path
    split: str
    index: int | None
    slide: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.split}[{self.index}]" if self.index is not None else self.split
        return f"{self.file.name}: {where}: slide {self.slide}: {self.reason}"


def group_problems(problems: Iterable[PreflightProblem], shown: int = 3) -> list[str]:
    """One line per (file, split, slide, reason), naming its first `shown` entries and how many
    there are: a missing slide with 500 regions is one line, not 500."""
    groups: dict[tuple[Path, str, str, str], list[PreflightProblem]] = {}
    for p in problems:
        groups.setdefault((p.file, p.split, p.slide, p.reason), []).append(p)
    lines = []
    for (file, split, slide, reason), group in groups.items():
        where = ", ".join(
            f"{split}[{p.index}]" if p.index is not None else split for p in group[:shown]
        )
        if len(group) > shown:
            where += f" and {len(group) - shown} more ({len(group)} entries)"
        lines.append(f"{file.name}: {where}: slide {slide}: {reason}")
    return lines


@dataclass
class SplitPlan:
    split: str
    parts: list[Part]
    skipped: list[dict[str, Any]] = field(
        default_factory=list
    )  # regions left out by the outside policy
    problems: list[PreflightProblem] = field(default_factory=list)

    @property
    def n_regions(self) -> int:
        return sum(len(p.regions) for p in self.parts)


def inspect_slides(
    paths: Iterable[Path], open_slide: Callable[[Path], SlideReader]
) -> dict[Path, SlideInfo]:
    """Open every slide once (preflight); failures become SlideInfo.error, never exceptions."""
    infos: dict[Path, SlideInfo] = {}
    for path in sorted(set(paths)):
        if not Path(path).exists():
            infos[path] = SlideInfo(
                path, error="file not found (check --data-root or the image name)"
            )
            continue
        try:
            with open_slide(path) as reader:
                infos[path] = SlideInfo(
                    path,
                    dimensions=reader.dimensions,
                    level_count=reader.level_count,
                    level_downsamples=tuple(float(d) for d in reader.level_downsamples),
                    mpp=reader.mpp,
                    fingerprint=slide_fingerprint(path),
                )
        except Exception as exc:  # any reason a slide cannot be opened is a preflight problem
            infos[path] = SlideInfo(path, error=f"cannot be opened: {exc}")
    return infos


def plan_split(
    split: str,
    regions: list[Region],
    source: Path,
    params: ExtractParams,
    slides: dict[Path, SlideInfo],
) -> SplitPlan:
    """Check every region against its slide and group the reads into parts.

    Problems (missing/unreadable slide, missing level, region outside the slide under the
    'error' policy, region wholly outside it under 'pad', label grid that does not divide
    the region; with --mpp, once per slide: no mpp without --assume-mpp, non-square pixels,
    a target finer than level 0) are all collected.
    """
    plan = SplitPlan(split, parts=[])
    stems: dict[str, str] = {}  # stem -> image, to catch two images sharing a key stem
    by_slide: dict[Path, tuple[str, list[PlannedRegion]]] = {}
    scales: dict[Path, float | str] = {}  # with --mpp: a slide's mpp, or its problem
    for r in regions:
        info = slides[r.slide]
        problem = _slide_problem(r, info, params)
        if problem:
            plan.problems.append(PreflightProblem(source, split, r.index, r.image, problem))
            continue
        scaled = None
        if params.mpp is not None:
            if r.slide not in scales:
                scales[r.slide] = _slide_mpp(info, params.mpp, params.assume_mpp)
                if isinstance(scales[r.slide], str):
                    reason = str(scales[r.slide])
                    plan.problems.append(PreflightProblem(source, split, None, r.image, reason))
            mpp = scales[r.slide]
            if isinstance(mpp, str):
                continue
            scaled = plan_region(
                r.x,
                r.y,
                params.region_size,
                mpp=mpp,
                target_mpp=params.mpp,
                downsamples=info.level_downsamples,
            )
            box: tuple[float, float, float] = (scaled.left, scaled.top, scaled.side)
        else:
            box = region_box(r.x, r.y, params.region_size, info.level_downsamples[params.level])
        stem = unique_key_stem(r.image, stems)  # two images never share keys
        assert info.dimensions is not None  # set whenever info.error is not
        verdict, reason = _outside_verdict(r, box, info.dimensions, params.outside)
        if verdict == "problem":
            plan.problems.append(PreflightProblem(source, split, r.index, r.image, reason))
            continue
        if verdict == "skip":
            skip = {"split": split, "index": r.index, "image": r.image, "x": r.x, "y": r.y}
            plan.skipped.append({**skip, "reason": reason})
            continue
        key = sample_key(stem, r.x, r.y)
        x0, y0 = math.floor(box[0]), math.floor(box[1])
        planned = PlannedRegion(key, r, x0, y0, padded=verdict == "pad", scaled=scaled)
        by_slide.setdefault(r.slide, (stem, []))[1].append(planned)
    for slide in sorted(by_slide):
        stem, todo = by_slide[slide]
        plan.parts += _cut_parts(stem, slide, todo, slides[slide], params)
    return plan


def _slide_mpp(info: SlideInfo, target: float, assume: float | None) -> float | str:
    """The slide's level-0 mpp for reads at ``target``, or why it cannot be read there (the
    reason without the slide's path: the preflight line names the slide)."""
    try:
        mpp = slide_mpp(info.mpp, info.path, assume)
        choose_level(mpp, target, info.level_downsamples, info.path)
    except ScaleError as exc:
        return str(exc).removeprefix(f"{info.path}: ")
    return mpp


def _slide_problem(r: Region, info: SlideInfo, params: ExtractParams) -> str | None:
    if info.error:
        return info.error
    if params.level >= info.level_count:
        return f"has {info.level_count} levels, --level {params.level} does not exist"
    if params.region_size % r.grid:
        return (
            f"label grid {r.grid}x{r.grid} does not divide --region-size "
            f"{params.region_size} (use a multiple of {r.grid})"
        )
    return None


def _outside_verdict(
    r: Region, box: tuple[float, float, float], dimensions: tuple[int, int], policy: str
) -> tuple[str, str]:
    """("inside" | "pad" | "skip" | "problem", reason) for a region's level-0 box (left, top,
    side) under the --outside policy. A region wholly outside is a problem even under pad: it
    would be all white, labelled."""
    x0, y0, extent = box
    width, height = dimensions
    if x0 >= 0 and y0 >= 0 and x0 + extent <= width and y0 + extent <= height:
        return "inside", ""
    where = (
        f"region [{_n(x0)}, {_n(x0 + extent)}) x [{_n(y0)}, {_n(y0 + extent)}) around centre "
        f"(x={r.x}, y={r.y})"
    )
    wholly = x0 + extent <= 0 or y0 + extent <= 0 or x0 >= width or y0 >= height
    if policy == "pad" and wholly:
        return "problem", (
            f"{where} lies wholly outside the slide ({width} x {height}): --outside pad would "
            "write an all-white image with these labels; fix the location (a [y, x] / [x, y] "
            "swap?) or use --outside skip"
        )
    reason = f"{where} is not inside the slide ({width} x {height})"
    if policy == "error":
        return "problem", reason + "; use --outside skip or --outside pad to accept such regions"
    return policy, reason


def _n(value: float) -> str:
    """A level-0 coordinate as the messages print it: whole numbers without a fraction."""
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def _cut_parts(
    stem: str, slide: Path, todo: list[PlannedRegion], info: SlideInfo, params: ExtractParams
) -> list[Part]:
    """A slide's reads in locality order, cut into equal parts of at most `part_size`."""
    # Locality: sweep the slide in bands one region high, left to right, so that
    # neighbouring reads share source tiles while they are still in the cache.
    first = todo[0].scaled  # with --mpp every region of the slide has the same side
    band = (
        max(1, round(first.side))
        if first is not None
        else region_box(0, 0, params.region_size, info.level_downsamples[params.level])[2]
    )
    todo = sorted(todo, key=lambda p: (p.y0 // band, p.x0, p.y0))
    return [
        make_part(stem, k, slide, info.fingerprint, chunk)
        for k, chunk in enumerate(_chunks(todo, params.part_size))
    ]


def _chunks(todo: list[PlannedRegion], part_size: int) -> list[tuple[PlannedRegion, ...]]:
    """Equal-sized chunks of at most part_size (100 regions -> 4 x 25, not 32 + 32 + 32 + 4),
    so that workers finish together."""
    n_parts = -(-len(todo) // part_size)
    bounds = [round(k * len(todo) / n_parts) for k in range(n_parts + 1)]
    return [tuple(todo[bounds[k] : bounds[k + 1]]) for k in range(n_parts)]
