"""Coordinate files -> one validated table of labelled regions.

Reads the MONAI datalist JSON (``{"training": [...], "validation": [...], ...}``, entries
``{"image", "location": [y, x], "label"}``) and the MONAI/NCRF CSV (``name,x,y,l0..l8``) into
:class:`RegionTable`. Conventions (README.md, section Conventions):

- Centres are level-0 pixels, ``x`` = column, ``y`` = row. JSON ``location`` is ``[y, x]``
  unless ``location_order="xy"``; CSV columns are always ``name,x,y``.
- ``anchor="corner"`` means the coordinates are the region's top-left corner; the centre is
  then ``corner + region_size // 2`` on each axis (for an even size, the pixel just right of
  and below the geometric middle, matching ``centre - region_size // 2 = corner``).
- A flat label of n*n values lists the grid column by column (``k = n*col + row``); nested
  ``[[..], ..]`` labels are already row-major; one value labels the whole region (1x1 grid);
  a bare number counts as one value. Stored labels are always row-major ``labels[row][col]``.
- A CSV file is one split, named by ``split`` or else inferred from the file name: exactly one
  of "valid"/"test"/"train" in it gives "validation"/"testing"/"training"; otherwise "training".

Every problem is collected (none stops the parse) as a :class:`Problem` naming file, entry and
field; :func:`load_regions` raises them together as :class:`CoordsError`. One reader per
format yields raw entries (reporting structural problems); one validator checks the values of
every format alike, and the table builder resolves slides and handles duplicates.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etl.errors import OptionError, PatchetlError

DEFAULT_DATA_ROOT = "/workspace/data/medical/pathology"
DATA_ROOT_ENV = "PATCHETL_DATA_ROOT"
DEFAULT_REGION_SIZE = 768
LOCATION_ORDERS = ("yx", "xy")
ANCHORS = ("center", "corner")
MAX_LISTED = 50  # problems printed by CoordsError / inspect_report before "... and N more"

_REQUIRED_KEYS = ("image", "location", "label")
_SPLIT_KEYWORDS = {"valid": "validation", "test": "testing", "train": "training"}
# Top-level keys that are splits even when their value is wrong (then: an error, not metadata).
_SPLIT_NAMES = {*_SPLIT_KEYWORDS, *_SPLIT_KEYWORDS.values(), "val"}


@dataclass(frozen=True)
class Region:
    """One labelled region: a level-0 centre on a slide plus its row-major label grid."""

    split: str
    index: int  # entry index within its split in the source file (0-based)
    image: str  # as written in the file
    slide: Path  # resolved path (the first candidate when none exists)
    x: int  # level-0 centre column
    y: int  # level-0 centre row
    labels: tuple[tuple[int, ...], ...]  # row-major grid labels[row][col]
    exists: bool = True  # whether `slide` was found on disk at parse time

    @property
    def grid(self) -> int:
        """Side of the (square) label grid."""
        return len(self.labels)

    @property
    def tumor(self) -> bool:
        """True when any cell is labelled 1."""
        return any(any(row) for row in self.labels)


@dataclass(frozen=True)
class Problem:
    """One error or warning, pointing at file, split/entry (or CSV line) and field."""

    file: Path
    split: str | None
    index: int | None
    field: str | None
    message: str
    hint: str = ""
    line: int | None = None  # 1-based line number (CSV)

    def __str__(self) -> str:
        if self.line is not None:
            where = f"line {self.line}" + (f", {self.field}" if self.field else "")
        elif self.split is not None and self.index is not None:
            where = f"{self.split}[{self.index}]" + (f".{self.field}" if self.field else "")
        else:
            where = self.field or ""
        text = f"{self.file}: " + (f"{where}: " if where else "") + self.message
        return text + (f" ({self.hint})" if self.hint else "")


class CoordsError(PatchetlError, ValueError):
    """A coordinate file had errors; ``problems`` lists all of them."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(_format_problems(self.problems, f"{len(self.problems)} error(s)"))


