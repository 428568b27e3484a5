"""The ETL commands of `patchetl` (synth, coords, inspect, extract, verify, qc).

Thin layer: options come from the config dataclasses (`etl.command` derives them), each
command calls functions that tests call directly and prints their results. Never imports
torch; the work modules load inside each command, so `--help` stays fast.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from etl.command import command, fail
from etl.config import (
    CohortOptions,
    CoordsOptions,
    ExtractRunOptions,
    QcOptions,
    SamplingOptions,
    SynthOptions,
    VerifyOptions,
)
from etl.extract.plan import ExtractParams

if TYPE_CHECKING:
    from collections.abc import Callable

    from etl.extract.plan import SplitPlan
    from etl.extract.run import SplitResult
    from etl.synth.cohort import SynthSlide

app = typer.Typer(
    name="patchetl",
    help="Whole-slide image ETL into WebDataset shards, and tumor-detector training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def warn(message: str) -> None:
    typer.secho(message, fg=typer.colors.YELLOW, err=True)


@command(app)
def synth(opts: SynthOptions) -> None:
    """Write synthetic H&E-like slides, tumor annotations and masks, and dataset_0.json / CSVs."""
    from etl.synth.cohort import synth_cohort

    def report(slide: SynthSlide) -> None:
        typer.echo(
            f"  {slide.path.name}: {slide.width}x{slide.height}"
            f"{'  tumor' if slide.has_tumor else ''}"
        )

    cohort = synth_cohort(
        opts.out,
        n_slides=opts.n_slides,
        width=opts.width,
        height=opts.height,
        tumor_fraction=opts.tumor_fraction,
        seed=opts.seed,
        mpp=opts.mpp,
        downsample=opts.downsample,
        vendor=opts.vendor,
        jpeg_quality=opts.jpeg_quality,
        regions_per_slide=opts.regions_per_slide,
        region_size=opts.region_size,
        grid=opts.grid,
        val_fraction=opts.val_fraction,
        artefacts=opts.artefacts,
        progress=report,
    )
    n_tumor = sum(s.has_tumor for s in cohort.slides)
    typer.echo(
        f"wrote {len(cohort.slides)} slide(s), {n_tumor} with tumor, to "
        f"{cohort.root / 'training' / 'images'}"
    )
    typer.echo(
        f"coordinates: {cohort.dataset_json} (and {cohort.csv_paths['all'].name}); "
        f"use --data-root {cohort.root}"
    )


@command(app)
def coords(cohort: CohortOptions, sampling: SamplingOptions) -> None:
    """Make a coordinate file (MONAI datalist, CSVs, summary) from slides and their annotations.

    Exits 2 listing every problem of the inputs (--strict: warnings too); writes nothing then.
    """
    from etl.cohort.run import make_coords
    from etl.cohort.writers import summary_table
    from etl.progress import progress_bar

    bar = progress_bar(unit="slides", enabled=cohort.progress, transient=True)
    with bar:
        task = bar.add_task("coords", total=None)
        result = make_coords(
            cohort,
            sampling,
            on_slide=lambda _: bar.advance(task),
            on_start=lambda n: bar.update(task, total=n),
        )
    typer.echo(summary_table(result.summary["slides"]))
    for warning in result.warnings:
        warn(f"warning: {warning}")
    totals = result.summary["totals"]
    splits = ", ".join(
        f"{name} {row['regions']} ({row['slides']} slides)"
        for name, row in totals["splits"].items()
    )
    typer.echo(
        f"wrote {result.paths.datalist}: {totals['regions']} regions, {totals['tumor_regions']} "
        f"centred in tumor; {splits}"
    )
    typer.echo(
        f"also {', '.join(p.name for p in result.paths.csvs.values())} and "
        f"{result.paths.summary.name}; extract with --data-root {cohort.slides}"
    )


@command(app, "inspect")
def inspect_command(coords: CoordsOptions) -> None:
    """Validate a coordinate file and summarise it per split, slide and label.

    Every slide found is opened as extract's preflight opens it. Exits 2 when there are
    errors, missing or unreadable slides; warnings alone exit 0.
    """
    from etl.extract.coords import inspect_report, parse_coordinates
    from etl.extract.plan import inspect_slides
    from etl.wsi.reader import open_slide

    table = parse_coordinates(coords.path, **coords.parse_options())
    infos = inspect_slides({r.slide for r in table.regions if r.exists}, open_slide)
    unreadable = {path: info.error for path, info in infos.items() if info.error}
    typer.echo(inspect_report(table, unreadable))
    missing = table.slides_missing()
    if table.errors or missing or unreadable:
        fail(
            f"{coords.path}: {len(table.errors)} error(s), {len(missing)} missing slide(s), "
            f"{len(unreadable)} unreadable slide(s) (listed above)"
        )


@command(app)
def extract(coords: CoordsOptions, params: ExtractParams, run: ExtractRunOptions) -> None:
    """Read every region once from its slide and write labelled regions into WebDataset shards."""
    from etl.atomic import output_folder
    from etl.extract.publish import check_target, stage_folder
    from etl.extract.run import extract_splits, plan_extraction
    from etl.progress import progress_bar
    from etl.storage import is_url

    parse_options = {"location_order": coords.location_order, "anchor": coords.anchor}
    table, plans = plan_extraction(
        coords.path,
        params,
        data_root=coords.data_root,
        splits=coords.splits,
        slide_backend=run.slide_backend,
        **parse_options,
    )
    for warning in table.warnings:
        warn(f"warning: {warning}")
    remote = is_url(run.out)  # s3://: extract into the stage, then publish (etl.extract.publish)
    root = stage_folder(run.out, run.stage) if remote else Path(run.out)
    if remote:
        check_target(run.out)  # the bucket and credentials, before any region is read
    # after preflight (which writes nothing), before any region is read
    output_folder(root, "--stage" if remote else "--out")
    bar = progress_bar(unit="regions", enabled=run.progress)
    with bar:
        jobs: list[tuple[SplitPlan, Path, Callable[[int], None]]] = [
            (
                plan,
                root / plan.split,
                partial(bar.advance, bar.add_task(plan.split, total=plan.n_regions)),
            )
            for plan in plans
        ]
        results = extract_splits(
            table,
            jobs,
            params,
            parse_options,
            workers=run.workers,
            backend=run.backend,
            scheduler=run.scheduler,
            overwrite=run.overwrite,
            slide_backend=run.slide_backend,
            tile_cache_bytes=run.tile_cache_mb << 20,
            check_sha256=run.check_sha256,
            ship_parts=remote and run.backend == "dask",  # workers need no shared folder
        )
    for r in results:
        _echo_split(r)
    if remote:
        _publish(results, run.out, run.overwrite)
    failed = sum(len(r.failed) for r in results)
    if failed:
        fail(f"{failed} region(s) could not be read; they are listed in the manifest(s)", code=1)


def _publish(results: list[SplitResult], out: str, overwrite: bool) -> None:
    """Upload each finished split to <out>/<split>/, its manifest last."""
    from etl.extract.publish import publish_split
    from etl.storage import join, redact

    for r in results:
        p = publish_split(r.folder, join(out, r.split), overwrite=overwrite)
        deleted = f", {len(p.deleted)} stale deleted" if p.deleted else ""
        manifest = "manifest.json uploaded" if p.manifest_uploaded else "manifest.json unchanged"
        typer.echo(
            f"{r.split}: published to {redact(p.url)}: {len(p.uploaded)} shard(s) uploaded, "
            f"{len(p.skipped)} already there{deleted}; {manifest} ({p.seconds:.1f} s)"
        )


def _echo_split(r: SplitResult) -> None:
    resumed = f", {r.resumed_parts} part(s) resumed" if r.resumed_parts else ""
    typer.echo(
        f"{r.split}: {r.written}/{r.planned} regions in {len(r.shards)} shard(s) at "
        f"{r.folder}  (skipped {len(r.skipped)}, failed {len(r.failed)}, "
        f"{r.seconds:.1f} s, {r.rate:.1f} regions/s{resumed})"
    )
    for name, why in r.repaired.items():
        typer.echo(f"  repaired {name} ({why}): rebuilt byte-identical to manifest.json")
    for message in r.warnings:
        warn(f"warning: {message}")
    for f in r.failed:
        typer.secho(
            f"  failed: {f['image']} entry {f['index']} (x={f['x']}, y={f['y']}): {f['reason']}",
            fg=typer.colors.RED,
            err=True,
        )


@command(app)
def verify(opts: VerifyOptions) -> None:
    """Check every shard against the manifest: counts, sha256, images decode, label grids."""
    from etl.extract.shards import verify_folder

    problems = verify_folder(opts.folder, decode=opts.decode)
    for p in problems:
        typer.secho(p, fg=typer.colors.RED, err=True)
    if problems:
        fail(f"{len(problems)} problem(s) in {opts.folder}", code=1)
    typer.echo(f"{opts.folder}: OK, every shard matches manifest.json")


@command(app)
def qc(coords: CoordsOptions, opts: QcOptions) -> None:
    """Thumbnails of each slide with its regions drawn (coloured by label) and tissue outline."""
    from etl.atomic import output_folder
    from etl.extract.coords import load_regions
    from etl.qc import qc_table

    output_folder(opts.out)  # a file or an unwritable folder stops here, before any work
    table = load_regions(coords.path, **coords.parse_options())
    results = qc_table(
        table,
        opts.out,
        region_size=coords.region_size,
        max_side=opts.max_side,
        tissue_downsample=opts.tissue_downsample,
        slide_backend=opts.slide_backend,
    )
    for r in results:
        if r.error:
            typer.secho(f"error: {r.error}", fg=typer.colors.RED, err=True)
            continue
        typer.echo(
            f"{r.png}: {r.regions} region(s) ({r.counts['normal']} normal, "
            f"{r.counts['mixed']} mixed, {r.counts['tumor']} tumor); "
            f"{r.off_tissue} centre(s) off tissue, {r.outside} not inside the slide"
        )
    failed = [r for r in results if r.error]
    if failed:
        fail(f"{len(failed)} of {len(results)} slide(s) could not be read (listed above)", code=1)


def main() -> None:  # pragma: no cover - console entry point when torch is absent
    app()
