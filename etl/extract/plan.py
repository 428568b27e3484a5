"""Planning: geometry of a region, stable sample keys, preflight checks, and the grouping of
reads into per-slide parts ordered for locality.

Nothing here reads pixels; preflight only opens each slide once to learn its size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from etl.errors import OptionError
from etl.extract.coords import Region
from etl.options import opt
from etl.wsi.formats import unique_key_stem
from etl.wsi.reader import SlideReader

OUTSIDE_POLICIES = ("error", "skip", "pad")


@dataclass(frozen=True)
class ExtractParams:
    """Everything that decides the content of the shards (a rerun must match them exactly)."""

    region_size: Annotated[int, opt("Region side in pixels at --level.")] = 768
    level: Annotated[int, opt("Pyramid level to read (region stays centred).")] = 0
    fmt: Annotated[str, opt("jpg, or png for lossless.", "--format")] = "jpg"
    quality: Annotated[int, opt("JPEG quality.")] = 95
    shard_size: Annotated[int, opt("Samples per shard (the last may be shorter).")] = 1000
    part_size: Annotated[int, opt("Regions per work unit (one slide each).")] = 32
    seed: Annotated[int, opt("Seed of the global shuffle that mixes shards.")] = 0
    outside: Annotated[str, opt("Region not inside its slide: error | skip | pad.")] = "error"

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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def region_box(x: int, y: int, size: int, downsample: float = 1.0) -> tuple[int, int, int]:
    """Top-left (level-0) and level-0 extent of a `size` px region at a level, centred on (x, y).

    At level 0 this is OpenSlide's `read_region((x - size // 2, y - size // 2), 0, (size, size))`,
    the seed's read. At level L the region stays centred: it spans size * downsample level-0 px.
    """
    extent = round(size * downsample)
    return x - extent // 2, y - extent // 2, extent


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


@dataclass(frozen=True)
class PlannedRegion:
    key: str
    region: Region
    x0: int  # level-0 top-left of the read
    y0: int
    padded: bool  # part of the region lies outside the slide and reads as white


@dataclass(frozen=True)
class Part:
    """A unit of work: consecutive reads from one slide, in locality order."""

    part_id: str
    slide: Path
    image: str
    regions: tuple[PlannedRegion, ...]


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
    'error' policy, label grid that does not divide the region) are all collected.
    """
    plan = SplitPlan(split, parts=[])
    stems: dict[str, str] = {}  # stem -> image, to catch two images sharing a key stem
    by_slide: dict[Path, tuple[str, list[PlannedRegion]]] = {}
    for r in regions:
        info = slides[r.slide]
        problem = None
        if info.error:
            problem = info.error
        elif params.level >= info.level_count:
            problem = f"has {info.level_count} levels, --level {params.level} does not exist"
        elif params.region_size % r.grid:
            problem = (
                f"label grid {r.grid}x{r.grid} does not divide --region-size "
                f"{params.region_size} (use a multiple of {r.grid})"
            )
        if problem:
            plan.problems.append(PreflightProblem(source, split, r.index, r.image, problem))
            continue
        stem = unique_key_stem(r.image, stems)  # two images never share keys
        x0, y0, extent = region_box(
            r.x, r.y, params.region_size, info.level_downsamples[params.level]
        )
        assert info.dimensions is not None  # set whenever info.error is not
        width, height = info.dimensions
        outside = x0 < 0 or y0 < 0 or x0 + extent > width or y0 + extent > height
        if outside:
            reason = (
                f"region [{x0}, {x0 + extent}) x [{y0}, {y0 + extent}) around centre "
                f"(x={r.x}, y={r.y}) is not inside the slide ({width} x {height})"
            )
            if params.outside == "error":
                plan.problems.append(
                    PreflightProblem(
                        source,
                        split,
                        r.index,
                        r.image,
                        reason + "; use --outside skip or --outside pad to accept such regions",
                    )
                )
                continue
            if params.outside == "skip":
                plan.skipped.append(
                    {
                        "split": split,
                        "index": r.index,
                        "image": r.image,
                        "x": r.x,
                        "y": r.y,
                        "reason": reason,
                    }
                )
                continue
        key = sample_key(stem, r.x, r.y)
        by_slide.setdefault(r.slide, (stem, []))[1].append(PlannedRegion(key, r, x0, y0, outside))

    for slide in sorted(by_slide):
        stem, todo = by_slide[slide]
        # Locality: sweep the slide in bands one region high, left to right, so that
        # neighbouring reads share source tiles while they are still in the cache.
        band = region_box(0, 0, params.region_size, slides[slide].level_downsamples[params.level])[
            2
        ]
        todo.sort(key=lambda p: (p.y0 // band, p.x0, p.y0))
        # Equal-sized parts of at most part_size (100 regions -> 4 x 25, not 32 + 32 + 32 + 4),
        # so that workers finish together.
        n_parts = -(-len(todo) // params.part_size)
        bounds = [round(k * len(todo) / n_parts) for k in range(n_parts + 1)]
        for k in range(n_parts):
            chunk = tuple(todo[bounds[k] : bounds[k + 1]])
            plan.parts.append(Part(f"{stem}-{k:05d}", slide, chunk[0].region.image, chunk))
    return plan
