"""Run an extraction: coordinates -> preflight -> parallel part extraction -> mixed shards ->
manifest. Owns locking, parameter checks and resumption; the pieces live in plan/shards.

Output per split: `<out>/<split>/<split>-000000.tar ...` and `<out>/<split>/manifest.json`.
Work in progress lives in `<out>/<split>/.parts/` and is removed once the manifest is written.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypedDict, TypeVar, cast

import joblib

from etl.atomic import remove_temporaries, write_json_atomic
from etl.errors import PatchetlError
from etl.extract.coords import RegionTable, load_regions
from etl.extract.plan import ExtractParams, PreflightProblem, SplitPlan, inspect_slides, plan_split
from etl.extract.shards import (
    Failure,
    Manifest,
    PartIndex,
    ShardRecord,
    SlideCounts,
    check_shard,
    extract_part,
    load_part_index,
    plan_shards,
    sample_catalog,
    sha256_file,
    shard_name,
    write_shard,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from etl.wsi.reader import Backend

BACKENDS = ("loky", "dask")
T = TypeVar("T")
P = ParamSpec("P")
# A call as joblib.delayed makes it: (function, args, kwargs), run by a worker.
Call = tuple[Callable[..., T], tuple[Any, ...], dict[str, Any]]
Progress = Callable[[int], None]  # called with the number of regions just done


class ExtractError(PatchetlError, RuntimeError):
    """A problem the user must fix; the message says what and how."""


class PreflightError(ExtractError):
    def __init__(self, problems: list[PreflightProblem]) -> None:
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(
            f"preflight found {len(problems)} problem(s); nothing was extracted:\n{shown}{more}"
        )


class Fingerprint(TypedDict):
    """`.params.json` of a split folder: what a rerun must match to resume instead of refusing."""

    coordinates_sha256: str
    split: str
    params: dict[str, Any]  # ExtractParams.as_dict() without part_size
    parse: dict[str, str]


@dataclass
class SplitResult:
    split: str
    folder: Path
    planned: int
    written: int
    skipped: list[dict[str, Any]]
    failed: list[Failure]
    shards: list[ShardRecord]
    seconds: float
    resumed_parts: int = 0
    timing: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0

    @property
    def rate(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


class RunOptions(TypedDict, total=False):
    """Keyword options of :func:`extract_splits` (defaults there)."""

    workers: int
    backend: str
    scheduler: str | None
    overwrite: bool
    slide_backend: str
    tile_cache_bytes: int


def tool_version() -> str:
    try:
        return version("patchetl")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on an output folder; a second concurrent run refuses at once.

    flock is released by the kernel when the holder dies, even on kill -9, so a crashed
    run never leaves a stale lock behind.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExtractError(
                f"{folder} is in use by another `patchetl extract` run; wait for "
                "it to finish (or use another --out)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fingerprint(
    table: RegionTable, split: str, params: ExtractParams, parse_options: dict[str, str]
) -> Fingerprint:
    """What a rerun in the same folder must match to resume instead of refusing."""
    return {
        "coordinates_sha256": sha256_file(table.source),
        "split": split,
        # part_size only changes how the work is cut, not a byte of the shards
        "params": {k: v for k, v in params.as_dict().items() if k != "part_size"},
        "parse": parse_options,
    }


def prepare_folder(folder: Path, expected: Fingerprint, overwrite: bool) -> None:
    """Refuse a folder holding another extraction unless --overwrite; else clear leftovers."""
    params_path = folder / ".params.json"
    ours = [folder / "manifest.json", folder / ".parts", params_path, *folder.glob("*.tar")]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        previous = json.loads(params_path.read_text()) if params_path.exists() else None
        if previous != expected:
            why = _why_different(previous, expected)
            raise ExtractError(
                f"refusing to write into {folder}: {why}. Use another --out, or "
                "--overwrite to delete it and start again."
            )
    if overwrite:
        for p in existing:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    remove_temporaries(folder)
    write_json_atomic(params_path, expected)


def _why_different(previous: dict[str, Any] | None, expected: Mapping[str, Any]) -> str:
    """Which parts of the fingerprint differ (each changed parameter by name)."""
    if previous is None:
        return "it already holds shards from an unknown run"
    diffs = [k for k in expected if previous.get(k) != expected[k]]
    if "params" in diffs:
        before, now = previous.get("params", {}), expected["params"]
        diffs += [
            f"params.{k}" for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)
        ]
    return "it holds an extraction made with different " + ", ".join(diffs)


class Runner(Protocol):
    """Runs calls on the workers, yielding their results as they finish (in any order)."""

    def __call__(self, calls: Sequence[Call[T]]) -> Iterator[T]: ...


def delayed(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Call[T]:
    """``joblib.delayed(function)(*args, **kwargs)``, with the arguments type-checked."""
    call: Call[T] = joblib.delayed(function)(*args, **kwargs)
    return call


@contextmanager
def executor(backend: str, workers: int, scheduler: str | None) -> Iterator[Runner]:
    """Yield a :class:`Runner` on local processes (loky) or on a dask.distributed cluster."""
    if backend == "loky":
        yield _runner(joblib.Parallel(n_jobs=workers, return_as="generator_unordered"))
        return
    if backend != "dask":
        raise ExtractError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ExtractError(
            "--backend dask needs dask.distributed: pip install 'patchetl[dask]'"
        ) from None
    # dask's Client and LocalCluster are not annotated
    if scheduler:
        client = Client(scheduler)  # type: ignore[no-untyped-call, unused-ignore]
    else:
        cluster = LocalCluster(  # type: ignore[no-untyped-call, unused-ignore]
            n_workers=workers, threads_per_worker=1, processes=True
        )
        client = Client(cluster)  # type: ignore[no-untyped-call, unused-ignore]
    with client, joblib.parallel_config(backend="dask"):
        yield _runner(joblib.Parallel(n_jobs=-1, return_as="generator_unordered"))


def _runner(parallel: joblib.Parallel) -> Runner:
    def run(calls: Sequence[Call[T]]) -> Iterator[T]:
        results: Iterator[T] = parallel(calls)
        return results

    return run


@dataclass
class _SplitRun:
    """One split's state during a run of `extract_splits`."""

    plan: SplitPlan
    folder: Path
    expected: Fingerprint
    on_progress: Progress
    indexes: list[PartIndex] = field(default_factory=list)
    records: dict[str, ShardRecord] = field(default_factory=dict)
    resumed: int = 0

    @property
    def parts_dir(self) -> Path:
        return self.folder / ".parts"

    def add_part(self, index: PartIndex) -> None:
        self.indexes.append(index)
        self.on_progress(len(index["samples"]) + len(index["failures"]))


