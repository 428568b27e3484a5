"""Whole-slide inference: tissue mask -> tumor probability map -> heatmaps and lesion candidates.

Map geometry (exact, written to the sidecar): inference runs at pyramid ``level`` (level-0 px
per level px: ``downsample``) with a step of ``stride_level`` level px (a multiple of 32).
With ``stride = stride_level * downsample`` level-0 px,

    map pixel (i, j) = the ``patch_size`` x ``patch_size`` level patch CENTRED at level-0
    (x = x_start + j * stride, y = y_start + i * stride),   x_start = y_start = stride / 2,

so map pixel (i, j) also stands for the level-0 cell ``[j*stride, (j+1)*stride) x
[i*stride, (i+1)*stride)``: the map is the slide downsampled by ``stride``, top-left aligned,
``ceil(width_level / stride_level)`` x ``ceil(height_level / stride_level)`` pixels (patches
that reach past the slide edge see white, as OpenSlide reads it). Map pixels whose cell holds
no tissue are 0 and never reach the model.

Two modes give the same geometry:

- ``dense`` (default): the fully convolutional model runs on large tiles (``tile_size`` level
  px of map area plus ``margin`` px of context on every side). The trunk has stride 32, so the
  logit of the patch at tile offset 32*m is the average-pooled feature window at feature m; the
  margin is cropped off the features before the pool, and every output then sees the same
  pixels it would see in a single pass over the whole slide: ResNet18's receptive field
  reaches 217 px beyond a patch (top/left; 186 px bottom/right), so the default margin of
  224 px (7 features) makes tiled maps equal to a single pass, without seams.
- ``patch``: the classic sliding window, each patch classified on its own (the reference).
  Patches are cut from the same tile reads, so both modes share the reading cost.

Pixels are scaled exactly as in training (``to_unit_range`` then ``to_model_range``: [-1, 1]).
Tiles are read by a thread pool (one slide reader per thread) a bounded number of tiles ahead
of the model; on CUDA the model runs in bf16 autocast.

Outputs in ``out``, named after the slide (``<name>.prob.npy`` float32 map, ``.prob.json``
sidecar, ``.heatmap.png`` over the thumbnail, ``.heatmap.tif`` pyramid, ``.candidates.csv``
and ``.candidates.geojson``), each written to a temporary file and renamed.

The heatmap TIFF has the map's own size (one pixel per ``stride`` level-0 px) and resolution
tags of ``mpp * stride`` um per pixel, so it covers the slide's physical extent from the same
top-left corner (rounded up to whole cells); viewers that honour the pixel size (QuPath,
ASAP) overlay it on the slide. Level 0 holds ``round(255 * prob)`` as 8-bit grey; each
further level halves it (mean) down to 256 px, each level its own tiled page.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from etl.atomic import atomic_path
from etl.progress import progress_bar
from etl.wsi.formats import find_slides, key_stem
from etl.wsi.pyramid import pyramid_levels, write_pyramid
from etl.wsi.reader import SlideError, SlideReader, open_slide
from etl.wsi.tissue import LowRes, TissueMask, thumbnail, tissue_mask
from training.data.augment import to_model_range, to_unit_range
from training.config import FEATURE_STRIDE, MODES, InferConfig
from training.errors import InferError
from training.model import FCResNet18, build_model
from etl.evaluate.nms import Candidate, candidates_csv, candidates_geojson, nms

TIFF_TILE = 256  # heatmap TIFF tile side; the pyramid halves down to one tile
_TURBO = np.array([  # a short version of the "turbo" colour map: (position, r, g, b)
    (0.00, 48, 18, 59), (0.15, 70, 107, 227), (0.35, 27, 208, 213), (0.50, 97, 252, 108),
    (0.65, 210, 233, 53), (0.80, 254, 155, 45), (0.92, 218, 56, 7), (1.00, 122, 4, 3)],
    dtype=np.float32)


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class MapGeometry:
    """Map pixel (i, j) = the patch centred at level-0 (x_start + j*stride, y_start + i*stride)."""

    cols: int
    rows: int
    level: int
    downsample: float  # level-0 px per level px
    stride_level: int  # level px per map pixel
    patch: int  # patch side, level px

    @classmethod
    def for_level(cls, level_dims: tuple[int, int], level: int, downsample: float,
                  stride_level: int, patch: int) -> MapGeometry:
        w, h = level_dims
        return cls(cols=-(-w // stride_level), rows=-(-h // stride_level), level=level,
                   downsample=float(downsample), stride_level=stride_level, patch=patch)

    @property
    def stride(self) -> float:
        """Level-0 px per map pixel."""
        return self.stride_level * self.downsample

    @property
    def x_start(self) -> float:
        return self.stride / 2

    @property
    def y_start(self) -> float:
        return self.stride / 2

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def centre(self, i: np.ndarray | int, j: np.ndarray | int) -> tuple[Any, Any]:
        """Level-0 (x, y) centre of map pixel (i, j)."""
        x = self.x_start + np.asarray(j) * self.stride
        return x, self.y_start + np.asarray(i) * self.stride

    def patch_origin(self, i: int, j: int) -> tuple[int, int]:
        """Level-px (x, y) top-left of the patch of map pixel (i, j)."""
        off = self.stride_level // 2 - self.patch // 2
        return j * self.stride_level + off, i * self.stride_level + off

    def as_dict(self) -> dict:
        return {"stride": self.stride, "stride_level": self.stride_level, "x_start": self.x_start,
                "y_start": self.y_start, "map_width": self.cols, "map_height": self.rows,
                "level": self.level, "level_downsample": self.downsample,
                "patch_size": self.patch, "patch_size_level0": self.patch * self.downsample,
                "definition": "map pixel (i, j) = the patch_size x patch_size patch (at `level`) "
                              "centred at level-0 (x_start + j*stride, y_start + i*stride); it "
                              "stands for level-0 [j*stride, (j+1)*stride) x [i*stride, "
                              "(i+1)*stride)"}


@dataclass(frozen=True)
class Tile:
    """``rows x cols`` map pixels from (i0, j0) (the part inside the map is used)."""

    i0: int
    j0: int
    rows: int
    cols: int


def tile_cells(geometry: MapGeometry, tile_size: int) -> tuple[int, int]:
    """Map pixels per tile (rows, cols): ``tile_size // stride``, no more than the map has."""
    n = max(1, tile_size // geometry.stride_level)
    return min(n, geometry.rows), min(n, geometry.cols)


def plan_tiles(cells: np.ndarray, shape: tuple[int, int]) -> list[Tile]:
    """Tiles of ``shape`` map pixels covering the map, in raster order, those with tissue."""
    rows, cols = cells.shape
    nr, nc = shape
    return [Tile(i0, j0, nr, nc) for i0 in range(0, rows, nr) for j0 in range(0, cols, nc)
            if cells[i0:i0 + nr, j0:j0 + nc].any()]


# --------------------------------------------------------------------------- model
def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InferError("--device cuda: no CUDA device is available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_model(path: str | Path, device: torch.device | str = "cpu"
               ) -> tuple[FCResNet18, dict]:
    """The detector from a training checkpoint (or a bare state dict), in eval mode.

    Returns ``(model, info)``; ``info`` has the checkpoint's ``patch_size`` when it records one.
    """
    path = Path(path)
    if not path.is_file():
        raise InferError(f"--checkpoint {path}: no such file (train one with `patchetl train`, "
                         "then pass <out>/best.pt or last.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and format errors all mean "not a checkpoint"
        raise InferError(f"--checkpoint {path}: not a readable torch checkpoint ({exc})") from None
    info: dict = {}
    state = ckpt
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state = ckpt["model"]
        info = {k: ckpt[k] for k in ("patch_size", "grid", "epoch", "arch") if k in ckpt}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InferError(f"--checkpoint {path}: expected a patchetl checkpoint or a state dict, "
                         f"got {type(state).__name__}")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    model = build_model()
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        parts = [f"{name} {items[:3]}{' ...' if len(items) > 3 else ''}"
                 for name, items in (("shape mismatch", wrong), ("missing", missing),
                                     ("unexpected", unexpected)) if items]
        raise InferError(f"--checkpoint {path}: not a checkpoint of this model (FCResNet18, "
                         f"1 output): {'; '.join(parts)}. Use a checkpoint written by "
                         "`patchetl train`")
    model.load_state_dict(state)
    return model.to(device).eval(), info


class Predictor:
    """Runs the model on uint8 pixels: dense tiles -> probability grids, patches -> values."""

    def __init__(self, model: FCResNet18, patch: int, stride_level: int, device: torch.device,
                 amp: bool = False, channels_last: bool = True) -> None:
        self.model, self.patch, self.device, self.amp = model, patch, device, amp
        self.pool = patch // FEATURE_STRIDE  # features per patch side
        self.step = stride_level // FEATURE_STRIDE  # features per map pixel
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def _input(self, pixels: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1] on the device (training scaling)."""
        t = torch.from_numpy(pixels).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = to_model_range(to_unit_range(t))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def _head(self, f: torch.Tensor) -> torch.Tensor:
        # The model's own pool is 7x7 (224 px); a patch of p px pools p/32 features, so a
        # 64 px checkpoint gives the same logits dense as patch by patch.
        pooled = F.avg_pool2d(f, self.pool, stride=self.step)
        return torch.sigmoid(self.model.fc(pooled).float())[:, 0]

    @torch.inference_mode()
    def dense(self, tiles: np.ndarray, margin: int) -> np.ndarray:
        """(B, h, w, 3) tiles, ``margin`` px of context around their patches -> (B, rows, cols)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            f = self._features(self._input(tiles))
            m = margin // FEATURE_STRIDE
            if m:
                f = f[:, :, m:-m, m:-m]
            return self._head(f).cpu().numpy()

    @torch.inference_mode()
    def patches(self, patches: np.ndarray) -> np.ndarray:
        """(N, p, p, 3) patches -> (N,) probabilities, each patch on its own."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self._head(self._features(self._input(patches))).reshape(-1).cpu().numpy()


# --------------------------------------------------------------------------- the map
class _ThreadReaders:
    """One slide reader per reading thread (readers are not thread-safe)."""

    def __init__(self, open_reader: Callable[[], SlideReader]) -> None:
        self._open, self._local, self._all = open_reader, threading.local(), []
        self._lock = threading.Lock()

    def get(self) -> SlideReader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = self._open()
            with self._lock:
                self._all.append(reader)
        return reader

    def close(self) -> None:
        for reader in self._all:
            reader.close()


def _prefetched(items: Sequence[Tile], load: Callable[[Tile], np.ndarray], workers: int,
                ahead: int) -> Iterator[tuple[Tile, np.ndarray]]:
    """(tile, pixels) in order, read by a thread pool at most ``ahead`` tiles in advance."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile-reader") as pool:
        pending: deque[tuple[Tile, Future]] = deque()
        it = iter(items)
        try:
            for tile in it:
                pending.append((tile, pool.submit(load, tile)))
                if len(pending) >= ahead:
                    break
            while pending:
                tile, fut = pending.popleft()
                pixels = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(load, nxt)))
                yield tile, pixels
        finally:
            for _, fut in pending:
                fut.cancel()


