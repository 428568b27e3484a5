"""Atomic outputs: write under a temporary name next to the target, flush it to disk, then
rename. A visible file is therefore always complete, whatever kills the writer; leftovers of
a killed writer carry `.tmp-<pid>` in their name and are swept by `remove_temporaries`.

Every part of the project (shards, manifests, checkpoints, maps, thumbnails) writes this way.
`output_folder` is the one check that an output folder can be written, run before any work so
that a folder that is a file or not writable stops a command at once with a message.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from etl.errors import PatchetlError


class OutputFolderError(PatchetlError, OSError):
    """An output folder that is a file, cannot be created or cannot be written."""


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path` through (for writers that want a file name);
    on success the file is fsynced and renamed onto `path`, on failure it is removed."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Like `open(path, mode)` for writing, but the file appears only once it is complete."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh


def write_json_atomic(path: str | Path, obj: object) -> None:
    with atomic_file(path, "w") as fh:
        json.dump(obj, fh, indent=1)


def remove_temporaries(folder: str | Path) -> int:
    """Delete leftovers of an interrupted run (`*.tmp-<pid>`, hidden or not). Returns how many."""
    n = 0
    for tmp in Path(folder).rglob("*.tmp-*"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def output_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Create the folder ``path`` (with its parents) and prove that a file can be written and
    removed in it; raises :class:`OutputFolderError` naming the folder, ``option`` and the fix.
    The probe is a temporary (``temporary_name``), so a kill leaves what `remove_temporaries`
    sweeps."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(
            f"{path}: {option} is a file, not a folder (give a folder path for the outputs)"
        )
    probe = temporary_name(path / ".write-probe")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"probe")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise OutputFolderError(
            f"{path}: {option} cannot be written ({exc.strerror or exc}) (choose a folder "
            "you can write to, or fix its permissions or free space)"
        ) from None
    return path
