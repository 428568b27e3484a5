"""A synthetic Camelyon16-like cohort: slides, ground truth and coordinate files.

``synth_cohort`` writes, under ``out``::

    training/images/tumor_001.tif, normal_001.tif, ...   (.svs when vendor='aperio')
    training/annotations/tumor_001.xml                   ASAP XML tumor polygons (level 0)
    training/masks/tumor_001_mask.tif                    tumor mask at MASK_DOWNSAMPLE (16)
    dataset_0.json                                       MONAI datalist {"training", "validation"}
    dataset_0.csv, dataset_0_training.csv, dataset_0_validation.csv
    synth.json                                           parameters and per-slide facts

Normal slides have neither XML nor mask. With ``artefacts=True`` every slide also carries pen
marks, scan borders, dust and air bubbles (``etl.synth.artefacts``); synth.json then lists
them per slide (kind, detail, level-0 outline polygon) and no region is centred on one.
Without it the files are exactly those of a cohort made before artefacts existed. The split is
by slide. Everything is deterministic:
slide i (0-based, synth.json order) uses the seed ``(seed, i)`` and its regions
``(seed, i, 1)``; the same options give byte-identical files. Synthetic data is for tests and
demos: production code never imports ``etl.synth``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from etl.errors import OptionError
from etl.synth.lesions import polygon_area
from etl.synth.regions import region_labels, sample_regions
from etl.synth.scene import SlideScene, make_scene
from etl.synth.slide import DOWNSAMPLES, VENDORS, write_slide
from etl.synth.textures import TILE
from etl.wsi.annotations import write_asap_xml
from etl.wsi.masks import tumor_mask, write_mask

__all__ = ["MASK_DOWNSAMPLE", "SynthCohort", "SynthSlide", "synth_cohort"]

MASK_DOWNSAMPLE = 16


@dataclass
class SynthSlide:
    """One generated slide and its ground truth (paths are absolute)."""

    name: str
    path: Path
    width: int
    height: int
    mpp: float
    has_tumor: bool
    xml: Path | None
    mask: Path | None


@dataclass
class SynthCohort:
    """What ``synth_cohort`` wrote; ``csv_paths`` has keys 'all', 'training', 'validation'."""

    root: Path
    slides: list[SynthSlide]
    dataset_json: Path
    csv_paths: dict[str, Path]


def _validate(
    n_slides: int,
    width: int,
    height: int,
    tumor_fraction: float,
    mpp: float,
    downsample: int,
    vendor: str,
    jpeg_quality: int,
    regions_per_slide: int,
    region_size: int,
    grid: int,
    val_fraction: float,
) -> None:
    problems = []
    if n_slides < 1:
        problems.append(f"n_slides={n_slides}: need at least 1 slide")
    if grid < 1:
        problems.append(f"grid={grid}: use a grid of at least 1")
    elif region_size < grid or region_size % grid:
        problems.append(
            f"region_size={region_size} is not a positive multiple of grid={grid}: "
            f"use e.g. region_size={max(grid, region_size - region_size % grid)}"
        )
    if min(width, height) < max(region_size, TILE):
        problems.append(
            f"slide {width}x{height} is smaller than region_size={region_size} "
            f"(or the {TILE} px tile): use a width and height >= "
            f"{max(region_size, TILE)} or a smaller region size"
        )
    if not 0.0 <= tumor_fraction <= 1.0:
        problems.append(f"tumor_fraction={tumor_fraction}: use a value in [0, 1]")
    if not 0.02 <= mpp <= 50:
        problems.append(f"mpp={mpp}: use micrometres per pixel in [0.02, 50] (e.g. 0.243)")
    if downsample not in DOWNSAMPLES:
        problems.append(f"downsample={downsample}: use 2 or 4")
    if vendor not in VENDORS:
        problems.append(f"vendor={vendor!r}: use 'generic' or 'aperio'")
    if not 1 <= jpeg_quality <= 100:
        problems.append(f"jpeg_quality={jpeg_quality}: use 1..100")
    if regions_per_slide < 1:
        problems.append(f"regions_per_slide={regions_per_slide}: use at least 1")
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"val_fraction={val_fraction}: use a value in [0, 1)")
    if problems:
        raise OptionError("; ".join(problems))


def _validation_slides(n_slides: int, n_tumor: int, val_fraction: float) -> set[int]:
    """Indices of the validation slides: the last slides, alternately tumor and normal; the
    first tumor and first normal slide go last, so training keeps one of each if it can."""
    n_val = 0
    if n_slides > 1 and val_fraction > 0:
        n_val = min(n_slides - 1, max(1, math.floor(val_fraction * n_slides + 0.5)))
    tumor_idx = list(range(n_tumor))[::-1]
    normal_idx = list(range(n_tumor, n_slides))[::-1]
    tail = [idx.pop() for idx in (normal_idx, tumor_idx) if idx]  # normal_001, tumor_001
    order = [i for pair in zip(tumor_idx, normal_idx, strict=False) for i in pair]
    order += tumor_idx[len(normal_idx) :] + normal_idx[len(tumor_idx) :] + tail
    return set(order[:n_val])


def _write_csv(path: Path, rows: list[dict[str, Any]], n_labels: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image", "x", "y"] + [f"label{k}" for k in range(n_labels)])
        for r in rows:
            y, x = r["location"]
            w.writerow([r["image"], x, y, *r["label"]])


def _write_coordinates(
    root: Path, entries: dict[str, list[dict[str, Any]]], n_labels: int
) -> tuple[Path, dict[str, Path]]:
    """dataset_0.json (one entry per line) and the CSVs; an empty split is left out (the
    coordinate parser rightly rejects empty splits)."""
    dataset_json = root / "dataset_0.json"
    splits = [s for s in ("training", "validation") if entries[s]]
    parts = []
    for split in splits:
        body = ",\n".join("  " + json.dumps(e) for e in entries[split])
        parts.append(f' "{split}": [\n{body}\n ]')
    dataset_json.write_text("{\n" + ",\n".join(parts) + "\n}\n", encoding="utf-8")
    csv_paths = {
        "all": root / "dataset_0.csv",
        **{split: root / f"dataset_0_{split}.csv" for split in splits},
    }
    _write_csv(csv_paths["all"], entries["training"] + entries["validation"], n_labels)
    for split in splits:
        _write_csv(csv_paths[split], entries[split], n_labels)
    return dataset_json, csv_paths


def _write_facts(
    root: Path,
    params: dict[str, Any],
    facts: list[dict[str, Any]],
    dataset_json: Path,
    csv_paths: dict[str, Path],
) -> None:
    """synth.json: the parameters, then one line per slide."""
    meta = {
        "generator": "patchetl.etl.synth",
        "params": params,
        "mask_downsample": MASK_DOWNSAMPLE,
        "label_order": "column-by-column (k = grid*col + row)",
        "dataset_json": dataset_json.name,
        "csv": {k: v.name for k, v in csv_paths.items()},
    }
    head = json.dumps(meta, indent=1)[: -len("\n}")]  # one line per slide below
    slide_lines = ",\n".join("  " + json.dumps(f) for f in facts)
    (root / "synth.json").write_text(
        f'{head},\n "slides": [\n{slide_lines}\n ]\n}}\n', encoding="utf-8"
    )


def _slide_facts(
    slide: SynthSlide,
    scene: SlideScene,
    root: Path,
    split: str,
    dims: list[tuple[int, int]],
    seed: list[int],
    centres: np.ndarray,
    labels: np.ndarray,
) -> dict[str, Any]:
    return {
        "name": slide.name,
        "image": slide.path.relative_to(root).as_posix(),
        "split": split,
        "width": slide.width,
        "height": slide.height,
        "mpp": slide.mpp,
        "has_tumor": slide.has_tumor,
        "levels": [list(d) for d in dims],
        "seed": seed,
        "polygons": len(scene.polygons),
        "lesion_diameters_um": [
            round(2 * math.sqrt(polygon_area(p) / math.pi) * slide.mpp, 1) for p in scene.polygons
        ],
        "xml": slide.xml.relative_to(root).as_posix() if slide.xml else None,
        "mask": slide.mask.relative_to(root).as_posix() if slide.mask else None,
        "regions": len(centres),
        "tumor_regions": int((labels.max(axis=1) > 0).sum()),
    }


def _write_one_slide(
    root: Path, name: str, index: int, split: str, params: dict[str, Any]
) -> tuple[SynthSlide, list[dict[str, Any]], dict[str, Any]]:
    """Slide ``index`` of the cohort (``params`` as in synth.json): its image, for a tumor
    slide its XML and mask, and its sampled regions. Returns the slide, its coordinate
    entries and its synth.json facts."""
    width, height, mpp, seed = params["width"], params["height"], params["mpp"], params["seed"]
    region_size, grid = params["region_size"], params["grid"]
    has_tumor = name.startswith("tumor")
    scene = make_scene(
        width,
        height,
        mpp=mpp,
        has_tumor=has_tumor,
        seed=(seed, index),
        artefacts=params.get("artefacts", False),
    )
    ext = ".svs" if params["vendor"] == "aperio" else ".tif"
    path = root / "training" / "images" / f"{name}{ext}"
    dims = write_slide(
        path,
        scene,
        downsample=params["downsample"],
        vendor=params["vendor"],
        jpeg_quality=params["jpeg_quality"],
    )
    xml = mask = None
    if has_tumor:
        xml = root / "training" / "annotations" / f"{name}.xml"
        mask = root / "training" / "masks" / f"{name}_mask.tif"
        write_asap_xml(xml, scene.polygons)
        write_mask(
            mask,
            tumor_mask(scene.polygons, width, height, MASK_DOWNSAMPLE),
            downsample=MASK_DOWNSAMPLE,
            width=width,
            height=height,
        )
    centres = sample_regions(
        scene, params["regions_per_slide"], region_size, np.random.default_rng((seed, index, 1))
    )
    labels = region_labels(centres, scene.polygons, region_size, grid)
    entries = [
        {"image": path.name, "location": [int(y), int(x)], "label": [int(v) for v in lab]}
        for (x, y), lab in zip(centres, labels, strict=True)
    ]
    slide = SynthSlide(
        name=name,
        path=path,
        width=width,
        height=height,
        mpp=mpp,
        has_tumor=has_tumor,
        xml=xml,
        mask=mask,
    )
    facts = _slide_facts(slide, scene, root, split, dims, [seed, index], centres, labels)
    if params.get("artefacts"):
        facts["artefacts"] = [a.facts() for a in scene.artefacts]
    return slide, entries, facts


def synth_cohort(
    out: Path,
    *,
    n_slides: int = 4,
    width: int = 4000,
    height: int = 3000,
    tumor_fraction: float = 0.5,
    seed: int = 0,
    mpp: float = 0.243,
    downsample: int = 2,
    vendor: str = "generic",
    jpeg_quality: int = 90,
    regions_per_slide: int = 32,
    region_size: int = 768,
    grid: int = 3,
    val_fraction: float = 0.25,
    artefacts: bool = False,
    progress: Callable[[SynthSlide], None] | None = None,
) -> SynthCohort:
    """Write ``n_slides`` synthetic slides, their ground truth and coordinate files under
    ``out``; ``artefacts``: add scan artefacts to every slide; ``progress`` is called with each
    slide once it is written."""
    _validate(
        n_slides,
        width,
        height,
        tumor_fraction,
        mpp,
        downsample,
        vendor,
        jpeg_quality,
        regions_per_slide,
        region_size,
        grid,
        val_fraction,
    )
    params = dict(
        n_slides=n_slides,
        width=width,
        height=height,
        tumor_fraction=tumor_fraction,
        seed=seed,
        mpp=mpp,
        downsample=downsample,
        vendor=vendor,
        jpeg_quality=jpeg_quality,
        regions_per_slide=regions_per_slide,
        region_size=region_size,
        grid=grid,
        val_fraction=val_fraction,
    )
    if artefacts:  # only then: synth.json stays byte-identical without artefacts
        params["artefacts"] = True
    root = Path(out)
    for d in ("images", "annotations", "masks"):
        (root / "training" / d).mkdir(parents=True, exist_ok=True)
    n_tumor = min(n_slides, math.floor(tumor_fraction * n_slides + 0.5))
    names = [f"tumor_{i + 1:03d}" for i in range(n_tumor)]
    names += [f"normal_{i + 1:03d}" for i in range(n_slides - n_tumor)]
    val_set = _validation_slides(n_slides, n_tumor, val_fraction)

    slides: list[SynthSlide] = []
    entries: dict[str, list[dict[str, Any]]] = {"training": [], "validation": []}
    facts = []
    for i, name in enumerate(names):
        split = "validation" if i in val_set else "training"
        slide, slide_entries, slide_facts = _write_one_slide(root, name, i, split, params)
        slides.append(slide)
        entries[split] += slide_entries
        facts.append(slide_facts)
        if progress is not None:
            progress(slide)

    dataset_json, csv_paths = _write_coordinates(root, entries, grid * grid)
    _write_facts(root, params, facts, dataset_json, csv_paths)
    return SynthCohort(root=root, slides=slides, dataset_json=dataset_json, csv_paths=csv_paths)