def part_calls(
    st: _SplitRun, params: ExtractParams, slide_backend: str, tile_cache_bytes: int
) -> list[Call[PartIndex]]:
    """Collect the finished parts of a split (resume) and the calls for the others."""
    calls = []
    for part in st.plan.parts:
        index = load_part_index(st.parts_dir, part.part_id)
        if index is None:
            calls.append(
                delayed(
                    extract_part,
                    part,
                    st.plan.split,
                    params,
                    st.parts_dir,
                    slide_backend,
                    tile_cache_bytes,
                )
            )
        else:
            st.add_part(index)
            st.resumed += 1
    return calls


def shard_calls(st: _SplitRun, params: ExtractParams) -> list[Call[ShardRecord]]:
    """Records of the shards already there, and the calls that write the others (by copying
    part members in a seeded global shuffle)."""
    catalog = sample_catalog(st.indexes)
    calls = []
    for i, entries in enumerate(plan_shards(st.indexes, params.shard_size, params.seed)):
        path = st.folder / shard_name(st.plan.split, i)
        if path.exists():  # complete (atomic rename), from a run that was interrupted
            st.records[path.name] = check_shard(path, decode=False).record
        else:
            resolved = [(key, part_id, catalog[part_id][key]) for key, part_id in entries]
            calls.append(delayed(write_shard, path, resolved, st.parts_dir))
    return calls


def finish_split(
    st: _SplitRun,
    table: RegionTable,
    params: ExtractParams,
    parse_options: dict[str, str],
    seconds: float,
) -> SplitResult:
    """Write the manifest (last), remove the work folder, and summarise."""
    plan, indexes = st.plan, st.indexes
    shards = [st.records[name] for name in sorted(st.records)]
    failed = [f for idx in indexes for f in idx["failures"]]
    timing: dict[str, float] = {}
    slides: dict[str, SlideCounts] = {}
    for idx in indexes:
        for k, v in idx["timing"].items():
            timing[k] = timing.get(k, 0.0) + v
        entry = slides.setdefault(idx["slide"], {"count": 0, "failed": 0})
        entry["count"] += len(idx["samples"])
        entry["failed"] += len(idx["failures"])
    written = sum(s["count"] for s in shards)
    manifest: Manifest = {
        "tool": "patchetl",
        "version": tool_version(),
        "split": plan.split,
        "coordinates": {"path": str(table.source), "sha256": st.expected["coordinates_sha256"]},
        "params": params.as_dict(),
        "parse": parse_options,
        "counts": {
            "planned": plan.n_regions + len(plan.skipped),
            "written": written,
            "skipped": len(plan.skipped),
            "failed": len(failed),
        },
        "shards": shards,
        "slides": dict(sorted(slides.items())),
        "skipped": plan.skipped,
        "failed": failed,
    }
    write_json_atomic(st.folder / "manifest.json", manifest)
    shutil.rmtree(st.parts_dir, ignore_errors=True)
    return SplitResult(
        plan.split,
        st.folder,
        manifest["counts"]["planned"],
        written,
        plan.skipped,
        failed,
        shards,
        seconds,
        resumed_parts=st.resumed,
        timing=timing,
        peak_rss_mb=max((i.get("peak_rss_mb", 0) for i in indexes), default=0),
    )