def predict_map(open_reader: Callable[[], SlideReader], geometry: MapGeometry, cells: np.ndarray,
                predictor: Predictor, *, mode: str = "dense", tile_size: int = 2048,
                margin: int = 224, batch_size: int = 256, tiles_per_batch: int = 1,
                workers: int = 4, prefetch: int | None = None,
                on_tile: Callable[[int], None] | None = None) -> np.ndarray:
    """The (rows, cols) float32 probability map; 0 where ``cells`` (tissue) is False.

    ``open_reader`` opens a slide reader (called once per reading thread).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {MODES}")
    s, p, d = geometry.stride_level, geometry.patch, geometry.downsample
    nr, nc = tile_cells(geometry, tile_size)
    ctx = margin if mode == "dense" else 0
    side_h, side_w = (nr - 1) * s + p + 2 * ctx, (nc - 1) * s + p + 2 * ctx
    tiles = plan_tiles(cells, (nr, nc))
    prob = np.zeros(geometry.shape, dtype=np.float32)
    readers = _ThreadReaders(open_reader)

    def load(tile: Tile) -> np.ndarray:
        lx, ly = geometry.patch_origin(tile.i0, tile.j0)
        return readers.get().read_region(int(round((lx - ctx) * d)), int(round((ly - ctx) * d)),
                                         geometry.level, side_w, side_h)

    def put(tile: Tile, grid: np.ndarray) -> None:
        h, w = min(nr, geometry.rows - tile.i0), min(nc, geometry.cols - tile.j0)
        prob[tile.i0:tile.i0 + h, tile.j0:tile.j0 + w] = grid[:h, :w]

    stream = _prefetched(tiles, load, workers, prefetch or 2 * workers + tiles_per_batch)
    try:
        if mode == "dense":
            batch: list[tuple[Tile, np.ndarray]] = []
            for k, item in enumerate(stream, 1):
                batch.append(item)
                if len(batch) == tiles_per_batch or k == len(tiles):
                    grids = predictor.dense(np.stack([px for _, px in batch]), ctx)
                    for (tile, _), grid in zip(batch, grids):
                        put(tile, grid)
                    if on_tile:
                        on_tile(len(batch))
                    batch = []
        else:
            _patch_pass(stream, cells, geometry, predictor, prob, batch_size, on_tile)
    finally:
        stream.close()  # stop the reading threads before their readers close
        readers.close()
    prob[~cells] = 0.0
    return prob


def _patch_pass(stream: Iterable[tuple[Tile, np.ndarray]], cells: np.ndarray,
                geometry: MapGeometry, predictor: Predictor, prob: np.ndarray,
                batch_size: int, on_tile: Callable[[int], None] | None) -> None:
    """Classify every tissue patch on its own, in batches of ``batch_size`` across tiles."""
    s, p = geometry.stride_level, geometry.patch
    crops: list[np.ndarray] = []
    where: list[np.ndarray] = []
    queued = 0

    def flush() -> None:
        nonlocal crops, where, queued
        if queued:
            idx = np.concatenate(where)
            prob[idx[:, 0], idx[:, 1]] = predictor.patches(np.concatenate(crops))
        crops, where, queued = [], [], 0

    for tile, pixels in stream:
        sub = cells[tile.i0:tile.i0 + tile.rows, tile.j0:tile.j0 + tile.cols]
        a, b = np.nonzero(sub)
        # (rows, cols, p, p, 3) view of every patch of the tile; only tissue ones are copied
        views = np.lib.stride_tricks.sliding_window_view(pixels, (p, p, 3))[::s, ::s, 0]
        lo = 0
        while lo < len(a):  # fill the batch up to batch_size, run it when full
            take = min(batch_size - queued, len(a) - lo)
            aa, bb = a[lo:lo + take], b[lo:lo + take]
            crops.append(views[aa, bb])
            where.append(np.column_stack([aa + tile.i0, bb + tile.j0]))
            queued += take
            lo += take
            if queued == batch_size:
                flush()
        if on_tile:
            on_tile(1)
    flush()


# --------------------------------------------------------------------------- one slide
@dataclass
class SlideResult:
    """Everything one slide's inference produced (outputs are written from it)."""

    path: Path
    name: str
    dimensions: tuple[int, int]
    mpp: tuple[float, float] | None
    geometry: MapGeometry
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


