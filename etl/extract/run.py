"""Run an extraction: coordinates -> preflight -> parallel part extraction -> mixed shards ->
manifest. Owns locking, parameter checks, resumption and repair; the pieces live in plan/shards.

Output per split: `<out>/<split>/<split>-000000.tar ...` and `<out>/<split>/manifest.json`.
Work in progress lives in `<out>/<split>/.parts/` and is removed once the manifest is written.

What a rerun keeps, so that it always ends with exactly the planned samples:
- a part whose index lists the keys planned for it now, from the same slide fingerprint
  (`load_part_index`); any other is read again, so `--part-size` may change between runs;
- shards of an interrupted mixing step only when `.parts/mixing.json` says they were mixed
  from the same parts and each holds the keys planned for it; otherwise they are mixed again;
- a finished split only after every shard the manifest lists is there with its size (and
  sha256, `check_sha256`); a missing or damaged shard is rebuilt from its regions alone and
  must come out byte-identical to the manifest's record.
Parts and shards run on `etl.extract.executor` (loky workers that exit with this process, or
dask). With `ship_parts` (dask with --out s3://) workers need no shared file system: each
sends its part's bytes back and this process writes them into `.parts/` (`store_part`) and
mixes the shards on local workers.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

from etl.atomic import output_folder, remove_temporaries, write_json_atomic
from etl.errors import PatchetlError
from etl.extract.coords import RegionTable, load_regions
from etl.extract.executor import Call, Runner, delayed, executor
from etl.extract.plan import (
    ExtractParams,
    Part,
    PreflightProblem,
    SplitPlan,
    group_problems,
    inspect_slides,
    plan_split,
    restrict_parts,
)
from etl.extract.shards import (
    Failure,
    Manifest,
    PartIndex,
    ShardRecord,
    SlideCounts,
    check_shard,
    extract_part,
    extract_part_shipped,
    is_shard_name,
    keys_digest,
    load_part_index,
    plan_shards,
    sample_catalog,
    sha256_file,
    shard_name,
    store_part,
    write_shard,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from etl.wsi.reader import Backend

Progress = Callable[[int], None]  # called with the number of regions just done


class ExtractError(PatchetlError, RuntimeError):
    """A problem the user must fix; the message says what and how."""


class PreflightError(ExtractError):
    def __init__(self, problems: list[PreflightProblem]) -> None:
        self.problems = problems
        lines = group_problems(problems)
        shown = "\n".join(f"  - {line}" for line in lines[:50])
        more = f"\n  ... and {len(lines) - 50} more" if len(lines) > 50 else ""
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
    repaired: dict[str, str] = field(default_factory=dict)  # shard name -> what was wrong
    warnings: list[str] = field(default_factory=list)

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
    check_sha256: bool
    ship_parts: bool


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


def our_files(folder: Path, split: str) -> list[Path]:
    """What extract writes in a split folder: manifest, parameters, work folder, and the files
    named as its shards; nothing else is ever deleted (`--overwrite` included)."""
    fixed = [folder / "manifest.json", folder / ".parts", folder / ".params.json"]
    shards = sorted(p for p in folder.glob("*.tar") if is_shard_name(split, p.name))
    return [p for p in fixed if p.exists()] + shards


def prepare_folder(folder: Path, expected: Fingerprint, overwrite: bool) -> None:
    """Refuse a folder holding another extraction unless --overwrite; else clear leftovers."""
    params_path = folder / ".params.json"
    existing = our_files(folder, expected["split"])
    if existing and not overwrite:
        previous = _read_json(params_path) if params_path.exists() else None
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


def _read_json(path: Path) -> Any:
    """A JSON file this tool wrote, or None when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _why_different(previous: dict[str, Any] | None, expected: Mapping[str, Any]) -> str:
    """Which parts of the fingerprint differ (each changed parameter by name)."""
    if not isinstance(previous, dict):
        return "it already holds shards from an unknown run"
    diffs = [k for k in expected if previous.get(k) != expected[k]]
    if "params" in diffs:
        before, now = previous.get("params", {}), expected["params"]
        diffs += [
            f"params.{k}" for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)
        ]
    return "it holds an extraction made with different " + ", ".join(diffs)


