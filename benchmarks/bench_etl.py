"""ETL benchmark: regions/s of the naive per-region OpenSlide ETL vs `patchetl extract`.

(a) naive: OpenSlide `read_region` per region in dataset order, same JPEG encoding, shards
    written with webdataset's ShardWriter, one process (the seed's read pattern, offline);
(b) `patchetl extract` with 1 worker;  (c) with 2 workers.
Same synthetic slides, same coordinates, 768 px regions, JPEG 95. Medians of --repeats runs.

    python benchmarks/bench_etl.py --out benchmarks/results/etl.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import openslide

from benchmarks.common import cli, machine, median, table, write_section
from etl.extract.encode import encode_region
from etl.extract.plan import ExtractParams
from etl.extract.run import extract_splits, plan_extraction
from etl.extract.shards import SampleTarWriter
from etl.wsi.reader import read_region_openslide_rgb
from etl.wsi.scale import region_box

REGION = 768


def naive_etl(table_, out: Path, quality: int, shard_size: int) -> int:
    """The baseline: one OpenSlide handle per slide, regions in file order, one process,
    the same JPEG encoder and tar writer, shards of `shard_size` samples."""
    out.mkdir(parents=True)
    handles: dict = {}
    for start in range(0, len(table_.regions), shard_size):
        with open(out / f"naive-{start // shard_size:06d}.tar", "wb") as fh:
            sink = SampleTarWriter(fh)
            for r in table_.regions[start : start + shard_size]:
                slide = handles.get(r.slide) or handles.setdefault(
                    r.slide, openslide.OpenSlide(str(r.slide))
                )
                x0, y0, _ = region_box(r.x, r.y, REGION)
                rgb = read_region_openslide_rgb(slide, x0, y0, 0, REGION, REGION)
                meta = {"labels": [list(row) for row in r.labels]}
                sink.write(
                    f"{r.slide.stem}_x{r.x}_y{r.y}",
                    {"jpg": encode_region(rgb, "jpg", quality), "json": json.dumps(meta).encode()},
                )
            sink.close()
    for h in handles.values():
        h.close()
    return len(table_.regions)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/etl.md"))
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--width", type=int, default=8000)
    ap.add_argument("--height", type=int, default=6000)
    ap.add_argument("--regions-per-slide", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quality", type=int, default=95)
    return ap.parse_args(argv)


def synthesise(data: Path, args: argparse.Namespace) -> None:
    """The benchmark's slides, in a child process so its memory does not count as the
    extractor's."""
    cli(
        "synth",
        "--out",
        data,
        "--slides",
        args.slides,
        "--width",
        args.width,
        "--height",
        args.height,
        "--seed",
        7,
        "--regions-per-slide",
        args.regions_per_slide,
        "--region-size",
        REGION,
    )


def measure(
    table_, plans, params: ExtractParams, work: Path, repeats: int, quality: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]], dict[str, float]]:
    """`repeats` interleaved runs of the three variants: regions/s of every run, and of the
    last run of (b) and (c) the share of worker time per stage and the peak RSS per worker."""
    n_regions = len(table_.regions)
    runs: dict[str, list[float]] = {"naive": [], "w1": [], "w2": []}
    shares, rss = {}, {}
    for rep in range(repeats):
        # Interleave the variants so machine noise hits them alike.
        t0 = time.perf_counter()
        assert naive_etl(table_, work / f"naive{rep}", quality, params.shard_size) == n_regions
        runs["naive"].append(n_regions / (time.perf_counter() - t0))
        for name, workers in (("w1", 1), ("w2", 2)):
            t0 = time.perf_counter()
            results = extract_splits(
                table_,
                [(plan, work / f"{name}-{rep}" / plan.split, lambda n: None) for plan in plans],
                params,
                {},
                workers=workers,
            )
            elapsed = time.perf_counter() - t0
            assert sum(r.written for r in results) == n_regions
            runs[name].append(n_regions / elapsed)
            timing: dict[str, float] = {}
            for r in results:
                for k, v in r.timing.items():
                    timing[k] = timing.get(k, 0.0) + v
            busy = sum(timing.values())
            shares[name] = {k: v / busy for k, v in timing.items()}
            rss[name] = max(r.peak_rss_mb for r in results)
        for rep_dir in work.glob(f"*{rep}"):
            shutil.rmtree(rep_dir, ignore_errors=True)
    return runs, shares, rss


def render(
    args: argparse.Namespace,
    n_regions: int,
    runs: dict[str, list[float]],
    shares: dict[str, dict[str, float]],
    rss: dict[str, float],
) -> str:
    """The markdown section."""
    naive, w1, w2 = (median(runs[k]) for k in ("naive", "w1", "w2"))
    # Ratios are medians of the per-repeat ratios: each repeat runs the variants back to
    # back, so a slow spell of this shared machine hits both sides of a ratio alike.
    r_b = median([b / a for a, b in zip(runs["naive"], runs["w1"], strict=True)])
    r_c = median([c / b for b, c in zip(runs["w1"], runs["w2"], strict=True)])
    rows = [
        [
            "(a) naive: OpenSlide read_region per region, 1 process",
            f"{naive:.1f}",
            "1.00x",
            "baseline",
        ],
        ["(b) patchetl extract --workers 1", f"{w1:.1f}", f"{r_b:.2f}x vs (a)", ">= 3x (a)"],
        ["(c) patchetl extract --workers 2", f"{w2:.1f}", f"{r_c:.2f}x vs (b)", ">= 1.7x (b)"],
    ]
    share_rows = [
        [
            name,
            *(f"{100 * s.get(k, 0):.0f}%" for k in ("read", "encode", "write")),
            f"{rss[name]:.0f} MiB",
        ]
        for name, s in shares.items()
    ]
    return "\n\n".join(
        [
            "## ETL: regions/s (issue 3)",
            "Command: `python benchmarks/bench_etl.py` (run by `make bench`). "
            f"Machine: {machine()}.",
            f"Data: {args.slides} synthetic slides of {args.width} x {args.height} "
            "(JPEG tiles 256), "
            f"{n_regions} regions of {REGION} px, JPEG quality {args.quality}; medians of "
            f"{args.repeats} interleaved runs, ratios = medians of per-run ratios (all runs: "
            + ", ".join(f"{k} {[round(v, 1) for v in vs]}" for k, vs in runs.items())
            + ").",
            table(["variant", "regions/s (median)", "ratio", "target"], rows),
            "Share of worker time per stage (read = slide read incl. tile decode; "
            "encode = JPEG; "
            "write = tar member), and peak RSS per worker process:",
            table(["run", "read", "encode", "write", "peak RSS/worker"], share_rows),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_etl_"))
    try:
        data = work / "data"
        synthesise(data, args)
        params = ExtractParams(region_size=REGION, quality=args.quality, shard_size=100)
        table_, plans = plan_extraction(data / "dataset_0.json", params, data_root=data)
        # Warm up the process pool once (worker start-up is paid once per command, not per run).
        extract_splits(
            table_,
            [(plan, work / "warmup" / plan.split, lambda n: None) for plan in plans],
            params,
            {},
            workers=2,
        )
        runs, shares, rss = measure(table_, plans, params, work, args.repeats, args.quality)
        write_section(args.out, render(args, len(table_.regions), runs, shares, rss))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