def find_candidates(prob: np.ndarray, geometry: MapGeometry, *, radius: float = 768.0,
                    threshold: float = 0.5) -> list[Candidate]:
    """NMS candidates at level-0 map pixel centres; ``radius`` in level-0 px."""
    kept = nms(prob, radius=radius / geometry.stride, threshold=threshold)
    out = []
    for p, i, j in kept:
        x, y = geometry.centre(i, j)
        out.append(Candidate(prob=p, x=int(math.floor(x)), y=int(math.floor(y))))
    return out


def infer_slide(path: str | Path, predictor: Predictor, cfg: InferConfig,
                on_tiles: Callable[[int], Callable[[int], None]] | None = None) -> SlideResult:
    """Tissue mask, probability map and candidates of one slide (nothing is written).

    ``on_tiles(total)`` is called once the tile count is known and returns a per-tile callback.
    Raises :class:`SlideError` for a missing or unreadable slide.
    """
    path = Path(path)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    with open_slide(path, backend=cfg.slide_backend) as reader:
        if cfg.level >= reader.level_count:
            raise InferError(f"{path}: --level {cfg.level} out of range (the slide has levels "
                             f"0..{reader.level_count - 1})")
        geometry = MapGeometry.for_level(reader.level_dimensions[cfg.level], cfg.level,
                                         reader.level_downsamples[cfg.level], cfg.stride,
                                         predictor.patch)
        tissue = tissue_mask(reader, downsample=cfg.tissue_downsample,
                             threshold=cfg.tissue_threshold, min_area=cfg.tissue_min_area)
        cells = tissue.any_in_cells(geometry.stride, geometry.shape)
        thumb = thumbnail(reader, cfg.thumbnail_side)
        dims, mpp = reader.dimensions, reader.mpp
    times["tissue"] = time.perf_counter() - t0
    warnings = []
    total = len(plan_tiles(cells, tile_cells(geometry, cfg.tile_size)))
    callback = on_tiles(total) if on_tiles else None
    t1 = time.perf_counter()
    if not cells.any():
        warnings.append(f"{path}: no tissue found (threshold {tissue.threshold:.3f} on "
                        "saturation); the map is empty. Lower --tissue-threshold if the slide "
                        "has faint tissue")
        prob = np.zeros(geometry.shape, dtype=np.float32)
    else:
        tiles_per_batch = cfg.tiles_per_batch or (4 if predictor.device.type == "cuda" else 1)
        prob = predict_map(
            lambda: open_slide(path, backend=cfg.slide_backend, tile_cache_bytes=64 << 20),
            geometry, cells, predictor, mode=cfg.mode, tile_size=cfg.tile_size,
            margin=cfg.margin, batch_size=cfg.batch_size, tiles_per_batch=tiles_per_batch,
            workers=cfg.workers, prefetch=cfg.prefetch, on_tile=callback)
    times["model"] = time.perf_counter() - t1
    cands = find_candidates(prob, geometry, radius=cfg.nms_radius, threshold=cfg.nms_threshold)
    times["total"] = time.perf_counter() - t0
    return SlideResult(path=path, name=key_stem(path.name), dimensions=dims, mpp=mpp,
                       geometry=geometry, prob=prob, cells=cells, tissue=tissue, thumb=thumb,
                       candidates=cands, seconds=times, warnings=warnings)


