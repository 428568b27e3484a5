"""A cohort's inputs: its slides, each matched to at most one annotation file, and patients.

An annotation file belongs to the slide whose name (``slide_stem``) it carries:
``<name>.xml`` (ASAP), ``<name>.geojson`` / ``<name>.json`` (QuPath; ``<name>.<slide suffix>
.geojson`` too, as QuPath scripts often name them), ``<name>_mask.tif`` / ``_Mask.tif`` /
``_mask.tiff`` (tumor mask). An annotation file without a slide, two files for one slide and a
file of another type are errors; hidden files are skipped. Slides and annotations may share a
folder (``<name>_mask.tif`` next to slide ``<name>`` is its mask, not a slide). A slide without
a file is tumor-free, or left out with ``unannotated="skip"``.

Every problem of a cohort is a :class:`Problem` (file, entry, message, fix; error or warning);
the run collects all of them and raises one :class:`CohortError`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from etl.errors import PatchetlError
from etl.wsi.annotations import ANNOTATION_SUFFIXES, AnnotationProblem
from etl.wsi.formats import find_slides, is_slide_name, slide_stem

__all__ = [
    "MASK_SUFFIXES",
    "CohortError",
    "Problem",
    "SlideInput",
    "match_inputs",
    "read_patients",
]

MASK_SUFFIXES = ("_mask.tif", "_Mask.tif", "_mask.tiff", "_Mask.tiff")
MAX_LISTED = 100


@dataclass(frozen=True)
class Problem:
    """One error or warning: the file, the entry in it (may be empty), what and the fix."""

    path: Path
    entry: str
    message: str
    fix: str = ""
    warning: bool = False

    @classmethod
    def of(cls, p: AnnotationProblem) -> Problem:
        return cls(p.path, p.entry, p.message, p.fix, p.warning)

    def __str__(self) -> str:
        where = f"{self.path}: {self.entry}: " if self.entry else f"{self.path}: "
        return where + self.message + (f" ({self.fix})" if self.fix else "")


class CohortError(PatchetlError, ValueError):
    """A cohort's inputs have errors (or warnings under --strict); ``problems`` lists all."""

    def __init__(self, problems: Sequence[Problem], strict: bool = False) -> None:
        self.problems = list(problems)
        errors = [p for p in self.problems if strict or not p.warning]
        lines = [("warning: " if p.warning else "") + str(p) for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"... and {len(self.problems) - MAX_LISTED} more")
        strict_note = " (--strict: warnings count as errors)" if strict else ""
        super().__init__(
            f"{len(errors)} error(s) in the cohort's inputs{strict_note}; nothing was written:\n  "
            + "\n  ".join(lines)
        )


@dataclass(frozen=True)
class SlideInput:
    """One slide and its annotation file (None: none found); ``kind``: xml, geojson, mask, none."""

    path: Path
    annotation: Path | None

    @property
    def name(self) -> str:
        return slide_stem(self.path)

    @property
    def kind(self) -> str:
        if self.annotation is None:
            return "none"
        name = self.annotation.name
        if any(name.endswith(s) for s in MASK_SUFFIXES):
            return "mask"
        return "xml" if name.lower().endswith(".xml") else "geojson"


def _annotation_name(path: Path) -> str | None:
    """The slide name an annotation file carries, or None for a file of another type."""
    name = path.name
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    lower = name.lower()
    for suffix in ANNOTATION_SUFFIXES:
        if lower.endswith(suffix):
            return slide_stem(name[: -len(suffix)])
    return None


def _annotation_files(
    folder: Path, names: set[str], problems: list[Problem]
) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        name = _annotation_name(path)
        if name is None and is_slide_name(path.name):
            continue  # slides and annotations may share a folder
        if name is None:
            problems.append(
                Problem(
                    path,
                    "",
                    "unknown annotation file type",
                    "annotations are <slide>.xml (ASAP), <slide>.geojson (QuPath) or "
                    "<slide>_mask.tif; move other files out of the folder",
                )
            )
        elif name not in names:
            problems.append(
                Problem(
                    path,
                    "",
                    f"annotation file without a slide: no slide named {name!r}",
                    "add the slide to --slides, or rename or remove the file",
                )
            )
        else:
            found.setdefault(name, []).append(path)
    return found


def match_inputs(
    slides: Path, annotations: Path | None, unannotated: str
) -> tuple[list[SlideInput], list[SlideInput], list[Problem]]:
    """(slides to use, slides skipped for having no annotation, problems), slides by name."""
    problems: list[Problem] = []
    paths = find_slides([slides])
    stems = {slide_stem(p) for p in paths}
    by_name: dict[str, Path] = {}
    for path in paths:
        if (_annotation_name(path) or "") in stems:
            continue  # <slide>_mask.tif next to <slide>: a mask, not a slide
        first = by_name.setdefault(slide_stem(path), path)
        if first != path:
            problems.append(
                Problem(
                    path,
                    "",
                    f"two slides named {slide_stem(path)!r} ({first.name})",
                    "keep one slide per name",
                )
            )
    files: dict[str, list[Path]] = {}
    if annotations is not None:
        if not annotations.is_dir():
            problems.append(
                Problem(annotations, "", "annotation folder not found", "check --annotations")
            )
        else:
            files = _annotation_files(annotations, set(by_name), problems)
    used: list[SlideInput] = []
    skipped: list[SlideInput] = []
    for name, path in sorted(by_name.items()):
        own = files.get(name, [])
        if len(own) > 1:
            problems.append(
                Problem(
                    own[0],
                    "",
                    f"{len(own)} annotation files for slide {name!r}: "
                    + ", ".join(p.name for p in own),
                    "keep one of them",
                )
            )
        item = SlideInput(path, own[0] if own else None)
        (skipped if not own and unannotated == "skip" else used).append(item)
    return used, skipped, problems


def read_patients(path: Path, names: Sequence[str]) -> tuple[dict[str, str], list[Problem]]:
    """slide name -> patient from a CSV ``slide,patient`` (header optional; slide names with or
    without their suffix). A slide of the cohort missing from it is its own patient (warning)."""
    problems: list[Problem] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        return {}, [Problem(path, "", f"cannot read the patients CSV ({exc})", "check --patients")]
    patients: dict[str, str] = {}
    rows = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["slide", "patient"]:
        rows = rows[1:]
    for line, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if len(cells) < 2 or not cells[0] or not cells[1]:
            problems.append(
                Problem(
                    path,
                    f"row {line}",
                    f"expected slide,patient, got {row}",
                    "rows are slide,patient",
                )
            )
            continue
        name = slide_stem(cells[0])
        if patients.setdefault(name, cells[1]) != cells[1]:
            problems.append(
                Problem(
                    path,
                    f"row {line}",
                    f"slide {name!r} given two patients ({patients[name]!r} and {cells[1]!r})",
                    "keep one row per slide",
                )
            )
    for name in names:
        if name not in patients:
            problems.append(
                Problem(
                    path,
                    "",
                    f"slide {name!r} is not listed; it is its own patient",
                    "add a row slide,patient",
                    warning=True,
                )
            )
    return {n: patients.get(n, f"slide:{n}") for n in names}, problems
