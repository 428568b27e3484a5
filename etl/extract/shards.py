"""Shard files: per-slide part tars (written by workers), their mixing into final shards,
the manifest, and verification.

Workers without the client's file system (dask with --out s3://) run `extract_part_shipped`:
the part is written into a worker-local temporary folder, its index and tar bytes go back to
the client, and `store_part` writes them into the client's parts folder: the same names and
bytes as `extract_part` there, so resumption and mixing do not know the difference.

Atomicity: every file is written under a temporary name, flushed to disk, then renamed, so a
visible `.tar` is always complete. Parts are the unit of resumption for reading: a part is
reused only when its index lists exactly the keys planned for it, from the same slide
fingerprint, and its tar has the recorded size. Final shards are the unit of resumption for
mixing; `manifest.json` is written last and records a digest of the written keys, so that
`verify` catches a split whose sample set is not the planned one.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import re
import tarfile
import tempfile
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypedDict, cast

from etl.atomic import atomic_file, write_json_atomic
from etl.errors import PatchetlError
from etl.extract.encode import decode_image, encode_region
from etl.extract.plan import ExtractParams, Part, PlannedRegion, slide_fingerprint
from etl.wsi.scale import read_scaled

if TYPE_CHECKING:
    import numpy as np
    from _typeshed import ReadableBuffer
    from typing_extensions import NotRequired

    from etl.wsi.reader import Backend, SlideReader

# Fixed member mtime: the same inputs give byte-identical tars (and sha256) on every run.
TAR_MTIME = 0

Grid = list[list[int]]  # row-major label grid labels[row][col]


class SampleMeta(TypedDict):
    """The `.json` member of a shard sample."""

    key: str
    slide: str  # image name as written in the coordinate file
    split: str
    index: int  # entry index in its split
    x: int  # level-0 centre
    y: int
    x0: int  # level-0 top-left actually read
    y0: int
    level: int
    downsample: float
    region_size: int
    grid: int
    cell_size: int
    labels: Grid
    mpp: list[float] | None  # the slide's own (x, y), as its file records it
    padded: bool
    # with --mpp (ScaledRegion.metadata()): the mpp used (the slide's, or --assume-mpp), the
    # target, the level read ("level" above) and its mpp, level px per output px (1.0: the
    # level as is), and the level-0 box [left, top, side] the output covers
    slide_mpp: NotRequired[float]
    target_mpp: NotRequired[float]
    level_mpp: NotRequired[float]
    scale: NotRequired[float]
    box: NotRequired[list[float]]


class PartSample(TypedDict):
    key: str
    labels: Grid
    members: dict[str, list[int]]  # extension -> [data offset, size] in the part tar


class Failure(TypedDict):
    """A region that could not be read or encoded (listed in the manifest)."""

    key: str
    split: str
    index: int
    image: str
    x: int
    y: int
    reason: str


class PartIndex(TypedDict):
    """`<part>.json`, written after `<part>.tar`: its presence marks the part as done."""

    part_id: str
    split: str
    slide: str
    planned: list[str]  # the part's keys as planned (each a sample or a failure)
    fingerprint: str  # of the slide, as planned
    tar_bytes: int  # size of `<part>.tar`
    samples: list[PartSample]
    failures: list[Failure]
    timing: dict[str, float]  # seconds per stage: read, encode, write
    peak_rss_mb: float


class LabelHistogram(TypedDict):
    cells: dict[str, int]  # "0"/"1" -> cells
    regions: dict[str, int]  # "normal"/"tumor" (any cell 1) -> regions


class ShardRecord(TypedDict):
    """A shard's entry in the manifest."""

    name: str
    count: int
    bytes: int
    sha256: str
    labels: LabelHistogram


ShardField = Literal["count", "bytes", "sha256", "labels"]
_CHECKED_FIELDS: tuple[ShardField, ...] = ("count", "bytes", "sha256", "labels")


