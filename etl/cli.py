"""The ETL commands of `patchetl` (synth, inspect, extract, verify, qc).

Thin layer: parse options, call functions that tests call directly, turn known errors
into a clear message and a non-zero exit. Never imports torch.
"""
from __future__ import annotations

import os
from pathlib import Path

import typer

app = typer.Typer(
    name="patchetl",
    help="Whole-slide image ETL into WebDataset shards, and tumor-detector training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 2) -> None:
    """Print an error for the user (no traceback) and exit non-zero."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# --- synth command (owner: synth) ---
@app.command()
def synth(
    out: Path = typer.Option(Path("data/synth"), help="Output folder (MONAI data-root layout)."),
    slides: int = typer.Option(4, "--slides", help="Number of slides."),
    width: int = typer.Option(4000, help="Level-0 width in pixels."),
    height: int = typer.Option(3000, help="Level-0 height in pixels."),
    tumor_fraction: float = typer.Option(0.5, help="Share of slides with tumor lesions."),
    seed: int = typer.Option(0, help="Random seed; same options + seed give identical files."),
    mpp: float = typer.Option(0.243, help="Micrometres per pixel at level 0 (coarser = smaller textures)."),
    downsample: int = typer.Option(2, help="Pyramid downsample per level: 2 or 4."),
    vendor: str = typer.Option("generic", help="generic (tiled TIFF) or aperio (SVS layout, .svs)."),
    quality: int = typer.Option(90, help="JPEG quality of the slide tiles."),
    regions_per_slide: int = typer.Option(32, help="Regions per slide in the coordinate files."),
    region_size: int = typer.Option(768, help="Region side in level-0 pixels."),
    grid: int = typer.Option(3, help="Label grid per region (grid x grid cells)."),
    val_fraction: float = typer.Option(0.25, help="Share of slides in the validation split."),
) -> None:
    """Write synthetic H&E-like slides, tumor annotations and masks, and dataset_0.json / CSVs."""
    from etl.synth.cohort import synth_cohort

    def report(slide) -> None:
        typer.echo(f"  {slide.path.name}: {slide.width}x{slide.height}"
                   f"{'  tumor' if slide.has_tumor else ''}")

    try:
        cohort = synth_cohort(
            out, n_slides=slides, width=width, height=height, tumor_fraction=tumor_fraction,
            seed=seed, mpp=mpp, downsample=downsample, vendor=vendor, jpeg_quality=quality,
            regions_per_slide=regions_per_slide, region_size=region_size, grid=grid,
            val_fraction=val_fraction, progress=report)
    except ValueError as exc:
        fail(str(exc))
    n_tumor = sum(s.has_tumor for s in cohort.slides)
    typer.echo(f"wrote {len(cohort.slides)} slide(s), {n_tumor} with tumor, to "
               f"{cohort.root / 'training' / 'images'}")
    typer.echo(f"coordinates: {cohort.dataset_json} (and {cohort.csv_paths['all'].name}); "
               f"use --data-root {cohort.root}")


# --- inspect command (owner: coords) ---


@app.command("inspect")
def inspect_command(
    json_file: str | None = typer.Option(
        None, "--json", help="MONAI datalist JSON: {split: [{image, location [y, x], label}]}."),
    csv_file: str | None = typer.Option(
        None, "--csv", help="MONAI/NCRF CSV: name,x,y,l0..l8 (x,y = centre)."),
    data_root: str | None = typer.Option(
        None, "--data-root", help="Folder the slide names resolve against (then "
        "<root>/training/images). Default: $PATCHETL_DATA_ROOT, else "
        "/workspace/data/medical/pathology."),
    location_order: str = typer.Option(
        "yx", "--location-order", help="Order of JSON `location`: yx (MONAI) or xy."),
    anchor: str = typer.Option(
        "center", "--anchor", help="center, or corner (top-left; centre = corner + size // 2)."),
    region_size: int = typer.Option(768, "--region-size", help="Region side in level-0 pixels."),
    split: list[str] | None = typer.Option(
        None, "--split", help="JSON: only these splits (repeat). CSV: the file's split name "
        "(default: from the file name, else training)."),
) -> None:
    """Validate a coordinate file and summarise it per split, slide and label.

    Exits 2 when there are errors or missing slides; warnings alone exit 0.
    """
    from etl.extract.coords import inspect_report, parse_coordinates

    if (json_file is None) == (csv_file is None):
        fail("give exactly one of --json FILE or --csv FILE")
    path, fmt = (json_file, "json") if json_file is not None else (csv_file, "csv")
    try:
        table = parse_coordinates(
            str(path), data_root=data_root, location_order=location_order, anchor=anchor,
            region_size=region_size, split=split or None, fmt=fmt)
    except ValueError as exc:  # bad option values
        fail(str(exc))
    typer.echo(inspect_report(table))
    missing = table.slides_missing()
    if table.errors or missing:
        fail(f"{path}: {len(table.errors)} error(s), {len(missing)} missing slide(s) "
             "(listed above)")


# --- extract / verify commands (owner: lead) ---
@app.command()
def extract(
    json_file: Path = typer.Option(None, "--json", help="MONAI datalist JSON (e.g. dataset_0.json)."),
    csv_file: Path = typer.Option(None, "--csv", help="MONAI/NCRF CSV (name,x,y,l0..l8)."),
    out: Path = typer.Option(Path("shards"), help="Output root; each split goes to <out>/<split>/."),
    data_root: Path = typer.Option(None, help="Where slide names resolve (env PATCHETL_DATA_ROOT)."),
    split: list[str] = typer.Option(None, help="Only these splits (repeatable); default: all."),
    region_size: int = typer.Option(768, help="Region side in pixels at --level."),
    level: int = typer.Option(0, help="Pyramid level to read (region stays centred)."),
    image_format: str = typer.Option("jpg", "--format", help="jpg, or png for lossless."),
    quality: int = typer.Option(95, help="JPEG quality."),
    shard_size: int = typer.Option(1000, help="Samples per shard (the last may be shorter)."),
    part_size: int = typer.Option(32, help="Regions per work unit (one slide each)."),
    seed: int = typer.Option(0, help="Seed of the global shuffle that mixes shards."),
    outside: str = typer.Option("error", help="Region not inside its slide: error | skip | pad."),
    workers: int = typer.Option(os.cpu_count() or 1, help="Worker processes."),
    backend: str = typer.Option("loky", help="loky (local processes) or dask."),
    scheduler: str = typer.Option(None, help="dask.distributed scheduler address (--backend dask)."),
    overwrite: bool = typer.Option(False, help="Delete an extraction with other parameters in --out."),
    slide_backend: str = typer.Option("auto", help="auto (direct tile decode, OpenSlide fallback) | tiff | openslide."),
    tile_cache_mb: int = typer.Option(256, help="Decoded-tile cache per worker, MiB."),
    location_order: str = typer.Option("yx", help="Order of `location` in the JSON: yx (MONAI) or xy."),
    anchor: str = typer.Option("center", help="`location` is the region centre or its top-left corner."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Read every region once from its slide and write labelled regions into WebDataset shards."""
    from etl.extract.coords import CoordsError
    from etl.progress import progress_bar
    from etl.extract.run import ExtractError, extract_splits, plan_extraction
    from etl.extract.plan import ExtractParams

    if (json_file is None) == (csv_file is None):
        fail("give exactly one coordinate file: --json FILE or --csv FILE")
    coords = json_file or csv_file
    params = ExtractParams(region_size=region_size, level=level, fmt=image_format,
                           quality=quality, shard_size=shard_size, part_size=part_size,
                           seed=seed, outside=outside)
    parse_options = {"location_order": location_order, "anchor": anchor}
    try:
        table, plans = plan_extraction(coords, params, data_root=data_root, splits=split or None,
                                       slide_backend=slide_backend, **parse_options)
    except (CoordsError, ExtractError, ValueError) as exc:
        fail(str(exc))
    for warning in table.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    bar = progress_bar(unit="regions", enabled=progress)
    try:
        with bar:
            jobs = []
            for plan in plans:
                task = bar.add_task(plan.split, total=plan.n_regions)
                jobs.append((plan, out / plan.split, lambda n, t=task: bar.advance(t, n)))
            results = extract_splits(
                table, jobs, params, parse_options, workers=workers, backend=backend,
                scheduler=scheduler, overwrite=overwrite, slide_backend=slide_backend,
                tile_cache_bytes=tile_cache_mb << 20)
    except ExtractError as exc:
        fail(str(exc))
    failed = 0
    for r in results:
        typer.echo(f"{r.split}: {r.written}/{r.planned} regions in {len(r.shards)} shard(s) at "
                   f"{r.folder}  (skipped {len(r.skipped)}, failed {len(r.failed)}, "
                   f"{r.seconds:.1f} s, {r.rate:.1f} regions/s"
                   + (f", {r.resumed_parts} part(s) resumed" if r.resumed_parts else "") + ")")
        for f in r.failed:
            typer.secho(f"  failed: {f['image']} entry {f['index']} (x={f['x']}, y={f['y']}): "
                        f"{f['reason']}", fg=typer.colors.RED, err=True)
        failed += len(r.failed)
    if failed:
        fail(f"{failed} region(s) could not be read; they are listed in the manifest(s)", code=1)


@app.command()
def verify(
    folder: Path = typer.Argument(..., help="A split folder holding shards and manifest.json."),
    decode: bool = typer.Option(True, help="Decode every image (slower, thorough)."),
) -> None:
    """Check every shard against the manifest: counts, sha256, images decode, label grids."""
    from etl.extract.shards import verify_folder

    problems = verify_folder(folder, decode=decode)
    for p in problems:
        typer.secho(p, fg=typer.colors.RED, err=True)
    if problems:
        fail(f"{len(problems)} problem(s) in {folder}", code=1)
    typer.echo(f"{folder}: OK, every shard matches manifest.json")


# --- qc command (owner: infer) ---
@app.command()
def qc(
    json_file: Path = typer.Option(None, "--json", help="MONAI datalist JSON (e.g. dataset_0.json)."),
    csv_file: Path = typer.Option(None, "--csv", help="MONAI/NCRF CSV (name,x,y,l0..l8)."),
    data_root: Path = typer.Option(None, help="Where slide names resolve (env PATCHETL_DATA_ROOT)."),
    out: Path = typer.Option(Path("runs/qc"), help="Output folder: <slide>.qc.png per slide."),
    split: list[str] = typer.Option(None, help="Only these splits (repeatable); default: all."),
    region_size: int = typer.Option(768, help="Region side in level-0 pixels."),
    max_side: int = typer.Option(2048, help="Longest side of each thumbnail, px."),
    tissue_downsample: float = typer.Option(32.0, help="Tissue mask resolution (level-0 px per "
                                            "mask pixel)."),
    location_order: str = typer.Option("yx", help="Order of `location` in the JSON: yx or xy."),
    anchor: str = typer.Option("center", help="`location` is the region centre or its corner."),
    slide_backend: str = typer.Option("auto", help="auto | tiff | openslide."),
) -> None:
    """Thumbnails of each slide with its regions drawn (coloured by label) and the tissue outline."""
    from etl.extract.coords import CoordsError, load_regions
    from etl.qc import qc_table

    if (json_file is None) == (csv_file is None):
        fail("give exactly one coordinate file: --json FILE or --csv FILE")
    try:
        table = load_regions(json_file or csv_file, data_root=data_root, split=split or None,
                             region_size=region_size, location_order=location_order,
                             anchor=anchor)
    except (CoordsError, ValueError) as exc:
        fail(str(exc))
    results = qc_table(table, out, region_size=region_size, max_side=max_side,
                       tissue_downsample=tissue_downsample, slide_backend=slide_backend)
    for r in results:
        if r.error:
            typer.secho(f"error: {r.error}", fg=typer.colors.RED, err=True)
            continue
        typer.echo(f"{r.png}: {r.regions} region(s) ({r.counts['normal']} normal, "
                   f"{r.counts['mixed']} mixed, {r.counts['tumor']} tumor); "
                   f"{r.off_tissue} centre(s) off tissue, {r.outside} not inside the slide")
    failed = [r for r in results if r.error]
    if failed:
        fail(f"{len(failed)} of {len(results)} slide(s) could not be read (listed above)", code=1)


def main() -> None:  # pragma: no cover - console entry point when torch is absent
    app()