@dataclass
class _SplitRun:
    """One split's state during a run of `extract_splits`; `finished` is the manifest of a
    finished split whose `redo` shards (name -> what is wrong) are being rebuilt."""

    plan: SplitPlan
    folder: Path
    expected: Fingerprint
    on_progress: Progress
    finished: Manifest | None = None
    redo: dict[str, str] = field(default_factory=dict)
    indexes: list[PartIndex] = field(default_factory=list)
    records: dict[str, ShardRecord] = field(default_factory=dict)
    resumed: int = 0

    @property
    def parts_dir(self) -> Path:
        return self.folder / ".parts"

    @property
    def planned_keys(self) -> list[str]:
        return [r.key for part in self.plan.parts for r in part.regions]

    def written_keys(self) -> list[str]:
        """The keys the shards hold: every planned key that did not fail to read."""
        if self.finished is not None:
            failed = {f["key"] for f in self.finished["failed"]}
            return [k for k in self.planned_keys if k not in failed]
        return [s["key"] for idx in self.indexes for s in idx["samples"]]

    def add_part(self, index: PartIndex) -> None:
        self.indexes.append(index)
        self.on_progress(len(index["samples"]) + len(index["failures"]))


def parts_to_read(st: _SplitRun, params: ExtractParams) -> list[Part]:
    """Collect the finished parts of a split (resume) and return the others."""
    todo = []
    for part in st.plan.parts if st.finished is None else _repair_parts(st, params):
        index = load_part_index(st.parts_dir, part)
        if index is None:
            todo.append(part)
        else:
            st.add_part(index)
            st.resumed += 1
    return todo


def _repair_parts(st: _SplitRun, params: ExtractParams) -> list[Part]:
    """The parts cut down to the regions of the shards to rebuild."""
    shards = plan_shards(st.written_keys(), params.shard_size, params.seed)
    needed = {
        k for i, keys in enumerate(shards) if shard_name(st.plan.split, i) in st.redo for k in keys
    }
    st.on_progress(st.plan.n_regions - len(needed))
    return restrict_parts(st.plan.parts, needed, params.part_size)


def shard_calls(st: _SplitRun, params: ExtractParams) -> list[Call[ShardRecord]]:
    """Records of the shards already there, and the calls that write the others (by copying
    part members in a seeded global shuffle)."""
    catalog = sample_catalog(st.indexes)
    owner = {key: part_id for part_id, samples in catalog.items() for key in samples}
    shards = plan_shards(st.written_keys(), params.shard_size, params.seed)
    if st.finished is None:
        _forget_other_mixes(st, [[(k, owner[k]) for k in keys] for keys in shards])
    done = {s["name"]: s for s in st.finished["shards"]} if st.finished else {}
    calls = []
    for i, keys in enumerate(shards):
        path = st.folder / shard_name(st.plan.split, i)
        if path.name in done and path.name not in st.redo:
            st.records[path.name] = done[path.name]
            continue
        if st.finished is None and path.exists():  # complete (atomic rename), same mix
            check = check_shard(path, decode=False)
            if check.keys == keys:
                st.records[path.name] = check.record
                continue
        resolved = [(key, owner[key], catalog[owner[key]][key]) for key in keys]
        calls.append(delayed(write_shard, path, resolved, st.parts_dir))
    return calls


def _forget_other_mixes(st: _SplitRun, shards: list[list[tuple[str, str]]]) -> None:
    """Delete shards left by an interrupted mixing step of other parts (another part size,
    or a slide since replaced); record the mix about to be written."""
    digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()
    record = st.parts_dir / "mixing.json"
    if _read_json(record) != {"shards_sha256": digest}:
        for path in st.folder.glob("*.tar"):
            if is_shard_name(st.plan.split, path.name):
                path.unlink()
        write_json_atomic(record, {"shards_sha256": digest})


