"""Whole-slide inference: tissue mask -> tumor probability map -> lesion candidates -> outputs.

`infer_slide` computes one slide's result (nothing written): the tissue mask and thumbnail
(`etl.wsi.tissue`), the map geometry (`geometry`), the probability map (`tiling`, running the
`predictor`), and NMS candidates at level-0 map pixel centres (`etl.evaluate.nms`).
`run_inference` does that for every slide and writes each one's outputs (`outputs`): it checks
`--out` before any work, names each slide's outputs uniquely (`output_names`), and a slide that
cannot be read or written (any reader's error, OpenSlide's included) is a failure of that slide
only: it is reported, the others still run, and the caller exits 1 with the list. Slides whose
outputs are complete for the same inputs are skipped, and several processes share a cohort
(`cohort`: which rank runs which slide, rank reports and their summary).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
from openslide import OpenSlideError

from etl.atomic import output_folder
from etl.evaluate.nms import Candidate, nms
from etl.progress import progress_bar
from etl.wsi.formats import find_slides, key_stem, unique_key_stem
from etl.wsi.reader import Backend, SlideError, open_slide
from etl.wsi.scale import ScaleError
from etl.wsi.tissue import LowRes, TissueMask, thumbnail, tissue_mask
from training.config import InferConfig
from training.errors import InferError
from training.infer.cohort import (
    RankReport,
    Share,
    assign,
    cohort_digest,
    complete,
    file_sha256,
    report_path,
    run_inputs,
    slide_inputs,
)
from training.infer.geometry import MapGeometry, plan_tiles, tile_cells
from training.infer.outputs import write_outputs
from training.infer.predictor import Predictor, make_predictor
from training.infer.scaling import MapScale, plan_scale
from training.infer.tiling import predict_map

# What reading one slide can raise when the file is bad: our readers' SlideError, OpenSlide's
# own error from a read (a corrupt tile of a format only OpenSlide reads), a --level it lacks.
# With --mpp: a slide without a pixel size, with non-square pixels or coarser than asked.
SLIDE_FAILURES = (SlideError, OpenSlideError, InferError, ScaleError)


def failure(path: Path, exc: BaseException) -> str:
    """One slide's failure as a line that names the slide."""
    return str(exc) if str(path) in str(exc) else f"{path}: cannot read this slide: {exc}"


@dataclass
class SlideResult:
    """Everything one slide's inference produced (outputs are written from it)."""

    path: Path
    name: str
    dimensions: tuple[int, int]
    mpp: tuple[float, float] | None
    geometry: MapGeometry
    scale: MapScale
    prob: np.ndarray
    cells: np.ndarray  # tissue map pixels
    tissue: TissueMask
    thumb: LowRes
    candidates: list[Candidate]
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    @property
    def tissue_pixels(self) -> float:
        """Level-0 pixels of tissue (from the tissue mask)."""
        return float(self.tissue.mask.sum()) * self.tissue.downsample[0] * self.tissue.downsample[1]


def find_candidates(
    prob: np.ndarray, geometry: MapGeometry, *, radius: float = 768.0, threshold: float = 0.5
) -> list[Candidate]:
    """NMS candidates at level-0 map pixel centres; ``radius`` in level-0 px."""
    kept = nms(prob, radius=radius / geometry.stride, threshold=threshold)
    out = []
    for p, i, j in kept:
        x, y = geometry.centre(i, j)
        out.append(Candidate(prob=p, x=math.floor(x), y=math.floor(y)))
    return out