class Counts(TypedDict):
    planned: int
    written: int
    skipped: int
    failed: int


class SlideCounts(TypedDict):
    count: int
    failed: int
    fingerprint: NotRequired[str]  # plan.slide_fingerprint (manifests since 0.2)
    scale: NotRequired[dict[str, Any]]  # with --mpp: Part.scale (how the slide was read)


class Manifest(TypedDict):
    """`manifest.json` of a split folder, written last."""

    tool: str
    version: str
    split: str
    coordinates: dict[str, str]  # path, sha256
    params: dict[str, Any]  # ExtractParams.as_dict()
    parse: dict[str, str]  # coordinate parse options (location_order, anchor)
    counts: Counts
    keys_sha256: NotRequired[str]  # keys_digest of the written keys (manifests since 0.2)
    shards: list[ShardRecord]
    slides: dict[str, SlideCounts]
    skipped: list[dict[str, Any]]  # regions left out by the outside policy (SplitPlan.skipped)
    failed: list[Failure]


class SampleTarWriter:
    """Writes WebDataset samples as `<key>.<ext>` tar members (USTAR, like webdataset's
    TarWriter). The standard library does this; webdataset's own writer would import torch
    into every ETL worker (seconds of start-up, and etl must stay torch-free)."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self.sink = _Sink(fileobj)  # counts and hashes the bytes written
        # closed by close() or on leaving the `with` block, once the sample stream ends
        self.tar = tarfile.open(  # noqa: SIM115
            fileobj=self.sink, mode="w|", format=tarfile.USTAR_FORMAT
        )

    def __enter__(self) -> SampleTarWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:  # the file is being thrown away: write nothing more to it
            self.sink.discarded = True
        self.close()

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
            info.uname = info.gname = "patchetl"
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()  # writes the end-of-archive blocks; the file object stays open


class _Sink(io.RawIOBase):
    """The file a tar stream writes to; hashes and counts what passes, so a shard's sha256
    comes for free instead of from reading it back. Once `discarded` (the file is thrown away
    after an error), writes go nowhere: tarfile's stream flushes its buffer when it is closed
    or collected, and must not write to (or print errors about) the closed file then."""

    def __init__(self, fh: IO[bytes]) -> None:
        super().__init__()
        self.fh, self.sha, self.bytes, self.discarded = fh, hashlib.sha256(), 0, False

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        if self.discarded:
            return memoryview(data).nbytes
        self.sha.update(data)
        self.bytes += memoryview(data).nbytes
        return self.fh.write(data)


def keys_digest(keys: Iterable[str]) -> str:
    """sha256 of the sorted keys, one per line: the identity of a split's sample set."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- parts (workers)
def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited
    from the parent across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def sample_metadata(
    planned: PlannedRegion,
    split: str,
    params: ExtractParams,
    mpp: tuple[float, float] | None,
    downsample: float,
) -> SampleMeta:
    r = planned.region
    meta: SampleMeta = {
        "key": planned.key,
        "slide": r.image,
        "split": split,
        "index": r.index,
        "x": r.x,  # level-0 centre
        "y": r.y,
        "x0": planned.x0,  # level-0 top-left actually read
        "y0": planned.y0,
        "level": params.level,
        "downsample": downsample,
        "region_size": params.region_size,
        "grid": r.grid,
        "cell_size": params.region_size // r.grid,
        "labels": [list(row) for row in r.labels],  # row-major: labels[row][col]
        "mpp": list(mpp) if mpp else None,
        "padded": planned.padded,
    }
    if planned.scaled is not None:
        facts = planned.scaled.metadata()  # the level read replaces params.level
        meta["level"], meta["downsample"] = facts["level"], planned.scaled.downsample
        meta["slide_mpp"], meta["target_mpp"] = facts["slide_mpp"], facts["target_mpp"]
        meta["level_mpp"], meta["scale"], meta["box"] = (
            facts["level_mpp"],
            facts["scale"],
            facts["box"],
        )
    return meta


