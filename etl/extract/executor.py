"""Where extraction work runs: local worker processes (joblib/loky) or a dask.distributed
cluster (through joblib's dask backend), behind one `Runner` that yields results as they
finish. Local workers are tied to the process that started them: each exits within
`PARENT_POLL_S` of that process's death, even by `kill -9` (loky would keep them for minutes,
still reading slides). Cluster workers belong to their cluster and are left alone.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ParamSpec, Protocol, TypeVar

import joblib

from etl.errors import OptionError

BACKENDS = ("loky", "dask")
T = TypeVar("T")
P = ParamSpec("P")
# A call as joblib.delayed makes it: (function, args, kwargs), run by a worker.
Call = tuple[Callable[..., T], tuple[Any, ...], dict[str, Any]]


class Runner(Protocol):
    """Runs calls on the workers, yielding their results as they finish (in any order)."""

    def __call__(self, calls: Sequence[Call[T]]) -> Iterator[T]: ...


def delayed(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Call[T]:
    """``joblib.delayed(function)(*args, **kwargs)``, with the arguments type-checked."""
    call: Call[T] = joblib.delayed(function)(*args, **kwargs)
    return call


@contextmanager
def executor(backend: str, workers: int, scheduler: str | None) -> Iterator[Runner]:
    """Yield a :class:`Runner` on local processes (loky) or on a dask.distributed cluster."""
    if backend == "loky":
        parallel = joblib.Parallel(n_jobs=workers, return_as="generator_unordered")
        yield _runner(parallel, parent=os.getpid())
        return
    if backend != "dask":
        raise OptionError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise OptionError(
            "--backend dask needs dask.distributed: pip install 'patchetl[dask]'"
        ) from None
    # dask's Client and LocalCluster are not annotated
    if scheduler:
        client = Client(scheduler)  # type: ignore[no-untyped-call, unused-ignore]
    else:
        cluster = LocalCluster(  # type: ignore[no-untyped-call, unused-ignore]
            n_workers=workers, threads_per_worker=1, processes=True
        )
        client = Client(cluster)  # type: ignore[no-untyped-call, unused-ignore]
    with client, joblib.parallel_config(backend="dask"):
        yield _runner(joblib.Parallel(n_jobs=-1, return_as="generator_unordered"), parent=None)


def _runner(parallel: joblib.Parallel, parent: int | None) -> Runner:
    """Run calls through `parallel`; with `parent` (loky), each in a worker tied to it."""

    def run(calls: Sequence[Call[T]]) -> Iterator[T]:
        if parent is not None:
            calls = [(watched, (parent, f, *args), kw) for f, args, kw in calls]
        results: Iterator[T] = parallel(calls)
        return results

    return run


def watched(parent: int, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`function(*args, **kwargs)` in a worker that exits once `parent` has died."""
    exit_with_parent(parent)
    return function(*args, **kwargs)


_WATCHED: set[int] = set()  # parents this process watches already
PARENT_POLL_S = 0.5


def exit_with_parent(parent: int) -> None:
    """End this worker process within `PARENT_POLL_S` of its parent's death.

    Loky keeps idle workers for minutes and does not notice a parent killed with SIGKILL; an
    orphaned worker would go on reading slides and holding memory. A daemon thread polls the
    parent pid (portable; prctl's PDEATHSIG follows the forking thread, not the process).
    Runs in the parent itself when joblib runs a call in-process (one worker): nothing then.
    """
    if os.getpid() == parent or parent in _WATCHED:
        return
    if os.getppid() != parent:  # died before this call started
        os._exit(1)
    _WATCHED.add(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
