"""Physical-scale benchmark: regions/s at a target mpp between two levels vs at a level's own.

One synthetic slide at 0.25 um/px (JPEG tiles 256, pyramid downsample 2: levels at 0.25, 0.5
and 1.0 um/px), the same random centres for every variant, the direct tile reader
(`open_slide` auto) without a tile cache (each region decodes its own tiles, as on a large
slide where regions rarely share tiles), one process. Variants, read with
`etl.wsi.scale.read_region_at_mpp`:

  own-0   0.25 um/px: level 0 as is          between-0  0.35 um/px: level 0 shrunk 1.4x
  own-1   0.5 um/px: level 1 as is            between-1  0.7 um/px: level 1 shrunk 1.4x
  own-1-off  0.5 um/px, centres off level 1's pixel grid (OpenSlide's sub-pixel read)

Medians of --repeats interleaved runs; ratios are medians of per-run ratios.

    python -m benchmarks.bench_scale --out benchmarks/results/scale.md
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, median, table, write_section
from etl.synth.scene import make_scene
from etl.synth.slide import write_slide
from etl.wsi.downsample import area_resize
from etl.wsi.reader import TiffTileReader, open_slide
from etl.wsi.scale import read_region_at_mpp

# name -> (target mpp, centre offset in level-0 px from a multiple of 4)
VARIANTS = {
    "own-0": (0.25, 0),
    "between-0": (0.35, 0),
    "own-1": (0.5, 0),
    "between-1": (0.7, 0),
    "own-1-off": (0.5, 1),
}
LABELS = {
    "own-0": "0.25 um/px: level 0 as is",
    "between-0": "0.35 um/px: level 0 shrunk 1.4x",
    "own-1": "0.5 um/px: level 1 as is (centres on its grid)",
    "between-1": "0.7 um/px: level 1 shrunk 1.4x",
    "own-1-off": "0.5 um/px: level 1 as is, centres off its grid",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.md"))
    ap.add_argument("--side", type=int, default=3072, help="slide side at level 0 (px)")
    ap.add_argument("--regions", type=int, default=100)
    ap.add_argument("--region-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    return ap.parse_args(argv)


def run(slide: Path, centres: np.ndarray, size: int, name: str) -> tuple[float, int]:
    """Regions/s of one variant with a fresh reader, and its OpenSlide fallback reads."""
    target, offset = VARIANTS[name]
    with open_slide(slide, tile_cache_bytes=0) as reader:
        t0 = time.perf_counter()
        for x, y in centres:
            read_region_at_mpp(reader, int(x) + offset, int(y) + offset, size, target)
        elapsed = time.perf_counter() - t0
        fallbacks = reader.fallback_reads if isinstance(reader, TiffTileReader) else -1
    return len(centres) / elapsed, fallbacks


def resample_ms(size: int, factor: float, repeats: int = 20) -> float:
    """Median ms of `area_resize` alone, for a window of a region shrunk by `factor`."""
    side = int(np.ceil(size * factor)) + 1
    window = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    box = (0.5, 0.5, 0.5 + size * factor, 0.5 + size * factor)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        area_resize(window, (size, size), box)
        times.append(time.perf_counter() - t0)
    return 1000 * median(times)


def render(args: argparse.Namespace, runs: dict[str, list[float]], fallbacks: dict) -> str:
    rate = {k: median(v) for k, v in runs.items()}

    def ratio(a: str, b: str) -> str:
        return f"{median([y / x for x, y in zip(runs[a], runs[b], strict=True)]):.2f}x {a}"

    against = {"between-0": "own-0", "between-1": "own-1", "own-1-off": "own-1"}
    rows = [
        [
            f"{name}: {LABELS[name]}",
            f"{rate[name]:.1f}",
            ratio(against[name], name) if name in against else "baseline",
            fallbacks[name],
        ]
        for name in VARIANTS
    ]
    resample = resample_ms(args.region_size, 1.4)
    return "\n\n".join(
        [
            "## Physical scale: regions/s at a target mpp (issue 12)",
            "Command: `python -m benchmarks.bench_scale` (run by `make bench`). "
            f"Machine: {machine()}.",
            f"Data: one synthetic slide of {args.side} x {args.side} px at 0.25 um/px (JPEG "
            "tiles 256, levels at 0.25, 0.5, 1.0 um/px), "
            f"{args.regions} random centres, regions of {args.region_size} output px, read "
            "with `etl.wsi.scale.read_region_at_mpp` through the direct tile reader without "
            "a tile cache (each region decodes its own tiles); medians of "
            f"{args.repeats} interleaved runs, "
            "ratios = medians of per-run ratios (all runs: "
            + ", ".join(f"{k} {[round(v, 1) for v in vs]}" for k, vs in runs.items())
            + ").",
            table(["variant", "regions/s (median)", "ratio", "OpenSlide reads"], rows),
            "A region between levels reads 1.4^2 = 1.96x the level pixels of one at that "
            "level's own scale and area-averages them (`area_resize`: "
            f"{resample:.1f} ms per {args.region_size} px region at 1.4x, measured alone). "
            "Reads at a level's own scale whose top-left is off that level's pixel grid go "
            "to OpenSlide (its sub-pixel read is the reference there); resampled reads always "
            "start on the grid and stay on the direct path.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        slide = work / "slide.tif"
        write_slide(slide, make_scene(args.side, args.side, mpp=0.25, seed=7), downsample=2)
        margin = args.region_size  # the largest region here spans 0.7 / 0.25 x size px
        rng = np.random.default_rng(0)
        centres = 4 * rng.integers(margin // 4, (args.side - margin) // 4, (args.regions, 2))
        runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
        fallbacks: dict[str, int] = {}
        for name in VARIANTS:  # warm-up: imports, page cache
            run(slide, centres[:5], args.region_size, name)
        for _ in range(args.repeats):
            for name in VARIANTS:  # interleaved, so a slow spell hits all variants alike
                rate, fallbacks[name] = run(slide, centres, args.region_size, name)
                runs[name].append(rate)
        write_section(args.out, render(args, runs, fallbacks))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
