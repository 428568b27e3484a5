"""Inference benchmark: dense (fully convolutional tiles) vs patch-by-patch sliding window.

Same synthetic slide, same checkpoint (a randomly initialised FCResNet18 saved in the trainer's
checkpoint format: speed does not depend on the weights), same output stride (32 px) and patch
size (224 px), same tile reads; only ``InferConfig.mode`` differs. The timed part is the
probability map (tile reads + model), ``infer_slide``'s ``seconds["model"]``; the tissue mask
is computed once per run in both modes and reported apart. Medians of --repeats interleaved
runs after one untimed dense warm-up.

    python -m benchmarks.bench_infer --out benchmarks/results/infer.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.common import cli, machine, median, table, write_section
from training.config import InferConfig
from training.infer.predictor import Predictor
from training.infer.run import infer_slide
from training.model import build_model, load_model

PATCH, STRIDE = 224, 32


def synth_slide(out: Path, width: int, height: int, mpp: float, seed: int) -> Path:
    """One synthetic tumor slide, written by the CLI in a child process; returns its path."""
    cli(
        "synth",
        "--out",
        out,
        "--slides",
        1,
        "--tumor-fraction",
        1,
        "--width",
        width,
        "--height",
        height,
        "--mpp",
        mpp,
        "--seed",
        seed,
        "--regions-per-slide",
        1,
        "--val-fraction",
        0,
    )
    return next((out / "training" / "images").glob("*.tif"))


def random_checkpoint(path: Path, seed: int = 0) -> Path:
    """A randomly initialised detector in the trainer's checkpoint layout (what infer loads)."""
    torch.manual_seed(seed)
    torch.save(
        {"model": build_model().state_dict(), "patch_size": PATCH, "arch": "FCResNet18"}, path
    )
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/infer.md"))
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--height", type=int, default=1152)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="tile reading threads")
    ap.add_argument("--batch-size", type=int, default=64, help="patch mode: patches per pass")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)

    work = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    try:
        slide = synth_slide(work / "data", args.width, args.height, args.mpp, seed=5)
        ckpt = random_checkpoint(work / "random.pt")
        device = torch.device("cpu")
        model, _ = load_model(ckpt, device)
        predictor = Predictor(model, PATCH, STRIDE, device, amp=False, channels_last=True)
        base = InferConfig(
            checkpoint=str(ckpt),
            out=str(work / "out"),
            stride=STRIDE,
            patch_size=PATCH,
            device="cpu",
            workers=args.workers,
            batch_size=args.batch_size,
            progress=False,
        )
        configs = {mode: InferConfig(**{**vars(base), "mode": mode}) for mode in ("dense", "patch")}
        result = infer_slide(slide, predictor, configs["dense"])  # warm-up (allocator, threads)
        tissue_px, cells = result.tissue_pixels, int(result.cells.sum())
        seconds: dict[str, list[float]] = {"dense": [], "patch": []}
        tissue_s: list[float] = []
        for rep in range(args.repeats):
            order = ["dense", "patch"] if rep % 2 == 0 else ["patch", "dense"]
            for mode in order:
                r = infer_slide(slide, predictor, configs[mode])
                seconds[mode].append(r.seconds["model"])
                tissue_s.append(r.seconds["tissue"])
                print(
                    f"run {rep + 1} {mode}: {r.seconds['model']:.2f} s map, "
                    f"{r.seconds['tissue']:.2f} s tissue",
                    flush=True,
                )
        per = {m: median(v) / (tissue_px / 1e8) for m, v in seconds.items()}
        rows = [
            [
                "patch-by-patch sliding window (224 px patch per map pixel, batches of "
                f"{args.batch_size})",
                f"{median(seconds['patch']):.2f}",
                f"{per['patch']:.1f}",
                "1.00x",
                "baseline",
            ],
            [
                "dense: fully convolutional tiles of 2048 px + 224 px margin",
                f"{median(seconds['dense']):.2f}",
                f"{per['dense']:.1f}",
                f"{per['patch'] / per['dense']:.1f}x",
                ">= 5x faster",
            ],
        ]
        text = "\n\n".join(
            [
                "## Inference: dense vs patch-by-patch, same slide and stride (issue 5)",
                f"Command: `python -m benchmarks.bench_infer` (run by `make bench`). Machine: "
                f"{machine()}; torch {torch.__version__} on CPU, {threads} threads, fp32, "
                f"channels_last; {args.workers} tile-reading threads.",
                f"Slide: synthetic {args.width} x {args.height} px at {args.mpp} um/px "
                f"({tissue_px / 1e6:.2f} M tissue px = {tissue_px / (args.width * args.height):.0%}"
                f", {cells} tissue map pixels); checkpoint: randomly initialised FCResNet18 "
                "(speed does not depend on the weights); "
                f"output stride {STRIDE} px, patch {PATCH} px. "
                "Time = the probability map (tile reads + model); the tissue mask (median "
                f"{median(tissue_s):.2f} s) is the same in both modes and left out. Medians of "
                f"{args.repeats} interleaved runs after a warm-up (all runs, s: "
                + ", ".join(f"{k} {[round(v, 2) for v in vs]}" for k, vs in seconds.items())
                + ").",
                table(
                    ["mode", "map seconds (median)", "s per 1e8 tissue px", "speed-up", "target"],
                    rows,
                ),
            ]
        )
        write_section(args.out, text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