class SlideChangedError(PatchetlError, RuntimeError):
    """A slide file changed between the preflight and the read of one of its parts."""


# this worker's open slide: (path, mtime, size, backend, cache) -> reader
_OPEN_READER: dict[tuple[str, int, int, str, int], SlideReader] = {}


def worker_reader(path: Path, backend: str, tile_cache_bytes: int) -> SlideReader:
    """The slide reader of this worker process, kept open from one part to the next.

    Parts are planned slide by slide, so a worker's next part is usually on the same slide:
    keeping it open saves re-parsing the file and keeps the tile cache warm across the part
    boundary. Only one slide stays open per worker, so memory stays bounded by one cache.
    """
    from etl.wsi.reader import open_slide  # imported here: worker processes start light

    stat = Path(path).stat()  # a rewritten file at the same path is another slide
    key = (str(path), stat.st_mtime_ns, stat.st_size, backend, tile_cache_bytes)
    reader = _OPEN_READER.get(key)
    if reader is None:
        for old in _OPEN_READER.values():
            old.close()
        _OPEN_READER.clear()
        # open_slide rejects an unknown backend name (a preflight problem before any work)
        reader = _OPEN_READER[key] = open_slide(
            path, backend=cast("Backend", backend), tile_cache_bytes=tile_cache_bytes
        )
    return reader


def part_paths(parts_dir: Path, part_id: str) -> tuple[Path, Path]:
    return parts_dir / f"{part_id}.tar", parts_dir / f"{part_id}.json"


def extract_part(
    part: Part,
    split: str,
    params: ExtractParams,
    parts_dir: Path,
    slide_backend: str = "auto",
    tile_cache_bytes: int = 256 << 20,
) -> PartIndex:
    """Read, encode and write one part; return its index (also written as `<part>.json`).

    A region that fails to read or encode is recorded as a failure with its reason, never
    dropped silently. Runs in a worker process: opens its own slide reader.
    """
    tar_path, index_path = part_paths(parts_dir, part.part_id)
    index_path.unlink(missing_ok=True)  # a stale index must never describe the new tar
    timing: defaultdict[str, float] = defaultdict(float)
    failures: list[Failure] = []
    order: list[tuple[str, Grid]] = []
    if part.fingerprint and slide_fingerprint(part.slide) != part.fingerprint:
        raise SlideChangedError(
            f"{part.slide}: the slide changed after this run's preflight (size, mtime or "
            "content); run the same command again: it reads the parts of a changed slide again"
        )
    reader = worker_reader(part.slide, slide_backend, tile_cache_bytes)
    downsample = float(reader.level_downsamples[params.level])
    with atomic_file(tar_path) as fh, SampleTarWriter(fh) as writer:
        for planned in part.regions:
            try:
                t0 = time.perf_counter()
                rgb = read_planned(reader, planned, params)
                t1 = time.perf_counter()
                image = encode_region(rgb, params.fmt, params.quality)
                t2 = time.perf_counter()
            except Exception as exc:  # recorded in the manifest, and the run exits non-zero
                failures.append(
                    {
                        "key": planned.key,
                        "split": split,
                        "index": planned.region.index,
                        "image": planned.region.image,
                        "x": planned.region.x,
                        "y": planned.region.y,
                        "reason": f"{type(exc).__name__}: {exc}",
                    }
                )
                continue
            meta = sample_metadata(planned, split, params, reader.mpp, downsample)
            writer.write(
                planned.key, {params.fmt: image, "json": json.dumps(meta, sort_keys=True).encode()}
            )
            timing["read"] += t1 - t0
            timing["encode"] += t2 - t1
            timing["write"] += time.perf_counter() - t2
            order.append((planned.key, meta["labels"]))
    members = index_tar(tar_path)
    index: PartIndex = {
        "part_id": part.part_id,
        "split": split,
        "slide": part.image,
        "planned": part.keys,
        "fingerprint": part.fingerprint,
        "tar_bytes": tar_path.stat().st_size,
        "samples": [{"key": k, "labels": lab, "members": members[k]} for k, lab in order],
        "failures": failures,
        "timing": dict(timing),
        "peak_rss_mb": peak_rss_mb(),
    }
    write_json_atomic(index_path, index)
    return index