def _check_complete(st: _SplitRun, shards: list[ShardRecord]) -> None:
    """Every planned key is a sample or a failure exactly once, and the shards hold them all:
    a manifest is never written over a lost or duplicated region."""
    done = [s["key"] for i in st.indexes for s in i["samples"]]
    done += [f["key"] for i in st.indexes for f in i["failures"]]
    written = sum(s["count"] for s in shards)
    if sorted(done) != sorted(st.planned_keys) or written != len(st.written_keys()):
        raise ExtractError(
            f"{st.folder}: the parts hold {len(done)} regions and the shards {written} samples "
            f"for {len(st.planned_keys)} planned regions; no manifest was written. Run the same "
            "command with --overwrite to extract the split again, and report this."
        )


def finish_split(
    st: _SplitRun,
    table: RegionTable,
    params: ExtractParams,
    parse_options: dict[str, str],
    seconds: float,
) -> SplitResult:
    """Write the manifest (last), remove the work folder, and summarise."""
    if st.finished is not None:
        return _finish_repair(st, st.finished, seconds)
    plan, indexes = st.plan, st.indexes
    shards = [st.records[name] for name in sorted(st.records)]
    _check_complete(st, shards)
    failed = [f for idx in indexes for f in idx["failures"]]
    timing: dict[str, float] = {}
    slides: dict[str, SlideCounts] = {}
    fingerprints = {part.image: part.fingerprint for part in plan.parts}
    scales = {part.image: part.scale for part in plan.parts if part.scale is not None}
    for idx in indexes:
        for k, v in idx["timing"].items():
            timing[k] = timing.get(k, 0.0) + v
        entry = slides.setdefault(
            idx["slide"], {"count": 0, "failed": 0, "fingerprint": fingerprints[idx["slide"]]}
        )
        if idx["slide"] in scales:  # with --mpp: how the slide was read
            entry["scale"] = scales[idx["slide"]]
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
        "keys_sha256": keys_digest(st.written_keys()),
        "shards": shards,
        "slides": dict(sorted(slides.items())),
        "skipped": plan.skipped,
        "failed": failed,
    }
    write_json_atomic(st.folder / "manifest.json", manifest)
    shutil.rmtree(st.parts_dir, ignore_errors=True)
    result = _result(plan, st.folder, manifest, seconds, resumed_parts=st.resumed)
    result.timing = timing
    result.peak_rss_mb = max((i.get("peak_rss_mb", 0) for i in indexes), default=0)
    return result


def _finish_repair(st: _SplitRun, manifest: Manifest, seconds: float) -> SplitResult:
    """Rebuilt shards must be the manifest's byte for byte; then the split is whole again."""
    failed = [f for idx in st.indexes for f in idx["failures"]]
    if failed:
        raise ExtractError(
            f"{st.folder}: cannot rebuild {', '.join(sorted(st.redo))}: {len(failed)} of its "
            f"regions no longer read (first: {failed[0]['image']} entry {failed[0]['index']}: "
            f"{failed[0]['reason']}). Run with --overwrite to extract the split again."
        )
    listed = {s["name"]: s for s in manifest["shards"]}
    differ = [n for n in sorted(st.redo) if st.records.get(n) != listed[n]]
    if differ:
        raise ExtractError(
            f"{st.folder}: rebuilt {', '.join(differ)} differ from manifest.json (the slides or "
            "the reader changed since it was written). Run with --overwrite to extract the split "
            "again."
        )
    shutil.rmtree(st.parts_dir, ignore_errors=True)
    result = _result(st.plan, st.folder, manifest, seconds, resumed_parts=st.resumed)
    result.repaired = dict(st.redo)
    return result