@dataclass
class RegionTable:
    """All regions of one coordinate file, in file order, with the problems found."""

    source: Path
    regions: list[Region]
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    duplicates: int = 0  # entries dropped as exact duplicates of an earlier one

    def splits(self) -> dict[str, list[Region]]:
        """Regions grouped by split, splits in file order."""
        out: dict[str, list[Region]] = {}
        for region in self.regions:
            out.setdefault(region.split, []).append(region)
        return out

    def slides_missing(self) -> list[Path]:
        """Resolved slide paths that did not exist, each once, in file order."""
        return list(dict.fromkeys(r.slide for r in self.regions if not r.exists))


def default_data_root() -> Path:
    """``$PATCHETL_DATA_ROOT`` if set (and not empty), else MONAI's default location."""
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def parse_coordinates(
    path: str | Path,
    *,
    data_root: str | Path | None = None,
    location_order: str = "yx",
    anchor: str = "center",
    region_size: int = DEFAULT_REGION_SIZE,
    split: str | Iterable[str] | None = None,
    default_ext: str = ".tif",
    fmt: str | None = None,
) -> RegionTable:
    """Parse a datalist JSON or NCRF CSV into a :class:`RegionTable`, collecting all problems.

    ``split``: for JSON, keep only these split(s) (a missing one is an error); for CSV, the
    name of the file's single split (default: inferred from the file name). ``default_ext`` is
    appended to CSV names without a suffix. ``fmt`` ("json"/"csv") overrides the type taken
    from the suffix (.json/.csv; any other suffix is read as JSON). Bad options raise
    ``OptionError`` (a ``ValueError``); problems in the file (an unreadable file too) go to
    ``table.errors``.
    """
    if fmt not in (None, "json", "csv"):
        raise ValueError(f"fmt must be 'json', 'csv' or None, not {fmt!r}")
    if location_order not in LOCATION_ORDERS:
        raise OptionError(
            f"location_order must be one of {LOCATION_ORDERS}, not {location_order!r}"
        )
    if anchor not in ANCHORS:
        raise OptionError(f"anchor must be one of {ANCHORS}, not {anchor!r}")
    if isinstance(region_size, bool) or not isinstance(region_size, int) or region_size <= 0:
        raise OptionError(f"region_size must be a positive integer, not {region_size!r}")
    wanted = [split] if isinstance(split, str) else (list(split) if split is not None else None)
    path = Path(path)
    is_csv = fmt == "csv" or (fmt is None and path.suffix.lower() == ".csv")
    if is_csv and wanted is not None and len(wanted) != 1:
        raise OptionError(f"a CSV file holds one split; give one split name, not {wanted}")
    builder = _TableBuilder(
        _Report(path),
        Path(data_root) if data_root is not None else default_data_root(),
        region_size // 2 if anchor == "corner" else 0,
    )
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from spreadsheet tools
    except (OSError, UnicodeDecodeError) as exc:
        builder.report.error(
            None,
            None,
            None,
            f"cannot read the file: {exc}",
            "check the path and that it is a UTF-8 text file",
        )
        return builder.table()
    if is_csv:
        split_name = wanted[0] if wanted else infer_csv_split(path)
        entries = _read_csv(text, split_name, default_ext, builder.report)
    else:
        known_suffix = fmt == "json" or path.suffix.lower() == ".json"
        entries = _read_json(text, wanted, location_order, known_suffix, builder.report)
    for raw in entries:
        builder.add(raw)
    return builder.table()


def load_regions(path: str | Path, **options: Any) -> RegionTable:
    """Like :func:`parse_coordinates`, but raise :class:`CoordsError` if there is any error."""
    table = parse_coordinates(path, **options)
    if table.errors:
        raise CoordsError(table.errors)
    return table


def infer_csv_split(path: Path) -> str:
    """Split name from a CSV file name: exactly one of valid/test/train in it, else training."""
    name = path.stem.lower()
    hits = [split for key, split in _SPLIT_KEYWORDS.items() if key in name]
    return hits[0] if len(hits) == 1 else "training"


