"""Coordinate files -> one validated table of labelled regions.

Reads the MONAI datalist JSON (``{"training": [...], "validation": [...], ...}``, entries
``{"image", "location": [y, x], "label"}``) and the MONAI/NCRF CSV (``name,x,y,l0..l8``) into
:class:`RegionTable`. Conventions (see DESIGN.md):

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
field; :func:`load_regions` raises them together as :class:`CoordsError`.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etl.errors import PatchetlError

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
    ``ValueError``; problems in the file (an unreadable file too) go to ``table.errors``.
    """
    if fmt not in (None, "json", "csv"):
        raise ValueError(f"fmt must be 'json', 'csv' or None, not {fmt!r}")
    if location_order not in LOCATION_ORDERS:
        raise ValueError(f"location_order must be one of {LOCATION_ORDERS}, not {location_order!r}")
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, not {anchor!r}")
    if isinstance(region_size, bool) or not isinstance(region_size, int) or region_size <= 0:
        raise ValueError(f"region_size must be a positive integer, not {region_size!r}")
    wanted = [split] if isinstance(split, str) else (list(split) if split is not None else None)
    path = Path(path)
    parser = _Parser(
        path, Path(data_root) if data_root is not None else default_data_root(),
        location_order, region_size // 2 if anchor == "corner" else 0,
    )
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from spreadsheet tools
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(None, None, None, f"cannot read the file: {exc}",
                     "check the path and that it is a UTF-8 text file")
        return parser.table()
    suffix = path.suffix.lower()
    if fmt == "csv" or (fmt is None and suffix == ".csv"):
        if wanted is not None and len(wanted) != 1:
            raise ValueError(f"a CSV file holds one split; give one split name, not {wanted}")
        parser.parse_csv(text, wanted[0] if wanted else infer_csv_split(path), default_ext)
    else:
        parser.parse_json(text, wanted, known_suffix=fmt == "json" or suffix == ".json")
    return parser.table()


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


def inspect_report(table: RegionTable) -> str:
    """Human-readable summary: counts per split, slide and label, then errors and warnings."""
    lines = [f"coordinates: {table.source}", f"regions: {len(table.regions)}"
             + (f" ({table.duplicates} duplicate(s) dropped)" if table.duplicates else "")]
    splits = table.splits()
    if splits:
        lines += ["", "per split:", _row("split", "regions", "slides", "tumor", "normal")]
        for name, regions in splits.items():
            tumor = sum(r.tumor for r in regions)
            lines.append(_row(name, len(regions), len({r.slide for r in regions}),
                              tumor, len(regions) - tumor))
        by_slide: dict[Path, list[Region]] = {}
        for region in table.regions:
            by_slide.setdefault(region.slide, []).append(region)
        lines += ["", f"per slide ({len(by_slide)}):",
                  _row("slide", "regions", "tumor", "normal", "exists", first=40)]
        for slide, regions in by_slide.items():
            tumor = sum(r.tumor for r in regions)
            lines.append(_row(regions[0].image, len(regions), tumor, len(regions) - tumor,
                              "yes" if regions[0].exists else "MISSING", first=40))
        cells = Counter(v for r in table.regions for row in r.labels for v in row)
        grids = Counter(f"{r.grid}x{r.grid}" for r in table.regions)
        tumor = sum(r.tumor for r in table.regions)
        lines += ["", "labels:",
                  f"  regions: {tumor} with tumor (any cell 1), "
                  f"{len(table.regions) - tumor} all normal",
                  f"  cells: {cells[1]} tumor (1), {cells[0]} normal (0)",
                  "  grids: " + ", ".join(f"{g}: {n}" for g, n in sorted(grids.items()))]
    missing = table.slides_missing()
    if missing:
        lines += ["", f"missing slides ({len(missing)}):"]
        lines += [f"  {p}" for p in missing[:MAX_LISTED]]
        if len(missing) > MAX_LISTED:
            lines.append(f"  ... and {len(missing) - MAX_LISTED} more")
    if table.errors:
        lines += ["", _format_problems(table.errors, f"errors ({len(table.errors)})")]
    if table.warnings:
        lines += ["", _format_problems(table.warnings, f"warnings ({len(table.warnings)})")]
    if not (table.errors or table.warnings or missing):
        lines += ["", "no problems found"]
    return "\n".join(lines)


# --- internals ---------------------------------------------------------------------------


