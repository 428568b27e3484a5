"""Options of the ETL commands (synth, inspect, extract, verify, qc, evaluate), each with its
default and help defined once, here (the CLI is derived from them; `etl.options`).

`CoordsOptions` is the coordinate-file group shared by inspect, extract and qc. What decides
the content of shards is `etl.extract.plan.ExtractParams` (the fingerprint a resume compares);
`ExtractRunOptions` holds how an extraction runs, which never changes its output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from etl.errors import OptionError
from etl.options import arg, opt

CPUS = os.cpu_count() or 1

SlideBackend = Annotated[
    str, opt("auto (direct tile decode, OpenSlide fallback) | tiff | openslide.")
]
Progress = Annotated[bool, opt("Show a progress bar.")]


@dataclass
class CoordsOptions:
    """Which coordinate file to read, and how its locations are meant."""

    json_file: Annotated[
        Path | None,
        opt("MONAI datalist JSON: {split: [{image, location \\[y, x], label}]}.", "--json"),
    ] = None
    csv_file: Annotated[
        Path | None, opt("MONAI/NCRF CSV: name,x,y,l0..l8 (x,y = centre).", "--csv")
    ] = None
    data_root: Annotated[
        Path | None,
        opt(
            "Folder the slide names resolve against (then <root>/training/images). Default: "
            "$PATCHETL_DATA_ROOT, else /workspace/data/medical/pathology."
        ),
    ] = None
    split: Annotated[
        list[str],
        opt(
            "JSON: only these splits (repeat; default: all). CSV: the file's split name (default: "
            "from the file name, else training)."
        ),
    ] = field(default_factory=list)
    location_order: Annotated[str, opt("Order of JSON `location`: yx (MONAI) or xy.")] = "yx"
    anchor: Annotated[str, opt("center, or corner (top-left; centre = corner + size // 2).")] = (
        "center"
    )
    region_size: Annotated[int, opt("Region side in pixels (extract: at --level).")] = 768

    def validate(self) -> None:
        if (self.json_file is None) == (self.csv_file is None):
            raise OptionError("give exactly one of --json FILE or --csv FILE")

    @property
    def path(self) -> Path:
        """The coordinate file."""
        path = self.json_file or self.csv_file
        assert path is not None, "validate() first"
        return path

    @property
    def fmt(self) -> str:
        return "json" if self.json_file is not None else "csv"

    @property
    def splits(self) -> list[str] | None:
        """The splits asked for; None: all."""
        return self.split or None

    def parse_options(self) -> dict[str, Any]:
        """Keyword arguments of `parse_coordinates` / `load_regions` for this file."""
        return {
            "data_root": self.data_root,
            "location_order": self.location_order,
            "anchor": self.anchor,
            "region_size": self.region_size,
            "split": self.splits,
            "fmt": self.fmt,
        }


@dataclass
class ExtractRunOptions:
    """How an extraction runs: none of these change the shards."""

    out: Annotated[Path, opt("Output root; each split goes to <out>/<split>/.")] = Path("shards")
    workers: Annotated[int, opt("Worker processes.")] = CPUS
    backend: Annotated[str, opt("loky (local processes) or dask.")] = "loky"
    scheduler: Annotated[
        str | None, opt("dask.distributed scheduler address (--backend dask).")
    ] = None
    overwrite: Annotated[bool, opt("Delete an extraction with other parameters in --out.")] = False
    slide_backend: SlideBackend = "auto"
    tile_cache_mb: Annotated[int, opt("Decoded-tile cache per worker, MiB.")] = 256
    progress: Progress = True


@dataclass
class VerifyOptions:
    folder: Annotated[Path, arg("A split folder holding shards and manifest.json.")]
    decode: Annotated[bool, opt("Decode every image (slower, thorough).")] = True


@dataclass
class QcOptions:
    out: Annotated[Path, opt("Output folder: <slide>.qc.png per slide.")] = Path("runs/qc")
    max_side: Annotated[int, opt("Longest side of each thumbnail, px.")] = 2048
    tissue_downsample: Annotated[
        float, opt("Tissue mask resolution (level-0 px per mask pixel).")
    ] = 32.0
    slide_backend: SlideBackend = "auto"


@dataclass
class EvaluateOptions:
    """The lesion FROC and slide AUC of `evaluate` (its patch-level part needs torch)."""

    pred: Annotated[
        str,
        opt(
            "Inference output folder: <name>.candidates.csv (+ <name>.prob.npy/.prob.json); its "
            "slides are the ones evaluated."
        ),
    ] = "runs/infer"
    truth: Annotated[
        list[str],
        opt(
            "Ground-truth folder(s) of <name>.xml (ASAP) or <name>_mask.tif; repeat for several. A "
            "slide without a file is a normal slide."
        ),
    ] = field(default_factory=lambda: ["data/synth/training/annotations"])
    slides: Annotated[
        str | None,
        opt("Folder of the slides (level-0 size and mpp); default: the .prob.json sidecars."),
    ] = None
    mpp: Annotated[
        float | None,
        opt("Level-0 micrometres per pixel for every slide (overrides the slides' own)."),
    ] = None
    froc_method: Annotated[
        str,
        opt(
            "Sensitivity at the 6 FP rates: interp (np.interp, as NCRF/MONAI) or step (the later "
            "official script's bisect lookup)."
        ),
    ] = "interp"
    mask_tumor_value: Annotated[
        int | None,
        opt("Tumor value in mask TIFFs (default: the non-zero value of 0/1 or 0/255 masks)."),
    ] = None
    out: Annotated[str, opt("Writes evaluation.json and froc.png here.")] = "runs/eval"


@dataclass
class SynthOptions:
    """`etl.synth.cohort.synth_cohort`'s settings; it checks them (names in its messages)."""

    out: Annotated[Path, opt("Output folder (MONAI data-root layout).")] = Path("data/synth")
    n_slides: Annotated[int, opt("Number of slides.", "--slides")] = 4
    width: Annotated[int, opt("Level-0 width in pixels.")] = 4000
    height: Annotated[int, opt("Level-0 height in pixels.")] = 3000
    tumor_fraction: Annotated[float, opt("Share of slides with tumor lesions.")] = 0.5
    seed: Annotated[int, opt("Random seed; same options + seed give identical files.")] = 0
    mpp: Annotated[float, opt("Micrometres per pixel at level 0 (coarser = smaller textures).")] = (
        0.243
    )
    downsample: Annotated[int, opt("Pyramid downsample per level: 2 or 4.")] = 2
    vendor: Annotated[str, opt("generic (tiled TIFF) or aperio (SVS layout, .svs).")] = "generic"
    jpeg_quality: Annotated[int, opt("JPEG quality of the slide tiles.", "--quality")] = 90
    regions_per_slide: Annotated[int, opt("Regions per slide in the coordinate files.")] = 32
    region_size: Annotated[int, opt("Region side in level-0 pixels.")] = 768
    grid: Annotated[int, opt("Label grid per region (grid x grid cells).")] = 3
    val_fraction: Annotated[float, opt("Share of slides in the validation split.")] = 0.25
