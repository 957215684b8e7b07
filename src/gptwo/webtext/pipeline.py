"""Where a stage's tasks run: in this process, in local worker processes, or on a Ray cluster.

Every stage splits its work into independent tasks (one input file, one crawl partition) and
hands them to `CrawlPipeline.map`. Locally that is a process pool; for web scale the same tasks go to
Ray (`engine="ray"`), which runs them on every machine of a cluster or, without an address, on a
single-machine Ray instance it starts itself.
"""

from __future__ import annotations

import atexit
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from gptwo.errors import GptwoError

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class CrawlPipeline:
    """How the crawl stages run their tasks: `workers` parallel processes, with `kind` 'local' or 'ray'
    (the `--engine` option)."""

    kind: str = "local"
    workers: int = 1
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ENGINES:
            raise GptwoError(f"unknown engine {self.kind!r}", f"use one of {', '.join(ENGINES)}")
        if self.workers < 1:
            raise GptwoError(f"--workers must be at least 1 (got {self.workers})", "pass a positive number")

    def map(self, func: Callable[..., Any], tasks: Sequence[tuple]) -> Iterator[Any]:
        """Yield `func(*task)` for every task, in task order."""
        if not tasks:
            return iter(())
        if self.kind == "ray":
            return _ray_map(func, tasks, self.workers, self.ray_address)
        if self.workers == 1 or len(tasks) == 1:
            return (func(*task) for task in tasks)
        return _pool_map(func, tasks, self.workers)


_pools: dict[int, ProcessPoolExecutor] = {}


def _one_thread_per_worker() -> None:
    """Parallelism comes from the worker processes: numerical libraries get one thread each, so
    N workers don't start N x cores BLAS threads (Ray does the same for its workers)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _pool(workers: int) -> ProcessPoolExecutor:
    """A process pool kept for the life of this process, so the stages of a build share workers
    (and the models they loaded). spawn: workers start clean, whatever threads the parent holds."""
    if workers not in _pools:
        _pools[workers] = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread_per_worker
        )
        atexit.register(_pools[workers].shutdown, cancel_futures=True)
    return _pools[workers]


def _pool_map(func: Callable[..., Any], tasks: Sequence[tuple], workers: int) -> Iterator[Any]:
    futures = [_pool(workers).submit(func, *task) for task in tasks]
    try:
        for future in futures:
            yield future.result()
    except BrokenProcessPool:
        _pools.pop(workers).shutdown(cancel_futures=True)  # a worker died: start afresh next time
        raise
    finally:
        for future in futures:
            future.cancel()


def _ray_map(func: Callable[..., Any], tasks: Sequence[tuple], workers: int, address: str | None) -> Iterator[Any]:
    try:
        import ray
    except ImportError as err:
        raise GptwoError(
            "the Ray engine needs the 'ray' package", "pip install 'gptwo[webtext]' or pass --engine local"
        ) from err
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(func)
    refs = [remote.remote(*task) for task in tasks]
    for ref in refs:
        try:
            yield ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, GptwoError):  # a user error in a task: the task's own one line
                raise err.cause from None
            raise
