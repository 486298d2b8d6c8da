"""Ctrl-C that is never lost: the interrupt is recorded, and checked again at safe points.

Python runs a signal handler between two bytecodes of the main thread, wherever they are. When
that is inside a ``__del__``, a weakref finalizer or a garbage-collector callback, the
``KeyboardInterrupt`` the handler raises is printed as "Exception ignored in ..." and the
program goes on. So the handler `catch_interrupts` installs records the interrupt before it
raises, and `raise_if_interrupted` raises it again at the next safe point: between epochs,
before each trial, in the loop that follows worker processes, and when a command ends.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

#: The signal numbers received since `catch_interrupts` (or `note_interrupt`) was called.
_received: list[int] = []


def catch_interrupts() -> Callable[[], None]:
    """Make the first Ctrl-C (SIGINT) raise ``KeyboardInterrupt`` and record it (the running
    trial is recorded as interrupted, its MLflow run and the study's parent run end KILLED, and
    the command exits 130); a second one exits at once. Returns a function restoring the
    previous handler. Outside the main thread it changes nothing."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if _received:
            os._exit(130)  # the writer and worker processes end with this one (their PDEATHSIG)
        note_interrupt(signum)

    signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous)


def note_interrupt(signum: int) -> None:
    """Record an interrupt by signal ``signum`` and raise ``KeyboardInterrupt`` (a signal
    handler's body: a worker's SIGTERM handler calls it too)."""
    _received.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def interrupted() -> bool:
    """Whether an interrupt was received (and perhaps swallowed where it was raised)."""
    return bool(_received)


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if an interrupt was received: a safe point."""
    if _received:
        raise KeyboardInterrupt(f"signal {_received[0]}")