# --------------------------------------------------------------------------- outputs
def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through ``write(tmp)`` then rename, so a visible output is always complete."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def colorize(prob: np.ndarray) -> np.ndarray:
    """(h, w) probabilities -> (h, w, 3) uint8 colours (a turbo-like map)."""
    p = np.clip(prob, 0.0, 1.0)
    return np.stack([np.interp(p, _TURBO[:, 0], _TURBO[:, c]) for c in (1, 2, 3)],
                    axis=-1).round().astype(np.uint8)


def heatmap_overlay(thumb: LowRes, prob: np.ndarray, geometry: MapGeometry,
                    alpha: float = 0.7) -> np.ndarray:
    """The thumbnail with the map blended over it (opacity ``alpha * prob``), RGB uint8."""
    h, w = thumb.rgb.shape[:2]
    sx, sy = geometry.stride / thumb.downsample[0], geometry.stride / thumb.downsample[1]
    size = (max(1, round(geometry.cols * sx)), max(1, round(geometry.rows * sy)))
    up = np.asarray(Image.fromarray(prob.astype(np.float32), mode="F")
                    .resize(size, Image.Resampling.BILINEAR))
    scaled = np.zeros((h, w), dtype=np.float32)
    hh, ww = min(h, up.shape[0]), min(w, up.shape[1])
    scaled[:hh, :ww] = np.clip(up[:hh, :ww], 0.0, 1.0)
    a = (alpha * scaled)[..., None]
    return (thumb.rgb * (1 - a) + colorize(scaled) * a).round().astype(np.uint8)