def _row(*cells: object, first: int = 14) -> str:
    return "  " + f"{cells[0]!s:<{first}}" + "".join(f"{c!s:>9}" for c in cells[1:])


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
_SHAPE_HINT = ("give 1 value for the whole region, n*n values column by column (e.g. 9 for 3x3), "
               "or n rows of n values")


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
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise _Invalid(f"{name} is not an integer: {value!r}", _LOC_HINT)
        value = int(value)
    if value < 0:
        raise _Invalid(f"negative value {value} for {name}", _LOC_HINT)
    return value


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
            raise _Invalid(f"nested label must be {n} rows of {n} values, got row lengths {shape}",
                           _SHAPE_HINT)
        flat = [v for row in value for v in row]
    else:
        flat, n = value, math.isqrt(n)
        if n * n != len(flat):
            raise _Invalid(f"label has {len(flat)} values, not 1 or a square (4, 9, 16, ...)",
                           _SHAPE_HINT)
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
        return tuple(tuple(values[r * n:(r + 1) * n]) for r in range(n))
    # flat input lists the grid column by column: k = n*col + row
    return tuple(tuple(values[n * c + r] for c in range(n)) for r in range(n))


class _Parser:
    """Accumulates regions and problems for one file."""

    def __init__(self, path: Path, data_root: Path, order: str, shift: int) -> None:
        self.path, self.data_root, self.order, self.shift = path, data_root, order, shift
        self.regions: list[Region] = []
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.duplicates = 0
        self._resolved: dict[str, tuple[Path, bool]] = {}
        self._seen: dict[tuple[Path, int, int], Region] = {}
        self._lines: dict[tuple[str, int], int] = {}  # CSV: (split, index) -> 1-based line

    def table(self) -> RegionTable:
        return RegionTable(self.path, self.regions, self.errors, self.warnings, self.duplicates)

    def error(self, split: str | None, index: int | None, fld: str | None, message: str,
              hint: str = "", line: int | None = None) -> None:
        self.errors.append(Problem(self.path, split, index, fld, message, hint, line))

    # -- JSON -------------------------------------------------------------------------

    def parse_json(self, text: str, wanted: list[str] | None, known_suffix: bool) -> None:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = ("fix the JSON syntax there" if known_suffix else
                    "coordinate files are .json (MONAI datalist) or .csv (name,x,y,labels); "
                    "rename the file if it is a CSV")
            self.error(None, None, None,
                       f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", hint)
            return
        if not isinstance(data, dict):
            self.error(None, None, None, f"top level is {_kind(data)}, not an object",
                       'write {"training": [...], "validation": [...]} with one list per split')
            return
        if not data:
            self.error(None, None, None, "no splits at all (empty object)",
                       'add e.g. "training": [{"image": ..., "location": [y, x], "label": [...]}]')
            return
        if wanted is None:
            # Decathlon-style datalists carry metadata next to the splits ("name",
            # "description", "labels": {...}); those keys are skipped with a warning. A
            # split-like name that is not a list stays an error (it is most likely a mistake).
            names = []
            for name, value in data.items():
                if isinstance(value, list) or name.lower() in _SPLIT_NAMES:
                    names.append(name)
                else:
                    self.warnings.append(Problem(
                        self.path, None, None, None,
                        f"top-level key '{name}' ({_kind(value)}) is not a list of entries: "
                        "skipped as metadata", "name it with --split to have it checked"))
            if not names:
                self.error(None, None, None, "no splits: no top-level key holds a list of "
                           f"entries (keys: {', '.join(map(repr, data))})",
                           'add e.g. "training": [{"image": ..., "location": [y, x], '
                           '"label": [...]}]')
                return
        else:
            names = wanted
        for name in names:
            if name not in data:
                self.error(None, None, None, f"split '{name}' not in the file",
                           f"splits present: {', '.join(map(repr, data))}")
                continue
            entries = data[name]
            if not isinstance(entries, list):
                self.error(name, None, None, f"split '{name}' is {_kind(entries)}, not a list",
                           "each top-level key is a split holding a list of entries")
            elif not entries:
                self.error(name, None, None, f"split '{name}' is empty",
                           "add entries or remove the split")
            for index, entry in enumerate(entries if isinstance(entries, list) else ()):
                self._json_entry(name, index, entry)

    def _json_entry(self, split: str, index: int, entry: Any) -> None:
        if not isinstance(entry, dict):
            self.error(split, index, None, f"entry is {_kind(entry)}, not an object",
                       'write {"image": ..., "location": [y, x], "label": [...]}')
            return
        missing = [k for k in _REQUIRED_KEYS if k not in entry]
        for key in missing:
            self.error(split, index, key, f"missing key '{key}'",
                       'each entry needs "image", "location" ([y, x] centre) and "label"')
        if missing:
            return
        ok = True
        image = entry["image"]
        if not isinstance(image, str) or not image.strip():
            self.error(split, index, "image", f"not a non-empty string: {image!r}",
                       "give the slide file name, e.g. tumor_001.tif")
            ok = False
        loc = entry["location"]
        centre = None
        if not isinstance(loc, list) or len(loc) != 2:
            got = f"{len(loc)} values" if isinstance(loc, list) else _kind(loc)
            self.error(split, index, "location", f"must be a list of 2 numbers, got {got}",
                       f"write [{self.order[0]}, {self.order[1]}] (level-0 pixels)")
            ok = False
        else:
            axes = dict(zip(self.order, loc))
            centre = self._centre(axes["x"], axes["y"], split, index, "location")
        labels = self._labels(entry["label"], split, index, "label")
        if ok and centre is not None and labels is not None:
            self._add(split, index, image, self._resolve(image), centre, labels)

    # -- CSV --------------------------------------------------------------------------

    def parse_csv(self, text: str, split: str, default_ext: str) -> None:
        rows = [(n, row) for n, row in enumerate(csv.reader(text.splitlines()), start=1)
                if any(cell.strip() for cell in row)]
        if rows and _is_header(rows[0][1]):
            header = [c.strip().lower() for c in rows[0][1]]
            if header[1:3] == ["y", "x"]:
                self.error(None, None, None, "header names columns 'y,x'", "CSV columns are "
                           "name,x,y,labels (x first); swap the columns", line=rows[0][0])
            rows = rows[1:]
        if not rows:
            self.error(split, None, None, f"split '{split}' is empty (no data rows)",
                       "add rows name,x,y,l0..l8")
            return
        for index, (line, row) in enumerate(rows):
            self._csv_row(split, index, line, [c.strip() for c in row], default_ext)

    def _csv_row(self, split: str, index: int, line: int, row: list[str], ext: str) -> None:
        if len(row) < 4:
            self.error(split, index, "label", f"{len(row)} column(s); no labels",
                       "rows are name,x,y,l0..l8 (labels column by column); "
                       "coordinate-only NCRF files need labels added", line=line)
            return
        name = row[0]
        if not name:
            self.error(split, index, "name", "empty slide name", "first column is the slide",
                       line=line)
        elif not Path(name).suffix and ext:
            name += ext if ext.startswith(".") else f".{ext}"
        centre = self._centre(row[1], row[2], split, index, None, line)
        labels = self._labels(row[3:], split, index, "label", line)
        if name and centre is not None and labels is not None:
            self._lines[(split, index)] = line
            self._add(split, index, name, self._resolve(name), centre, labels)

    # -- shared -----------------------------------------------------------------------

    def _centre(self, x: Any, y: Any, split: str, index: int, fld: str | None,
                line: int | None = None) -> tuple[int, int] | None:
        out = []
        for axis, value in (("x", x), ("y", y)):
            try:
                out.append(_integer(value, axis, from_text=line is not None) + self.shift)
            except _Invalid as exc:
                self.error(split, index, fld or axis, exc.message, exc.hint, line)
        return (out[0], out[1]) if len(out) == 2 else None

    def _labels(self, value: Any, split: str, index: int, fld: str,
                line: int | None = None) -> tuple[tuple[int, ...], ...] | None:
        try:
            return _labels(value, from_text=line is not None)
        except _Invalid as exc:
            self.error(split, index, fld, exc.message, exc.hint, line)
            return None

    def _resolve(self, image: str) -> tuple[Path, bool]:
        """First existing candidate: absolute path as is, else root/image, root/training/images."""
        if image not in self._resolved:
            p = Path(image)
            candidates = [p] if p.is_absolute() else [
                self.data_root / p, self.data_root / "training" / "images" / p]
            found = next((c for c in candidates if c.exists()), None)
            self._resolved[image] = (found, True) if found else (candidates[0], False)
        return self._resolved[image]

    def _add(self, split: str, index: int, image: str, resolved: tuple[Path, bool],
             centre: tuple[int, int], labels: tuple[tuple[int, ...], ...]) -> None:
        slide, exists = resolved
        region = Region(split, index, image, slide, centre[0], centre[1], labels, exists)
        key = (slide, region.x, region.y)
        first = self._seen.get(key)
        if first is None:
            self._seen[key] = region
            self.regions.append(region)
            return
        line = self._lines.get((split, index))
        ref = (f"line {self._lines[(first.split, first.index)]}" if line is not None
               else f"{first.split}[{first.index}]")
        same = f"same slide {image} and centre x={region.x}, y={region.y} as {ref}"
        if first.labels == labels:
            self.duplicates += 1
            self.warnings.append(Problem(self.path, split, index, None,
                                         f"duplicate: {same}; kept the first", line=line))
        else:
            self.error(split, index, "label", f"conflicting duplicate: {same} but different "
                       f"labels {labels} vs {first.labels}", "keep one entry with the right labels",
                       line)


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
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
