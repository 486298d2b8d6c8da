"""The threads that pack and load files (`compressors.packing`): one pool per thread count,
started once for the process and kept, rather than a pool per file (starting two threads took
a quarter to a third of a 10 M MLP's reload on a loaded machine: each new thread waits for a
core before the pool can hand it work)."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager

_PREFIX = "squeeze-packing"
_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}


def pool(workers: int) -> ThreadPoolExecutor | None:
    """The process's pool of ``workers`` threads (made on first use); None when called from
    one of these pools' own threads (a job that waited on its own pool could wait forever):
    then the caller works alone."""
    if threading.current_thread().name.startswith(_PREFIX):
        return None
    with _LOCK:
        found = _POOLS.get(workers)
        if found is None:
            found = ThreadPoolExecutor(workers, thread_name_prefix=f"{_PREFIX}-{workers}")
            _POOLS[workers] = found
        return found


@contextmanager
def settling(pending: deque) -> Iterator[deque]:
    """``pending`` (entries whose second item is a `Future` of a shared pool) for the caller's
    loop; however the loop ends (an error, or its consumer stopping early), the futures left
    in it that have not started are cancelled and the others waited for: no job outlives the
    call that queued it (a reload's threads writing into the model after it raised)."""
    try:
        yield pending
    finally:
        futures: list[Future] = [entry[1] for entry in pending]
        for future in futures:
            future.cancel()
        wait(futures)


def _forget() -> None:
    """After a fork, the child has none of its parent's threads: it starts its own pools."""
    global _LOCK
    _LOCK = threading.Lock()
    _POOLS.clear()


os.register_at_fork(after_in_child=_forget)