def inspect_report(table: RegionTable, unreadable: dict[Path, str] | None = None) -> str:
    """Human-readable summary: counts per split, slide and label, then errors and warnings.
    `unreadable`: slides that exist but failed to open (path -> reason), as preflight found."""
    unreadable = unreadable or {}
    lines = [
        f"coordinates: {table.source}",
        f"regions: {len(table.regions)}"
        + (f" ({table.duplicates} duplicate(s) dropped)" if table.duplicates else ""),
    ]
    splits = table.splits()
    if splits:
        lines += ["", "per split:", _row("split", "regions", "slides", "tumor", "normal")]
        for name, regions in splits.items():
            tumor = sum(r.tumor for r in regions)
            lines.append(
                _row(
                    name, len(regions), len({r.slide for r in regions}), tumor, len(regions) - tumor
                )
            )
        by_slide: dict[Path, list[Region]] = {}
        for region in table.regions:
            by_slide.setdefault(region.slide, []).append(region)
        lines += [
            "",
            f"per slide ({len(by_slide)}):",
            _row("slide", "regions", "tumor", "normal", "exists", first=40, width=11),
        ]
        for regions in by_slide.values():
            tumor = sum(r.tumor for r in regions)
            lines.append(
                _row(
                    regions[0].image,
                    len(regions),
                    tumor,
                    len(regions) - tumor,
                    _slide_state(regions[0], unreadable),
                    first=40,
                    width=11,
                )
            )
        cells = Counter(v for r in table.regions for row in r.labels for v in row)
        grids = Counter(f"{r.grid}x{r.grid}" for r in table.regions)
        tumor = sum(r.tumor for r in table.regions)
        lines += [
            "",
            "labels:",
            f"  regions: {tumor} with tumor (any cell 1), {len(table.regions) - tumor} all normal",
            f"  cells: {cells[1]} tumor (1), {cells[0]} normal (0)",
            "  grids: " + ", ".join(f"{g}: {n}" for g, n in sorted(grids.items())),
        ]
    missing = table.slides_missing()
    if missing:
        lines += ["", f"missing slides ({len(missing)}):"]
        lines += [f"  {p}" for p in missing[:MAX_LISTED]]
        if len(missing) > MAX_LISTED:
            lines.append(f"  ... and {len(missing) - MAX_LISTED} more")
    if unreadable:
        lines += ["", f"unreadable slides ({len(unreadable)}):"]
        lines += [f"  {p}: {why}" for p, why in list(unreadable.items())[:MAX_LISTED]]
        if len(unreadable) > MAX_LISTED:
            lines.append(f"  ... and {len(unreadable) - MAX_LISTED} more")
    if table.errors:
        lines += ["", _format_problems(table.errors, f"errors ({len(table.errors)})")]
    if table.warnings:
        lines += ["", _format_problems(table.warnings, f"warnings ({len(table.warnings)})")]
    if not (table.errors or table.warnings or missing or unreadable):
        lines += ["", "no problems found"]
    return "\n".join(lines)


# --- internals ---------------------------------------------------------------------------


def _slide_state(region: Region, unreadable: dict[Path, str]) -> str:
    if not region.exists:
        return "MISSING"
    return "UNREADABLE" if region.slide in unreadable else "yes"


def _row(*cells: object, first: int = 14, width: int = 9) -> str:
    return "  " + f"{cells[0]!s:<{first}}" + "".join(f"{c!s:>{width}}" for c in cells[1:])