def _result(
    plan: SplitPlan, folder: Path, manifest: Manifest, seconds: float, resumed_parts: int
) -> SplitResult:
    warnings = []
    if manifest["counts"]["written"] == 0:
        counts = manifest["counts"]
        warnings.append(
            f"{plan.split}: no region was written ({counts['skipped']} skipped, "
            f"{counts['failed']} failed of {counts['planned']}); see {folder / 'manifest.json'}"
        )
    return SplitResult(
        plan.split,
        folder,
        manifest["counts"]["planned"],
        manifest["counts"]["written"],
        manifest["skipped"],
        manifest["failed"],
        manifest["shards"],
        seconds,
        resumed_parts=resumed_parts,
        warnings=warnings,
    )


def damaged_shards(folder: Path, manifest: Manifest, check_sha256: bool) -> dict[str, str]:
    """The shards of a finished split that are not as the manifest lists them: missing, of
    another size, or (with `check_sha256`) of other content."""
    damaged = {}
    for record in manifest["shards"]:
        path = folder / record["name"]
        if not path.is_file():
            damaged[record["name"]] = "missing"
        elif (size := path.stat().st_size) != record["bytes"]:
            damaged[record["name"]] = f"{size} bytes, manifest.json says {record['bytes']}"
        elif check_sha256 and sha256_file(path) != record["sha256"]:
            damaged[record["name"]] = "sha256 differs from manifest.json"
    return damaged


def changed_slides(manifest: Manifest, plan: SplitPlan) -> list[str]:
    """Slides whose fingerprint now differs from the one the manifest recorded."""
    now = {part.image: part.fingerprint for part in plan.parts}
    changed = []
    for image, counts in manifest["slides"].items():
        before, after = counts.get("fingerprint"), now.get(image)
        if before and after and before != after:
            changed.append(image)
    return changed


def open_split(
    plan: SplitPlan,
    folder: Path,
    expected: Fingerprint,
    on_progress: Progress,
    *,
    overwrite: bool,
    check_sha256: bool,
    seconds: Callable[[], float],
) -> _SplitRun | SplitResult:
    """A split's work: all of it, a resume, the repair of a finished split's damaged shards,
    or nothing (a finished split whose shards are all as its manifest lists them)."""
    prepare_folder(folder, expected, overwrite)
    path = folder / "manifest.json"
    st = _SplitRun(plan, folder, expected, on_progress)
    if not path.exists():
        st.parts_dir.mkdir(exist_ok=True)
        return st
    manifest: Manifest | None = _read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ExtractError(f"{path}: cannot be read; run with --overwrite to extract again")
    changed = changed_slides(manifest, plan)
    st.finished, st.redo = manifest, damaged_shards(folder, manifest, check_sha256)
    if not st.redo:
        on_progress(plan.n_regions)
        shutil.rmtree(st.parts_dir, ignore_errors=True)
        result = _result(plan, folder, manifest, seconds(), resumed_parts=len(plan.parts))
        result.warnings += [
            f"{folder}: slide {image} changed since manifest.json was written; the shards hold "
            "its earlier pixels (run with --overwrite to extract again)"
            for image in changed
        ]
        return result
    damage = "; ".join(f"{name}: {why}" for name, why in st.redo.items())
    if changed or manifest.get("keys_sha256", "") not in ("", keys_digest(st.written_keys())):
        why = f"slide(s) {', '.join(changed)} changed" if changed else "its samples differ"
        raise ExtractError(
            f"{folder}: shards are damaged ({damage}) and cannot be rebuilt as manifest.json "
            f"lists them: {why} since it was written. Run with --overwrite to extract again."
        )
    st.parts_dir.mkdir(exist_ok=True)
    return st


_WRITE_HINTS = {
    errno.EFBIG: "a file size limit (`ulimit -f`) is below the size of a part or shard: lift it",
    errno.ENOSPC: "the disk is full: free space",
    errno.EDQUOT: "the disk quota is used up: free space",
    errno.EACCES: "the output folder is not writable: fix its permissions",
    errno.EPERM: "the output folder is not writable: fix its permissions",
    errno.EROFS: "the output file system is read-only: choose another --out",
}