def write_heatmap_tiff(path: Path, prob: np.ndarray, geometry: MapGeometry,
                       mpp: tuple[float, float] | None, description: str = "") -> list[tuple]:
    """Pyramidal tiled TIFF of ``round(255 * prob)``; returns the (width, height) of each level.

    One map pixel per ``stride`` level-0 px; the resolution tags give ``mpp * stride`` um per
    pixel (scaled per level) when the slide's mpp is known. Each level is the 2 x 2 mean of the
    one above (edge replicated) down to one tile.
    """
    image = np.rint(np.clip(prob, 0, 1) * 255).astype(np.uint8)
    levels = pyramid_levels(image, 2, max_side=TIFF_TILE, edge="replicate")
    pixel_um = None if mpp is None else (mpp[0] * geometry.stride, mpp[1] * geometry.stride)
    with atomic_path(path) as tmp:
        dims = write_pyramid(tmp, levels, description=description or None,
                             photometric="minisblack", compression="zlib", tile=TIFF_TILE,
                             mpp=pixel_um)
    return dims


def write_outputs(result: SlideResult, out: str | Path, cfg: InferConfig,
                  extra: dict | None = None) -> dict[str, Path]:
    """Write the six outputs of a slide under ``out``; returns {kind: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / result.name
    g = result.geometry
    sidecar = {
        "slide": str(result.path.resolve()), "name": result.name,
        "width": result.dimensions[0], "height": result.dimensions[1],
        "mpp": list(result.mpp) if result.mpp else None,
        **g.as_dict(),
        "mode": cfg.mode, "margin": cfg.margin if cfg.mode == "dense" else 0,
        "tile_size": cfg.tile_size, "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "tissue_fraction": result.tissue.fraction,
        "tissue_map_pixels": int(result.cells.sum()),
        "tissue_pixels_level0": result.tissue_pixels,
        "tissue": {"downsample": list(result.tissue.downsample), "level": result.tissue.level,
                   "threshold": result.tissue.threshold, "min_area": cfg.tissue_min_area},
        "nms": {"radius_level0": cfg.nms_radius, "radius_map": cfg.nms_radius / g.stride,
                "threshold": cfg.nms_threshold},
        "candidates": len(result.candidates), "seconds": result.seconds,
        "warnings": result.warnings, **(extra or {}),
    }
    paths = {k: Path(f"{base}.{k}") for k in ("prob.npy", "prob.json", "heatmap.png",
                                               "heatmap.tif", "candidates.csv",
                                               "candidates.geojson")}

    def save_npy(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, result.prob.astype(np.float32, copy=False))

    _atomic(paths["prob.npy"], save_npy)
    overlay = heatmap_overlay(result.thumb, result.prob, g)
    _atomic(paths["heatmap.png"], lambda t: Image.fromarray(overlay).save(t, format="PNG"))
    desc = json.dumps({"source": sidecar["slide"], "value": "round(255 * tumor probability)",
                       **{k: v for k, v in g.as_dict().items() if k != "definition"}})
    write_heatmap_tiff(paths["heatmap.tif"], result.prob, g, result.mpp, desc)
    _atomic(paths["candidates.csv"],
            lambda t: t.write_text(candidates_csv(result.candidates), encoding="utf-8"))
    _atomic(paths["candidates.geojson"],
            lambda t: t.write_text(candidates_geojson(result.candidates), encoding="utf-8"))
    # the sidecar last: its presence means the slide's outputs are all there
    _atomic(paths["prob.json"],
            lambda t: t.write_text(json.dumps(sidecar, indent=1) + "\n", encoding="utf-8"))
    return paths


# --------------------------------------------------------------------------- runs
def slide_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Slide files from files and folders (a folder: its files with a slide suffix, sorted)."""
    return find_slides(inputs)


