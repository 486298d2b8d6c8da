"""A journal file (Optuna's `JournalFileBackend`) whose records are written whole or not at all.

Optuna appends each record as one JSON line. A process killed mid-write, or a write that fails
because the disk is full, leaves the last line cut; Optuna then raises ``JSONDecodeError`` on it
once another line follows, and the next append lands right after the cut, so the study is
unreadable from then on. `SafeJournalBackend` keeps the file whole:

- an append that fails (``OSError``, e.g. ``ENOSPC``) truncates the file back to where it was
  before re-raising, so the record is written whole or not at all;
- a cut last line (the file does not end with a newline: a writer died mid-write) is truncated
  away, with one warning, when the file is opened and before each append, always under Optuna's
  own journal lock (a writer that is still alive holds it while its line is incomplete).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file

logger = logging.getLogger(__name__)


def _append(fd: int, data: bytes) -> None:
    """Write all of ``data`` at the end of the open file ``fd`` and flush it to disk."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


class SafeJournalBackend(JournalFileBackend):
    """`JournalFileBackend` with whole-record appends and a cut last line repaired on open.

    Args:
        file_path: The journal file (created if missing).
    """

    def __init__(self, file_path: str) -> None:
        super().__init__(file_path)
        with get_lock_file(self._lock):
            self._repair()

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
        with get_lock_file(self._lock):
            self._repair()
            fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND)
            try:
                size = os.fstat(fd).st_size
                try:
                    _append(fd, data)
                except OSError:
                    os.ftruncate(fd, size)  # the record is written whole or not at all
                    raise
            finally:
                os.close(fd)

    def _repair(self) -> None:
        """Truncate a cut last line (call under the journal lock)."""
        with open(self._file_path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            end = size
            while end > 0:  # back to the last newline
                start = max(0, end - 65536)
                f.seek(start)
                block = f.read(end - start)
                cut = block.rfind(b"\n")
                if cut >= 0:
                    end = start + cut + 1
                    break
                end = start
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        logger.warning(
            "journal %s ended in a record cut mid-write (%d bytes); it was removed and the "
            "study continues from the records before it",
            self._file_path,
            size - end,
        )
