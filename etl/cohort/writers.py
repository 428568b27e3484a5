"""The outputs of `patchetl coords`, each written atomically (``etl.atomic``):

- ``<out>`` (e.g. ``dataset_0.json``): MONAI datalist ``{split: [{"image", "location": [y, x],
  "label": [...]}]}``, the centre at level 0 in ``[y, x]``, labels column by column
  (``k = grid * col + row``); splits training, validation, testing in this order, empty ones
  left out; one entry per line; slides by name, a slide's regions by (y, x). ``image`` is the
  slide's file name: extract and inspect find it with ``--data-root <slides folder>``.
- ``<stem>_<split>.csv``: the same regions as NCRF/MONAI CSV rows ``image,x,y,label0..``
  (x first), one split per file, with a header line. CSVs of splits not written are removed.
- ``<stem>.summary.json``: the options, totals and, per slide, tissue and tumor area, regions
  per class, what was asked, left out and why, ignored annotations and warnings.

All of them are written to temporaries and renamed together once complete (the datalist last).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etl.atomic import atomic_path
from etl.cohort.slide import SlideOutcome
from etl.cohort.splits import SPLITS
from etl.errors import PatchetlError

__all__ = [
    "OutputError",
    "OutputPaths",
    "datalist_entries",
    "slide_summary",
    "summary_table",
    "write_outputs",
]

Entry = dict[str, Any]


class OutputError(PatchetlError, OSError):
    """An output file cannot be written; the message names it."""


@dataclass(frozen=True)
class OutputPaths:
    datalist: Path
    csvs: dict[str, Path]
    summary: Path


def datalist_entries(
    outcomes: Sequence[SlideOutcome], split_of: dict[str, str]
) -> dict[str, list[Entry]]:
    """The kept regions as datalist entries per split (splits in ``SPLITS`` order, non-empty)."""
    entries: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    for o in sorted(outcomes, key=lambda o: o.name):
        for (x, y), label in zip(o.centres[o.keep], o.labels[o.keep], strict=True):
            entries[split_of[o.name]].append(
                {"image": o.image, "location": [int(y), int(x)], "label": label.tolist()}
            )
    return {split: e for split, e in entries.items() if e}


def _mm2(px: float, mpp: float | None) -> float | None:
    return None if mpp is None else round(px * mpp * mpp / 1e6, 4)


def slide_summary(o: SlideOutcome, split: str | None) -> dict[str, Any]:
    kept_tumor = int((o.tumor & o.keep).sum())
    scale = {} if o.scale is None else {"scale": o.scale}  # with --mpp
    return {
        "slide": o.name,
        "image": o.image,
        "split": split,
        "width": o.width,
        "height": o.height,
        "mpp": o.mpp,
        "annotation": o.annotation,
        "annotation_kind": o.kind,
        "tissue_area_px": round(o.tissue_px),
        "tissue_area_mm2": _mm2(o.tissue_px, o.mpp),
        "tumor_area_px": round(o.tumor_px),
        "tumor_area_mm2": _mm2(o.tumor_px, o.mpp),
        "regions": {"tumor": kept_tumor, "normal": int(o.keep.sum()) - kept_tumor},
        "asked": o.asked,
        "dropped_for_balance": int((~o.keep).sum()),
        "left_out": o.left_out,
        "ignored_annotations": o.ignored,
        "warnings": [str(p) for p in o.problems if p.warning],
        **scale,
    }


def _datalist_text(entries: dict[str, list[Entry]]) -> str:
    parts = []
    for split, rows in entries.items():
        body = ",\n".join("  " + json.dumps(e) for e in rows)
        parts.append(f' "{split}": [\n{body}\n ]')
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _csv_text(rows: list[Entry], n_labels: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "x", "y"] + [f"label{k}" for k in range(n_labels)])
    for r in rows:
        y, x = r["location"]
        w.writerow([r["image"], x, y, *r["label"]])
    return buf.getvalue()


def write_outputs(
    out: Path, entries: dict[str, list[Entry]], n_labels: int, summary: dict[str, Any]
) -> OutputPaths:
    """Write the datalist, one CSV per split and the summary next to ``out``: every file goes to
    a temporary first, and only when all are complete are they renamed (the datalist last), so
    a failed write leaves the previous outputs as they were. Raises :class:`OutputError`."""
    csvs = {split: out.with_name(f"{out.stem}_{split}.csv") for split in entries}
    paths = OutputPaths(out, csvs, out.with_name(f"{out.stem}.summary.json"))
    summary["outputs"] = {
        "datalist": out.name,
        "csv": {k: v.name for k, v in csvs.items()},
        "summary": paths.summary.name,
    }
    texts = {out: _datalist_text(entries), paths.summary: json.dumps(summary, indent=1)}
    texts.update({path: _csv_text(entries[split], n_labels) for split, path in csvs.items()})
    target = out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:  # renames on exit, in reverse: the datalist last
            for target, text in texts.items():
                tmp = stack.enter_context(atomic_path(target))
                tmp.write_text(text, encoding="utf-8")
            target = out
        for split in SPLITS:
            if split not in entries:
                target = out.with_name(f"{out.stem}_{split}.csv")
                target.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{target}: cannot write it ({exc.strerror or exc}); the previous outputs are left "
            "as they were; check the folder's space and permissions"
        ) from None
    return paths


def summary_table(slides: Sequence[dict[str, Any]]) -> str:
    """One line per slide: split, annotation, tissue and tumor area, regions per class, notes."""
    area = "mm2" if all(s["mpp"] for s in slides) else "Mpx"

    def size(s: dict[str, Any], key: str) -> str:
        value = s[f"{key}_area_mm2"] if area == "mm2" else s[f"{key}_area_px"] / 1e6
        return f"{value:.2f}"

    rows = [("slide", "split", "truth", f"tissue {area}", f"tumor {area}", "tumor", "normal")]
    for s in slides:
        r = s["regions"]
        rows.append(
            (
                s["slide"],
                s["split"] or "-",
                s["annotation_kind"],
                size(s, "tissue"),
                size(s, "tumor"),
                str(r["tumor"]),
                str(r["normal"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(lines)