def make_predictor(cfg: InferConfig) -> tuple[InferConfig, Predictor]:
    """Validate the options, load the checkpoint on the device; returns the options with the
    patch size filled in (the checkpoint's when not given) and the predictor."""
    cfg.validate()
    device = resolve_device(cfg.device)
    model, info = load_model(cfg.checkpoint, device)
    if cfg.patch_size is None:
        cfg = replace(cfg, patch_size=int(info.get("patch_size", 224)))
        if cfg.patch_size % FEATURE_STRIDE:
            raise InferError(f"--checkpoint {cfg.checkpoint}: trained on {cfg.patch_size} px "
                             f"patches; give --patch-size as a multiple of {FEATURE_STRIDE}")
    amp = device.type == "cuda" if cfg.amp is None else cfg.amp
    predictor = Predictor(model, cfg.patch_size, cfg.stride, device, amp=amp,
                          channels_last=cfg.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return cfg, predictor


def run_inference(cfg: InferConfig, slides: Sequence[str | Path],
                  echo: Callable[[str], None] = print,
                  warn: Callable[[str], None] = print) -> tuple[list[dict[str, Path]], list[str]]:
    """Infer every slide; returns (outputs per finished slide, failure messages).

    A bad checkpoint or option raises :class:`InferError` before any slide is read; a slide
    that cannot be read is reported in the failures and the others still run.
    """
    cfg.validate()
    paths = slide_paths(slides)
    cfg, predictor = make_predictor(cfg)
    device, amp = predictor.device, predictor.amp
    done, failed = [], []
    with progress_bar(unit="tiles", enabled=cfg.progress) as bar:
        for path in paths:
            def on_tiles(total: int, name: str = path.name) -> Callable[[int], None]:
                task = bar.add_task(name, total=total)
                return lambda k: bar.advance(task, k)

            try:
                result = infer_slide(path, predictor, cfg, on_tiles)
            except (SlideError, InferError) as exc:
                failed.append(str(exc))
                warn(f"error: {exc}")
                continue
            for w in result.warnings:
                warn(f"warning: {w}")
            outputs = write_outputs(result, cfg.out, cfg,
                                    {"device": device.type, "amp": amp})
            done.append(outputs)
            rate = result.seconds["model"] / max(result.tissue_pixels / 1e8, 1e-9)
            echo(f"{path.name}: map {result.geometry.cols}x{result.geometry.rows} "
                 f"(stride {result.geometry.stride:g} px), tissue "
                 f"{result.tissue.fraction:.1%}, {len(result.candidates)} candidate(s), "
                 f"{result.seconds['model']:.1f} s model ({rate:.1f} s per 1e8 tissue px) "
                 f"-> {outputs['prob.npy'].parent}/{result.name}.*")
    return done, failed