def infer_slide(
    path: str | Path,
    predictor: Predictor,
    cfg: InferConfig,
    on_tiles: Callable[[int], Callable[[int], None]] | None = None,
    name: str | None = None,
) -> SlideResult:
    """Tissue mask, probability map and candidates of one slide (nothing is written).

    ``on_tiles(total)`` is called once the tile count is known and returns a per-tile callback.
    ``name`` names the outputs (default: the slide's ``key_stem``). Raises one of
    ``SLIDE_FAILURES`` for a missing or unreadable slide.
    """
    path = Path(path)
    backend = cast(Backend, cfg.slide_backend)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    with open_slide(path, backend=backend) as reader:
        scale, warnings = plan_scale(reader, cfg, predictor.training_scale)
        geometry = MapGeometry.for_level(
            reader.level_dimensions[scale.level],
            scale.level,
            scale.level_downsample,
            cfg.stride,
            predictor.patch,
            scale.factor,
        )
        tissue = tissue_mask(
            reader,
            downsample=cfg.tissue_downsample,
            threshold=cfg.tissue_threshold,
            min_area=cfg.tissue_min_area,
        )
        cells = tissue.any_in_cells(geometry.stride, geometry.shape)
        thumb = thumbnail(reader, cfg.thumbnail_side)
        dims, mpp = reader.dimensions, reader.mpp
    times["tissue"] = time.perf_counter() - t0
    total = len(plan_tiles(cells, tile_cells(geometry, cfg.tile_size)))
    callback = on_tiles(total) if on_tiles else None
    t1 = time.perf_counter()
    if not cells.any():
        warnings.append(
            f"{path}: no tissue found (threshold {tissue.threshold:.3f} on "
            "saturation); the map is empty. Lower --tissue-threshold if the slide "
            "has faint tissue"
        )
        prob = np.zeros(geometry.shape, dtype=np.float32)
    else:
        tiles_per_batch = cfg.tiles_per_batch or (4 if predictor.device.type == "cuda" else 1)
        prob = predict_map(
            lambda: open_slide(path, backend=backend, tile_cache_bytes=64 << 20),
            geometry,
            cells,
            predictor,
            mode=cfg.mode,
            tile_size=cfg.tile_size,
            margin=cfg.margin,
            batch_size=cfg.batch_size,
            tiles_per_batch=tiles_per_batch,
            workers=cfg.workers,
            prefetch=cfg.prefetch,
            on_tile=callback,
        )
    times["model"] = time.perf_counter() - t1
    cands = find_candidates(prob, geometry, radius=cfg.nms_radius, threshold=cfg.nms_threshold)
    times["total"] = time.perf_counter() - t0
    return SlideResult(
        path=path,
        name=name or key_stem(path.name),
        dimensions=dims,
        mpp=mpp,
        geometry=geometry,
        scale=scale,
        prob=prob,
        cells=cells,
        tissue=tissue,
        thumb=thumb,
        candidates=cands,
        seconds=times,
        warnings=warnings,
    )


def slide_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Slide files from files and folders (a folder: its files with a slide suffix, sorted)."""
    return find_slides(inputs)


def _previous_slide(out: Path, name: str) -> str | None:
    """The slide whose outputs ``<out>/<name>.*`` are (from its sidecar), or None."""
    try:
        slide = json.loads((out / f"{name}.prob.json").read_text(encoding="utf-8")).get("slide")
    except (OSError, ValueError, AttributeError):
        return None
    return slide if isinstance(slide, str) else None


def output_names(paths: Sequence[Path], out: str | Path) -> dict[Path, str]:
    """The name of each slide's outputs: its ``key_stem``, unless another slide took that name
    first, in this batch or in ``out`` by an earlier run (its sidecar names another file); then
    ``unique_key_stem`` adds a hash of the slide's absolute path. Nothing is ever overwritten
    by another slide's outputs."""
    taken: dict[str, str] = {}
    names = {}
    for path in paths:
        full = str(path.resolve())
        stem = key_stem(path.name)
        if stem not in taken and (before := _previous_slide(Path(out), stem)) is not None:
            taken[stem] = before
        names[path] = unique_key_stem(full, taken)
    return names