def stopped(exc: OSError, runs: Sequence[_SplitRun]) -> ExtractError:
    """The message for a run stopped by a system error (a write, usually): what, where, and
    that a rerun resumes once the cause is fixed."""
    where = f" ({exc.filename})" if exc.filename else ""
    hint = _WRITE_HINTS.get(exc.errno or 0, "fix the cause")
    folders = ", ".join(str(st.folder) for st in runs)
    return ExtractError(
        f"extraction into {folders} stopped: {exc.strerror or exc}{where}. Nothing incomplete "
        f"is marked done and no manifest was written; {hint}, then run the same command again "
        "to resume."
    )


def run_splits(
    runs: Sequence[_SplitRun],
    params: ExtractParams,
    backend: str,
    workers: int,
    scheduler: str | None,
    slide_backend: str,
    tile_cache_bytes: int,
    ship_parts: bool = False,
) -> None:
    """The parts of all splits through one pool, then their shards. With `ship_parts` the
    workers return each part's bytes, written here, and the shards are mixed here."""
    by_split = {st.plan.split: st for st in runs}
    todo = [(st, p) for st in runs for p in parts_to_read(st, params)]
    options = (slide_backend, tile_cache_bytes)
    with executor(backend, workers, scheduler) as run:
        if ship_parts:
            calls = [
                delayed(extract_part_shipped, p, st.plan.split, params, *options) for st, p in todo
            ]
            for index, data in run(calls):
                st = by_split[index["split"]]
                st.add_part(store_part(st.parts_dir, index, data))
        else:
            for index in run(
                [
                    delayed(extract_part, p, st.plan.split, params, st.parts_dir, *options)
                    for st, p in todo
                ]
            ):
                by_split[index["split"]].add_part(index)
            mix_shards(run, runs, params)
    if ship_parts:
        with executor("loky", workers, None) as run:
            mix_shards(run, runs, params)


def mix_shards(run: Runner, runs: Sequence[_SplitRun], params: ExtractParams) -> None:
    """Write the shards of all splits from their parts on `run`'s workers."""
    by_split = {st.plan.split: st for st in runs}
    for record in run([c for st in runs for c in shard_calls(st, params)]):
        by_split[record["name"].rsplit("-", 1)[0]].records[record["name"]] = record


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
    check_sha256: bool = True,
    ship_parts: bool = False,
) -> list[SplitResult]:
    """Extract several splits, each `(plan, output folder, progress callback)`, resuming a
    previous run of the same command. The parts of all splits go through one pool, then the
    shards of all splits, so no worker idles at the end of a split. `ship_parts`: see
    `run_splits` (for workers that do not share this machine's file system)."""
    start = time.perf_counter()
    results: dict[str, SplitResult] = {}
    with ExitStack() as locks:
        runs = []
        for plan, out, on_progress in jobs:
            folder = output_folder(out)
            locks.enter_context(folder_lock(folder))
            opened = open_split(
                plan,
                folder,
                fingerprint(table, plan.split, params, parse_options),
                on_progress,
                overwrite=overwrite,
                check_sha256=check_sha256,
                seconds=lambda: time.perf_counter() - start,
            )
            if isinstance(opened, SplitResult):
                results[plan.split] = opened
            else:
                runs.append(opened)
        try:
            if runs:
                run_splits(
                    runs,
                    params,
                    backend,
                    workers,
                    scheduler,
                    slide_backend,
                    tile_cache_bytes,
                    ship_parts,
                )
            for st in runs:
                seconds = time.perf_counter() - start
                results[st.plan.split] = finish_split(st, table, params, parse_options, seconds)
        except PatchetlError:
            raise
        except OSError as exc:  # a write that failed (file size limit, full disk, ...)
            raise stopped(exc, runs) from exc
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
    if anchor == "corner" and (params.level > 0 or params.mpp is not None):
        # The corner -> centre shift is region_size // 2 level-0 pixels; at level > 0 (or at
        # --mpp) a region spans region_size * downsample (* mpp / slide mpp) level-0 pixels,
        # which is known only per slide.
        raise ExtractError(
            "--anchor corner is only supported with --level 0 and without --mpp; convert the "
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