def extract_part_shipped(
    part: Part,
    split: str,
    params: ExtractParams,
    slide_backend: str = "auto",
    tile_cache_bytes: int = 256 << 20,
) -> tuple[PartIndex, bytes]:
    """`extract_part` into a temporary folder of the worker (removed before returning); its
    index and tar bytes, for the client to write with `store_part`."""
    with tempfile.TemporaryDirectory(prefix="patchetl-part-") as tmp:
        index = extract_part(part, split, params, Path(tmp), slide_backend, tile_cache_bytes)
        tar_path, _ = part_paths(Path(tmp), part.part_id)
        return index, tar_path.read_bytes()


def store_part(parts_dir: Path, index: PartIndex, data: bytes) -> PartIndex:
    """Write a part shipped by `extract_part_shipped` into `parts_dir` as `extract_part` would
    have written it there: the tar, then its index, each atomically."""
    tar_path, index_path = part_paths(parts_dir, index["part_id"])
    if len(data) != index["tar_bytes"]:
        raise PatchetlError(
            f"{tar_path}: a worker sent {len(data)} bytes, its index says {index['tar_bytes']}; "
            "run the same command again to read the part again"
        )
    index_path.unlink(missing_ok=True)  # a stale index must never describe the new tar
    with atomic_file(tar_path) as fh:
        fh.write(data)
    write_json_atomic(index_path, index)
    return index


def read_planned(reader: SlideReader, planned: PlannedRegion, params: ExtractParams) -> np.ndarray:
    """The pixels of a planned region: at --mpp through ``etl.wsi.scale.read_scaled``, else
    the level's own read (OpenSlide's ``read_region`` at --level)."""
    if planned.scaled is not None:
        return read_scaled(reader, planned.scaled)
    size = params.region_size
    return reader.read_region(planned.x0, planned.y0, params.level, size, size)


def index_tar(path: Path) -> dict[str, dict[str, list[int]]]:
    """Map key -> {extension: [data offset, size]} for the members of a tar."""
    out: dict[str, dict[str, list[int]]] = {}
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = split_member_name(m.name)
            out.setdefault(key, {})[ext] = [m.offset_data, m.size]
    return out


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key up to the first dot of the base name, extension after it."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def load_part_index(parts_dir: Path, part: Part) -> PartIndex | None:
    """The index of a finished part, or None if the part must be (re)done: not done, done
    for other keys or another version of the slide, or its tar is not the one indexed."""
    tar_path, index_path = part_paths(parts_dir, part.part_id)
    if not (index_path.exists() and tar_path.exists()):
        return None
    try:
        with open(index_path) as fh:
            index: PartIndex = json.load(fh)
        done = [s["key"] for s in index["samples"]] + [f["key"] for f in index["failures"]]
        valid = (
            index["planned"] == part.keys
            and sorted(done) == sorted(part.keys)
            and index["fingerprint"] == part.fingerprint
            and index["tar_bytes"] == tar_path.stat().st_size
        )
    except (OSError, ValueError, KeyError, TypeError):  # unreadable or from an older version
        return None
    return index if valid else None


# --------------------------------------------------------------------------- mixing
def plan_shards(keys: Iterable[str], shard_size: int, seed: int) -> list[list[str]]:
    """Seeded global shuffle of the sorted keys, cut into shards of `shard_size`: depends on
    the key set only, never on how the reads were cut into parts."""
    entries = sorted(keys)
    random.Random(seed).shuffle(entries)
    return [entries[i : i + shard_size] for i in range(0, len(entries), shard_size)]


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def is_shard_name(split: str, name: str) -> bool:
    """Whether `name` follows `shard_name`'s scheme for `split` (a file extract writes)."""
    return re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", name) is not None


