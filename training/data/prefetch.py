"""Prepare the next batch while the model runs on this one (CUDA).

On a GPU the last steps of the data path run on the device: the transfer, nvJPEG decoding,
the grid crops and the augmentation. Issued from the training loop's own thread and stream,
they would queue behind the model's step and the host would wait for them before it can
queue the next step; so `prefetched` runs the batch iterator in a background thread, on a
CUDA stream of its own, up to `depth` batches ahead. The consumer's stream waits for a
batch's event (not the host), and every tensor of the batch is marked as used on the
consumer's stream, so the caching allocator does not hand its memory to the producer again
while the model may still read it.

Errors in the producer are raised in the consumer, and closing the consumer (end of the
epoch, an exception in the step) stops the producer and closes its iterator.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import nullcontext
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) dataclass, dict, list or tuple."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_in(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def prefetched(make: Callable[[], Iterator[T]], device: torch.device, depth: int = 2
               ) -> Generator[T, None, None]:
    """The items of `make()`, produced by a background thread up to `depth` ahead.

    On CUDA the producer runs on its own stream and each item is handed over with an event;
    elsewhere this is a plain background thread (used by the tests).
    """
    if depth < 1:
        raise ValueError(f"prefetch depth {depth}: use at least 1")
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = None
        try:
            with torch.cuda.stream(side) if cuda else nullcontext():
                it = make()
                for item in it:
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(side)
                    if not put((item, event)):
                        return
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failure(exc))
            return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        put(_END)

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            got = items.get()
            if got is _END:
                return
            if isinstance(got, _Failure):
                raise got.exc
            item, event = got
            if cuda:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in tensors_in(item):
                    if t.is_cuda:
                        t.record_stream(current)
            yield item
    finally:
        stop.set()
        thread.join()
