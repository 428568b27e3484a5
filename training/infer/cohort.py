"""Cohort inference on many processes: which slides a rank runs, which are done, the summary.

`torchrun --nproc_per_node N -m training.cli infer SLIDES ...` (or `--rank R --world W` on
each of W processes) runs every slide exactly once over all ranks, with no collective a dead
rank could hang:

- **Sharing** (`assign`): slides largest first (file size), each to the rank with the fewest
  bytes so far (ties: the lower rank). Every rank computes the same table from the same slide
  list, so none waits for another.
- **Done means complete**: the sidecar `<name>.prob.json` is written last (`outputs`), and it
  records the run's `inputs` (the slide's path, size and mtime, the checkpoint's sha256, every
  option that changes the outputs). A slide whose sidecar holds the same inputs is skipped on
  a rerun; another slide, checkpoint or option runs again.
- **Summary**: each rank writes `<out>/infer-rank<r>-of-<W>.json` atomically when it is done
  (its slides done, skipped and failed, with reasons). A rank that then finds all W reports of
  the same cohort merges them into `<out>/infer-summary.json` and prints every failure across
  ranks; the last rank to finish therefore writes the complete one. A rank that died leaves no
  report: the others still finish, and the missing report says which rank to rerun.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from etl.atomic import write_json_atomic
from training.config import InferConfig
from training.errors import InferError

# InferConfig fields that change what a slide's outputs hold (the rest only change speed).
OUTPUT_OPTIONS = (
    "mode", "level", "stride", "patch_size", "tile_size", "margin", "tissue_downsample",
    "tissue_threshold", "tissue_min_area", "nms_radius", "nms_threshold", "thumbnail_side",
)  # fmt: skip
# Recorded only when given, so sidecars of runs without them still match.
SCALE_OPTIONS = ("mpp", "assume_mpp")
SUMMARY = "infer-summary.json"


@dataclass(frozen=True)
class Share:
    """This process's part of the cohort: rank `rank` of `world`."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # the GPU of this rank on its machine

    @classmethod
    def of(cls, cfg: InferConfig) -> Share:
        """--rank/--world when given, else RANK/WORLD_SIZE (torchrun), else the whole cohort."""
        if cfg.world is not None:
            return cls(cfg.rank or 0, cfg.world, cfg.rank or 0)
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise InferError(
                "RANK / WORLD_SIZE / LOCAL_RANK are not integers (run under torchrun, or give "
                "--rank and --world)"
            ) from None
        if not 0 <= rank < world:
            raise InferError(f"RANK {rank} is not in 0..WORLD_SIZE-1 ({world - 1})")
        return cls(rank, world, local)


def assign(paths: Sequence[Path], world: int) -> list[int]:
    """The rank of each slide: largest first, to the least loaded rank (see the module)."""
    sizes = [_bytes(p) for p in paths]
    load = [0] * world
    ranks = [0] * len(paths)
    for i in sorted(range(len(paths)), key=lambda i: (-sizes[i], str(paths[i]))):
        rank = min(range(world), key=lambda r: (load[r], r))
        ranks[i] = rank
        load[rank] += max(sizes[i], 1)
    return ranks


def _bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # a missing slide fails on its rank like any unreadable one


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_inputs(cfg: InferConfig, amp: bool, checkpoint_sha256: str) -> dict[str, Any]:
    """What a slide's outputs depend on besides the slide itself (stored in its sidecar)."""
    options = {k: getattr(cfg, k) for k in OUTPUT_OPTIONS}
    options.update({k: getattr(cfg, k) for k in SCALE_OPTIONS if getattr(cfg, k) is not None})
    return {"checkpoint_sha256": checkpoint_sha256, "options": {**options, "amp": amp}}


def slide_inputs(path: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` plus the slide's identity (absolute path, size, modification time)."""
    info = path.stat()
    slide = {"path": str(path.resolve()), "bytes": info.st_size, "mtime_ns": info.st_mtime_ns}
    return {"slide": slide, **inputs}


def complete(out: Path, name: str, path: Path, inputs: dict[str, Any]) -> bool:
    """Whether ``out/<name>.*`` are this slide's outputs for these inputs (sidecar last)."""
    try:
        meta = json.loads((out / f"{name}.prob.json").read_text(encoding="utf-8"))
        return bool(meta.get("inputs") == json.loads(json.dumps(slide_inputs(path, inputs))))
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class RankReport:
    """What one rank did with its slides (written to `<out>/infer-rank<r>-of-<W>.json`)."""

    cohort: str
    rank: int
    world: int
    slides: list[str]
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def cohort_digest(paths: Sequence[Path], world: int, inputs: dict[str, Any]) -> str:
    """Names one cohort run: its slides, world size, inputs and torchrun's run id."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    text = json.dumps([sorted(str(p.resolve()) for p in paths), world, inputs, run])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def report_path(out: Path, rank: int, world: int) -> Path:
    return out / f"infer-rank{rank}-of-{world}.json"


def finish(out: Path, report: RankReport) -> dict[str, Any] | None:
    """Write this rank's report; when every rank's report of this cohort is there, merge them
    into `infer-summary.json` and return the summary (else None)."""
    write_json_atomic(report_path(out, report.rank, report.world), asdict(report))
    reports = []
    for rank in range(report.world):
        try:
            found = json.loads(report_path(out, rank, report.world).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if found.get("cohort") != report.cohort:
            return None  # an earlier run's report: that rank has not finished this one yet
        reports.append(found)
    summary = {
        "world": report.world,
        "slides": sum(len(r["slides"]) for r in reports),
        **{k: sum(len(r[k]) for r in reports) for k in ("done", "skipped")},
        "failed": [f for r in reports for f in r["failed"]],
        "per_rank": [{k: len(r[k]) for k in ("slides", "done", "skipped", "failed")}
                     for r in reports],
    }  # fmt: skip
    write_json_atomic(out / SUMMARY, summary)
    return summary