MAX_OPEN_PARTS = 64  # file handles a shard writer keeps open (well under the usual ulimit)


def sample_catalog(part_indexes: Iterable[PartIndex]) -> dict[str, dict[str, PartSample]]:
    """part_id -> key -> sample entry of its index (members and labels); built once per run."""
    return {idx["part_id"]: {s["key"]: s for s in idx["samples"]} for idx in part_indexes}


def write_shard(
    path: Path, entries: Iterable[tuple[str, str, PartSample]], parts_dir: Path
) -> ShardRecord:
    """Copy the members of `entries` ((key, part_id, catalog entry), in shard order) from
    their part tars into a new shard (no re-encoding); return its manifest record (count,
    bytes, sha256, label histogram). Runs in a worker: shards are mixed in parallel."""
    handles: OrderedDict[str, IO[bytes]] = OrderedDict()  # LRU: a shard may touch 1000s of parts
    grids: list[Grid] = []
    try:
        with atomic_file(path) as fh, SampleTarWriter(fh) as writer:
            for key, part_id, entry in entries:
                src = handles.pop(part_id, None)
                if src is None:
                    # closed when the LRU evicts it, or in the finally below
                    src = open(part_paths(parts_dir, part_id)[0], "rb")  # noqa: SIM115
                    if len(handles) >= MAX_OPEN_PARTS:
                        handles.popitem(last=False)[1].close()
                handles[part_id] = src
                sample: dict[str, bytes] = {}
                for ext, (offset, size) in entry["members"].items():
                    src.seek(offset)
                    sample[ext] = src.read(size)
                writer.write(key, sample)
                grids.append(entry["labels"])
    finally:
        for src in handles.values():
            src.close()
    return {
        "name": path.name,
        "count": len(grids),
        "bytes": writer.sink.bytes,
        "sha256": writer.sink.sha.hexdigest(),
        "labels": label_histogram(grids),
    }


def label_histogram(grids: Iterable[Sequence[Sequence[int]]]) -> LabelHistogram:
    """Cell-level label counts and region-level (any tumor cell) counts of label grids."""
    cells: Counter[str] = Counter()
    regions: Counter[str] = Counter()
    for labels in grids:
        flat = [int(v) for row in labels for v in row]
        cells.update(str(v) for v in flat)
        regions["tumor" if any(flat) else "normal"] += 1
    return {"cells": dict(sorted(cells.items())), "regions": dict(sorted(regions.items()))}