@dataclass
class InferRun:
    """What one process did: outputs of the slides it ran, slides skipped as complete, failures
    (one line each), and its cohort report when several processes share the slides."""

    done: list[dict[str, Path]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    report: RankReport | None = None


def run_inference(
    cfg: InferConfig,
    slides: Sequence[str | Path],
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> InferRun:
    """Infer this process's share of the slides (`cohort`: all of them in one process),
    skipping those whose outputs are complete for these inputs.

    A bad checkpoint, option or ``--out`` raises a ``PatchetlError`` before any slide is read;
    a slide that cannot be read or written is reported in the failures and the others still
    run.
    """
    cfg.validate()
    share = Share.of(cfg)
    paths = slide_paths(slides)
    out = output_folder(cfg.out, "--out")
    names = output_names(paths, out)  # over the whole cohort: every rank names alike
    if share.world > 1:
        report_path(out, share.rank, share.world).unlink(missing_ok=True)
        owners = assign(paths, share.world)
        paths = [p for p, r in zip(paths, owners, strict=True) if r == share.rank]
        cfg = replace(cfg, progress=cfg.progress and share.rank == 0)
        _use_local_gpu(cfg, share)
    for path in paths:
        if names[path] != key_stem(path.name):
            echo(
                f"note: {path}: another slide has the output name {key_stem(path.name)}; "
                f"this one's outputs are {out}/{names[path]}.*"
            )
    cfg, predictor = make_predictor(cfg)
    inputs = run_inputs(cfg, predictor.amp, file_sha256(cfg.checkpoint))
    run = InferRun()
    if share.world > 1:
        cohort = cohort_digest(list(names), share.world, inputs)
        run.report = RankReport(cohort, share.rank, share.world, [str(p) for p in paths])
    todo = []
    for path in paths:
        if complete(out, names[path], path, inputs):
            run.skipped.append(path)
        else:
            todo.append(path)
    if run.skipped:
        echo(f"{len(run.skipped)} slide(s) skipped: their outputs in {out} are complete")
    _infer_slides(todo, names, predictor, cfg, out, inputs, run, echo, warn)
    if run.report is not None:
        run.report.done = [str(o["prob.json"]) for o in run.done]
        run.report.skipped = [str(p) for p in run.skipped]
        run.report.failed = list(run.failed)
    return run


def _use_local_gpu(cfg: InferConfig, share: Share) -> None:
    """Under torchrun on CUDA, each rank runs on its own GPU of the machine."""
    import torch

    if cfg.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(share.local_rank % torch.cuda.device_count())


def _infer_slides(
    paths: Sequence[Path],
    names: dict[Path, str],
    predictor: Predictor,
    cfg: InferConfig,
    out: Path,
    inputs: dict[str, Any],
    run: InferRun,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    """Each slide in turn; a failure is the slide's alone (see the module)."""
    device = {"device": predictor.device.type, "amp": predictor.amp}
    with progress_bar(unit="tiles", enabled=cfg.progress) as bar:
        for path in paths:

            def on_tiles(total: int, name: str = path.name) -> Callable[[int], None]:
                task = bar.add_task(name, total=total)
                return lambda k: bar.advance(task, k)

            try:
                result = infer_slide(path, predictor, cfg, on_tiles, names[path])
                extra = {**device, "inputs": slide_inputs(path, inputs)}
                outputs = write_outputs(result, out, cfg, extra)
            except SLIDE_FAILURES as exc:
                run.failed.append(failure(path, exc))
            except OSError as exc:  # writing: disk full, a file in the way, ...
                run.failed.append(f"{path}: cannot write its outputs in {out}: {exc}")
            else:
                for w in result.warnings:
                    warn(f"warning: {w}")
                run.done.append(outputs)
                echo(_done_line(path, result, outputs))
                continue
            warn(f"error: {run.failed[-1]}")


def _done_line(path: Path, result: SlideResult, outputs: dict[str, Path]) -> str:
    rate = result.seconds["model"] / max(result.tissue_pixels / 1e8, 1e-9)
    return (
        f"{path.name}: map {result.geometry.cols}x{result.geometry.rows} "
        f"(stride {result.geometry.stride:g} px), tissue "
        f"{result.tissue.fraction:.1%}, {len(result.candidates)} candidate(s), "
        f"{result.seconds['model']:.1f} s model ({rate:.1f} s per 1e8 tissue px) "
        f"-> {outputs['prob.npy'].parent}/{result.name}.*"
    )
