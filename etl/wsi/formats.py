"""Slide file names: which suffixes are slides, a slide's name, and finding slide files.

``SLIDE_SUFFIXES`` are the single-file formats the readers open: OpenSlide's (Aperio,
Hamamatsu, Leica, MIRAX, Philips, Sakura, Trestle, Ventana, generic tiled TIFF) plus ``.btf``
(BigTIFF, read as generic tiled TIFF). DICOM is left out: one DICOM slide is a folder of
``.dcm`` files, so a ``.dcm`` file is not a slide of its own.

Two names per slide file: ``slide_stem`` (the file name without its slide suffix, for
looking slides up and naming outputs after them) and ``key_stem`` (that name made safe for
WebDataset keys and file names: no dots, which separate a key from its extension). Shard keys,
QC thumbnails and inference outputs are named by ``key_stem``; it must not change, or keys of
existing shards would. Different files can share a key stem (``a/s.tif`` and ``b/s.svs``, names
that differ only in characters ``key_stem`` replaces): ``unique_key_stem`` gives every name
after the first that took a stem the stem plus a short hash of the name (shard keys, inference
outputs).

``HEATMAP_SUFFIX`` is the one output of the project that ends like a slide (infer's heatmap
TIFF); ``is_slide_name`` says no to it, so a folder of slides may also be the output folder.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from os import PathLike
from pathlib import Path

from etl.errors import PatchetlError

__all__ = [
    "HEATMAP_SUFFIX",
    "SLIDE_SUFFIXES",
    "SlidePathError",
    "find_slides",
    "is_slide_name",
    "key_stem",
    "slide_stem",
    "unique_key_stem",
]

SLIDE_SUFFIXES: tuple[str, ...] = (
    ".tif",
    ".tiff",
    ".svs",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".bif",
    ".svslide",
    ".btf",
)
HEATMAP_SUFFIX = ".heatmap.tif"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class SlidePathError(PatchetlError, ValueError):
    """A path given as a slide names no slide file; the message names the path and the fix."""


def _suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in SLIDE_SUFFIXES if lower.endswith(s)), None)


def is_slide_name(name: str | PathLike[str]) -> bool:
    """Does the file name end with a slide suffix (any case) and is it not a heatmap TIFF?"""
    base = Path(name).name
    return _suffix(base) is not None and not base.lower().endswith(HEATMAP_SUFFIX)


def slide_stem(name: str | PathLike[str]) -> str:
    """The file name without folders and without its slide suffix (kept when not a slide's)."""
    base = Path(name).name
    suffix = _suffix(base)
    return base[: -len(suffix)] if suffix else base


def key_stem(name: str | PathLike[str]) -> str:
    """``slide_stem`` with every run of characters other than ``A-Za-z0-9_-`` replaced by ``_``
    (``"slide"`` if nothing is left): usable in a WebDataset key and as a file name."""
    return _UNSAFE.sub("_", slide_stem(name)) or "slide"


def unique_key_stem(name: str, taken: dict[str, str]) -> str:
    """``key_stem(name)``, unless another name took it first: then that stem plus ``-`` and the
    first 8 hex digits of the SHA-1 of ``name``. ``taken`` (stem -> the name that took it) is
    updated; pass the same dict for every name of one output."""
    stem = key_stem(name)
    if taken.setdefault(stem, name) != name:
        stem = f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return stem


def find_slides(inputs: Iterable[str | PathLike[str]]) -> list[Path]:
    """Slide files from files and folders, in the order given.

    A file is taken as it is (its reader decides whether it is a slide); a folder gives its
    files with a slide suffix, sorted. A missing path or a folder without slides raises
    :class:`SlidePathError`.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            inside = sorted(f for f in path.iterdir() if f.is_file() and is_slide_name(f.name))
            if not inside:
                raise SlidePathError(
                    f"{path}: folder holds no slide files "
                    f"({', '.join(SLIDE_SUFFIXES)}); pass the folder of slides"
                )
            found += inside
        elif path.exists():
            found.append(path)
        else:
            raise SlidePathError(
                f"{path}: slide not found (give a slide file or a folder of slides)"
            )
    return found