# --------------------------------------------------------------------------- describe / verify
def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) per sample of a shard, in order (consecutive members that
    share a key make one sample)."""
    with tarfile.open(path, "r:") as tar:
        named = ((split_member_name(m.name), m) for m in tar if m.isfile())
        for key, members in itertools.groupby(named, key=lambda item: item[0][0]):
            yield key, {ext: _member_bytes(tar, m) for (_, ext), m in members}


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fh = tar.extractfile(member)
    if fh is None:  # not a regular file; iter_samples only asks for regular ones
        raise ValueError(f"{member.name} is not a regular file")
    return fh.read()


@dataclass
class ShardCheck:
    record: ShardRecord
    keys: list[str]
    problems: list[str]


def check_shard(path: Path, decode: bool = True) -> ShardCheck:
    """Describe a shard (for the manifest) and list what is wrong with its samples."""
    problems = irregular_members(path)
    keys: list[str] = []
    grids: list[Grid] = []
    for key, sample in iter_samples(path):
        keys.append(key)
        image_ext = next((e for e in ("jpg", "png") if e in sample), None)
        if image_ext is None or "json" not in sample:
            problems.append(
                f"{path.name}: sample {key}: members {sorted(sample)} lack an image or json"
            )
            continue
        try:
            meta = json.loads(sample["json"])
            labels, grid = meta["labels"], meta["grid"]
            if len(labels) != grid or any(len(row) != grid for row in labels):
                raise ValueError(f"labels {labels} are not a {grid}x{grid} grid")
        except Exception as exc:
            problems.append(f"{path.name}: sample {key}: bad json member: {exc}")
            continue
        grids.append(labels)
        if decode:
            try:
                rgb = decode_image(sample[image_ext])
                size = meta["region_size"]
                if rgb.shape != (size, size, 3):
                    raise ValueError(f"image is {rgb.shape}, expected ({size}, {size}, 3)")
            except Exception as exc:
                problems.append(f"{path.name}: sample {key}: image does not decode: {exc}")
    record: ShardRecord = {
        "name": path.name,
        "count": len(keys),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "labels": label_histogram(grids),
    }
    return ShardCheck(record, keys, problems)


_MEMBER_KINDS = (
    ("issym", "symbolic link"),
    ("islnk", "hard link"),
    ("isdir", "folder"),
    ("ischr", "character device"),
    ("isblk", "block device"),
    ("isfifo", "fifo"),
)


def irregular_members(path: Path) -> list[str]:
    """A problem per tar member that is not a regular file (extract never writes one): links
    and devices must not pass a check silently."""
    with tarfile.open(path, "r:") as tar:
        members = [m for m in tar if not m.isfile()]
    kinds = [
        next((k for test, k in _MEMBER_KINDS if getattr(m, test)()), "special") for m in members
    ]
    return [
        f"{path.name}: member {m.name!r} is a {kind} member, not a regular file (not written by "
        "patchetl extract)"
        for m, kind in zip(members, kinds, strict=True)
    ]


def verify_folder(folder: Path, decode: bool = True) -> list[str]:
    """Check every shard of an extracted split folder against its manifest."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return [
            f"{manifest_path}: missing (the extraction did not finish; rerun the same "
            "`patchetl extract` command to complete it)"
        ]
    manifest: Manifest = json.loads(manifest_path.read_text())
    problems: list[str] = []
    listed = {s["name"] for s in manifest["shards"]}
    for extra in sorted(p.name for p in folder.glob("*.tar") if p.name not in listed):
        problems.append(f"{folder / extra}: shard not listed in the manifest")
    seen: Counter[str] = Counter()
    for expected in manifest["shards"]:
        path = folder / expected["name"]
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        check = check_shard(path, decode=decode)
        problems += check.problems
        seen.update(check.keys)
        for name in _CHECKED_FIELDS:
            if check.record[name] != expected[name]:
                problems.append(
                    f"{path}: {name} is {check.record[name]}, manifest says {expected[name]}"
                )
    return problems + _sample_set_problems(manifest, seen)


def _sample_set_problems(manifest: Manifest, seen: Counter[str]) -> list[str]:
    """The shards' keys against the manifest: no duplicate, the written count, the planned
    count accounted for, and the key set the extraction planned (`keys_sha256`)."""
    problems = []
    dupes = [k for k, n in seen.items() if n > 1]
    if dupes:
        problems.append(f"{len(dupes)} keys occur more than once, e.g. {dupes[:3]}")
    counts = manifest["counts"]
    total = sum(seen.values())
    if total != counts["written"]:
        problems.append(f"{total} samples in shards, manifest says {counts['written']}")
    if counts["written"] + counts["skipped"] + counts["failed"] != counts["planned"]:
        problems.append(
            f"manifest counts do not add up: {counts['written']} written + {counts['skipped']} "
            f"skipped + {counts['failed']} failed != {counts['planned']} planned"
        )
    expected = manifest.get("keys_sha256")
    if expected is not None and keys_digest(seen) != expected:
        problems.append(
            "the shards hold another set of keys than the extraction planned (keys_sha256 "
            "differs from the manifest): extract the split again with --overwrite"
        )
    return problems
