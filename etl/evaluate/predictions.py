"""Inference outputs as evaluation reads them, and the facts of each slide they belong to.

Per slide ``<name>`` in the prediction folder (``patchetl infer`` writes them, ``<name>`` being
the slide's ``key_stem``): ``<name>.candidates.csv`` (header ``prob,x,y``, level-0 pixels) and,
optionally, ``<name>.prob.npy`` + ``<name>.prob.json`` (the probability map and its sidecar:
slide path, level-0 size, mpp). The slides evaluated are those with a candidates file.

A slide's level-0 size and mpp come from the slide itself (found in the slide folder by name,
or at the path the sidecar records), else from the sidecar.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from etl.evaluate.froc import EvaluationError
from etl.wsi.formats import SlidePathError, find_slides, key_stem

__all__ = [
    "CANDIDATES_SUFFIX",
    "SlideFacts",
    "candidate_files",
    "read_candidates",
    "slide_facts",
    "slide_index",
    "slide_max_prob",
]

CANDIDATES_SUFFIX = ".candidates.csv"


def candidate_files(pred: Path) -> list[tuple[str, Path]]:
    """(slide name, candidates file) of every slide in the prediction folder, sorted."""
    files = sorted(pred.glob(f"*{CANDIDATES_SUFFIX}"))
    if not files:
        raise EvaluationError(
            f"{pred}: no <name>{CANDIDATES_SUFFIX} files; run `patchetl infer` "
            "with --out pointing there first"
        )
    return [(path.name[: -len(CANDIDATES_SUFFIX)], path) for path in files]


def read_candidates(path: str | Path) -> np.ndarray:
    """``(n, 3)`` float64 array of (prob, x, y) from a ``prob,x,y`` CSV (header required)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise EvaluationError(f"{path}: cannot read the candidates file ({exc})") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if header[:3] != ["prob", "x", "y"]:
        raise EvaluationError(
            f"{path}: expected the header 'prob,x,y' (as `patchetl infer` "
            f"writes), found {rows[0] if rows else 'an empty file'}"
        )
    values = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue  # blank line
        try:
            if len(row) < 3:
                raise ValueError
            v = [float(c) for c in row[:3]]
        except ValueError:
            raise EvaluationError(
                f"{path}: line {line} {row} is not three numbers prob,x,y; fix or remove that line"
            ) from None
        if not (0.0 <= v[0] <= 1.0 and v[1] >= 0 and v[2] >= 0 and np.isfinite(v).all()):
            raise EvaluationError(
                f"{path}: line {line}: prob must be in [0, 1] and x, y >= 0 "
                f"(level-0 pixels), got {row}"
            )
        values.append(v)
    return np.array(values, np.float64).reshape(-1, 3)


def _sidecar(pred: Path, name: str) -> dict[str, Any]:
    path = pred / f"{name}.prob.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EvaluationError(f"{path}: not valid JSON ({exc}); rerun `patchetl infer`") from None
    return meta if isinstance(meta, dict) else {}


def _sidecar_dims(meta: dict[str, Any]) -> tuple[int, int] | None:
    for key in ("dims", "dimensions", "level0_dims", "size"):
        if isinstance(meta.get(key), (list, tuple)) and len(meta[key]) == 2:
            return int(meta[key][0]), int(meta[key][1])
    for wk, hk in (("width", "height"), ("level0_width", "level0_height")):
        if wk in meta and hk in meta:
            return int(meta[wk]), int(meta[hk])
    return None


def _as_mpp(value: Any) -> float | None:
    if isinstance(value, (list, tuple)) and value:
        value = value[0]  # (mpp_x, mpp_y): Camelyon's single "resolution" is x
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if mpp > 0 and math.isfinite(mpp) else None


def slide_index(folder: Path | None) -> dict[str, list[Path]]:
    """The slide files of ``folder`` by the name inference gives their outputs (sorted)."""
    if folder is None:
        return {}
    try:
        slides = find_slides([folder])
    except SlidePathError as exc:
        raise EvaluationError(f"--slides: {exc}") from None
    index: dict[str, list[Path]] = {}
    for path in slides:
        index.setdefault(key_stem(path.name), []).append(path)
    return index


@dataclass(frozen=True)
class SlideFacts:
    """Level-0 size and mpp of a slide (None: unknown), and where they came from."""

    size0: tuple[int, int] | None
    mpp: float | None
    source: str


def slide_facts(name: str, pred: Path, index: dict[str, list[Path]]) -> SlideFacts:
    """The facts of slide ``name``: from the first of its slide files that opens, else from its
    map's sidecar."""
    meta = _sidecar(pred, name)
    candidates = list(index.get(name, []))
    for key in ("slide", "slide_path", "path", "image"):
        if isinstance(meta.get(key), str):
            candidates.append(Path(meta[key]))
    for path in candidates:
        if path.is_file():
            from etl.wsi.reader import SlideError, open_slide

            try:
                with open_slide(path) as slide:
                    return SlideFacts(slide.dimensions, _as_mpp(slide.mpp), str(path))
            except SlideError:
                continue
    if meta:
        return SlideFacts(
            _sidecar_dims(meta), _as_mpp(meta.get("mpp")), str(pred / f"{name}.prob.json")
        )
    return SlideFacts(None, None, "unknown")


def slide_max_prob(pred: Path, name: str, detections: np.ndarray) -> tuple[float, str]:
    """The slide's score for the slide AUC: the maximum of its map, else of its candidates."""
    path = pred / f"{name}.prob.npy"
    if path.is_file():
        try:
            prob = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise EvaluationError(f"{path}: cannot read the probability map ({exc})") from None
        return (float(np.nanmax(prob)) if prob.size else 0.0), "prob.npy"
    return (float(detections[:, 0].max()) if len(detections) else 0.0), "candidates"