def finished_split(plan: SplitPlan, folder: Path, seconds: float) -> SplitResult:
    """The result of a split whose manifest was written by an earlier run (nothing to redo)."""
    manifest: Manifest = json.loads((folder / "manifest.json").read_text())
    shutil.rmtree(folder / ".parts", ignore_errors=True)
    return SplitResult(
        plan.split,
        folder,
        manifest["counts"]["planned"],
        manifest["counts"]["written"],
        manifest["skipped"],
        manifest["failed"],
        manifest["shards"],
        seconds,
        resumed_parts=len(plan.parts),
    )


def extract_splits(
    table: RegionTable,
    jobs: Sequence[tuple[SplitPlan, Path, Progress]],
    params: ExtractParams,
    parse_options: dict[str, str],
    *,
    workers: int = 1,
    backend: str = "loky",
    scheduler: str | None = None,
    overwrite: bool = False,
    slide_backend: str = "auto",
    tile_cache_bytes: int = 256 << 20,
) -> list[SplitResult]:
    """Extract several splits, each `(plan, output folder, progress callback)`, resuming a
    previous run of the same command. The parts of all splits go through one pool, then the
    shards of all splits, so no worker idles at the end of a split."""
    start = time.perf_counter()
    results: dict[str, SplitResult] = {}
    with ExitStack() as locks:
        runs = []
        for plan, out, on_progress in jobs:
            folder = Path(out)
            expected = fingerprint(table, plan.split, params, parse_options)
            locks.enter_context(folder_lock(folder))
            prepare_folder(folder, expected, overwrite)
            if (folder / "manifest.json").exists():
                on_progress(plan.n_regions)
                results[plan.split] = finished_split(plan, folder, time.perf_counter() - start)
                continue
            (folder / ".parts").mkdir(exist_ok=True)
            runs.append(_SplitRun(plan, folder, expected, on_progress))
        if runs:
            by_split = {st.plan.split: st for st in runs}
            with executor(backend, workers, scheduler) as run:
                part_work = [
                    c
                    for st in runs
                    for c in part_calls(st, params, slide_backend, tile_cache_bytes)
                ]
                for index in run(part_work):
                    by_split[index["split"]].add_part(index)
                shard_work = [c for st in runs for c in shard_calls(st, params)]
                owner = {shard_name(st.plan.split, 0).rsplit("-", 1)[0]: st for st in runs}
                for record in run(shard_work):
                    owner[record["name"].rsplit("-", 1)[0]].records[record["name"]] = record
            for st in runs:
                results[st.plan.split] = finish_split(
                    st, table, params, parse_options, time.perf_counter() - start
                )
    return [results[plan.split] for plan, _, _ in jobs]


def extract_split(
    table: RegionTable,
    plan: SplitPlan,
    out: Path,
    params: ExtractParams,
    parse_options: dict[str, str],
    *,
    on_progress: Progress = lambda n: None,
    **options: Unpack[RunOptions],
) -> SplitResult:
    """Extract one split into `out` (see `extract_splits` for the options)."""
    return extract_splits(table, [(plan, out, on_progress)], params, parse_options, **options)[0]


def plan_extraction(
    coords: Path,
    params: ExtractParams,
    *,
    data_root: str | Path | None = None,
    location_order: str = "yx",
    anchor: str = "center",
    splits: list[str] | None = None,
    slide_backend: str = "auto",
) -> tuple[RegionTable, list[SplitPlan]]:
    """Parse the coordinate file and run the preflight for every split, before any work."""
    from etl.wsi.reader import open_slide

    params.validate()
    if anchor == "corner" and params.level > 0:
        # The corner -> centre shift is region_size // 2 level-0 pixels; at level > 0 a region
        # spans region_size * downsample level-0 pixels, which is known only per slide.
        raise ExtractError(
            "--anchor corner is only supported with --level 0; convert the "
            "locations to centres (or read at level 0)"
        )
    table = load_regions(
        coords,
        data_root=data_root,
        location_order=location_order,
        anchor=anchor,
        region_size=params.region_size,
        split=splits,
    )
    by_split = table.splits()
    backend = cast("Backend", slide_backend)  # open_slide rejects an unknown name (a problem)
    slides = inspect_slides(
        [r.slide for r in table.regions], lambda p: open_slide(p, backend=backend)
    )
    plans = [plan_split(s, regs, table.source, params, slides) for s, regs in by_split.items()]
    problems = [p for plan in plans for p in plan.problems]
    if problems:
        raise PreflightError(problems)
    return table, plans
