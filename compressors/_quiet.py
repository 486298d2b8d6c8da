"""Silencing what native code (HiGHS, torch.onnx's C++ passes) prints to standard output."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def native_stdout_silenced() -> Iterator[None]:
    """Point file descriptor 1 at /dev/null meanwhile, flushing Python's and C's buffers on both
    sides (where the C library can be loaded; elsewhere native output is left alone)."""
    try:
        flush = ctypes.CDLL(None).fflush
    except (OSError, AttributeError):
        yield
        return
    sys.stdout.flush()
    flush(None)
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        flush(None)
        os.dup2(saved, 1)
        os.close(saved)
