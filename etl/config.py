"""Options of the ETL commands (synth, inspect, extract, verify, qc, evaluate), each with its
default and help defined once, here (the CLI is derived from them; `etl.options`).

`CoordsOptions` is the coordinate-file group shared by inspect, extract and qc. What decides
the content of shards is `etl.extract.plan.ExtractParams` (the fingerprint a resume compares);
`ExtractRunOptions` holds how an extraction runs, which never changes its output.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from etl.errors import OptionError
from etl.options import arg, opt
from etl.storage import check_url, is_url, redact, scheme

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
    region_size: Annotated[int, opt("Region side in pixels (extract: at --level or --mpp).")] = 768

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

    out: Annotated[
        str,
        opt(
            "Output root: a folder (each split in <out>/<split>/), or s3://bucket/prefix: "
            "extract into --stage, then upload each finished split to <prefix>/<split>/, its "
            "manifest.json last (credentials from the AWS environment only)."
        ),
    ] = "shards"
    stage: Annotated[
        Path | None,
        opt(
            "Local folder extraction writes into before uploading (--out s3://...); default: "
            "<system temp>/patchetl-stage/<hash of --out>, so a rerun resumes there. Only this "
            "machine writes it: dask workers send their parts back."
        ),
    ] = None
    workers: Annotated[int, opt("Worker processes.")] = CPUS
    backend: Annotated[str, opt("loky (local processes) or dask.")] = "loky"
    scheduler: Annotated[
        str | None, opt("dask.distributed scheduler address (--backend dask).")
    ] = None
    overwrite: Annotated[bool, opt("Delete an extraction with other parameters in --out.")] = False
    slide_backend: SlideBackend = "auto"
    tile_cache_mb: Annotated[int, opt("Decoded-tile cache per worker, MiB.")] = 256
    check_sha256: Annotated[
        bool,
        opt(
            "A rerun on a finished split hashes its shards against manifest.json before calling "
            "it done (sizes are always checked); a damaged or missing shard is rebuilt."
        ),
    ] = True
    progress: Progress = True

    def validate(self) -> None:
        if self.workers < 1:
            raise OptionError(f"--workers {self.workers}: use at least 1 worker process")
        if self.tile_cache_mb < 0:
            raise OptionError(f"--tile-cache-mb {self.tile_cache_mb}: use 0 or more MiB")
        if self.backend not in ("loky", "dask"):
            raise OptionError(f"--backend {self.backend!r}: use loky or dask")
        if is_url(self.out):
            check_url(self.out)
            if scheme(self.out) != "s3":
                raise OptionError(
                    f"--out {redact(self.out)}: extract publishes to s3://bucket/prefix only; "
                    "give an s3:// prefix or a local folder"
                )
        elif self.stage is not None:
            raise OptionError("--stage is only for --out s3://...; drop it or give an s3:// --out")


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
            "FROC curve and score: camelyon16 (bit-identical to the challenge's "
            "Evaluation_FROC.py as NCRF ran it: float32 hits, lowest threshold dropped), interp "
            "(float64, only 0 dropped; np.interp) or step (interp's curve, the later official "
            "script's bisect lookup)."
        ),
    ] = "camelyon16"
    mask_tumor_value: Annotated[
        int | None,
        opt("Tumor value in mask TIFFs (default: the non-zero value of 0/1 or 0/255 masks)."),
    ] = None
    allow_missing: Annotated[
        bool,
        opt(
            "Score only the slides with predictions when slides of --truth or --slides have "
            "none (listed as a warning); default: refuse.",
            "--allow-missing",
        ),
    ] = False
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
    artefacts: Annotated[
        bool,
        opt(
            "Add scan artefacts: pen marks (blue, green, black ink), black scan borders, dust "
            "on glass, air bubbles; listed per slide in synth.json, never under a region centre.",
            "--artefacts",
        ),
    ] = False


@dataclass
class CohortOptions:
    """`patchetl coords`: which slides and annotations, where the coordinate files go, the split,
    and how it runs (`etl.cohort`)."""

    slides: Annotated[Path, opt("Folder of the slides (files with a slide suffix).")]
    annotations: Annotated[
        Path | None,
        opt(
            "Folder of annotations matched to slides by name: <slide>.xml (ASAP), "
            "<slide>.geojson (QuPath), <slide>_mask.tif (tumor mask). Default: none (every slide "
            "tumor-free)."
        ),
    ] = None
    out: Annotated[
        Path,
        opt("MONAI datalist to write; <stem>_<split>.csv and <stem>.summary.json go next to it."),
    ] = Path("dataset_0.json")
    tumor_class: Annotated[
        list[str], opt("QuPath class(es) that are tumor (glob pattern; repeat).")
    ] = field(default_factory=lambda: ["Tumor"])
    exclude_class: Annotated[
        list[str], opt("QuPath class(es) never sampled (glob pattern; repeat).")
    ] = field(default_factory=lambda: ["Ignore*"])
    unannotated: Annotated[
        str, opt("A slide without an annotation file: normal (tumor-free) or skip.")
    ] = "normal"
    val_fraction: Annotated[float, opt("Share of slides (patients) in the validation split.")] = (
        0.25
    )
    test_fraction: Annotated[float, opt("Share of slides (patients) in a testing split.")] = 0.0
    patients: Annotated[
        Path | None, opt("CSV slide,patient: a patient's slides stay in one split.")
    ] = None
    seed: Annotated[int, opt("Random seed; same inputs + options + seed give identical files.")] = 0
    workers: Annotated[int, opt("Worker processes (slides run in parallel).")] = CPUS
    strict: Annotated[bool, opt("Treat warnings as errors.")] = False
    slide_backend: SlideBackend = "auto"
    progress: Progress = True

    def validate(self) -> None:
        problems = []
        if self.unannotated not in ("normal", "skip"):
            problems.append(f"--unannotated {self.unannotated!r}: use normal or skip")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1):
            problems.append("--val-fraction and --test-fraction: use shares in [0, 1)")
        elif self.val_fraction + self.test_fraction >= 1:
            problems.append(
                f"--val-fraction {self.val_fraction} + --test-fraction {self.test_fraction} "
                "leave no training slides: keep their sum below 1"
            )
        if self.workers < 1:
            problems.append(f"--workers {self.workers}: use at least 1")
        if problems:
            raise OptionError("; ".join(problems))


@dataclass
class SamplingOptions:
    """`patchetl coords`: where regions go and how their cells are labelled (level-0 pixels;
    with `--mpp`, lengths are pixels at that scale: `etl.cohort.geometry.Footprint`)."""

    mode: Annotated[
        str,
        opt(
            "sample: up to N regions centred in tumor and M in other tissue per slide (NCRF); "
            "grid: every region of a regular grid over tissue."
        ),
    ] = "sample"
    region_size: Annotated[int, opt("Region side in level-0 pixels (with --mpp: px at --mpp).")] = (
        768
    )
    grid: Annotated[int, opt("Label grid per region (grid x grid cells).")] = 3
    tumor_per_slide: Annotated[
        int, opt("sample: regions centred in tumor per slide (at most).")
    ] = 100
    normal_per_slide: Annotated[
        int, opt("sample: regions centred in tissue outside tumor per slide (at most).")
    ] = 100
    tumor_share: Annotated[
        float | None,
        opt(
            "sample: share of tumor-centred regions in the output (e.g. 0.5); the larger class is "
            "cut down at random. Default: as sampled."
        ),
    ] = None
    max_regions: Annotated[
        int, opt("sample: at most this many regions in all, classes cut alike (0: no limit).")
    ] = 0
    margin: Annotated[
        int,
        opt("sample: normal centres lie at least this far from tumor (level-0 px; or at --mpp)."),
    ] = 0
    min_spacing: Annotated[
        int, opt("sample: least distance between two centres of a slide (level-0 px; or at --mpp).")
    ] = 128
    min_tissue: Annotated[
        float, opt("Least tissue share of a region (tissue mask); 0: any tissue.")
    ] = 0.25
    stride: Annotated[
        int | None,
        opt("grid: step between centres (level-0 px, or at --mpp; default: the region size)."),
    ] = None
    label_rule: Annotated[
        str,
        opt(
            "Cell label: center (1 when the cell centre is in tumor, as NCRF/MONAI) or fraction "
            "(1 when the tumor share of the cell is >= --label-threshold)."
        ),
    ] = "center"
    label_threshold: Annotated[float, opt("fraction rule: least tumor share of a cell.")] = 0.5
    tissue_downsample: Annotated[
        int, opt("Tissue mask resolution (level-0 px per mask pixel; or px at --mpp).")
    ] = 32
    mpp: Annotated[
        float | None,
        opt(
            "Regions at this physical scale, um/px (e.g. 0.5), as extract --mpp reads them: "
            "--region-size, --margin, --min-spacing, --stride and --tissue-downsample are px at "
            "this scale (region_size * mpp / slide mpp level-0 px). Default: level-0 px."
        ),
    ] = None
    assume_mpp: Annotated[
        float | None,
        opt("With --mpp: level-0 um/px of the slides that record none (others keep their own)."),
    ] = None

    def validate(self) -> None:
        problems = []
        if self.mode not in ("sample", "grid"):
            problems.append(f"--mode {self.mode!r}: use sample or grid")
        if self.grid < 1 or self.region_size < self.grid or self.region_size % self.grid:
            problems.append(
                f"--region-size {self.region_size} is not a positive multiple of --grid "
                f"{self.grid}: use e.g. --region-size 768 --grid 3"
            )
        if min(self.tumor_per_slide, self.normal_per_slide, self.max_regions, self.margin) < 0:
            problems.append("counts, --max-regions and --margin: use values >= 0")
        if self.min_spacing < 0 or (self.stride is not None and self.stride < 1):
            problems.append("--min-spacing >= 0 and --stride >= 1, please")
        if self.tumor_share is not None and not 0 < self.tumor_share < 1:
            problems.append(f"--tumor-share {self.tumor_share}: use a share in (0, 1)")
        if self.mode == "grid" and (self.tumor_share is not None or self.max_regions):
            problems.append("--tumor-share and --max-regions apply to --mode sample only")
        if self.mode == "sample" and self.stride is not None:
            problems.append("--stride applies to --mode grid only")
        if not 0 <= self.min_tissue <= 1:
            problems.append(f"--min-tissue {self.min_tissue}: use a share in [0, 1]")
        if self.label_rule not in ("center", "fraction"):
            problems.append(f"--label-rule {self.label_rule!r}: use center or fraction")
        if not 0 < self.label_threshold <= 1:
            problems.append(f"--label-threshold {self.label_threshold}: use a share in (0, 1]")
        if self.tissue_downsample < 1:
            problems.append(f"--tissue-downsample {self.tissue_downsample}: use at least 1")
        for name, value in (("--mpp", self.mpp), ("--assume-mpp", self.assume_mpp)):
            if value is not None and not (math.isfinite(value) and value > 0):
                problems.append(f"{name} {value}: give a pixel size in um/px, > 0 (e.g. 0.5)")
        if self.assume_mpp is not None and self.mpp is None:
            problems.append("--assume-mpp applies only with --mpp: add --mpp or drop it")
        if problems:
            raise OptionError("; ".join(problems))

    @property
    def grid_stride(self) -> int:
        """The grid mode's step between centres."""
        return self.stride or self.region_size
