"""The probability map of a slide, tile by tile, with tiles read ahead of the model.

Two modes give the same geometry (`training.infer.geometry`):

- `dense` (default): the fully convolutional model runs on large tiles (`tile_size` level px of
  map area plus `margin` px of context on every side); every output then sees the pixels it
  would see in a single pass over the whole slide: ResNet18's receptive field reaches 217 px
  beyond a patch (top/left; 186 px bottom/right), so the default margin of 224 px (7 features)
  makes tiled maps equal to a single pass, without seams.
- `patch`: the classic sliding window, each patch classified on its own (the reference).
  Patches are cut from the same tile reads, so both modes share the reading cost.

Tiles are read by a thread pool (one slide reader per thread: readers are not thread-safe) a
bounded number of tiles ahead of the model. Map pixels whose cell holds no tissue are 0 and
never reach the model.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from etl.wsi.reader import SlideReader
from training.config import MODES
from training.infer.geometry import MapGeometry, Tile, plan_tiles, tile_cells
from training.infer.predictor import Predictor
from training.infer.scaling import read_model_px


class _ThreadReaders:
    """One slide reader per reading thread (readers are not thread-safe)."""

    def __init__(self, open_reader: Callable[[], SlideReader]) -> None:
        self._open, self._local = open_reader, threading.local()
        self._all: list[SlideReader] = []
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


def _prefetched(
    items: Sequence[Tile], load: Callable[[Tile], np.ndarray], workers: int, ahead: int
) -> Generator[tuple[Tile, np.ndarray], None, None]:
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


def predict_map(
    open_reader: Callable[[], SlideReader],
    geometry: MapGeometry,
    cells: np.ndarray,
    predictor: Predictor,
    *,
    mode: str = "dense",
    tile_size: int = 2048,
    margin: int = 224,
    batch_size: int = 256,
    tiles_per_batch: int = 1,
    workers: int = 4,
    prefetch: int | None = None,
    on_tile: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The (rows, cols) float32 probability map; 0 where ``cells`` (tissue) is False.

    ``open_reader`` opens a slide reader (called once per reading thread).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {MODES}")
    s, p = geometry.stride_level, geometry.patch
    nr, nc = tile_cells(geometry, tile_size)
    ctx = margin if mode == "dense" else 0
    side_h, side_w = (nr - 1) * s + p + 2 * ctx, (nc - 1) * s + p + 2 * ctx
    tiles = plan_tiles(cells, (nr, nc))
    prob = np.zeros(geometry.shape, dtype=np.float32)
    readers = _ThreadReaders(open_reader)

    def load(tile: Tile) -> np.ndarray:
        lx, ly = geometry.patch_origin(tile.i0, tile.j0)
        return read_model_px(readers.get(), geometry, lx - ctx, ly - ctx, side_w, side_h)

    def put(tile: Tile, grid: np.ndarray) -> None:
        h, w = min(nr, geometry.rows - tile.i0), min(nc, geometry.cols - tile.j0)
        prob[tile.i0 : tile.i0 + h, tile.j0 : tile.j0 + w] = grid[:h, :w]

    stream = _prefetched(tiles, load, workers, prefetch or 2 * workers + tiles_per_batch)
    try:
        if mode == "dense":
            batch: list[tuple[Tile, np.ndarray]] = []
            for k, item in enumerate(stream, 1):
                batch.append(item)
                if len(batch) == tiles_per_batch or k == len(tiles):
                    grids = predictor.dense(np.stack([px for _, px in batch]), ctx)
                    for (tile, _), grid in zip(batch, grids, strict=True):
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


def _patch_pass(
    stream: Iterable[tuple[Tile, np.ndarray]],
    cells: np.ndarray,
    geometry: MapGeometry,
    predictor: Predictor,
    prob: np.ndarray,
    batch_size: int,
    on_tile: Callable[[int], None] | None,
) -> None:
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
        sub = cells[tile.i0 : tile.i0 + tile.rows, tile.j0 : tile.j0 + tile.cols]
        a, b = np.nonzero(sub)
        # (rows, cols, p, p, 3) view of every patch of the tile; only tissue ones are copied
        views = np.lib.stride_tricks.sliding_window_view(pixels, (p, p, 3))[::s, ::s, 0]
        lo = 0
        while lo < len(a):  # fill the batch up to batch_size, run it when full
            take = min(batch_size - queued, len(a) - lo)
            aa, bb = a[lo : lo + take], b[lo : lo + take]
            crops.append(views[aa, bb])
            where.append(np.column_stack([aa + tile.i0, bb + tile.j0]))
            queued += take
            lo += take
            if queued == batch_size:
                flush()
        if on_tile:
            on_tile(1)
    flush()
