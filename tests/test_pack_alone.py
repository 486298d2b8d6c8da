"""A job of the packing pools runs torch's ops on one thread (`compressors._threads.alone`), and
the count is set back after it; outside the pools' threads, `alone` changes nothing."""

from __future__ import annotations

import torch

from compressors import _threads


def _inside(threads: int) -> tuple[int, int]:
    """``(count during alone, count after)`` in the calling thread, whose count is first set to
    ``threads`` (and set back to its own at the end)."""
    own = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _threads.alone():
            during = torch.get_num_threads()
        return during, torch.get_num_threads()
    finally:
        torch.set_num_threads(own)


def test_a_pool_job_runs_torch_alone_and_the_count_comes_back():
    assert _threads.pool(2).submit(_inside, 2).result() == (1, 2)
    assert _threads.pool(2).submit(_inside, 1).result() == (1, 1)
    assert _inside(2) == (2, 2)  # (the calling thread: not one of the pools')