def _format_problems(problems: list[Problem], title: str) -> str:
    lines = [f"{title}:"] + [f"  {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


class _Invalid(Exception):
    """A field failed validation (message, hint); caught and turned into a Problem."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


_LOC_HINT = "locations are level-0 pixel integers >= 0"
_LABEL_HINT = "labels are 0 (normal) or 1 (tumor)"
_SHAPE_HINT = (
    "give 1 value for the whole region, n*n values column by column (e.g. 9 for 3x3), "
    "or n rows of n values"
)


def _integer(value: Any, name: str, from_text: bool = False) -> int:
    """A level-0 coordinate: an integer (or integral float; a string only from CSV) >= 0."""
    if isinstance(value, str) and from_text:
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise _Invalid(f"{name} is not a number: {text!r}", _LOC_HINT) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"{name} is not a number: {value!r}", _LOC_HINT)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise _Invalid(f"{name} is not an integer: {value!r}", _LOC_HINT)
    number = int(value)
    if number < 0:
        raise _Invalid(f"negative value {number} for {name}", _LOC_HINT)
    return number


def _label_value(value: Any, where: str, from_text: bool = False) -> int:
    """One label cell: 0/1 as int, bool or float 0.0/1.0 (from CSV: such a number as text)."""
    raw = value
    if isinstance(value, str) and from_text:
        try:
            value = float(value.strip())
        except ValueError:
            raise _Invalid(f"{where} is not a number: {raw!r}", _LABEL_HINT) from None
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return int(value)
    raise _Invalid(f"{where} = {raw!r} is not 0 or 1", _LABEL_HINT)


def _labels(value: Any, from_text: bool = False) -> tuple[tuple[int, ...], ...]:
    """Any accepted label form -> row-major grid; raises _Invalid listing every bad cell."""
    if not isinstance(value, list):
        value = [value]  # a bare number labels the whole region
    if not value:
        raise _Invalid("empty label", _SHAPE_HINT)
    n = len(value)
    nested = any(isinstance(v, list) for v in value)
    if nested:
        if not all(isinstance(row, list) and len(row) == n for row in value):
            shape = [len(r) if isinstance(r, list) else "scalar" for r in value]
            raise _Invalid(
                f"nested label must be {n} rows of {n} values, got row lengths {shape}", _SHAPE_HINT
            )
        flat = [v for row in value for v in row]
    else:
        flat, n = value, math.isqrt(n)
        if n * n != len(flat):
            raise _Invalid(
                f"label has {len(flat)} values, not 1 or a square (4, 9, 16, ...)", _SHAPE_HINT
            )
    values, bad = [], []
    for k, v in enumerate(flat):
        if type(v) is int and (v == 0 or v == 1):  # fast paths for the common cases
            values.append(v)
            continue
        if from_text and (v == "0" or v == "1"):
            values.append(int(v))
            continue
        try:
            name = f"label[{k // n}][{k % n}]" if nested else f"label[{k}]"
            values.append(_label_value(v, name, from_text))
        except _Invalid as exc:
            bad.append(exc.message)
    if bad:
        raise _Invalid("; ".join(bad), _LABEL_HINT)
    if nested:
        return tuple(tuple(values[r * n : (r + 1) * n]) for r in range(n))
    # flat input lists the grid column by column: k = n*col + row
    return tuple(tuple(values[n * c + r] for c in range(n)) for r in range(n))


@dataclass
class _Report:
    """The errors and warnings found in one file, in the order they were found."""

    path: Path
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def error(
        self,
        split: str | None,
        index: int | None,
        fld: str | None,
        message: str,
        hint: str = "",
        line: int | None = None,
    ) -> None:
        self.errors.append(Problem(self.path, split, index, fld, message, hint, line))

    def warn(
        self,
        split: str | None,
        index: int | None,
        fld: str | None,
        message: str,
        hint: str = "",
        line: int | None = None,
    ) -> None:
        self.warnings.append(Problem(self.path, split, index, fld, message, hint, line))


@dataclass(frozen=True)
class _RawEntry:
    """One entry as a reader found it, before its values are checked.

    The reader has already reported what is wrong with the entry's structure; a field it
    could not take (``image`` or ``xy`` None) makes the entry yield no region, but the
    other fields are still checked so that every problem is reported at once.
    """

    split: str
    index: int
    image: str | None  # slide name (CSV: with the default suffix added)
    xy: tuple[Any, Any] | None  # centre (or corner) as written: JSON numbers, CSV text
    label: Any
    line: int | None = None  # 1-based CSV line; None for JSON (values are then not text)
    xy_field: str | None = None  # field named by location errors; None: the axis ("x"/"y")

    @property
    def from_text(self) -> bool:
        return self.line is not None


def _read_json(
    text: str, wanted: list[str] | None, order: str, known_suffix: bool, report: _Report
) -> Iterator[_RawEntry]:
    """Entries of a MONAI datalist, split by split; structural problems go to ``report``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = (
            "fix the JSON syntax there"
            if known_suffix
            else "coordinate files are .json (MONAI datalist) or .csv (name,x,y,labels); "
            "rename the file if it is a CSV"
        )
        report.error(
            None,
            None,
            None,
            f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            hint,
        )
        return
    if not isinstance(data, dict):
        report.error(
            None,
            None,
            None,
            f"top level is {_kind(data)}, not an object",
            'write {"training": [...], "validation": [...]} with one list per split',
        )
        return
    if not data:
        report.error(
            None,
            None,
            None,
            "no splits at all (empty object)",
            'add e.g. "training": [{"image": ..., "location": [y, x], "label": [...]}]',
        )
        return
    for name in _json_splits(data, wanted, report):
        if name not in data:
            report.error(
                None,
                None,
                None,
                f"split '{name}' not in the file",
                f"splits present: {', '.join(map(repr, data))}",
            )
            continue
        entries = data[name]
        if not isinstance(entries, list):
            report.error(
                name,
                None,
                None,
                f"split '{name}' is {_kind(entries)}, not a list",
                "each top-level key is a split holding a list of entries",
            )
        elif not entries:
            report.error(
                name, None, None, f"split '{name}' is empty", "add entries or remove the split"
            )
        for index, entry in enumerate(entries if isinstance(entries, list) else ()):
            raw = _json_entry(name, index, entry, order, report)
            if raw is not None:
                yield raw


def _json_splits(data: dict[str, Any], wanted: list[str] | None, report: _Report) -> list[str]:
    """The splits to read: ``wanted``, else every top-level key holding a list.

    Decathlon-style datalists carry metadata next to the splits ("name", "description",
    "labels": {...}); those keys are skipped with a warning. A split-like name that is not a
    list stays a split (then an error: it is most likely a mistake).
    """
    if wanted is not None:
        return wanted
    names = []
    for name, value in data.items():
        if isinstance(value, list) or name.lower() in _SPLIT_NAMES:
            names.append(name)
        else:
            report.warn(
                None,
                None,
                None,
                f"top-level key '{name}' ({_kind(value)}) is not a list of entries: "
                "skipped as metadata",
                "name it with --split to have it checked",
            )
    if not names:
        report.error(
            None,
            None,
            None,
            "no splits: no top-level key holds a list of "
            f"entries (keys: {', '.join(map(repr, data))})",
            'add e.g. "training": [{"image": ..., "location": [y, x], "label": [...]}]',
        )
    return names


def _json_entry(
    split: str, index: int, entry: Any, order: str, report: _Report
) -> _RawEntry | None:
    """One datalist entry; None when it is not an object or lacks a key (both reported)."""
    if not isinstance(entry, dict):
        report.error(
            split,
            index,
            None,
            f"entry is {_kind(entry)}, not an object",
            'write {"image": ..., "location": [y, x], "label": [...]}',
        )
        return None
    missing = [k for k in _REQUIRED_KEYS if k not in entry]
    for key in missing:
        report.error(
            split,
            index,
            key,
            f"missing key '{key}'",
            'each entry needs "image", "location" ([y, x] centre) and "label"',
        )
    if missing:
        return None
    image = entry["image"]
    if not isinstance(image, str) or not image.strip():
        report.error(
            split,
            index,
            "image",
            f"not a non-empty string: {image!r}",
            "give the slide file name, e.g. tumor_001.tif",
        )
        image = None
    loc = entry["location"]
    xy = None
    if not isinstance(loc, list) or len(loc) != 2:
        got = f"{len(loc)} values" if isinstance(loc, list) else _kind(loc)
        report.error(
            split,
            index,
            "location",
            f"must be a list of 2 numbers, got {got}",
            f"write [{order[0]}, {order[1]}] (level-0 pixels)",
        )
    else:
        axes = dict(zip(order, loc, strict=True))
        xy = (axes["x"], axes["y"])
    return _RawEntry(split, index, image, xy, entry["label"], xy_field="location")


def _read_csv(text: str, split: str, default_ext: str, report: _Report) -> Iterator[_RawEntry]:
    """Rows ``name,x,y,l0..`` of a CSV file (one split; optional header line)."""
    rows = [
        (n, row)
        for n, row in enumerate(csv.reader(text.splitlines()), start=1)
        if any(cell.strip() for cell in row)
    ]
    if rows and _is_header(rows[0][1]):
        header = [c.strip().lower() for c in rows[0][1]]
        if header[1:3] == ["y", "x"]:
            report.error(
                None,
                None,
                None,
                "header names columns 'y,x'",
                "CSV columns are name,x,y,labels (x first); swap the columns",
                line=rows[0][0],
            )
        rows = rows[1:]
    if not rows:
        report.error(
            split,
            None,
            None,
            f"split '{split}' is empty (no data rows)",
            "add rows name,x,y,l0..l8",
        )
        return
    suffix = default_ext if default_ext.startswith(".") else f".{default_ext}"
    for index, (line, cells) in enumerate(rows):
        row = [c.strip() for c in cells]
        if len(row) < 4:
            report.error(
                split,
                index,
                "label",
                f"{len(row)} column(s); no labels",
                "rows are name,x,y,l0..l8 (labels column by column); "
                "coordinate-only NCRF files need labels added",
                line=line,
            )
            continue
        name: str | None = row[0]
        if not name:
            report.error(
                split, index, "name", "empty slide name", "first column is the slide", line=line
            )
            name = None
        elif not Path(name).suffix and default_ext:
            name += suffix
        yield _RawEntry(split, index, name, (row[1], row[2]), row[3:], line=line)


def _validate(
    raw: _RawEntry, shift: int, report: _Report
) -> tuple[str, int, int, tuple[tuple[int, ...], ...]] | None:
    """Check an entry's values: (image, centre x, centre y, row-major labels), or None after
    reporting every bad value."""
    centre: list[int] = []
    for axis, value in () if raw.xy is None else (("x", raw.xy[0]), ("y", raw.xy[1])):
        try:
            centre.append(_integer(value, axis, raw.from_text) + shift)
        except _Invalid as exc:
            report.error(
                raw.split, raw.index, raw.xy_field or axis, exc.message, exc.hint, raw.line
            )
    try:
        labels = _labels(raw.label, raw.from_text)
    except _Invalid as exc:
        report.error(raw.split, raw.index, "label", exc.message, exc.hint, raw.line)
        return None
    if raw.image is None or len(centre) != 2:
        return None
    return raw.image, centre[0], centre[1], labels


class _TableBuilder:
    """Validates raw entries into regions, in file order; an exact duplicate is dropped with a
    warning, the same region with other labels is an error."""

    def __init__(self, report: _Report, data_root: Path, shift: int) -> None:
        self.report, self.shift = report, shift
        self.resolve = _slide_resolver(data_root)
        self.regions: list[Region] = []
        self.duplicates = 0
        self._first: dict[tuple[Path, int, int], tuple[Region, int | None]] = {}

    def table(self) -> RegionTable:
        return RegionTable(
            self.report.path,
            self.regions,
            self.report.errors,
            self.report.warnings,
            self.duplicates,
        )

    def add(self, raw: _RawEntry) -> None:
        valid = _validate(raw, self.shift, self.report)
        if valid is None:
            return
        image, x, y, labels = valid
        slide, exists = self.resolve(image)
        region = Region(raw.split, raw.index, image, slide, x, y, labels, exists)
        first = self._first.setdefault((slide, x, y), (region, raw.line))
        if first[0] is region:
            self.regions.append(region)
            return
        ref = f"line {first[1]}" if raw.line is not None else f"{first[0].split}[{first[0].index}]"
        same = f"same slide {image} and centre x={x}, y={y} as {ref}"
        if first[0].labels == labels:
            self.duplicates += 1
            self.report.warn(
                raw.split, raw.index, None, f"duplicate: {same}; kept the first", line=raw.line
            )
        else:
            self.report.error(
                raw.split,
                raw.index,
                "label",
                f"conflicting duplicate: {same} but different labels {labels} vs {first[0].labels}",
                "keep one entry with the right labels",
                raw.line,
            )


def _slide_resolver(data_root: Path) -> Callable[[str], tuple[Path, bool]]:
    """Image name -> (path, exists), cached per name. The path is the first existing candidate
    (an absolute path as is, else root/image, root/training/images/image), else the first."""

    @functools.cache
    def resolve(image: str) -> tuple[Path, bool]:
        p = Path(image)
        candidates = (
            [p] if p.is_absolute() else [data_root / p, data_root / "training" / "images" / p]
        )
        found = next((c for c in candidates if c.exists()), None)
        return (found, True) if found else (candidates[0], False)

    return resolve


def _is_header(row: list[str]) -> bool:
    """A first row whose fields after the name are all non-numbers (e.g. name,x,y,l0..l8)."""

    def numeric(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False

    rest = [c.strip() for c in row[1:]]
    return bool(rest) and all(c and not numeric(c) for c in rest)


def _kind(value: Any) -> str:
    """JSON type name with its article, for messages: "an object", "a list", "null"."""
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
